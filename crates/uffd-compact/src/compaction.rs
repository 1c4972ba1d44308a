//! The compaction: prepared outside the pause, started (the flip) inside
//! it, finished while mutators run.

#![allow(unsafe_code)]

use core::fmt;
use core::ops::Range;
use core::str::FromStr;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::mm::MprotectFlags;
use uffd::{
    ContinueMode, CopyMode, Errno, Event, EventBuffer, Features, MoveMode, Outcome, PoisonMode,
    RegisterMode, Resolved, Uffd,
};

use crate::error::{CompactError, FillPanicked, Guard, InstallFailed, PageFailure};
use crate::heap::{FromSpace, Heap, HeapKind, PAGE};
use crate::report::Report;
use crate::state::{Ask, PageStates};

/// How pages reach the to-space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Fill a per-thread buffer, install it with UFFDIO_COPY (anonymous heaps).
    Copy,
    /// Fill from-space pages that no longer hold live objects (recycled)
    /// and install them with UFFDIO_MOVE: no page is allocated or copied in
    /// steady state. The kernel flushes the moved pages' TLB entries once
    /// per call (per 2 MiB), and with a mutator running on another CPU
    /// that flush is an IPI: about 18 us on this VM, against about 1 us to
    /// COPY a page. So a background thread fills a whole window of 512
    /// to-space pages (one page table) into 512 consecutive recycled pages
    /// and MOVEs the window with one call. Each page is claimed only when
    /// its turn in the window comes, so a mutator touching one not reached
    /// yet compacts it itself; one touching a page already filled copies
    /// the filled page (no fill, no wait) and the window's MOVE skips it.
    /// Pages compacted on demand and windows for which no run of free
    /// pages exists yet (at the start, where pages must be allocated
    /// anyway) use COPY. Anonymous heaps, Linux 6.8.
    Move,
    /// Write the page through an alias of the next memfd and map it with
    /// UFFDIO_CONTINUE (shmem heaps, MINOR_SHMEM, Linux 5.14).
    Minor,
    /// No userfaultfd: the caller keeps its mutators paused until
    /// [`Running::finish`] returns. The baseline, and the fallback where
    /// userfaultfd is denied.
    StopTheWorld,
}

impl Mode {
    /// All modes, in the order the bench reports them.
    pub const ALL: [Mode; 4] = [Mode::Copy, Mode::Move, Mode::Minor, Mode::StopTheWorld];

    /// `copy`, `move`, `minor`, `stw`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Move => "move",
            Mode::Minor => "minor",
            Mode::StopTheWorld => "stw",
        }
    }

    /// The memory the mode works on.
    pub fn heap_kind(self) -> HeapKind {
        match self {
            Mode::Minor => HeapKind::Shmem,
            _ => HeapKind::Anon,
        }
    }

    /// Whether mutators may run during the compaction.
    pub fn is_concurrent(self) -> bool {
        self != Mode::StopTheWorld
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown mode {s:?}; expected copy, move, minor or stw"))
    }
}

/// The runtime's side of a compaction: where each to-space page's objects
/// come from, and how to write them (copying objects and fixing their
/// references).
///
/// The library calls `fill` exactly once per live page, from a background
/// thread or from the fault handler when a mutator touched the page first.
/// `fill` must not touch the heap itself (a to-space access would wait for
/// the very thread that runs it); it reads the from-space through
/// [`FromPages`].
pub trait Compactor: Send + Sync + 'static {
    /// The compactor's error; a failed page is reported and poisoned.
    type Error: std::error::Error + Send + Sync + 'static;

    /// How many pages from the start of the heap hold objects after
    /// compaction. The library installs the pages after them as zero pages
    /// without calling `fill`.
    fn live_pages(&self) -> usize;

    /// The from-space pages (heap page indices, old layout) that filling
    /// to-space page `page` reads. In MOVE mode a from-space page is recycled
    /// once every to-space page that reads it is done, so this must cover
    /// every byte `fill` reads (`FromPages` panics outside it). Asked once
    /// per page, before the pause.
    fn sources(&self, page: usize) -> Range<usize>;

    /// Writes every byte of to-space page `page` into `dst` (4096 bytes;
    /// it holds stale data, not zeros).
    fn fill(&self, page: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), Self::Error>;
}

/// The part of the from-space one `fill` may read: the pages its
/// [`Compactor::sources`] named, addressed by heap offset (old layout).
#[derive(Debug)]
pub struct FromPages<'a> {
    first: usize,
    bytes: &'a [u8],
}

impl FromPages<'_> {
    /// The heap pages covered.
    pub fn pages(&self) -> Range<usize> {
        self.first..self.first + self.bytes.len() / PAGE
    }

    /// `len` bytes at heap offset `offset` (old layout).
    ///
    /// # Panics
    /// Outside the pages `sources` named for this fill.
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let start = offset
            .checked_sub(self.first * PAGE)
            .filter(|s| s + len <= self.bytes.len())
            .unwrap_or_else(|| {
                panic!(
                    "fill read {offset:#x}+{len:#x}, outside its sources (pages {:?})",
                    self.pages()
                )
            });
        &self.bytes[start..start + len]
    }

    /// The 8-byte word at heap offset `offset` (old layout).
    pub fn load(&self, offset: usize) -> u64 {
        u64::from_ne_bytes(self.bytes(offset, 8).try_into().expect("8 bytes"))
    }
}

/// How to compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    mode: Mode,
    threads: usize,
    spin: Duration,
    background_nice: i32,
    realtime_handler: bool,
    sigbus: bool,
}

impl Options {
    /// One background thread and a fault handler that sleeps in `poll`.
    pub fn new(mode: Mode) -> Options {
        Options {
            mode,
            threads: 1,
            spin: Duration::ZERO,
            background_nice: 0,
            realtime_handler: false,
            sigbus: false,
        }
    }

    /// Background compacting threads (at least one: they guarantee every
    /// page is done even if no mutator touches it).
    pub fn threads(mut self, threads: usize) -> Options {
        self.threads = threads.max(1);
        self
    }

    /// How long the fault handler keeps reading before it sleeps in `poll`
    /// again: lower fault latency for CPU (default 0: sleep at once).
    pub fn spin(mut self, spin: Duration) -> Options {
        self.spin = spin;
        self
    }

    /// Nice value of the background threads (0..=19; default 0). Raising
    /// it lets the fault handler and the mutators win the CPU over
    /// background compaction on a busy machine: shorter stalls, longer
    /// compaction. Needs no privilege.
    pub fn background_nice(mut self, nice: i32) -> Options {
        self.background_nice = nice.clamp(0, 19);
        self
    }

    /// Run the fault handler SCHED_FIFO (priority 1) so a fault is served
    /// as soon as it arrives, not when the scheduler next gets to the
    /// handler. Needs CAP_SYS_NICE (or an RLIMIT_RTPRIO); without it the
    /// handler stays a normal thread and [`Report::realtime_handler`] says so.
    pub fn realtime_handler(mut self, on: bool) -> Options {
        self.realtime_handler = on;
        self
    }

    /// The SIGBUS path (ART's; COPY, MOVE and MINOR modes): a mutator
    /// touching a page not compacted yet gets SIGBUS and compacts the page
    /// itself, in its signal handler, instead of sleeping until a handler
    /// thread has done it. No wake-ups, so no scheduler delay (a woken
    /// handler thread here waited up to one 4 ms tick for a CPU taken by
    /// the background pass); the price is that
    /// `fill` runs inside a signal handler of the faulting thread and must
    /// not take a lock a mutator may hold while it accesses the heap. A
    /// SIGBUS that is not a page of a running compaction (a poisoned page)
    /// goes to the previous handler, by default killing the process.
    pub fn sigbus(mut self, on: bool) -> Options {
        self.sigbus = on;
        self
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// Entry point: `Compaction::prepare` → [`Prepared::start`] →
/// [`Running::finish`].
#[derive(Debug)]
pub struct Compaction;

impl Compaction {
    /// Everything that can be done before the pause: checks the mode
    /// against the heap and kernel, opens the userfaultfd (user-mode-only:
    /// no privilege needed), asks the compactor for each page's sources,
    /// builds the MOVE pool, allocates the next memfd (MINOR), and starts
    /// the compacting threads, which wait for [`Prepared::start`].
    pub fn prepare<C: Compactor>(
        heap: &Arc<Heap>,
        options: Options,
        compactor: Arc<C>,
    ) -> Result<Prepared<C>, CompactError> {
        if heap
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(CompactError::Busy);
        }
        let result = Self::prepare_inner(heap, options, compactor);
        if result.is_err() {
            heap.busy.store(false, Ordering::Release);
        }
        result
    }

    fn prepare_inner<C: Compactor>(
        heap: &Arc<Heap>,
        options: Options,
        compactor: Arc<C>,
    ) -> Result<Prepared<C>, CompactError> {
        let mode = options.mode;
        match (mode, heap.kind()) {
            (Mode::Copy | Mode::Move, HeapKind::Shmem) => {
                return Err(CompactError::Unsupported {
                    mode,
                    why: "COPY and MOVE compact anonymous heaps; use Mode::Minor on a shmem heap",
                })
            }
            (Mode::Minor, HeapKind::Anon) => {
                return Err(CompactError::Unsupported {
                    mode,
                    why: "MINOR faults need a page cache: make the heap with HeapKind::Shmem",
                })
            }
            _ => {}
        }
        if options.sigbus && mode == Mode::StopTheWorld {
            return Err(CompactError::Unsupported {
                mode,
                why: "the SIGBUS path serves faults, and stop-the-world compaction takes none",
            });
        }
        let pages = heap.pages();
        let live = compactor.live_pages();
        if live > pages {
            return Err(CompactError::TooManyLivePages { live, pages });
        }
        let mut sources = Vec::with_capacity(live);
        for page in 0..live {
            let r = compactor.sources(page);
            if r.start > r.end || r.end > pages {
                return Err(CompactError::BadSources {
                    page,
                    start: r.start,
                    end: r.end,
                    pages,
                });
            }
            sources.push((r.start as u32, r.end as u32));
        }
        let uffd = if mode == Mode::StopTheWorld {
            None
        } else {
            let kernel = uffd::probe().map_err(CompactError::Uffd)?.features;
            let needed = match mode {
                Mode::Move => Some((Features::MOVE, "the kernel has no UFFDIO_MOVE (Linux 6.8); use Mode::Copy")),
                Mode::Minor => Some((
                    Features::MINOR_SHMEM,
                    "the kernel has no minor faults on shmem (Linux 5.14); use Mode::Copy on an anonymous heap",
                )),
                _ => None,
            };
            let sigbus = options.sigbus.then_some((
                Features::SIGBUS,
                "the kernel has no UFFD_FEATURE_SIGBUS (Linux 4.14)",
            ));
            for (feature, why) in needed.into_iter().chain(sigbus) {
                if !kernel.contains(feature) {
                    return Err(CompactError::Unsupported { mode, why });
                }
            }
            // User-mode-only: the heap is touched by this process's own code
            // only, so no privilege is needed. Non-blocking, so the handler
            // can poll it beside its stop eventfd.
            let mut features = Features::empty();
            if mode == Mode::Minor {
                features |= Features::MINOR_SHMEM;
            }
            if options.sigbus {
                // Minor faults raise SIGBUS too: the kernel checks the
                // feature for every userfault, whatever its kind.
                features |= Features::SIGBUS;
            }
            let uffd = uffd::OpenOptions::new()
                .user_mode_only(true)
                .non_blocking(true)
                .features(features)
                .open()
                .map_err(CompactError::Uffd)?;
            Some(uffd)
        };
        let (readers, pool, pool_seeded) = if mode == Mode::Move {
            let mut counts = vec![0u32; pages];
            for &(a, b) in &sources {
                for q in a..b {
                    counts[q as usize] += 1;
                }
            }
            // Only resident pages are worth recycling: filling a hole would
            // allocate a page, and then COPY is the faster way.
            let resident = heap.resident()?;
            let pool = crate::pool::Pool::new(
                pages,
                (0..pages).filter(|&q| counts[q] == 0 && resident[q]),
            );
            let seeded = pool.len();
            (
                counts
                    .into_iter()
                    .map(|c| AtomicU64::new(u64::from(c)))
                    .collect(),
                pool,
                seeded,
            )
        } else {
            (Vec::new(), crate::pool::Pool::new(0, std::iter::empty()), 0)
        };
        let alias = if heap.kind() == HeapKind::Shmem {
            heap.prepare_spare()?;
            if mode == Mode::Minor {
                Some(heap.map_spare_alias(live * PAGE)?)
            } else {
                None
            }
        } else {
            None
        };
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| CompactError::memory("eventfd for stopping the fault handler", e))?;
        let shared = Arc::new(Shared {
            compactor,
            heap: Arc::clone(heap),
            mode,
            pages,
            live,
            uffd,
            states: Arc::new(PageStates::new(pages)),
            sources,
            readers,
            pool,
            staged: (0..if matches!(mode, Mode::Copy | Mode::Move) {
                live
            } else {
                0
            })
                .map(|_| AtomicUsize::new(0))
                .collect(),
            from: OnceLock::new(),
            alias,
            live_cursor: AtomicUsize::new(0),
            tail_cursor: AtomicUsize::new(live),
            done: Mutex::new(0),
            all_done: Condvar::new(),
            gate: Mutex::new((Gate::Wait, 0)),
            gate_cv: Condvar::new(),
            stop,
            spin: options.spin,
            background_nice: options.background_nice,
            realtime_handler: options.realtime_handler,
            realtime_granted: core::sync::atomic::AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let mut threads = Vec::new();
        let mut spawned = Ok(());
        for i in 0..options.threads {
            let s = Arc::clone(&shared);
            match spawn(format!("compact-bg-{i}"), move || s.background()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawned = Err(e);
                    break;
                }
            }
        }
        if spawned.is_ok() && shared.uffd.is_some() && !options.sigbus {
            let s = Arc::clone(&shared);
            match spawn("compact-fault".to_string(), move || s.handler()) {
                Ok(t) => threads.push(t),
                Err(e) => spawned = Err(e),
            }
        }
        if let Err(e) = spawned {
            // The threads started wait at the gate: let them go home.
            shared.open_gate(Gate::Abort);
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        shared.await_parked(threads.len());
        let mut report = Report {
            mode: Some(mode),
            pages,
            live_pages: live,
            pool_seeded,
            ..Report::default()
        };
        report.pool_seeded = pool_seeded;
        Ok(Prepared {
            inner: Some(Inner {
                shared,
                threads,
                report,
                sigbus: options.sigbus,
                sigbus_active: false,
            }),
        })
    }
}

fn spawn(
    name: String,
    f: impl FnOnce() -> ThreadOut + Send + 'static,
) -> Result<JoinHandle<ThreadOut>, CompactError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| CompactError::memory("spawning a compacting thread", io_errno(&e)))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EAGAIN))
}

struct Inner<C: Compactor> {
    /// SIGBUS routed to `shared` (retired in finish).
    sigbus_active: bool,
    shared: Arc<Shared<C>>,
    threads: Vec<JoinHandle<ThreadOut>>,
    report: Report,
    sigbus: bool,
}

impl<C: Compactor> Inner<C> {
    /// Stops and joins every thread, then hands the heap back.
    fn wind_down(&mut self) -> (Duration, Vec<u64>) {
        let _ = rustix::io::write(&self.shared.stop, &1u64.to_ne_bytes());
        let mut cpu = Duration::ZERO;
        let mut samples = Vec::new();
        for t in self.threads.drain(..) {
            if let Ok(out) = t.join() {
                cpu += out.cpu;
                samples.extend(out.on_demand_ns);
            }
        }
        (cpu, samples)
    }
}

/// A compaction ready to start: threads are waiting.
pub struct Prepared<C: Compactor> {
    inner: Option<Inner<C>>,
}

impl<C: Compactor> Prepared<C> {
    /// The handle of [`Running::progress`], available before the flip so
    /// mutator threads can hold it from the start.
    pub fn progress(&self) -> Progress {
        let s = &self.inner.as_ref().expect("prepared").shared;
        Progress {
            states: Arc::clone(&s.states),
            base: s.heap.addr(),
            len: s.heap.len() as u64,
        }
    }

    /// The flip, to be called while the mutators are paused (and after the
    /// runtime pointed its roots at the objects' new addresses): moves the
    /// heap's pages to the from-space (one `mremap`), registers the heap
    /// with the userfaultfd and lets the compacting threads go. Mutators may
    /// resume as soon as it returns (except in stop-the-world mode); a page
    /// they touch before it is done is compacted for them on demand.
    pub fn start(mut self) -> Result<Running<C>, CompactError> {
        let mut inner = self.inner.take().expect("prepared once");
        let t0 = Instant::now();
        let s = Arc::clone(&inner.shared);
        // SAFETY: the heap's accessors never hand out references, and the
        // caller has paused every thread that accesses the heap (the
        // documented contract of `start`).
        let from = match unsafe { s.heap.flip() } {
            Ok(from) => from,
            Err(e) => {
                s.open_gate(Gate::Abort);
                inner.wind_down();
                s.heap.busy.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let from_addr = from.addr();
        let _ = s.from.set(from);
        if inner.sigbus {
            let target: *const Shared<C> = Arc::as_ptr(&s);
            let target = target as *const (dyn crate::sigbus::SigbusTarget + 'static);
            // SAFETY: `inner.shared` keeps the target alive until finish
            // retires it (also when a Running is dropped unfinished).
            let routed = s
                .heap
                .with_sigbus_slot(|slot| unsafe { slot.activate(target) });
            match routed {
                Ok(()) => inner.sigbus_active = true,
                Err(why) => {
                    // SAFETY: as for the flip.
                    let _ = unsafe { unflip(&s.heap, from_addr) };
                    s.open_gate(Gate::Abort);
                    inner.wind_down();
                    s.heap.busy.store(false, Ordering::Release);
                    return Err(CompactError::Unsupported { mode: s.mode, why });
                }
            }
        }
        if let Some(uffd) = &s.uffd {
            let mode = if s.mode == Mode::Minor {
                RegisterMode::MINOR
            } else {
                RegisterMode::MISSING
            };
            if let Err(e) = uffd.register(s.heap.addr(), s.heap.len() as u64, mode) {
                // Put the old contents back where they were, so a failed
                // start leaves the heap as it found it.
                // SAFETY: as for the flip; the from-space is ours.
                let _ = unsafe { unflip(&s.heap, from_addr) };
                if inner.sigbus_active {
                    let _ = s.heap.with_sigbus_slot(|slot| slot.retire(&s.states));
                }
                s.open_gate(Gate::Abort);
                inner.wind_down();
                s.heap.busy.store(false, Ordering::Release);
                return Err(CompactError::Uffd(e));
            }
        }
        s.open_gate(Gate::Go);
        inner.report.flip = t0.elapsed();
        Ok(Running {
            inner: Some(inner),
            started: Instant::now(),
        })
    }
}

impl<C: Compactor> fmt::Debug for Prepared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(i) => i.shared.describe(f.debug_struct("Prepared")),
            None => f.write_str("Prepared(started)"),
        }
    }
}

impl<C: Compactor> fmt::Debug for Running<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(i) => i.shared.describe(f.debug_struct("Running")),
            None => f.write_str("Running(finished)"),
        }
    }
}

impl<C: Compactor> Drop for Prepared<C> {
    fn drop(&mut self) {
        if let Some(mut inner) = self.inner.take() {
            inner.shared.open_gate(Gate::Abort);
            inner.wind_down();
            inner.shared.heap.busy.store(false, Ordering::Release);
        }
    }
}

/// Moves the from-space back over the heap (after a failed registration).
///
/// # Safety
/// As for the flip: nothing accesses the heap meanwhile.
unsafe fn unflip(heap: &Heap, from: u64) -> Result<(), Errno> {
    // SAFETY: both ranges are ours; the caller promises no accesses.
    unsafe {
        rustix::mm::mremap_fixed(
            from as *mut _,
            heap.len(),
            heap.len(),
            rustix::mm::MremapFlags::MAYMOVE,
            heap.ptr().cast(),
        )
    }
    .map(drop)
}

/// A compaction under way. Dropping it without [`Running::finish`] still
/// waits for every page, so no mutator is left waiting on a fault.
pub struct Running<C: Compactor> {
    inner: Option<Inner<C>>,
    started: Instant,
}

impl<C: Compactor> Running<C> {
    /// A handle mutators can ask whether an address is compacted yet (the
    /// demo uses it to time only accesses that wait for compaction).
    pub fn progress(&self) -> Progress {
        let s = &self.inner.as_ref().expect("running").shared;
        Progress {
            states: Arc::clone(&s.states),
            base: s.heap.addr(),
            len: s.heap.len() as u64,
        }
    }

    /// Waits until every page is installed, stops the threads, unregisters
    /// the heap and releases the from-space. Returns what happened, or
    /// [`CompactError::Pages`] listing pages that could not be compacted
    /// (poisoned; every other page is installed).
    pub fn finish(mut self) -> Result<Report, CompactError> {
        self.finish_inner().expect("finished once")
    }

    fn finish_inner(&mut self) -> Option<Result<Report, CompactError>> {
        let mut inner = self.inner.take()?;
        let s = Arc::clone(&inner.shared);
        {
            let mut done = s.done.lock().unwrap_or_else(|e| e.into_inner());
            while *done < s.pages {
                done = s.all_done.wait(done).unwrap_or_else(|e| e.into_inner());
            }
        }
        let wall = self.started.elapsed();
        let (cpu, on_demand_ns) = inner.wind_down();
        let mut report = inner.report;
        report.wall = wall;
        report.compactor_cpu = cpu;
        report.on_demand_ns = on_demand_ns;
        s.counters.fill(&mut report);
        report.realtime_handler = s.realtime_granted.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        if let Some(uffd) = &s.uffd {
            if let Err(e) = uffd.unregister(s.heap.addr(), s.heap.len() as u64) {
                errors.push(PageFailure {
                    page: 0,
                    error: Box::new(InstallFailed(e)),
                    guard: Guard::Unguarded,
                });
            }
        }
        // Unregistered: no new SIGBUS for this heap. Signals raised before
        // and not handled yet are answered from the page states from now
        // on; this waits for handlers still inside the target.
        if inner.sigbus_active {
            let _ = s.heap.with_sigbus_slot(|slot| slot.retire(&s.states));
        }
        if s.heap.kind() == HeapKind::Shmem {
            s.heap.swap_files();
        }
        let mut failures =
            std::mem::take(&mut *s.failures.lock().unwrap_or_else(|e| e.into_inner()));
        failures.extend(errors);
        failures.sort_by_key(|f| f.page);
        let heap = Arc::clone(&s.heap);
        // The threads are joined: this is the last reference, so the
        // from-space and the alias are unmapped here, before the heap is
        // free for the next compaction.
        // Releasing the from-space frees every page not recycled: work of
        // the compaction, counted as compacting-thread time.
        let cpu0 = thread_cpu();
        drop(s);
        drop(inner.shared);
        report.compactor_cpu += thread_cpu().saturating_sub(cpu0);
        heap.busy.store(false, Ordering::Release);
        Some(if failures.is_empty() {
            Ok(report)
        } else {
            Err(CompactError::Pages {
                failures,
                report: Box::new(report),
            })
        })
    }
}

impl<C: Compactor> Drop for Running<C> {
    fn drop(&mut self) {
        let _ = self.finish_inner();
    }
}

/// Whether addresses of a heap under compaction are installed yet.
#[derive(Debug, Clone)]
pub struct Progress {
    states: Arc<PageStates>,
    base: u64,
    len: u64,
}

impl Progress {
    /// True when an access to `addr` will not wait for compaction (its page
    /// is installed, or `addr` is outside the heap).
    pub fn is_installed(&self, addr: u64) -> bool {
        match addr.checked_sub(self.base) {
            Some(off) if off < self.len => self.states.is_settled((off / PAGE as u64) as usize),
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Wait,
    Go,
    Abort,
}

#[derive(Debug, Default)]
struct ThreadOut {
    cpu: Duration,
    on_demand_ns: Vec<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    copied: AtomicUsize,
    moved: AtomicUsize,
    move_busy: AtomicUsize,
    staged_taken: AtomicUsize,
    continued: AtomicUsize,
    written: AtomicUsize,
    zeroed: AtomicUsize,
    on_demand: AtomicUsize,
    waited: AtomicUsize,
    late: AtomicUsize,
    copy_ns: AtomicU64,
    move_ns: AtomicU64,
    continue_ns: AtomicU64,
}

impl Counters {
    fn fill(&self, r: &mut Report) {
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let ns = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        r.copied = get(&self.copied);
        r.moved = get(&self.moved);
        r.move_busy = get(&self.move_busy);
        r.staged_taken = get(&self.staged_taken);
        r.continued = get(&self.continued);
        r.written = get(&self.written);
        r.zeroed = get(&self.zeroed);
        r.on_demand = get(&self.on_demand);
        r.waited = get(&self.waited);
        r.late_faults = get(&self.late);
        r.install_copy = ns(&self.copy_ns);
        r.install_move = ns(&self.move_ns);
        r.install_continue = ns(&self.continue_ns);
    }
}

/// Pages of the zero tail claimed per step.
const TAIL_CHUNK: usize = 512;

/// Live pages a background thread compacts and installs with one COPY or
/// CONTINUE ioctl.
const BATCH: usize = 16;

/// MOVE mode: to-space pages a background thread fills into recycled
/// pages and moves with one ioctl, one page table's worth: the kernel
/// flushes the TLB once per page table a MOVE touches, and the flush is
/// what a MOVE costs while mutators run (an IPI to their CPUs).
const MOVE_WINDOW: usize = 512;

/// MOVE mode: the shortest run of a window moved rather than copied. A
/// MOVE call costs one TLB-flush IPI (about 18 us here with a mutator on
/// the other CPU, and an interruption of that mutator) plus about 0.1 us
/// a page; a COPY about 1 us a page and no IPI.
const MOVE_MIN_RUN: usize = 32;

struct Shared<C: Compactor> {
    compactor: Arc<C>,
    heap: Arc<Heap>,
    mode: Mode,
    pages: usize,
    live: usize,
    uffd: Option<Uffd>,
    states: Arc<PageStates>,
    /// `sources(p)` for each live page, asked once before the pause.
    sources: Vec<(u32, u32)>,
    /// MOVE: live to-space pages still to read each from-space page.
    readers: Vec<AtomicU64>,
    /// MOVE: from-space pages no live page reads any more.
    pool: crate::pool::Pool,
    /// COPY and MOVE: the address of the page each staged to-space page
    /// was filled into (see `PageStates::stage`): a pool page of a MOVE
    /// window, or a page of a background thread's batch buffer.
    staged: Box<[AtomicUsize]>,
    from: OnceLock<FromSpace>,
    alias: Option<FromSpace>,
    live_cursor: AtomicUsize,
    tail_cursor: AtomicUsize,
    done: Mutex<usize>,
    all_done: Condvar,
    /// Whether the threads may go, and how many wait for it.
    gate: Mutex<(Gate, usize)>,
    gate_cv: Condvar,
    stop: OwnedFd,
    spin: Duration,
    background_nice: i32,
    realtime_handler: bool,
    realtime_granted: core::sync::atomic::AtomicBool,
    failures: Mutex<Vec<PageFailure>>,
    counters: Counters,
}

/// A thread's own page buffer (COPY mode and the MOVE fallback).
struct Buffer(Box<[u8]>);

impl Buffer {
    fn new() -> Buffer {
        Buffer(vec![0u8; PAGE].into_boxed_slice())
    }
}

type FillError = Box<dyn std::error::Error + Send + Sync>;

impl<C: Compactor> Shared<C> {
    fn describe(&self, mut d: fmt::DebugStruct<'_, '_>) -> fmt::Result {
        let done = *self.done.lock().unwrap_or_else(|e| e.into_inner());
        d.field("mode", &self.mode)
            .field(
                "heap",
                &format_args!("{:#x}+{:#x}", self.heap.addr(), self.heap.len()),
            )
            .field("pages", &self.pages)
            .field("live", &self.live)
            .field("done", &done)
            .finish()
    }

    fn open_gate(&self, to: Gate) {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).0 = to;
        self.gate_cv.notify_all();
    }

    fn wait_gate(&self) -> bool {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.1 += 1;
        self.gate_cv.notify_all();
        while gate.0 == Gate::Wait {
            gate = self.gate_cv.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        gate.0 == Gate::Go
    }

    /// Waits until `threads` threads wait at the gate. A thread still
    /// starting up when the flip runs maps its stack and signal stack,
    /// spinning on the mmap lock the flip's mremap holds, on another CPU:
    /// every 2 MiB the mremap moves then flushes that CPU's TLB with an
    /// IPI, which made the pause 1.4-2.2 ms instead of 0.15 ms here.
    fn await_parked(&self, threads: usize) {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        while gate.1 < threads {
            gate = self.gate_cv.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes `step` pages at a time from `cursor` (shared by every
    /// background thread) until `end`, and calls `run(a, b)` for each run
    /// `a..b` of them this thread claimed (a fault may have claimed others).
    fn claim_runs(
        &self,
        cursor: &AtomicUsize,
        step: usize,
        end: usize,
        mut run: impl FnMut(usize, usize),
    ) {
        loop {
            let a = cursor.fetch_add(step, Ordering::Relaxed);
            if a >= end {
                break;
            }
            self.claim_within(a, (a + step).min(end), &mut run);
        }
    }

    /// Claims what it can of pages `a..b` and calls `run(x, y)` for each
    /// run `x..y` it claimed.
    fn claim_within(&self, a: usize, b: usize, run: impl FnMut(usize, usize)) {
        for_each_run(a, b, |i| self.states.claim(i), |_| {}, run);
    }

    fn background(&self) -> ThreadOut {
        make_batch();
        if self.background_nice > 0 {
            // Best effort: a refused nice only costs latency.
            let _ = rustix::process::setpriority_process(
                Some(rustix::thread::gettid()),
                self.background_nice,
            );
        }
        if !self.wait_gate() {
            return ThreadOut::default();
        }
        let cpu0 = thread_cpu();
        let mut buf = vec![0u8; BATCH * PAGE].into_boxed_slice();
        if self.mode == Mode::Move {
            loop {
                let a = self.live_cursor.fetch_add(MOVE_WINDOW, Ordering::Relaxed);
                if a >= self.live {
                    break;
                }
                let b = (a + MOVE_WINDOW).min(self.live);
                match self.pool.pop_run(b - a) {
                    Some(q) => self.move_window(a, b, q),
                    None => {
                        for c in (a..b).step_by(BATCH) {
                            self.stage_batch(c, (c + BATCH).min(b), &mut buf);
                        }
                    }
                }
            }
        } else if self.mode == Mode::StopTheWorld {
            self.claim_runs(&self.live_cursor, BATCH, self.live, |a, b| {
                (a..b).for_each(|p| self.work(p, &mut buf[..PAGE]))
            });
        } else {
            loop {
                let a = self.live_cursor.fetch_add(BATCH, Ordering::Relaxed);
                if a >= self.live {
                    break;
                }
                self.stage_batch(a, (a + BATCH).min(self.live), &mut buf);
            }
        }
        self.claim_runs(&self.tail_cursor, TAIL_CHUNK, self.pages, |a, b| {
            self.zero_run(a, b)
        });
        ThreadOut {
            cpu: thread_cpu().saturating_sub(cpu0),
            on_demand_ns: Vec::new(),
        }
    }

    fn handler(&self) -> ThreadOut {
        if !self.wait_gate() {
            return ThreadOut::default();
        }
        let uffd = self
            .uffd
            .as_ref()
            .expect("the handler runs with a userfaultfd");
        if self.realtime_handler && make_realtime() {
            self.realtime_granted.store(true, Ordering::Relaxed);
        }
        let cpu0 = thread_cpu();
        let mut buf = Buffer::new();
        let mut events = EventBuffer::new(64);
        let mut samples = Vec::new();
        let mut idle_since: Option<Instant> = None;
        // A read error means the fd is unusable; background threads still
        // install every page, and each install wakes its faults, so
        // nothing hangs when the handler stops.
        while let Ok(batch) = uffd.read_events(&mut events) {
            if batch.is_empty() {
                let spun = idle_since.get_or_insert_with(Instant::now).elapsed();
                if spun < self.spin {
                    core::hint::spin_loop();
                    continue;
                }
                idle_since = None;
                let mut fds = [
                    PollFd::new(uffd, PollFlags::IN),
                    PollFd::new(&self.stop, PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) if fds[1].revents().contains(PollFlags::IN) => break,
                    Ok(_) | Err(Errno::INTR) => continue,
                    Err(_) => break,
                }
            }
            idle_since = None;
            for event in batch.drain(..) {
                let Event::Pagefault(fault) = event else {
                    continue;
                };
                let t0 = Instant::now();
                let page_addr = fault.page(PAGE as u64);
                let Some(p) = page_addr
                    .checked_sub(self.heap.addr())
                    .map(|off| (off / PAGE as u64) as usize)
                    .filter(|&p| p < self.pages)
                else {
                    continue;
                };
                match self.states.ask(p) {
                    Ask::Claimed => {
                        self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                        if p < self.live {
                            self.work(p, &mut buf.0);
                        } else {
                            self.zero_run(p, p + 1);
                        }
                        samples.push(t0.elapsed().as_nanos() as u64);
                    }
                    Ask::Staged => {
                        self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                        self.install_staged(p);
                        samples.push(t0.elapsed().as_nanos() as u64);
                    }
                    Ask::InProgress => {
                        self.counters.waited.fetch_add(1, Ordering::Relaxed);
                    }
                    Ask::Settled => {
                        self.counters.late.fetch_add(1, Ordering::Relaxed);
                        let _ = uffd.wake(page_addr, PAGE as u64);
                    }
                }
            }
        }
        ThreadOut {
            cpu: thread_cpu().saturating_sub(cpu0),
            on_demand_ns: samples,
        }
    }

    fn old_space(&self) -> *mut u8 {
        self.from.get().expect("the flip ran").ptr()
    }

    fn dst_addr(&self, p: usize) -> u64 {
        self.heap.addr() + (p * PAGE) as u64
    }

    /// Compacts and installs live page `p`, which this thread claimed.
    fn work(&self, p: usize, buf: &mut [u8]) {
        let from = self.sources_of(p);
        let result = match self.mode {
            // A lone page is COPYed in MOVE mode too: moving one page
            // flushes its TLB entry on every CPU running the process, an IPI
            // that costs ~18 us here while mutators run; `move_window`
            // MOVEs runs of a window, one flush per run.
            Mode::Copy | Mode::Move => self
                .fill(p, &from, &mut *buf)
                .and_then(|()| self.install_copy_run(p, buf.as_ptr(), 1)),
            Mode::Minor => {
                let alias = self.alias.as_ref().expect("MINOR maps an alias").ptr();
                // SAFETY: the alias page of `p` is written only by the thread
                // that claimed `p` (this one); the heap cannot map it until
                // the CONTINUE below, so no mutator reads it meanwhile.
                let dst = unsafe { core::slice::from_raw_parts_mut(alias.add(p * PAGE), PAGE) };
                self.fill(p, &from, dst)
                    .and_then(|()| self.install_continue_run(p, 1))
            }
            Mode::StopTheWorld => self.fill(p, &from, &mut *buf).map(|()| {
                // SAFETY: the destination page is inside the heap, and the
                // caller keeps mutators paused in stop-the-world mode; a
                // raw copy, so no reference to the heap is made.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        self.heap.ptr().add(p * PAGE),
                        PAGE,
                    )
                };
                self.counters.written.fetch_add(1, Ordering::Relaxed);
            }),
        };
        if self.mode == Mode::Move {
            // No allocation here (this may run in a SIGBUS handler).
            self.release_sources(p);
        }
        self.conclude(p, p + 1, result);
    }

    /// The part of the from-space that filling live page `p` reads.
    fn sources_of(&self, p: usize) -> FromPages<'_> {
        let (a, b) = self.sources[p];
        let (a, b) = (a as usize, b as usize);
        FromPages {
            first: a,
            // SAFETY: pages a..b of the from-space stay mapped while `self`
            // lives, and nobody writes them until `p` is filled: mutators
            // only access the heap, and MOVE recycles a from-space page only
            // after every live page reading it (counted in `readers`, `p`
            // among them) has been filled.
            bytes: unsafe {
                core::slice::from_raw_parts(self.old_space().add(a * PAGE), (b - a) * PAGE)
            },
        }
    }

    /// Compacts live pages `a..b` (at most BATCH, unclaimed) and installs
    /// them with one ioctl per run: COPY from `buf` (MOVE mode too: a
    /// batch this small is cheaper copied than moved), CONTINUE after
    /// writing through the alias.
    fn stage_batch(&self, a: usize, b: usize, buf: &mut [u8]) {
        debug_assert!(b - a <= BATCH && buf.len() >= BATCH * PAGE);
        let base = buf.as_mut_ptr();
        let minor_alias = (self.mode == Mode::Minor)
            .then(|| self.alias.as_ref().expect("MINOR maps an alias").ptr());
        let dst = |j: usize| match minor_alias {
            Some(alias) => alias.wrapping_add((a + j) * PAGE),
            None => base.wrapping_add(j * PAGE),
        };
        let taken = self.fill_and_install(a, b, &dst, |s, e| {
            self.install_filled_run(s, dst(s - a), e - s)
        });
        if self.mode != Mode::Minor {
            // A fault that took a staged page copies from `buf`: wait for
            // its COPY (a few microseconds) before the next batch reuses
            // the buffer. Only this thread waits here, never a mutator.
            for j in (0..b - a).filter(|&j| taken.has(j)) {
                self.states.wait_settled(a + j);
            }
        }
    }

    /// MOVE mode: fills live pages `a..b` (one window, unclaimed) into the
    /// consecutive free pool pages `q..q + (b - a)`, page `a + j` into
    /// `q + j`, which this thread popped together, and installs them with
    /// one UFFDIO_MOVE per run. Runs shorter than `MOVE_MIN_RUN` (split by
    /// pages faults took) are copied: a COPY costs less than a MOVE's
    /// TLB-flush IPI and interrupts no mutator; their pool pages go back
    /// to the pool.
    fn move_window(&self, a: usize, b: usize, q: usize) {
        debug_assert!(b - a <= MOVE_WINDOW);
        let pool_page = |j: usize| self.old_space().wrapping_add((q + j) * PAGE);
        let mut moved = Marks::default();
        let taken = self.fill_and_install(a, b, &pool_page, |s, e| {
            let n = e - s;
            if n >= MOVE_MIN_RUN {
                (s - a..e - a).for_each(|j| moved.set(j));
                self.install_move_run(s, q + (s - a), n)
            } else {
                self.install_copy_run(s, pool_page(s - a), n)
            }
        });
        // A pool page a fault took is copied from unsynchronised, and the
        // from-space frees it at the end; a moved one is the heap's now.
        for j in (0..b - a).filter(|&j| !taken.has(j) && !moved.has(j)) {
            self.pool.push(q + j);
        }
    }

    /// Fills live pages `a..b` (a batch or a MOVE window, unclaimed), page
    /// `a + j` into the page at `dst(j)`, and installs the runs of them no
    /// fault took with `install_run(start, end)`. Returns the pages faults
    /// took.
    ///
    /// Each page is claimed only when its turn comes, and staged once
    /// filled, so the window never holds up a mutator: had it claimed all
    /// its pages first, a fault on any of them would wait for the whole
    /// window, and for as long as this thread is preempted (with more
    /// runnable threads than CPUs, 4-8 ms). A page not reached yet is
    /// claimed and compacted by its fault; a staged one is taken by its
    /// fault, which installs it itself from `dst` (COPY, or CONTINUE); a
    /// fault on the page being filled waits for that one fill.
    fn fill_and_install(
        &self,
        a: usize,
        b: usize,
        dst: &impl Fn(usize) -> *mut u8,
        mut install_run: impl FnMut(usize, usize) -> Result<(), FillError>,
    ) -> Marks {
        debug_assert!(b - a <= MOVE_WINDOW);
        let (mut staged, mut taken) = (Marks::default(), Marks::default());
        for p in a..b {
            if !self.states.claim(p) {
                continue;
            }
            let j = p - a;
            // SAFETY: `dst(j)` is a page nobody else touches until `p` is
            // staged: a page of this thread's batch buffer, a pool page this
            // thread popped (no live page reads it any more), or the alias
            // page of `p`, which this thread claimed and the heap maps only
            // after the CONTINUE.
            let page = unsafe { core::slice::from_raw_parts_mut(dst(j), PAGE) };
            let filled = self.fill(p, &self.sources_of(p), page);
            if self.mode == Mode::Move {
                // The contents are in `page` now: the sources are free.
                self.release_sources(p);
            }
            if filled.is_err() {
                self.conclude(p, p + 1, filled);
                continue;
            }
            if let Some(slot) = self.staged.get(p) {
                slot.store(page.as_ptr() as usize, Ordering::Relaxed);
            }
            if self.states.stage(p) {
                staged.set(j);
            } else {
                // A fault waits for this very page: install it now, with a
                // COPY rather than a MOVE and its IPI.
                let r = self.install_filled_run(p, page.as_ptr(), 1);
                self.conclude(p, p + 1, r);
            }
        }
        for_each_run(
            a,
            b,
            |p| staged.has(p - a) && self.states.unstage(p),
            |p| {
                if staged.has(p - a) {
                    taken.set(p - a);
                }
            },
            |s, e| {
                let r = install_run(s, e);
                self.conclude(s, e, r);
            },
        );
        taken
    }

    /// Installs `n` filled live pages from `p`: COPY from `src`, or in
    /// MINOR mode CONTINUE (their contents are in the alias already).
    fn install_filled_run(&self, p: usize, src: *const u8, n: usize) -> Result<(), FillError> {
        match self.mode {
            Mode::Minor => self.install_continue_run(p, n),
            _ => self.install_copy_run(p, src, n),
        }
    }

    /// A fault took staged page `p`: installs it from where it was filled
    /// (COPY of a MOVE window's pool page, which stays in the from-space
    /// and is freed at the end, or of a batch buffer's page, which its
    /// thread reuses only once `p` is settled; MINOR: CONTINUE).
    fn install_staged(&self, p: usize) {
        self.counters.staged_taken.fetch_add(1, Ordering::Relaxed);
        let src = self.staged.get(p).map_or(core::ptr::null(), |slot| {
            slot.load(Ordering::Relaxed) as *const u8
        });
        // The staging thread stored the address before staging `p`
        // (release), and `ask` took `p` from the staged state (acquire);
        // the page there is written by nobody until `p` is settled.
        let r = self.install_filled_run(p, src, 1);
        self.conclude(p, p + 1, r);
    }

    /// MOVE: from-space pages no live page reads any more join the pool.
    fn release_sources(&self, p: usize) {
        let (a, b) = self.sources[p];
        for q in a as usize..b as usize {
            if self.readers[q].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.pool.push(q);
            }
        }
    }

    fn install_copy_run(&self, p: usize, src: *const u8, n: usize) -> Result<(), FillError> {
        let t0 = Instant::now();
        let len = (n * PAGE) as u64;
        // SAFETY: `src` holds n filled pages this thread owns (its buffer,
        // or pool pages it staged or a fault took), not written while the
        // kernel reads them; the destination is registered heap memory no
        // reference covers.
        let r = retry(|| unsafe {
            self.uffd()
                .copy_all(self.dst_addr(p), src, len, PAGE as u64, CopyMode::empty())
        });
        self.counters
            .copy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r?;
        self.counters.copied.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn install_move_run(&self, p: usize, q: usize, n: usize) -> Result<(), FillError> {
        let t0 = Instant::now();
        let len = (n * PAGE) as u64;
        // SAFETY: from-space pages q..q+n are this thread's (popped from the
        // pool together, written by `fill`), exclusive to this process (the
        // heap is MADV_DONTFORK); the destination is registered heap memory.
        let r = retry(|| unsafe {
            self.uffd().move_all(
                self.dst_addr(p),
                self.old_space().add(q * PAGE),
                len,
                PAGE as u64,
                MoveMode::empty(),
            )
        });
        self.counters
            .move_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if r.is_ok() {
            self.counters.moved.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        // Refused (EBUSY: a source page shared after all, or a transient):
        // the staged pages still hold every page's contents, so copy them.
        // The pages the MOVE did install before it stopped are present,
        // and COPY skips them.
        self.counters.move_busy.fetch_add(n, Ordering::Relaxed);
        let t0 = Instant::now();
        // SAFETY: as above; COPY only reads the staged pages.
        let r = retry_counting(|| unsafe {
            self.uffd().copy_all(
                self.dst_addr(p),
                self.old_space().add(q * PAGE),
                len,
                PAGE as u64,
                CopyMode::empty(),
            )
        });
        self.counters
            .copy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let existing = r? as usize;
        self.counters.moved.fetch_add(existing, Ordering::Relaxed);
        self.counters
            .copied
            .fetch_add(n - existing, Ordering::Relaxed);
        Ok(())
    }

    fn install_continue_run(&self, p: usize, n: usize) -> Result<(), FillError> {
        let t0 = Instant::now();
        let len = (n * PAGE) as u64;
        let r = retry(|| {
            self.uffd()
                .continue_all(self.dst_addr(p), len, PAGE as u64, ContinueMode::empty())
        });
        self.counters
            .continue_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r?;
        self.counters.continued.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn fill(&self, p: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), FillError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.compactor.fill(p, from, dst))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Box::new(e)),
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_string());
                Err(Box::new(FillPanicked(text)))
            }
        }
    }

    fn uffd(&self) -> &Uffd {
        self.uffd.as_ref().expect("this mode has a userfaultfd")
    }

    /// Installs claimed tail pages `a..b` as zero.
    fn zero_run(&self, a: usize, b: usize) {
        let (addr, len) = (self.dst_addr(a), ((b - a) * PAGE) as u64);
        let result: Result<(), FillError> = match (self.mode, self.heap.kind()) {
            (Mode::Copy | Mode::Move, _) => retry(|| {
                self.uffd()
                    .zeropage_all(addr, len, PAGE as u64, uffd::ZeropageMode::empty())
            }),
            // A hole in the new file: the access after the wake is a missing
            // fault, which MINOR registration leaves to the kernel (a zero page).
            (_, HeapKind::Shmem) => self
                .heap
                .punch(true, a * PAGE, b * PAGE - a * PAGE)
                .map_err(|errno| -> FillError {
                    Box::new(InstallFailed(uffd::Error::Memory {
                        what: "fallocate(PUNCH_HOLE)",
                        errno,
                    }))
                })
                .and_then(|()| match &self.uffd {
                    Some(u) => u
                        .wake(addr, len)
                        .map_err(|e| -> FillError { Box::new(InstallFailed(e)) }),
                    None => Ok(()),
                }),
            // Stop-the-world anonymous: the flip left the range empty, which
            // reads as zero.
            (Mode::StopTheWorld, HeapKind::Anon) => Ok(()),
            (Mode::Minor, HeapKind::Anon) => unreachable!("rejected by prepare"),
        };
        if result.is_ok() {
            self.counters.zeroed.fetch_add(b - a, Ordering::Relaxed);
        }
        self.conclude(a, b, result);
    }

    /// Makes pages `a..b` fail loudly and records why.
    fn fail(&self, a: usize, b: usize, error: FillError) {
        let (addr, len) = (self.dst_addr(a), ((b - a) * PAGE) as u64);
        let poisoned = self.uffd.as_ref().is_some_and(|u| {
            matches!(
                // SAFETY: the pages hold no valid objects; the runtime is told
                // (CompactError::Pages) not to use them, and a mutator that
                // does gets SIGBUS instead of stale or zero data.
                unsafe { u.poison(addr, len, PoisonMode::empty()) },
                Ok(Outcome::Complete { .. })
            )
        });
        let guard = if poisoned {
            Guard::Poisoned
        } else {
            // SAFETY: our own heap pages, which no reference covers; an
            // access afterwards raises SIGSEGV. mprotect also wakes nothing,
            // so wake the range for any fault waiting there.
            let protected = unsafe {
                rustix::mm::mprotect(addr as *mut _, len as usize, MprotectFlags::empty())
            }
            .is_ok();
            if let Some(u) = &self.uffd {
                let _ = u.wake(addr, len);
            }
            if protected {
                Guard::Protected
            } else {
                Guard::Unguarded
            }
        };
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let text = error.to_string();
        failures.push(PageFailure {
            page: a,
            error,
            guard,
        });
        for page in a + 1..b {
            failures.push(PageFailure {
                page,
                error: text.clone().into(),
                guard,
            });
        }
    }

    /// Settles pages `a..b` after their install: done, or failed (and
    /// guarded) with the install's error.
    fn conclude(&self, a: usize, b: usize, installed: Result<(), FillError>) {
        let ok = match installed {
            Ok(()) => true,
            Err(e) => {
                self.fail(a, b, e);
                false
            }
        };
        self.settle(a, b, ok);
    }

    fn settle(&self, a: usize, b: usize, ok: bool) {
        for p in a..b {
            if self.states.settle(p, ok) {
                if let Some(u) = &self.uffd {
                    let _ = u.wake(self.dst_addr(p), PAGE as u64);
                }
            }
        }
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done += b - a;
        if *done >= self.pages {
            self.all_done.notify_all();
        }
    }
}

impl<C: Compactor> crate::sigbus::SigbusTarget for Shared<C> {
    fn on_sigbus(&self, addr: u64) -> bool {
        let Some(p) = addr
            .checked_sub(self.heap.addr())
            .map(|off| (off / PAGE as u64) as usize)
            .filter(|&p| p < self.pages)
        else {
            return false;
        };
        let mut buf = [0u8; PAGE];
        match self.states.ask(p) {
            Ask::Claimed => {
                self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                if p < self.live {
                    self.work(p, &mut buf);
                } else {
                    self.zero_run(p, p + 1);
                }
                !self.states.is_failed(p)
            }
            Ask::Staged => {
                self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                self.install_staged(p);
                !self.states.is_failed(p)
            }
            // Another thread is filling it: a few microseconds.
            Ask::InProgress => {
                self.counters.waited.fetch_add(1, Ordering::Relaxed);
                self.states.wait_settled(p);
                !self.states.is_failed(p)
            }
            // Installed: the access restarts and finds it. Failed
            // (poisoned): a real bus error, for the previous handler.
            Ask::Settled => !self.states.is_failed(p),
        }
    }
}

/// Pages of one batch or MOVE window, by their place in it.
#[derive(Default)]
struct Marks([u64; MOVE_WINDOW / 64]);

impl Marks {
    fn set(&mut self, j: usize) {
        self.0[j / 64] |= 1 << (j % 64);
    }

    fn has(&self, j: usize) -> bool {
        self.0[j / 64] & (1 << (j % 64)) != 0
    }
}

/// Splits `a..b` into the runs of consecutive pages for which `take`
/// succeeds (it is asked once per page, in order): `run(x, y)` for each
/// run `x..y`, `skip(p)` for each page it refused.
fn for_each_run(
    a: usize,
    b: usize,
    mut take: impl FnMut(usize) -> bool,
    mut skip: impl FnMut(usize),
    mut run: impl FnMut(usize, usize),
) {
    let mut start = None;
    for p in a..b {
        if take(p) {
            start.get_or_insert(p);
        } else {
            if let Some(s) = start.take() {
                run(s, p);
            }
            skip(p);
        }
    }
    if let Some(s) = start {
        run(s, b);
    }
}

/// Runs a whole-range resolve, retrying while the kernel reports pending
/// events (this userfaultfd asks for none, so it is at most a transient).
fn retry(f: impl FnMut() -> Result<Resolved, uffd::Error>) -> Result<(), FillError> {
    match retry_counting(f)? {
        0 => Ok(()),
        _ => Err(Box::new(AlreadyInstalled)),
    }
}

/// As `retry`, and returns how many pages were present already.
fn retry_counting(mut f: impl FnMut() -> Result<Resolved, uffd::Error>) -> Result<u64, FillError> {
    for _ in 0..1000 {
        match f() {
            Ok(Resolved::Complete { existing, .. }) => return Ok(existing / PAGE as u64),
            Ok(Resolved::RetryAfterEvents { .. }) => std::thread::yield_now(),
            Ok(Resolved::TargetGone) => return Err("the process owning the heap is gone".into()),
            Err(e) => return Err(Box::new(InstallFailed(e))),
        }
    }
    Err("the kernel kept answering EAGAIN".into())
}

/// A page was present before its one compaction installed it: something
/// other than this library wrote the to-space.
#[derive(Debug, thiserror::Error)]
#[error("the to-space page was already present (written behind the compaction's back)")]
struct AlreadyInstalled;

/// SCHED_FIFO priority 1 for the calling thread; false when refused.
fn make_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads `param`, a live local; pid 0 is the
    // calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// SCHED_BATCH for the calling thread (best effort, no privilege needed):
/// a batch thread that wakes never preempts the running one, so opening
/// the gate at the flip does not put the background thread ahead of the
/// pausing thread (which every mutator waits for) on its CPU.
fn make_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`, a live local; pid 0 is the
    // calling thread.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
