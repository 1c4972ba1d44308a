//! How a pager stops: shutdown, detach (every page installed, memory
//! unregistered, so the target runs on without it) and hand-over to
//! another pager.

use super::*;

/// What [`Pager::detach`] did.
#[derive(Debug, Clone)]
pub struct Detached {
    /// The final counters (as [`Pager::shutdown`] returns them).
    pub stats: Stats,
    /// Pages installed between the call and the end of the fill (by the
    /// drain's fill, and by demand faults served meanwhile).
    pub installed_pages: u64,
    /// Bytes unregistered, over every process served.
    pub unregistered_bytes: u64,
    /// Processes still alive and made independent of the pager (the
    /// target and any adopted fork children).
    pub processes: usize,
    /// Ranges left registered because their pages could not be installed;
    /// empty when the detach was complete.
    pub still_registered: Vec<RegisteredRange>,
    /// Pages poisoned because the source failed (during the detach or
    /// before); they raise SIGBUS when read, after the detach too.
    pub poisoned: Vec<PoisonedPage>,
}

impl Detached {
    /// True when no range stayed registered.
    pub fn is_complete(&self) -> bool {
        self.still_registered.is_empty()
    }

    pub(super) fn describe_incomplete(&self) -> String {
        let bytes: u64 = self.still_registered.iter().map(|r| r.len).sum();
        let first = self
            .still_registered
            .first()
            .map(|r| format!("; first {:#x}+{:#x}: {}", r.start, r.len, r.why))
            .unwrap_or_default();
        format!(
            "{} ranges ({bytes} bytes) stay registered with no handler{first}",
            self.still_registered.len()
        )
    }
}

/// A range [`Pager::detach`] left registered, in one process's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredRange {
    /// The pager's id of the process (0 = the target, then fork children).
    pub process: usize,
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why it stayed registered.
    pub why: StillRegistered,
}

/// Why [`Pager::detach`] left a range registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StillRegistered {
    /// The timeout passed before its pages were installed.
    #[error("not installed before the timeout")]
    Timeout,
    /// The fill finished but could not install these pages: the source
    /// failed and UFFDIO_POISON was not possible either (see
    /// [`Pager::poisoned`] and the logs). Unregistering would have handed
    /// the process zero pages where snapshot data belongs.
    #[error("the source could not produce the pages and they could not be poisoned")]
    NotInstalled,
    /// UFFDIO_UNREGISTER failed.
    #[error("UFFDIO_UNREGISTER failed: {0}")]
    UnregisterFailed(String),
}

/// What [`Pager::hand_over`] gives back for another pager to carry on.
#[derive(Debug)]
pub struct HandedOver {
    /// The target's userfaultfd (a copy).
    pub uffd: Uffd,
    /// The target's pidfd, when the pager watched one (a copy).
    pub pidfd: Option<OwnedFd>,
    /// What the pager knew about the target's memory.
    pub state: PagerState,
}

impl Pager {
    /// Makes every process this pager serves independent of it, then shuts
    /// down: the drain before a page server exits while its VMs run on.
    ///
    /// Closing the pager's userfaultfd is not enough when the target keeps
    /// its own copy (Firecracker does): the ranges stay registered, and the
    /// target's next fault on a missing page would wait forever for a
    /// handler. So, for the target and every adopted fork child still
    /// alive:
    /// 1. every page not yet present is installed, by the same fill as
    ///    [`PagerBuilder::background_fill`], while the handler threads keep
    ///    serving demand faults (pages removed by a balloon stay
    ///    unpopulated: they read as zero with or without a handler);
    /// 2. every range whose pages are all settled (installed, removed, or
    ///    poisoned) is unregistered with `UFFDIO_UNREGISTER`, which wakes
    ///    any thread waiting on a fault there; it faults again and finds the
    ///    page present;
    /// 3. the threads stop and are joined as in [`Pager::shutdown`].
    ///
    /// Poisoned pages stay poisoned: `UFFDIO_UNREGISTER` keeps the PTE's
    /// poison marker (Linux 6.18, checked by this crate's tests), so reading
    /// such a page raises SIGBUS after the detach too, never a zero page.
    ///
    /// Pages that could not be installed — the fill did not finish within
    /// `timeout`, or the source failed and POISON was not possible — are
    /// **not** unregistered (the process would read zero pages where
    /// snapshot data belongs): the result is
    /// [`PagerError::DetachIncomplete`] listing those ranges, and the pager
    /// is shut down anyway, as [`Pager::shutdown`] would. A source read still
    /// blocked at the deadline is left to finish on its own thread.
    pub fn detach(self, timeout: Duration) -> Result<Detached, PagerError> {
        let deadline = Instant::now() + timeout;
        let installed_before = self.shared.installed_pages.load(Ordering::Relaxed);
        let live: Vec<Arc<Target>> = lock(&self.shared.targets)
            .iter()
            .filter(|t| !t.gone.load(Ordering::SeqCst))
            .cloned()
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut fills = Vec::with_capacity(live.len());
        for target in &live {
            let (s, t, tx) = (Arc::clone(&self.shared), Arc::clone(target), tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-detach-{}", self.shared.config.name, target.id))
                .spawn(move || {
                    let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        settle(&s, &t, deadline)
                    }))
                    .unwrap_or_else(|panic| {
                        error!(panic = panic_message(&*panic), "the detach fill panicked");
                        Settled::Incomplete
                    });
                    let _ = tx.send((t.id, end));
                });
            match spawned {
                Ok(handle) => fills.push(handle),
                Err(e) => {
                    error!(error = %e, target = target.id, "cannot start the detach fill; its missing pages stay registered");
                }
            }
        }
        drop(tx);
        let mut ends: Vec<(usize, Settled)> = Vec::with_capacity(live.len());
        while ends.len() < fills.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(end) => ends.push(end),
                Err(_) => break,
            }
        }
        for handle in fills {
            // Joined only when done: one stuck in a source read finishes
            // (and exits) on its own.
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        let installed_pages = self
            .shared
            .installed_pages
            .load(Ordering::Relaxed)
            .saturating_sub(installed_before);
        let mut still_registered = Vec::new();
        let mut unregistered_bytes = 0;
        let mut processes = 0;
        for target in &live {
            let end = ends
                .iter()
                .find(|(id, _)| *id == target.id)
                .map_or(Settled::TimedOut, |(_, end)| *end);
            if end == Settled::Gone || target.gone.load(Ordering::SeqCst) {
                continue;
            }
            processes += 1;
            let why = match end {
                Settled::TimedOut => StillRegistered::Timeout,
                _ => StillRegistered::NotInstalled,
            };
            unregistered_bytes += unregister_settled(target, why, &mut still_registered);
        }
        self.stop_and_join();
        let detached = Detached {
            stats: self.stats(),
            installed_pages,
            unregistered_bytes,
            processes,
            still_registered,
            poisoned: self.poisoned(),
        };
        if detached.is_complete() {
            info!(
                pager = %self.shared.config.name,
                processes,
                installed_pages,
                unregistered_bytes,
                "detached: every page installed and unregistered"
            );
            Ok(detached)
        } else {
            for r in &detached.still_registered {
                error!(
                    pager = %self.shared.config.name,
                    process = r.process,
                    start = format_args!("{:#x}", r.start),
                    len = r.len,
                    why = %r.why,
                    "range stays registered with no handler: a fault there will wait"
                );
            }
            Err(PagerError::DetachIncomplete(Box::new(detached)))
        }
    }

    /// Stops serving without leaving the target without a handler: the
    /// threads stop, every waiting fault is woken (it faults again and
    /// waits in the kernel's queue), and the target's userfaultfd comes back
    /// with the state a [`PagerBuilder::resume`] needs, to carry on here or
    /// in another process. Nothing is unregistered or installed.
    ///
    /// Only the target the pager was started with is handed over; forked
    /// children it adopted are shut down as by [`Pager::shutdown`].
    pub fn hand_over(self) -> Result<HandedOver, PagerError> {
        let target = lock(&self.shared.targets)
            .first()
            .cloned()
            .ok_or(PagerError::Config(ConfigError::NoTarget))?;
        let fd = rustix::io::fcntl_dupfd_cloexec(&target.uffd, 0)
            .map_err(|e| io_err("duplicating the userfaultfd")(e.into()))?;
        let uffd = Uffd::from_fd(fd, target.uffd.features())?;
        let pidfd = match &self.shared.pidfd {
            Some(fd) => Some(
                rustix::io::fcntl_dupfd_cloexec(fd, 0)
                    .map_err(|e| io_err("duplicating the target's pidfd")(e.into()))?,
            ),
            None => None,
        };
        self.stop_and_join();
        let table = read(&target.table);
        let spans = table
            .spans
            .iter()
            .map(|span| {
                let region = Region::new(span.start, span.len, span.offset, span.page_size);
                SpanState::capture(region, &span.states, span.first)
            })
            .collect();
        let state = PagerState {
            spans,
            recorded: lock(&self.shared.recorded).clone(),
        };
        info!(
            pager = %self.shared.config.name,
            present = state.count(PageKind::Present),
            removed = state.count(PageKind::Removed),
            "handed over"
        );
        Ok(HandedOver { uffd, pidfd, state })
    }

    pub(super) fn stop_and_join(&self) {
        self.shutdown_handle().request();
        // An answer being installed where it arrived finishes first; later
        // ones see the stop and are left to the handlers, which stop.
        drop(lock(&self.shared.answer_worker));
        loop {
            let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
        let targets: Vec<_> = lock(&self.shared.targets).drain(..).collect();
        for target in targets {
            if target.gone.load(Ordering::SeqCst) {
                continue;
            }
            let table = read(&target.table);
            for span in &table.spans {
                if let Err(e) = target.uffd.wake(span.start, span.len) {
                    debug!(error = %e, "wake at shutdown");
                }
            }
        }
        *lock(&self.shared.fill_done) = true;
        self.shared.fill_cv.notify_all();
        self.shared.live_cv.notify_all();
    }
}

/// How the detach fill of one process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// No page is missing any more.
    Complete,
    /// Every page was tried; some could not be installed.
    Incomplete,
    /// The deadline passed first.
    TimedOut,
    /// The process is gone.
    Gone,
}

/// Fills `target` until no page is missing, the fill makes no progress
/// (pages the source cannot produce) or `deadline` passes.
pub(super) fn settle(shared: &Arc<Shared>, target: &Target, deadline: Instant) -> Settled {
    let _span = debug_span!("detach", pager = %shared.config.name, target = target.id).entered();
    let mut worker = match Worker::new(shared) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "detach fill cannot allocate its buffers");
            return Settled::Incomplete;
        }
    };
    let mut last_missing = usize::MAX;
    loop {
        if fill_missing(&mut worker, shared, target, Some(deadline)) == FillEnd::Gone {
            shared.mark_gone(target);
            return Settled::Gone;
        }
        let (missing, in_flight) = unsettled_pages(target);
        if missing + in_flight == 0 {
            return Settled::Complete;
        }
        if Instant::now() >= deadline {
            return Settled::TimedOut;
        }
        if in_flight == 0 && missing >= last_missing {
            return Settled::Incomplete;
        }
        last_missing = missing;
        if in_flight > 0 {
            // A handler is installing them; look again shortly.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A page whose content the target does not have yet, and which would
/// read wrong (zero) without a handler.
pub(super) fn unsettled(s: u8) -> bool {
    matches!(s, state::MISSING | state::CLAIMED | state::CLAIMED_BG)
}

/// Missing pages, and pages a thread is installing right now.
pub(super) fn unsettled_pages(target: &Target) -> (usize, usize) {
    let table = read(&target.table);
    let (mut missing, mut in_flight) = (0, 0);
    for span in &table.spans {
        for i in span.first..span.index_end() {
            match span.states.get(i) {
                state::MISSING => missing += 1,
                state::CLAIMED | state::CLAIMED_BG => in_flight += 1,
                _ => {}
            }
        }
    }
    (missing, in_flight)
}

/// Unregisters every run of settled pages of `target`; runs of unsettled
/// pages (and runs whose UNREGISTER failed) go to `kept` with `why`.
/// Returns the bytes unregistered. Holds the table's read lock so no event
/// reshapes the table meanwhile.
pub(super) fn unregister_settled(
    target: &Target,
    why: StillRegistered,
    kept: &mut Vec<RegisteredRange>,
) -> u64 {
    let table = read(&target.table);
    let mut unregistered = 0;
    let mut keep = |start: u64, len: u64, why: StillRegistered| match kept.last_mut() {
        Some(last)
            if last.process == target.id && last.start + last.len == start && last.why == why =>
        {
            last.len += len;
        }
        _ => kept.push(RegisteredRange {
            process: target.id,
            start,
            len,
            why,
        }),
    };
    for span in &table.spans {
        let mut i = span.first;
        while i < span.index_end() {
            let settled = !unsettled(span.states.get(i));
            let mut end = i + 1;
            while end < span.index_end() && unsettled(span.states.get(end)) != settled {
                end += 1;
            }
            let (start, len) = (span.addr_of(i), (end - i) as u64 * span.page_size);
            if !settled {
                keep(start, len, why.clone());
            } else {
                match target.uffd.unregister(start, len) {
                    Ok(()) => unregistered += len,
                    Err(e) if e.errno() == Some(rustix::io::Errno::SRCH) => return unregistered,
                    Err(e) => keep(start, len, StillRegistered::UnregisterFailed(e.to_string())),
                }
            }
            i = end;
        }
    }
    unregistered
}
