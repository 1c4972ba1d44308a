//! The mechanism: handler threads read events and resolve faults; a fill
//! thread replays a working set and fills the rest. Where bytes come from
//! is the [`PageSource`]'s business, what to fetch the policy's.
//!
//! - `events`: handler threads, reading messages and applying events;
//! - `resolve`: serving one fault (claims, readahead window, async reads);
//! - `install`: fetching claimed pages, installing them run by run;
//! - `strategy`: one implementation per strategy (COPY, COPY+WP, MOVE,
//!   CONTINUE) behind [`strategy::Resolver`];
//! - `fill` (the background policies' engine side): replay and fill;
//! - `lifecycle`: shutdown, detach (drain) and hand-over.

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::EventfdFlags;
use rustix::mm::Advice;
use tracing::{debug, debug_span, error, info, trace, warn};
use uffd::{
    ContinueMode, CopyMode, Event, EventBuffer, Features, MoveMode, Pagefault, PoisonMode,
    RegisterMode, Resolved, Uffd, WriteProtectMode, ZeropageMode,
};

use crate::config::{Config, BATCH_BYTES};
use crate::handover::{PageKind, PagerState, SpanState, StateError};

use crate::region::{state, PageStates, Region, Span, Table};
use crate::source::{is_zero, Content, Fetched, PageSource, SourceError};
use crate::stats::{Counters, Stats};
use crate::wait::{SpinPolicy, Waiter};
use crate::{Prefetch, Strategy, WaitMode, WorkingSet};

mod events;
mod fill;
mod install;
mod lifecycle;
mod resolve;
mod strategy;

use crate::stats::panic_message;
use crate::stop::StopSignal;
use events::spawn_handlers;
pub use events::MAX_HANDLERS_PER_CPU;
use fill::{fill_main, fill_missing, FillEnd};
use install::{release, ClaimGuard};
pub use lifecycle::{Detached, HandedOver, RegisteredRange, StillRegistered};
use strategy::{resolver, Resolver};

/// What is wrong with a pager's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No regions were given.
    #[error("no regions to serve")]
    NoRegions,
    /// `content_in_place` without [`Strategy::Continue`].
    #[error(
        "content_in_place needs Strategy::Continue (a MINOR-registered shmem or hugetlbfs region)"
    )]
    InPlaceNeedsContinue,
    /// [`Strategy::Continue`] on a region without an alias.
    #[error("Strategy::Continue needs an alias mapping for every region (Region::with_alias)")]
    ContinueNeedsAlias,
    /// [`Strategy::Move`] on hugetlb memory.
    #[error("Strategy::Move works on anonymous memory only, not hugetlb")]
    MoveNeedsBasePages,
    /// [`Strategy::Move`] on a kernel without `UFFDIO_MOVE`.
    #[error("Strategy::Move needs a kernel with UFFDIO_MOVE (Linux 6.8)")]
    MoveUnsupported,
    /// [`Strategy::CopyWp`] on a userfaultfd without write-protect faults.
    #[error("Strategy::CopyWp needs a userfaultfd opened with Features::PAGEFAULT_FLAG_WP")]
    CopyWpNeedsWp,
    /// A granule that is not a power of two from 4 KiB to 2 MiB.
    #[error("granule {0} must be a power of two from 4096 to 2097152")]
    Granule(u64),
    /// Zero handler threads.
    #[error("at least one handler thread is needed")]
    NoThreads,
    /// A target pid that cannot be a process.
    #[error("invalid target pid {0}")]
    TargetPid(i32),
    /// [`Pager::hand_over`] of a pager with no target.
    #[error("the pager has no target to hand over")]
    NoTarget,
}

/// Why a pager could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PagerError {
    /// A region is malformed.
    #[error("invalid region at {start:#x}+{len:#x}: {why}")]
    InvalidRegion {
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The configuration does not fit the regions or the userfaultfd.
    #[error("invalid pager configuration: {0}")]
    Config(ConfigError),
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// [`Pager::detach`] could not make every page independent of the
    /// pager: the ranges listed stay registered (the pager was shut down
    /// anyway; a fault there waits for a handler that no longer exists).
    #[error("{}", .0.describe_incomplete())]
    DetachIncomplete(Box<Detached>),
    /// A handed-over state does not describe valid memory.
    #[error(transparent)]
    State(StateError),
    /// Creating a buffer, eventfd, pidfd or thread failed.
    #[error("{what}: {source}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> PagerError {
    move |source| PagerError::Io { what, source }
}

/// A page the source could not produce, which was poisoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonedPage {
    /// Its address in the target.
    pub address: u64,
    /// Its source offset.
    pub source_offset: u64,
    /// Why the source failed.
    pub error: String,
}

/// Pages installed so far against pages in the regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Pages installed by any path (faults, readahead, replay, fill).
    pub installed_pages: u64,
    /// Pages in all regions at start.
    pub total_pages: u64,
}

/// Asks a pager to shut down; cheap to clone and send to another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<StopSignal>,
}

impl ShutdownHandle {
    /// Requests shutdown: handler threads stop after the fault they are
    /// serving. Only an atomic store and an eventfd `write(2)`, so it is
    /// async-signal-safe and may be called from a SIGTERM handler.
    /// [`Pager::shutdown`] then wakes every waiter and joins the threads.
    pub fn request(&self) {
        self.stop.request();
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.stop.is_requested()
    }
}

/// Builds a [`Pager`]; see [`Pager::builder`].
#[derive(Debug)]
pub struct PagerBuilder {
    source: Arc<dyn PageSource>,
    config: Config,
    pidfd: Option<OwnedFd>,
}

impl PagerBuilder {
    /// How missing pages are installed (default [`Strategy::Copy`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.config.strategy = strategy;
        self
    }

    /// The unit a fault resolves: a power of two from 4 KiB to 2 MiB
    /// (default 4 KiB). Hugetlb regions always resolve whole huge pages.
    pub fn granule(mut self, bytes: u64) -> Self {
        self.config.granule = bytes;
        self
    }

    /// Handler threads per userfaultfd (default 1).
    pub fn threads(mut self, threads: usize) -> Self {
        self.config.threads = threads;
        self
    }

    /// One handler thread per CPU this process may run on (at most
    /// [`MAX_HANDLERS_PER_CPU`]), each pinned to its CPU and sleeping
    /// until a fault arrives (no spinning; replaces [`Self::threads`] and
    /// [`Self::wait`]). A fault wakes all of them and the first to read it
    /// serves it: usually the one on the CPU the faulting thread just left
    /// idle, so the fault is served on that core and the faulting thread
    /// woken there, with no cross-core wake-up. That is what a one-thread
    /// handler gets when the scheduler happens to place it beside a
    /// serially faulting vCPU (measured on a 2-core VM: 5 us per fault
    /// instead of 14). Default off.
    pub fn handler_per_cpu(mut self, on: bool) -> Self {
        self.config.handler_per_cpu = on;
        self
    }

    /// How handler threads wait (default [`WaitMode::Block`]).
    pub fn wait(mut self, wait: WaitMode) -> Self {
        self.config.wait = wait;
        self
    }

    /// What else to fetch on a fault (default [`Prefetch::None`]).
    pub fn prefetch(mut self, prefetch: Prefetch) -> Self {
        self.config.prefetch = prefetch;
        self
    }

    /// After any replay, install every page not yet present, in the
    /// background, at a lower priority; a demand fault takes over any page it
    /// claimed (default off).
    pub fn background_fill(mut self, on: bool) -> Self {
        self.config.background_fill = on;
        self
    }

    /// Prefetch a recorded working set first: its pages are installed in
    /// file order, a window of up to 2 MiB per pass (only the recorded pages
    /// of each window), while demand faults keep priority.
    pub fn replay(mut self, working_set: Option<WorkingSet>) -> Self {
        self.config.replay = working_set;
        self
    }

    /// Record the pages demand faults touch first ([`Pager::working_set`]).
    pub fn record(mut self, on: bool) -> Self {
        self.config.record = on;
        self
    }

    /// How often a transient source error is retried before the page is
    /// poisoned (default 3).
    pub fn source_retries(mut self, retries: u32) -> Self {
        self.config.source_retries = retries;
        self
    }

    /// Map zero pages for all-zero pages found in data the source returned
    /// (default on; the check stops at the first non-zero bytes).
    pub fn detect_zero_pages(mut self, on: bool) -> Self {
        self.config.detect_zero_pages = on;
        self
    }

    /// [`Strategy::Continue`] only: the page cache of the regions' file
    /// already holds the content (the snapshot *is* that shmem/tmpfs file,
    /// or something else filled it), so a fault is answered with
    /// `UFFDIO_CONTINUE` alone: nothing is read from the source and nothing
    /// is written through the alias (except zeros for pages a REMOVE event
    /// dropped). Zero-copy restore; default off.
    pub fn content_in_place(mut self, on: bool) -> Self {
        self.config.content_in_place = on;
        self
    }

    /// The target's process id: its exit (seen through a pidfd) stops the
    /// handlers as if an ioctl had returned ESRCH.
    pub fn target_pid(mut self, pid: i32) -> Self {
        self.config.target_pid = Some(pid);
        self
    }

    /// The target's pidfd, already open (a server opened it to check its
    /// peer): the pager watches it instead of opening a second one, so a
    /// VM has one watcher; [`Pager::is_finished`] says when it exited.
    pub fn target_pidfd(mut self, pidfd: OwnedFd) -> Self {
        self.pidfd = Some(pidfd);
        self
    }

    /// A name for logs and thread names.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Starts serving `uffd` for `regions`.
    ///
    /// The userfaultfd may belong to another process (a VMM that sent it
    /// over a socket): then the regions are that process's addresses and
    /// the ioctls act on its memory. The ranges must already be registered
    /// (see [`register`] for this process's own memory). The fd is made
    /// non-blocking.
    ///
    /// # Safety
    /// The contract of [`Uffd::copy`] for the memory it fills, the same as
    /// [`crate::SigbusPagerBuilder::start`]'s: if the regions are memory of
    /// this process, no Rust reference may cover them and no Rust object may
    /// rely on the contents of their missing pages (the pager fills them
    /// with the source's bytes, where the kernel would give zeros), for as
    /// long as the pager serves them. Memory of another process (a VMM that
    /// sent its userfaultfd) holds no Rust object of ours: nothing to uphold.
    pub unsafe fn start(self, uffd: Uffd, regions: Vec<Region>) -> Result<Pager, PagerError> {
        Pager::start(self.source, self.config, uffd, regions, None, self.pidfd)
    }

    /// Carries on where another pager stopped ([`Pager::hand_over`], maybe
    /// in another process): serves `uffd` for the memory `state` describes,
    /// never installing a page that is present, keeping removed pages zero
    /// and poisoned ones poisoned, and continuing its recording.
    ///
    /// The previous pager may have read a fault and stopped before serving
    /// it; every range is woken at start, so such a thread faults again and
    /// this pager sees it. Regions with an alias ([`Strategy::Continue`])
    /// cannot be resumed: the alias is another process's address.
    ///
    /// # Safety
    /// As for [`PagerBuilder::start`].
    pub unsafe fn resume(self, uffd: Uffd, state: PagerState) -> Result<Pager, PagerError> {
        let regions = state
            .spans
            .iter()
            .enumerate()
            .map(|(i, span)| span.region(i))
            .collect::<Result<Vec<Region>, StateError>>()
            .map_err(PagerError::State)?;
        let pager = Pager::start(
            self.source,
            self.config,
            uffd,
            regions,
            Some(state),
            self.pidfd,
        )?;
        for target in lock(&pager.shared.targets).iter() {
            for span in &read(&target.table).spans {
                let _ = target.uffd.wake(span.start, span.len);
            }
        }
        Ok(pager)
    }
}

/// Registers every region with `mode` on `uffd` (for memory of this
/// process; a VMM registers its own).
pub fn register(uffd: &Uffd, regions: &[Region], mode: RegisterMode) -> Result<(), uffd::Error> {
    for r in regions {
        uffd.register(r.start, r.len, mode)?;
    }
    Ok(())
}

/// A running pager: handler threads serving one userfaultfd (plus those of
/// forked children), and optionally a fill thread.
///
/// Dropping it shuts it down like [`Pager::shutdown`].
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    source: Arc<dyn PageSource>,
    counters: Counters,
    stop: Arc<StopSignal>,
    targets: Mutex<Vec<Arc<Target>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    recorded: Mutex<Vec<u64>>,
    poisoned: Mutex<Vec<PoisonedPage>>,
    fill_done: Mutex<bool>,
    fill_cv: Condvar,
    live_targets: Mutex<usize>,
    live_cv: Condvar,
    total_pages: u64,
    installed_pages: AtomicU64,
    pidfd: Option<OwnedFd>,
    record_page_size: u64,
    next_id: AtomicUsize,
    /// Asynchronous reads that finished, waiting for a handler thread to
    /// install them; `completion_fd` (an eventfd) wakes the handlers.
    completions: Mutex<Vec<Completion>>,
    completions_pending: AtomicUsize,
    completion_fd: OwnedFd,
    fetches_in_flight: AtomicUsize,
    /// The scratch of the worker that installs answers on the thread that
    /// received them ([`Shared::finish_here`]); held while it installs,
    /// so a stop waits for that install to end.
    answer_worker: Mutex<Option<Scratch>>,
    /// Handler threads not asleep on their epoll set: spinning or
    /// working, so they take completions without being woken.
    handlers_awake: AtomicUsize,
}

/// An asynchronous read that finished: what it was for and what it got.
#[derive(Debug)]
struct Completion {
    target: Arc<Target>,
    claim: Claim,
    from: usize,
    claims: Vec<u8>,
    started: Instant,
    result: Result<Fetched, SourceError>,
}

#[derive(Debug)]
struct Target {
    id: usize,
    uffd: Uffd,
    /// Regions as mapped now. Resolvers hold the read lock from their
    /// state check to the end of their ioctl; reading messages (and so
    /// applying REMOVE/UNMAP/REMAP) holds the write lock, so no page is
    /// installed with stale contents after a REMOVE was read.
    table: RwLock<Table>,
    gone: AtomicBool,
    readahead: Mutex<ReadaheadState>,
    watch_pid: bool,
}

#[derive(Debug, Default)]
struct ReadaheadState {
    states: usize,
    last: usize,
    next: usize,
    window: usize,
}

/// What became of one resolution attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// An event changed the range; the waiters were woken. Try again.
    Abandoned,
    /// An event is pending: read events, then retry.
    Defer,
    Gone,
}

impl Pager {
    /// A builder serving pages from `source`.
    pub fn builder(source: Arc<dyn PageSource>) -> PagerBuilder {
        PagerBuilder {
            source,
            config: Config::default(),
            pidfd: None,
        }
    }

    fn start(
        source: Arc<dyn PageSource>,
        config: Config,
        uffd: Uffd,
        regions: Vec<Region>,
        resumed: Option<PagerState>,
        pidfd: Option<OwnedFd>,
    ) -> Result<Pager, PagerError> {
        validate(&config, &uffd, &regions)?;
        rustix::fs::fcntl_setfl(&uffd, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| io_err("making the userfaultfd non-blocking")(e.into()))?;
        let stop = StopSignal::new().map_err(|e| io_err("eventfd")(e.into()))?;
        let completion_fd =
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| io_err("eventfd")(e.into()))?;
        let pidfd = match (pidfd, config.target_pid) {
            (Some(fd), _) => Some(fd),
            (None, Some(pid)) => {
                let pid = rustix::process::Pid::from_raw(pid)
                    .ok_or(PagerError::Config(ConfigError::TargetPid(pid)))?;
                Some(
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                        .map_err(|e| io_err("pidfd_open of the target")(e.into()))?,
                )
            }
            (None, None) => None,
        };
        let total_pages = regions.iter().map(|r| r.len / r.page_size).sum();
        let record_page_size = regions.iter().map(|r| r.page_size).min().unwrap_or(4096);
        let track_dirty = resolver(config.strategy).tracks_writes();
        let table = Table::new(&regions, track_dirty);
        let (mut installed, mut recorded) = (0, Vec::new());
        if let Some(state) = resumed {
            for span in &state.spans {
                if let Some(t) = table.spans.iter().find(|t| t.start == span.start) {
                    span.apply(&t.states);
                }
            }
            installed = state.count(PageKind::Present);
            recorded = state.recorded;
        }
        let needs_fill = config.background_fill || config.replay.is_some();
        let shared = Arc::new(Shared {
            config,
            source,
            counters: Counters::default(),
            stop: Arc::new(stop),
            targets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            recorded: Mutex::new(recorded),
            poisoned: Mutex::new(Vec::new()),
            fill_done: Mutex::new(!needs_fill),
            fill_cv: Condvar::new(),
            live_targets: Mutex::new(0),
            live_cv: Condvar::new(),
            total_pages,
            installed_pages: AtomicU64::new(installed),
            pidfd,
            record_page_size,
            next_id: AtomicUsize::new(0),
            completions: Mutex::new(Vec::new()),
            completions_pending: AtomicUsize::new(0),
            completion_fd,
            fetches_in_flight: AtomicUsize::new(0),
            answer_worker: Mutex::new(None),
            handlers_awake: AtomicUsize::new(0),
        });
        let target = shared.add_target(uffd, table, true);
        let pager = Pager {
            shared: Arc::clone(&shared),
        };
        spawn_handlers(&shared, &target)?;
        if needs_fill {
            let s = Arc::clone(&shared);
            let t = Arc::clone(&target);
            let handle = std::thread::Builder::new()
                .name(format!("{}-fill", shared.config.name))
                .spawn(move || {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        fill_main(&s, &t)
                    }));
                    if let Err(panic) = run {
                        s.counters.handler_panics.fetch_add(1, Ordering::Relaxed);
                        error!(
                            pager = %s.config.name,
                            panic = panic_message(&*panic),
                            "the fill thread panicked; demand faults are still served"
                        );
                        *lock(&s.fill_done) = true;
                        s.fill_cv.notify_all();
                    }
                })
                .map_err(io_err("spawning the fill thread"))?;
            lock(&shared.threads).push(handle);
        }
        Ok(pager)
    }

    /// A snapshot of the counters (all userfaultfds this pager serves).
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Installed pages against the regions' pages.
    pub fn progress(&self) -> Progress {
        Progress {
            installed_pages: self.shared.installed_pages.load(Ordering::Relaxed),
            total_pages: self.shared.total_pages,
        }
    }

    /// The pages demand faults touched first, in order (needs
    /// [`PagerBuilder::record`]).
    pub fn working_set(&self) -> WorkingSet {
        WorkingSet::new(
            self.shared.record_page_size,
            lock(&self.shared.recorded).clone(),
        )
        .with_source_len(self.shared.source.len())
    }

    /// Pages poisoned because the source failed.
    pub fn poisoned(&self) -> Vec<PoisonedPage> {
        lock(&self.shared.poisoned).clone()
    }

    /// Addresses (in the target) of pages written since they were
    /// installed, with [`Strategy::CopyWp`].
    pub fn dirty_pages(&self) -> Vec<u64> {
        let targets = lock(&self.shared.targets);
        let Some(target) = targets.first() else {
            return Vec::new();
        };
        let table = read(&target.table);
        let mut out = Vec::new();
        for span in &table.spans {
            for i in span.first..span.index_end() {
                if span.states.is_dirty(i) {
                    out.push(span.addr_of(i));
                }
            }
        }
        out
    }

    /// Waits until replay and background fill are done; false on timeout.
    pub fn wait_filled(&self, timeout: Duration) -> bool {
        let done = lock(&self.shared.fill_done);
        let (done, _) = self
            .shared
            .fill_cv
            .wait_timeout_while(done, timeout, |d| !*d)
            .unwrap_or_else(PoisonError::into_inner);
        *done
    }

    /// Waits until every served process is gone (or shutdown was
    /// requested); false on timeout.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        let live = lock(&self.shared.live_targets);
        let (live, _) = self
            .shared
            .live_cv
            .wait_timeout_while(live, timeout, |l| *l > 0 && !self.shared.stopping())
            .unwrap_or_else(PoisonError::into_inner);
        *live == 0 || self.shared.stopping()
    }

    /// True when every served process has exited.
    pub fn is_finished(&self) -> bool {
        *lock(&self.shared.live_targets) == 0
    }

    /// A handle to request shutdown from elsewhere (another thread, a
    /// signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: Arc::clone(&self.shared.stop),
        }
    }

    /// Stops every thread, wakes every thread waiting on a fault in any
    /// region (they fault again; once the last copy of the userfaultfd is
    /// closed the kernel serves them), closes the userfaultfds and returns
    /// the final counters.
    pub fn shutdown(self) -> Stats {
        self.stop_and_join();
        self.stats()
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn validate(config: &Config, uffd: &Uffd, regions: &[Region]) -> Result<(), PagerError> {
    if regions.is_empty() {
        return Err(PagerError::Config(ConfigError::NoRegions));
    }
    for r in regions {
        r.validate().map_err(|why| PagerError::InvalidRegion {
            start: r.start,
            len: r.len,
            why,
        })?;
        if config.content_in_place && config.strategy != Strategy::Continue {
            return Err(PagerError::Config(ConfigError::InPlaceNeedsContinue));
        }
    }
    resolver(config.strategy)
        .check(uffd, regions)
        .map_err(PagerError::Config)?;
    let g = config.granule;
    if !g.is_power_of_two() || !(4096..=BATCH_BYTES).contains(&g) {
        return Err(PagerError::Config(ConfigError::Granule(g)));
    }
    if config.threads == 0 {
        return Err(PagerError::Config(ConfigError::NoThreads));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read(l: &RwLock<Table>) -> std::sync::RwLockReadGuard<'_, Table> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(l: &RwLock<Table>) -> std::sync::RwLockWriteGuard<'_, Table> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.is_requested()
    }

    fn add_target(&self, uffd: Uffd, table: Table, watch_pid: bool) -> Arc<Target> {
        let target = Arc::new(Target {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            uffd,
            table: RwLock::new(table),
            gone: AtomicBool::new(false),
            readahead: Mutex::new(ReadaheadState::default()),
            watch_pid,
        });
        lock(&self.targets).push(Arc::clone(&target));
        *lock(&self.live_targets) += 1;
        target
    }

    /// A read of an asynchronous source is no longer in flight.
    fn fetch_ended(&self) {
        let in_flight = self.fetches_in_flight.fetch_sub(1, Ordering::SeqCst);
        self.counters
            .async_in_flight_max
            .fetch_max(in_flight as u64, Ordering::Relaxed);
    }

    /// Installs a finished asynchronous read on this thread, the one that
    /// received its answer (a source's own, see
    /// [`crate::AsyncPageSource::read_direct`]) when every handler
    /// sleeps: the kernel wakes the faulting thread from here, and no
    /// handler is woken to do it. Queued for the handlers instead when
    /// one is awake (spinning, it takes the answer at no cost; measured:
    /// installing here then only added contention), while another answer
    /// is being installed this way, or once the pager stops.
    fn finish_here(self: &Arc<Shared>, done: Completion) {
        if self.handlers_awake.load(Ordering::SeqCst) > 0 {
            return self.complete(done);
        }
        let Ok(mut scratch) = self.answer_worker.try_lock() else {
            return self.complete(done);
        };
        if self.stopping() {
            drop(scratch);
            return self.complete(done);
        }
        let mut worker = match scratch.take() {
            Some(s) => Worker::with_scratch(self, s),
            None => match Worker::new(self) {
                Ok(w) => w,
                Err(e) => {
                    debug!(error = %e, "no scratch for installing answers where they arrive");
                    drop(scratch);
                    return self.complete(done);
                }
            },
        };
        self.fetch_ended();
        Counters::add(&self.counters.async_installed_on_arrival, 1);
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.finish_fetch(done)));
        *scratch = Some(worker.into_scratch());
        if let Err(panic) = run {
            // The claim's guard poisoned its pages; the source's thread
            // carries on.
            self.counters.handler_panics.fetch_add(1, Ordering::Relaxed);
            error!(
                pager = %self.config.name,
                panic = panic_message(&*panic),
                "installing an answer where it arrived panicked"
            );
        }
    }

    /// Queues a finished asynchronous read for the handler threads.
    fn complete(&self, done: Completion) {
        self.fetch_ended();
        lock(&self.completions).push(done);
        self.completions_pending.fetch_add(1, Ordering::SeqCst);
        let _ = rustix::io::write(&self.completion_fd, &1u64.to_ne_bytes());
    }

    /// Takes every finished asynchronous read.
    fn take_completions(&self) -> Vec<Completion> {
        if self.completions_pending.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        let done = std::mem::take(&mut *lock(&self.completions));
        self.completions_pending
            .fetch_sub(done.len(), Ordering::SeqCst);
        done
    }

    /// The claimed pages cannot be produced: poison them so that access
    /// raises SIGBUS instead of reading wrong bytes or hanging.
    fn poison(
        &self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
        why: &str,
    ) -> Step {
        let span = &claim.span;
        let ps = span.page_size;
        let addr = span.addr_of(from);
        let len = claims.len() as u64 * ps;
        error!(address = addr, error = why, source = %self.source.describe(), "the page cannot be produced; poisoning it");
        let table = read(&target.table);
        if table.generation != claim.generation {
            drop(table);
            release(target, claim, from, claims);
            return Step::Abandoned;
        }
        // SAFETY: the range is the target's registered memory that we
        // claimed; its contents cannot be produced, so SIGBUS on access is
        // the intended result.
        let r = target.uffd.resolve(addr, len, ps, |off, rest| unsafe {
            target.uffd.poison(addr + off, rest, PoisonMode::empty())
        });
        match r {
            Ok(Resolved::Complete { .. }) => {
                for k in 0..claims.len() {
                    span.states.set(from + k, state::POISONED);
                }
                Counters::add(&self.counters.poisoned, claims.len() as u64);
                let mut list = lock(&self.poisoned);
                for k in 0..claims.len() {
                    list.push(PoisonedPage {
                        address: span.addr_of(from + k),
                        source_offset: span.source_of(from + k),
                        error: why.to_string(),
                    });
                }
                Step::Done
            }
            Ok(Resolved::RetryAfterEvents { .. }) => {
                drop(table);
                release(target, claim, from, claims);
                Step::Defer
            }
            Ok(Resolved::TargetGone) => Step::Gone,
            Err(err) => {
                error!(error = %err, "POISON failed");
                drop(table);
                release(target, claim, from, claims);
                Step::Done
            }
        }
    }

    /// This pager's strategy's implementation.
    fn resolver(&self) -> &'static dyn Resolver {
        resolver(self.config.strategy)
    }

    fn mark_gone(&self, target: &Target) {
        if !target.gone.swap(true, Ordering::SeqCst) {
            debug!(target = target.id, "target process gone");
            let mut live = lock(&self.live_targets);
            *live = live.saturating_sub(1);
            self.live_cv.notify_all();
        }
    }
}

/// Per-thread scratch: a staging buffer and a zero buffer, both 2 MiB.
#[derive(Debug)]
struct Worker<'a> {
    shared: &'a Arc<Shared>,
    staging: uffd::Mapping,
    zeros: uffd::Mapping,
    claims: Vec<u8>,
    /// Source ranges installed, for [`Worker::tell_source`].
    installed: Vec<(u64, u64)>,
}

/// A [`Worker`]'s own memory, kept between uses.
#[derive(Debug)]
struct Scratch {
    staging: uffd::Mapping,
    zeros: uffd::Mapping,
    claims: Vec<u8>,
    installed: Vec<(u64, u64)>,
}

/// Which pages of `lo..hi` this thread claimed and how they are to be
/// filled.
#[derive(Debug, Clone)]
struct Claim {
    span: Span,
    generation: u64,
    /// Map every page now (handler claims: the faulting granule and its
    /// readahead); the fill thread only writes through the alias for
    /// [`Strategy::Continue`].
    map_now: bool,
    /// Pages below this index were demanded (PRESENT afterwards); the rest
    /// are prefetched (PREFETCHED).
    demand_hi: usize,
}
