//! The stress bounce of the kernel's `uffd-stress`.
//!
//! Two areas of pages, each page holding a lock word (offset 0) and a
//! counter (offset 8). Per CPU, each bounce runs a locking thread (takes
//! the lock inside a page of dst, checks the counter against an
//! out-of-band copy, bumps both), a fault handler (COPY from the same
//! offset of src for MISSING faults, unprotect for WP faults) and a
//! background thread (COPY half its slice, write-protect the slice, COPY
//! the rest; EEXIST is fine but woken). The bounce number selects the
//! modes: random page order, racing on the same pages, verification of
//! every counter at the end, and poll versus blocking reads. Then the areas
//! swap, so the data moves back. Any counter mismatch is corruption.
//!
//! Every thread is bounded: a locking thread still asleep on a fault after
//! [`STUCK_AFTER`] FAILs the run, naming its page; blocking readers are
//! shut down by faults on sentinel pages they recognise.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{
    Event, EventBuffer, FaultKind, Features, Mapping, MemoryKind, Outcome, RegisterMode, Uffd,
    WriteProtectMode, ZeropageMode,
};

use crate::harness::{
    copy_page, parallelism, peek, poke, release, serve, set_nonblocking, unprotect, Env, Next, Rng,
    Stop, Stopper, COUNT_OFFSET, STUCK_AFTER,
};

/// Random page order in the locking threads.
pub const BOUNCE_RANDOM: u32 = 1;
/// All locking threads walk the same pages.
pub const BOUNCE_RACINGFAULTS: u32 = 2;
/// Check every counter after the bounce.
pub const BOUNCE_VERIFY: u32 = 4;
/// Handlers poll a non-blocking userfaultfd (else: blocking reads).
pub const BOUNCE_POLL: u32 = 8;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct StressOptions {
    /// Memory type.
    pub kind: MemoryKind,
    /// Pages per area (a multiple of the thread count).
    pub pages: usize,
    /// Number of bounces.
    pub bounces: u32,
    /// Seeds the random page order.
    pub seed: u64,
    /// Add a thread per CPU that write-protects and unprotects (without
    /// waking) random chunks of dst all the time, so that COPY, WP faults
    /// and EEXIST race (the wake-after-copy-failure case).
    pub toggle_wp: bool,
    /// Only bounce modes with racing faults.
    pub racing_only: bool,
    /// Print a line per bounce on stderr.
    pub progress: bool,
    /// A deliberately broken handler that answers MISSING faults with
    /// zero pages instead of the source's contents: the run must then
    /// report corruption (the negative control of the checker).
    #[doc(hidden)]
    pub sabotage_zero_fill: bool,
}

impl StressOptions {
    /// The default bounce of `env`'s memory type.
    pub fn for_env(env: &Env) -> StressOptions {
        StressOptions {
            kind: env.kind,
            pages: env.stress.pages(env.kind),
            bounces: env.stress.bounces,
            seed: env.seed,
            toggle_wp: false,
            racing_only: false,
            progress: env.stress.progress,
            sabotage_zero_fill: false,
        }
    }
}

/// What a stress run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct StressReport {
    /// Bounces completed.
    pub bounces: u32,
    /// MISSING faults resolved by handlers.
    pub missing: u64,
    /// WP faults resolved.
    pub wp: u64,
    /// COPYs (by handlers or background threads) that met EEXIST and were
    /// followed by a wake.
    pub eexist: u64,
    /// Pages the background threads installed.
    pub background: u64,
    /// Whether write-protection was exercised.
    pub wp_enabled: bool,
    /// MISSING faults reported for a write although the thread had read
    /// the page first (seen only on MAP_PRIVATE memfd mappings, where they
    /// are tolerated and counted).
    pub write_missing: u64,
}

struct Shared {
    uffd: Uffd,
    a: Mapping,
    b: Mapping,
    sentinel: Mapping,
    verify: Vec<AtomicU64>,
    ps: u64,
    pages: u64,
    per_cpu: u64,
    wp: bool,
    kind: MemoryKind,
    sabotage: bool,
    error: Mutex<Option<String>>,
    abort: AtomicBool,
    missing: AtomicU64,
    wp_faults: AtomicU64,
    eexist: AtomicU64,
    background: AtomicU64,
    write_missing: AtomicU64,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        e.get_or_insert(msg);
        self.abort.store(true, Ordering::SeqCst);
    }
}

/// One bounce's addresses and modes, copied into every thread.
#[derive(Clone, Copy)]
struct Bounce {
    src: u64,
    dst: u64,
    dst_alias: Option<u64>,
    mode: u32,
    number: u32,
}

struct BounceState {
    finished: AtomicBool,
    retry_alias: AtomicBool,
    slow_background: bool,
    stop: Stopper,
    /// Per locking thread: the page it is touching (0 when idle).
    at: Vec<AtomicU64>,
}

/// Runs the stress test; `Ok` when every bounce ran without corruption
/// and without a stuck thread.
pub fn run(opts: &StressOptions) -> Result<StressReport, Stop> {
    let kind = opts.kind;
    let env = Env {
        kind,
        seed: opts.seed,
        mib: None,
        stress: Default::default(),
    };
    let mut features = kind.missing_feature();
    let supported = match uffd::probe() {
        Ok(info) => info.features,
        Err(e) if e.is_denied() => {
            return Err(Stop::Skip(format!("userfaultfd is not permitted: {e}")))
        }
        Err(e) => return Err(Stop::Fail(e.to_string())),
    };
    let wp = supported.contains(kind.wp_features());
    if wp {
        features |= kind.wp_features();
        if kind == MemoryKind::Anon && supported.contains(Features::WP_UNPOPULATED) {
            features |= Features::WP_UNPOPULATED;
        }
    }
    if opts.toggle_wp && !wp {
        return Err(Stop::Skip(format!(
            "the kernel lacks UFFD_FEATURE_{}",
            kind.wp_features()
        )));
    }
    let threads = parallelism();
    let per_cpu = (opts.pages / threads).max(2) as u64;
    let pages = per_cpu * threads as u64;
    let ps = kind.page_size() as u64;
    let uffd = env.open(features)?;
    let a = env.map((pages * ps) as usize)?;
    let b = env.map((pages * ps) as usize)?;
    let sentinel = Mapping::new(MemoryKind::Anon, 4096 * threads)?;
    uffd.register(
        sentinel.addr(),
        sentinel.len() as u64,
        RegisterMode::MISSING,
    )?;
    for nr in 0..pages {
        let page = a.addr() + nr * ps;
        // SAFETY: area a is ours and not registered yet.
        unsafe {
            poke(page, 0);
            poke(page + COUNT_OFFSET as u64, 1);
            poke(page + 2 * COUNT_OFFSET as u64, 1);
        }
    }
    release(&b)?;
    let shared = Arc::new(Shared {
        uffd,
        a,
        b,
        sentinel,
        verify: (0..pages).map(|_| AtomicU64::new(1)).collect(),
        ps,
        pages,
        per_cpu,
        wp,
        kind,
        sabotage: opts.sabotage_zero_fill,
        error: Mutex::new(None),
        abort: AtomicBool::new(false),
        missing: AtomicU64::new(0),
        wp_faults: AtomicU64::new(0),
        eexist: AtomicU64::new(0),
        background: AtomicU64::new(0),
        write_missing: AtomicU64::new(0),
    });
    let mut report = StressReport {
        wp_enabled: wp,
        ..Default::default()
    };
    let mut remaining = opts.bounces;
    let mut number = 0;
    while remaining > 0 {
        remaining -= 1;
        let mut mode = remaining % 16;
        if opts.racing_only {
            mode |= BOUNCE_RACINGFAULTS;
        }
        let (src, dst) = if number % 2 == 0 {
            (&shared.a, &shared.b)
        } else {
            (&shared.b, &shared.a)
        };
        let bounce = Bounce {
            src: src.addr(),
            dst: dst.addr(),
            dst_alias: if kind.is_shared() {
                dst.alias_ptr().map(|p| p as u64)
            } else {
                None
            },
            mode,
            number,
        };
        let started = Instant::now();
        one_bounce(&shared, bounce, opts, threads, dst)?;
        report.bounces += 1;
        if opts.progress {
            eprintln!(
                "bounce {}/{}: {}{}{}{} {:?}: missing {} wp {} eexist {}",
                number + 1,
                opts.bounces,
                if mode & BOUNCE_RANDOM != 0 {
                    "rnd "
                } else {
                    ""
                },
                if mode & BOUNCE_RACINGFAULTS != 0 {
                    "racing "
                } else {
                    ""
                },
                if mode & BOUNCE_VERIFY != 0 {
                    "ver "
                } else {
                    ""
                },
                if mode & BOUNCE_POLL != 0 {
                    "poll"
                } else {
                    "read"
                },
                started.elapsed(),
                shared.missing.load(Ordering::Relaxed),
                shared.wp_faults.load(Ordering::Relaxed),
                shared.eexist.load(Ordering::Relaxed),
            );
        }
        number += 1;
    }
    report.missing = shared.missing.load(Ordering::Relaxed);
    report.wp = shared.wp_faults.load(Ordering::Relaxed);
    report.eexist = shared.eexist.load(Ordering::Relaxed);
    report.background = shared.background.load(Ordering::Relaxed);
    report.write_missing = shared.write_missing.load(Ordering::Relaxed);
    Ok(report)
}

fn one_bounce(
    shared: &Arc<Shared>,
    bounce: Bounce,
    opts: &StressOptions,
    threads: usize,
    dst_mapping: &Mapping,
) -> Result<(), Stop> {
    let s = shared;
    let len = s.pages * s.ps;
    let poll = bounce.mode & BOUNCE_POLL != 0;
    set_nonblocking(&s.uffd, poll)?;
    let reg = if s.wp {
        RegisterMode::MISSING | RegisterMode::WP
    } else {
        RegisterMode::MISSING
    };
    // A racing COPY of the previous bounce may have refilled the zapped
    // source, which is now dst: empty it again.
    release(dst_mapping)?;
    s.uffd.register(bounce.dst, len, reg)?;
    if let Some(alias) = bounce.dst_alias {
        s.uffd.register(alias, len, reg)?;
    }
    let state = Arc::new(BounceState {
        finished: AtomicBool::new(false),
        retry_alias: AtomicBool::new(bounce.dst_alias.is_some()),
        slow_background: opts.toggle_wp,
        stop: Stopper::new(),
        at: (0..threads).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut lockers = Vec::new();
    let mut handlers = Vec::new();
    let mut backgrounds = Vec::new();
    for cpu in 0..threads {
        let (sh, st) = (Arc::clone(s), Arc::clone(&state));
        lockers.push(std::thread::spawn(move || {
            locking_thread(&sh, &st, bounce, cpu, opts_seed(bounce, cpu))
        }));
        let (sh, st) = (Arc::clone(s), Arc::clone(&state));
        handlers.push(std::thread::spawn(move || {
            handler_thread(&sh, &st, bounce, poll)
        }));
        let (sh, st) = (Arc::clone(s), Arc::clone(&state));
        backgrounds.push(std::thread::spawn(move || {
            background_thread(&sh, &st, bounce, cpu)
        }));
    }
    let mut togglers = Vec::new();
    if opts.toggle_wp && s.wp {
        for cpu in 0..threads {
            let (sh, st) = (Arc::clone(s), Arc::clone(&state));
            let seed = opts_seed(bounce, cpu) ^ 0x7067;
            togglers.push(std::thread::spawn(move || {
                toggler_thread(&sh, &st, bounce, seed)
            }));
        }
    }
    let deadline = Instant::now() + STUCK_AFTER;
    if !wait_all(&mut backgrounds, deadline) {
        s.fail("a background COPY thread did not finish".into());
    }
    // Everything is transferred: zap src. Handlers still resolving old
    // faults COPY zeros from it but meet EEXIST, so nothing reaches dst.
    let src_mapping = if std::ptr::eq(dst_mapping, &s.a) {
        &s.b
    } else {
        &s.a
    };
    release(src_mapping)?;
    state.finished.store(true, Ordering::SeqCst);
    let mut stuck = None;
    if !wait_all(&mut togglers, Instant::now() + STUCK_AFTER) {
        s.fail("a write-protect toggling thread did not finish".into());
    }
    if !wait_all(&mut lockers, Instant::now() + STUCK_AFTER) {
        let asleep: Vec<String> = state
            .at
            .iter()
            .enumerate()
            .filter(|(i, _)| !lockers[*i].is_finished())
            .map(|(i, at)| {
                let addr = at.load(Ordering::Relaxed);
                format!(
                    "locking thread {i} at page {} ({addr:#x})",
                    (addr.saturating_sub(bounce.dst)) / s.ps
                )
            })
            .collect();
        stuck = Some(format!(
            "bounce {}: faulting threads still asleep after {}s: {}",
            bounce.number,
            STUCK_AFTER.as_secs(),
            asleep.join(", ")
        ));
        // Release them so the run can go on.
        let _ = s.uffd.unregister(bounce.dst, len);
        let _ = wait_all(&mut lockers, Instant::now() + Duration::from_secs(2));
    }
    stop_handlers(s, &state, poll, handlers, threads);
    if let Some(msg) = stuck {
        s.fail(msg);
    }
    if let Some(e) = s.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Err(Stop::Fail(e));
    }
    if s.wp {
        match s
            .uffd
            .write_protect(bounce.dst, len, WriteProtectMode::empty())?
        {
            Outcome::Complete { .. } => {}
            other => return Err(Stop::Fail(format!("unprotecting dst: {other:?}"))),
        }
    }
    s.uffd.unregister(bounce.dst, len)?;
    if let Some(alias) = bounce.dst_alias {
        s.uffd.unregister(alias, len)?;
    }
    if bounce.mode & BOUNCE_VERIFY != 0 {
        for nr in 0..s.pages {
            // SAFETY: dst is fully populated and unregistered now.
            let count = unsafe { peek(bounce.dst + nr * s.ps + COUNT_OFFSET as u64) };
            let want = s.verify[nr as usize].load(Ordering::Relaxed);
            if count != want {
                return Err(Stop::Fail(format!(
                    "bounce {}: page {nr} memory corruption: count {count}, expected {want}",
                    bounce.number
                )));
            }
        }
    }
    Ok(())
}

fn opts_seed(bounce: Bounce, cpu: usize) -> u64 {
    (u64::from(bounce.number) << 32) ^ cpu as u64
}

/// Waits until every thread finished (then joins them) or the deadline passes.
fn wait_all(handles: &mut Vec<JoinHandle<()>>, deadline: Instant) -> bool {
    loop {
        if handles.iter().all(JoinHandle::is_finished) {
            for h in handles.drain(..) {
                let _ = h.join();
            }
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn page_lock(page: u64) -> &'static AtomicU64 {
    // SAFETY: `page` is a page-aligned address of a stress area, which the
    // Arc'd `Shared` keeps mapped for as long as any thread runs; the lock
    // word is only accessed atomically. Contents may be replaced by the
    // kernel (COPY) only while the page is missing, i.e. before any access.
    unsafe { &*(page as *const AtomicU64) }
}

fn locking_thread(s: &Shared, st: &BounceState, bounce: Bounce, cpu: usize, seed: u64) {
    let mut rng = Rng::new(seed ^ s.pages);
    let random = bounce.mode & BOUNCE_RANDOM != 0;
    let mut page_nr: u64 = 0;
    if !random {
        page_nr = 0u64.wrapping_sub(u64::from(bounce.number));
        if bounce.mode & BOUNCE_RACINGFAULTS == 0 {
            page_nr = page_nr.wrapping_add(cpu as u64 * s.per_cpu);
        }
    }
    while !st.finished.load(Ordering::Relaxed) && !s.abort.load(Ordering::Relaxed) {
        page_nr = if random {
            rng.next_u64()
        } else {
            page_nr.wrapping_add(1)
        };
        let nr = page_nr % s.pages;
        let page = bounce.dst + nr * s.ps;
        st.at[cpu].store(page, Ordering::Relaxed);
        let lock = page_lock(page);
        let mut spins = 0u32;
        // The first access is a read (the fault handler refuses a write
        // fault on a missing page, as the kernel's test does).
        while lock.load(Ordering::Relaxed) != 0
            || lock
                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            if s.abort.load(Ordering::Relaxed) {
                return;
            }
        }
        let count_at = page + COUNT_OFFSET as u64;
        // SAFETY: the page is mapped and we hold its lock.
        let count = unsafe { peek(count_at) };
        let want = s.verify[nr as usize].load(Ordering::Relaxed);
        if count != want {
            s.fail(format!(
                "bounce {}: page {nr} ({page:#x}) memory corruption: count {count}, expected {want}",
                bounce.number
            ));
            lock.store(0, Ordering::Release);
            return;
        }
        // SAFETY: as above; the write may take a WP fault.
        unsafe { poke(count_at, count + 1) };
        s.verify[nr as usize].store(count + 1, Ordering::Relaxed);
        lock.store(0, Ordering::Release);
    }
    st.at[cpu].store(0, Ordering::Relaxed);
}

/// Handles one stress event; `Ok(true)` when it was a sentinel (the
/// blocking reader's shutdown request).
fn handle(s: &Shared, bounce: Bounce, uffd: &Uffd, event: Event) -> Result<bool, String> {
    let Event::Pagefault(fault) = event else {
        return Err(format!("unexpected event {event:?}"));
    };
    let sentinel = s.sentinel.addr()..s.sentinel.addr() + s.sentinel.len() as u64;
    if sentinel.contains(&fault.address) {
        let page = fault.page(4096);
        match uffd.zeropage(page, 4096, ZeropageMode::empty()) {
            Ok(Outcome::Complete { .. } | Outcome::AlreadyPresent) => {
                uffd.wake(page, 4096).map_err(|e| e.to_string())?;
                return Ok(true);
            }
            other => return Err(format!("ZEROPAGE of sentinel {page:#x}: {other:?}")),
        }
    }
    let page = fault.page(s.ps);
    match fault.kind() {
        FaultKind::WriteProtect => {
            unprotect(uffd, page, s.ps)?;
            s.wp_faults.fetch_add(1, Ordering::Relaxed);
        }
        FaultKind::Missing => {
            if fault.is_write() {
                // Every first access is the lock word's read, so a write
                // should never find a page missing. On a MAP_PRIVATE memfd
                // mapping registered MISSING|WP, Linux 6.18 does report
                // some writes as MISSING (rarely, under racing faults; the
                // data stays intact, as the counters prove). The kernel's
                // tests never map shmem privately; there we count these
                // instead of failing.
                if s.kind != MemoryKind::ShmemPrivate {
                    return Err(format!(
                        "unexpected write fault at {:#x} (page {} of dst): the lock word is read first",
                        fault.address,
                        (page - bounce.dst) / s.ps
                    ));
                }
                s.write_missing.fetch_add(1, Ordering::Relaxed);
            }
            let off = page
                .checked_sub(bounce.dst)
                .filter(|o| *o < s.pages * s.ps)
                .ok_or_else(|| format!("fault at {page:#x} outside dst"))?;
            if s.sabotage {
                let _ = uffd.zeropage(page, s.ps, ZeropageMode::empty());
                uffd.wake(page, s.ps).map_err(|e| e.to_string())?;
                s.missing.fetch_add(1, Ordering::Relaxed);
            } else if copy_page(uffd, page, bounce.src + off, s.ps, s.wp)? {
                s.missing.fetch_add(1, Ordering::Relaxed);
            } else {
                s.eexist.fetch_add(1, Ordering::Relaxed);
            }
        }
        FaultKind::Minor => return Err(format!("unexpected minor fault at {page:#x}")),
    }
    Ok(false)
}

fn handler_thread(s: &Shared, st: &BounceState, bounce: Bounce, poll: bool) {
    let result = if poll {
        serve(&s.uffd, &st.stop, |u, e| {
            handle(s, bounce, u, e).and_then(|sentinel| {
                if sentinel {
                    Err("a sentinel fault in poll mode".into())
                } else {
                    Ok(Next::Continue)
                }
            })
        })
    } else {
        // Blocking reads, one message each, until this reader gets a
        // sentinel fault.
        let mut buf = EventBuffer::new(1);
        let mut pending = Vec::with_capacity(1);
        loop {
            match s.uffd.read_events(&mut buf) {
                Ok(events) => pending.append(events),
                Err(e) => break Err(e.to_string()),
            };
            let mut done = false;
            for event in pending.drain(..) {
                match handle(s, bounce, &s.uffd, event) {
                    Ok(true) => done = true,
                    Ok(false) => {}
                    Err(e) => {
                        s.fail(e);
                        return;
                    }
                }
            }
            if done {
                break Ok(());
            }
        }
    };
    if let Err(e) = result {
        s.fail(e);
        // Release any thread waiting on a fault this handler will not serve.
        let _ = s.uffd.unregister(bounce.dst, s.pages * s.ps);
    }
}

fn stop_handlers(
    s: &Arc<Shared>,
    st: &Arc<BounceState>,
    poll: bool,
    mut handlers: Vec<JoinHandle<()>>,
    threads: usize,
) {
    if poll {
        st.stop.stop();
        if !wait_all(&mut handlers, Instant::now() + STUCK_AFTER) {
            s.fail("a poll handler did not stop".into());
        }
        return;
    }
    // One sentinel fault per blocking reader; each exits after one.
    let base = s.sentinel.addr();
    let pokers: Vec<JoinHandle<()>> = (0..threads as u64)
        .map(|i| {
            let sh = Arc::clone(s);
            let page = base + i * 4096;
            std::thread::spawn(move || {
                let _keep = &sh;
                // SAFETY: a sentinel page, kept mapped by `sh`.
                unsafe { (page as *const u8).read_volatile() };
            })
        })
        .collect();
    let stopped = wait_all(&mut handlers, Instant::now() + STUCK_AFTER);
    // Wake any poker no reader took (then it reads a zero page).
    let _ = s
        .uffd
        .unregister(s.sentinel.addr(), s.sentinel.len() as u64);
    let mut pokers = pokers;
    let _ = wait_all(&mut pokers, Instant::now() + STUCK_AFTER);
    if !stopped {
        s.fail("a blocking reader did not stop after its sentinel fault".into());
    }
    // Empty the sentinels and arm them again for the next bounce.
    let _ = s
        .sentinel
        .advise(0, s.sentinel.len(), rustix::mm::Advice::LinuxDontNeed);
    let _ = s.uffd.register(
        s.sentinel.addr(),
        s.sentinel.len() as u64,
        RegisterMode::MISSING,
    );
}

fn background_thread(s: &Shared, st: &BounceState, bounce: Bounce, cpu: usize) {
    let start = cpu as u64 * s.per_cpu;
    let end = start + s.per_cpu;
    let mid = (start + end) / 2;
    let copy = |nr: u64| -> Result<(), String> {
        let off = nr * s.ps;
        let installed = copy_page(&s.uffd, bounce.dst + off, bounce.src + off, s.ps, s.wp)?;
        if !installed {
            s.eexist.fetch_add(1, Ordering::Relaxed);
        }
        if installed {
            s.background.fetch_add(1, Ordering::Relaxed);
            if let Some(alias) = bounce.dst_alias {
                if st.retry_alias.swap(false, Ordering::Relaxed) {
                    // The same page through the alias must meet EEXIST.
                    // SAFETY: src is the bounce's source area.
                    match unsafe {
                        s.uffd.copy(
                            alias + off,
                            (bounce.src + off) as *const u8,
                            s.ps,
                            uffd::CopyMode::empty(),
                        )
                    } {
                        Ok(Outcome::AlreadyPresent) => {
                            s.uffd.wake(alias + off, s.ps).map_err(|e| e.to_string())?;
                        }
                        other => {
                            return Err(format!(
                                "COPY retry through the alias: {other:?}, expected EEXIST"
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    };
    // With toggling, the background COPY goes slowly so that faulting
    // threads reach missing pages first and both sides race for them.
    let pace = || {
        if st.slow_background {
            std::thread::sleep(Duration::from_micros(50));
        }
    };
    let run = || -> Result<(), String> {
        for nr in start..mid {
            pace();
            copy(nr)?;
        }
        if s.wp {
            match s.uffd.write_protect(
                bounce.dst + start * s.ps,
                s.per_cpu * s.ps,
                WriteProtectMode::WP,
            ) {
                Ok(Outcome::Complete { .. }) => {}
                other => return Err(format!("write-protecting the slice: {other:?}")),
            }
        }
        for nr in mid..end {
            pace();
            copy(nr)?;
        }
        Ok(())
    };
    if let Err(e) = run() {
        s.fail(e);
    }
}

fn toggler_thread(s: &Shared, st: &BounceState, bounce: Bounce, seed: u64) {
    let mut rng = Rng::new(seed);
    let chunk_pages = 8.min(s.pages);
    while !st.finished.load(Ordering::Relaxed) && !s.abort.load(Ordering::Relaxed) {
        let first = rng.below(s.pages - chunk_pages + 1);
        let start = bounce.dst + first * s.ps;
        let len = chunk_pages * s.ps;
        let on = s.uffd.write_protect(start, len, WriteProtectMode::WP);
        // Unprotect without waking: only the handler's own resolution
        // (or its wake after EEXIST) may wake a faulting thread.
        let off = s.uffd.write_protect(start, len, WriteProtectMode::DONTWAKE);
        for r in [on, off] {
            match r {
                Ok(Outcome::Complete { .. }) => {}
                other => {
                    s.fail(format!(
                        "toggling write-protection at {start:#x}: {other:?}"
                    ));
                    return;
                }
            }
        }
        std::thread::yield_now();
    }
}
