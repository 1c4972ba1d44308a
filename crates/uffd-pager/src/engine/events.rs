//! Handler threads: waiting, reading messages in batches, applying
//! non-cooperative events, and handing page faults to [`super::Worker`].

use super::*;

/// Most handler threads [`crate::PagerBuilder::handler_per_cpu`] starts:
/// each fault wakes every one of them.
pub const MAX_HANDLERS_PER_CPU: usize = 8;

pub(super) fn spawn_handlers(shared: &Arc<Shared>, target: &Arc<Target>) -> Result<(), PagerError> {
    let cpus: Vec<Option<usize>> = if shared.config.handler_per_cpu {
        let allowed = rustix::thread::sched_getaffinity(None)
            .map_err(|e| io_err("reading this process's CPU affinity")(e.into()))?;
        (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .take(MAX_HANDLERS_PER_CPU)
            .map(Some)
            .collect()
    } else {
        vec![None; shared.config.threads]
    };
    for (n, cpu) in cpus.into_iter().enumerate() {
        let s = Arc::clone(shared);
        let t = Arc::clone(target);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{}-{n}", shared.config.name, target.id))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let mut set = rustix::thread::CpuSet::new();
                    set.set(cpu);
                    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                        warn!(cpu, error = %e, "cannot pin a handler thread; it runs unpinned");
                    }
                }
                handle_faults_surviving_panics(&s, &t)
            })
            .map_err(io_err("spawning a handler thread"))?;
        lock(&shared.threads).push(handle);
    }
    Ok(())
}

/// Runs a handler thread; a panic in it (a source or the engine failing
/// unforeseen) is logged and counted, the pages it held are poisoned by
/// their [`ClaimGuard`], and the handler starts again after a pause that
/// grows while panics repeat: the target never loses its handler.
pub(super) fn handle_faults_surviving_panics(shared: &Arc<Shared>, target: &Arc<Target>) {
    let mut pause = Duration::from_millis(1);
    loop {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler_main(shared, target)
        }));
        let Err(panic) = run else { return };
        shared
            .counters
            .handler_panics
            .fetch_add(1, Ordering::Relaxed);
        error!(
            pager = %shared.config.name,
            target = target.id,
            panic = panic_message(&*panic),
            "a handler thread panicked; it starts again"
        );
        if shared.stopping() || target.gone.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

pub(super) fn handler_main(shared: &Arc<Shared>, target: &Arc<Target>) {
    let _span = debug_span!("handler", pager = %shared.config.name, target = target.id).entered();
    let mut worker = match Worker::new(shared) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "handler cannot allocate its buffers");
            shared.mark_gone(target);
            return;
        }
    };
    let pidfd = shared.pidfd.as_ref().filter(|_| target.watch_pid);
    // Per-CPU handlers are all woken by a fault (the first to read it
    // serves it); otherwise one is.
    let exclusive = !shared.config.handler_per_cpu;
    let waiter = match Waiter::new(
        &target.uffd,
        &*shared.stop,
        &shared.completion_fd,
        pidfd,
        exclusive,
    ) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "handler cannot set up its epoll set");
            shared.mark_gone(target);
            return;
        }
    };
    let mut events = EventBuffer::new(128);
    let mut faults: Vec<(Pagefault, Instant)> = Vec::with_capacity(128);
    let mut deferred: Vec<(Pagefault, Instant)> = Vec::new();
    let mut spin = match shared.config.wait {
        _ if shared.config.handler_per_cpu => SpinPolicy::block(),
        WaitMode::Block => SpinPolicy::block(),
        WaitMode::Spin(budget) => SpinPolicy::fixed(budget),
        WaitMode::Adaptive(budget) => SpinPolicy::adaptive(budget),
    };
    // While spinning, the handler reads the non-blocking userfaultfd again
    // at once (no epoll_wait before it), so a fault costs one read and its
    // resolving ioctl, and the handler is never woken.
    let mut spinning = false;
    let _awake = AwakeCount::awake(shared);
    while !shared.stopping() && !target.gone.load(Ordering::Relaxed) {
        if deferred.is_empty() && !spinning {
            let woken = {
                let _asleep = AwakeCount::asleep(shared);
                wait_for_messages(shared, target, &waiter)
            };
            if !woken {
                continue;
            }
        }
        let read = match drain(shared, target, &mut events, &mut faults) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "reading userfaultfd messages failed; no longer serving it");
                shared.mark_gone(target);
                break;
            }
        };
        let completed = shared.take_completions();
        let had_completions = !completed.is_empty();
        for done in completed {
            worker.finish_fetch(done);
        }
        if read == 0 && deferred.is_empty() {
            if !had_completions {
                spinning = spin.keep_spinning();
                if spinning {
                    std::hint::spin_loop();
                }
            }
            continue;
        }
        spin.busy();
        spinning = spin.spins();
        if !deferred.is_empty() {
            if read == 0 {
                // The pending event is being applied by another thread, or
                // the page is being written by the fill thread.
                std::thread::yield_now();
            }
            faults.splice(0..0, deferred.drain(..));
        }
        if faults.is_empty() {
            continue;
        }
        for (fault, started) in faults.drain(..) {
            if shared.stopping() {
                // Shutdown wakes every region; the rest fault again.
                break;
            }
            match worker.serve(target, fault, started) {
                Step::Done | Step::Abandoned => {}
                Step::Defer => deferred.push((fault, started)),
                Step::Gone => {
                    shared.mark_gone(target);
                    break;
                }
            }
        }
    }
}

/// A change to the count of awake handler threads (not sleeping on their
/// epoll set), undone when dropped, panics included: +1 for as long as a
/// handler thread lives, −1 while it sleeps.
struct AwakeCount<'a> {
    shared: &'a Shared,
    awake: bool,
}

impl<'a> AwakeCount<'a> {
    fn awake(shared: &'a Shared) -> AwakeCount<'a> {
        shared.handlers_awake.fetch_add(1, Ordering::SeqCst);
        AwakeCount {
            shared,
            awake: true,
        }
    }

    fn asleep(shared: &'a Shared) -> AwakeCount<'a> {
        shared.handlers_awake.fetch_sub(1, Ordering::SeqCst);
        AwakeCount {
            shared,
            awake: false,
        }
    }
}

impl Drop for AwakeCount<'_> {
    fn drop(&mut self) {
        let count = &self.shared.handlers_awake;
        if self.awake {
            count.fetch_sub(1, Ordering::SeqCst);
        } else {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Sleeps until messages may be readable or asynchronous reads finished;
/// false when stopping, gone or nothing happened within a second.
pub(super) fn wait_for_messages(shared: &Shared, target: &Target, waiter: &Waiter) -> bool {
    let woken = match waiter.wait(Duration::from_secs(1)) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "epoll_wait failed");
            shared.mark_gone(target);
            return false;
        }
    };
    if woken.target_gone {
        shared.mark_gone(target);
        return false;
    }
    if woken.broken {
        warn!(
            target = target.id,
            "userfaultfd reports an error; no longer serving it"
        );
        shared.mark_gone(target);
        return false;
    }
    if woken.completions {
        // Reset the eventfd here, where it woke us: a completion queued
        // after this read writes it again.
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&shared.completion_fd, &mut count);
    }
    woken.messages || woken.completions
}

/// Reads messages under the table's write lock and applies the
/// non-cooperative ones at once; page faults go to `faults`.
pub(super) fn drain(
    shared: &Arc<Shared>,
    target: &Arc<Target>,
    events: &mut EventBuffer,
    faults: &mut Vec<(Pagefault, Instant)>,
) -> Result<usize, uffd::Error> {
    let mut table = write(&target.table);
    let mut total = 0;
    loop {
        let batch = target.uffd.read_events(events)?;
        let n = batch.len();
        if n == 0 {
            break;
        }
        total += n;
        shared.counters.reads.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        for event in batch.drain(..) {
            apply_event(shared, target, &mut table, event, now, faults);
        }
        if n < events.capacity() {
            break;
        }
    }
    Ok(total)
}

pub(super) fn apply_event(
    shared: &Arc<Shared>,
    target: &Arc<Target>,
    table: &mut Table,
    event: Event,
    now: Instant,
    faults: &mut Vec<(Pagefault, Instant)>,
) {
    let c = &shared.counters;
    match event {
        Event::Pagefault(fault) => {
            let counter = match fault.kind() {
                uffd::FaultKind::Missing => &c.faults_missing,
                uffd::FaultKind::Minor => &c.faults_minor,
                uffd::FaultKind::WriteProtect => &c.faults_wp,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            trace!(address = fault.address, kind = ?fault.kind(), "fault");
            faults.push((fault, now));
        }
        Event::Remove { start, end } => {
            c.events_remove.fetch_add(1, Ordering::Relaxed);
            debug!(start, end, "REMOVE: pages read as zero from now on");
            if shared.resolver().remove_makes_missing() {
                table.set_range(start, end, state::REMOVED);
            }
        }
        Event::Unmap { start, end } => {
            c.events_unmap.fetch_add(1, Ordering::Relaxed);
            debug!(start, end, "UNMAP: no longer serving the range");
            let _ = table.cut(start, end);
        }
        Event::Remap { from, to, len } => {
            c.events_remap.fetch_add(1, Ordering::Relaxed);
            debug!(from, to, len, "REMAP: translating addresses");
            table.remap(from, to, len);
        }
        Event::Unknown { code } => {
            c.events_unknown.fetch_add(1, Ordering::Relaxed);
            warn!(
                code = format_args!("{code:#x}"),
                "a userfaultfd message of a type this version does not know; ignored"
            );
        }
        Event::Fork { uffd } => {
            c.events_fork.fetch_add(1, Ordering::Relaxed);
            debug!(
                parent = target.id,
                "FORK: serving the child's userfaultfd too"
            );
            if shared.stopping() {
                return;
            }
            if let Err(e) = rustix::fs::fcntl_setfl(&uffd, rustix::fs::OFlags::NONBLOCK) {
                error!(error = %e, "cannot make the child's userfaultfd non-blocking");
                return;
            }
            let child = shared.add_target(uffd, table.for_child(), false);
            if let Err(e) = spawn_handlers(shared, &child) {
                error!(error = %e, "cannot serve the forked child");
                shared.mark_gone(&child);
            }
        }
    }
}
