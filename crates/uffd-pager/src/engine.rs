//! The mechanism: handler threads read events and resolve faults; a fill
//! thread replays a working set and fills the rest. Where bytes come from
//! is the [`PageSource`]'s business, what to fetch the policy's.

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
use crate::mem::AlignedAnon;
use crate::region::{state, PageStates, Region, Span, Table};
use crate::source::{is_zero, Content, Fetched, PageSource, SourceError};
use crate::stats::{Counters, Stats};
use crate::wait::{SpinPolicy, Waiter};
use crate::{Prefetch, Strategy, WaitMode, WorkingSet};

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

    fn describe_incomplete(&self) -> String {
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

/// Asks a pager to shut down; cheap to clone and send to another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<StopSignal>,
}

#[derive(Debug)]
struct StopSignal {
    flag: AtomicBool,
    fd: OwnedFd,
}

impl ShutdownHandle {
    /// Requests shutdown: handler threads stop after the fault they are
    /// serving. Only an atomic store and an eventfd `write(2)`, so it is
    /// async-signal-safe and may be called from a SIGTERM handler.
    /// [`Pager::shutdown`] then wakes every waiter and joins the threads.
    pub fn request(&self) {
        self.stop.flag.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&self.stop.fd, &1u64.to_ne_bytes());
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.stop.flag.load(Ordering::SeqCst)
    }
}

/// Builds a [`Pager`]; see [`Pager::builder`].
#[derive(Debug)]
pub struct PagerBuilder {
    source: Arc<dyn PageSource>,
    config: Config,
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
    /// background, yielding to demand faults (default off).
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
    pub fn start(self, uffd: Uffd, regions: Vec<Region>) -> Result<Pager, PagerError> {
        Pager::start(self.source, self.config, uffd, regions, None)
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
    pub fn resume(self, uffd: Uffd, state: PagerState) -> Result<Pager, PagerError> {
        let regions = state
            .spans
            .iter()
            .enumerate()
            .map(|(i, span)| span.region(i))
            .collect::<Result<Vec<Region>, StateError>>()
            .map_err(PagerError::State)?;
        let pager = Pager::start(self.source, self.config, uffd, regions, Some(state))?;
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
    /// Handler threads currently serving demand faults; the fill thread
    /// yields while it is non-zero.
    demand_active: AtomicUsize,
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
        }
    }

    fn start(
        source: Arc<dyn PageSource>,
        config: Config,
        uffd: Uffd,
        regions: Vec<Region>,
        resumed: Option<PagerState>,
    ) -> Result<Pager, PagerError> {
        validate(&config, &uffd, &regions)?;
        rustix::fs::fcntl_setfl(&uffd, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| io_err("making the userfaultfd non-blocking")(e.into()))?;
        let stop_fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| io_err("eventfd")(e.into()))?;
        let completion_fd =
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| io_err("eventfd")(e.into()))?;
        let pidfd = match config.target_pid {
            Some(pid) => {
                let pid = rustix::process::Pid::from_raw(pid)
                    .ok_or(PagerError::Config(ConfigError::TargetPid(pid)))?;
                Some(
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                        .map_err(|e| io_err("pidfd_open of the target")(e.into()))?,
                )
            }
            None => None,
        };
        let total_pages = regions.iter().map(|r| r.len / r.page_size).sum();
        let record_page_size = regions.iter().map(|r| r.page_size).min().unwrap_or(4096);
        let track_dirty = config.strategy == Strategy::CopyWp;
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
            stop: Arc::new(StopSignal {
                flag: AtomicBool::new(false),
                fd: stop_fd,
            }),
            targets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            demand_active: AtomicUsize::new(0),
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
    pub fn hand_over(self) -> Result<(Uffd, PagerState), PagerError> {
        let target = lock(&self.shared.targets)
            .first()
            .cloned()
            .ok_or(PagerError::Config(ConfigError::NoTarget))?;
        let fd = rustix::io::fcntl_dupfd_cloexec(&target.uffd, 0)
            .map_err(|e| io_err("duplicating the userfaultfd")(e.into()))?;
        let uffd = Uffd::from_fd(fd, target.uffd.features())?;
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
        Ok((uffd, state))
    }

    fn stop_and_join(&self) {
        self.shutdown_handle().request();
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
        if config.strategy == Strategy::Continue && r.alias().is_none() {
            return Err(PagerError::Config(ConfigError::ContinueNeedsAlias));
        }
        if config.strategy == Strategy::Move && r.page_size != 4096 {
            return Err(PagerError::Config(ConfigError::MoveNeedsBasePages));
        }
    }
    let g = config.granule;
    if !g.is_power_of_two() || !(4096..=BATCH_BYTES).contains(&g) {
        return Err(PagerError::Config(ConfigError::Granule(g)));
    }
    if config.threads == 0 {
        return Err(PagerError::Config(ConfigError::NoThreads));
    }
    // The kernel gates MOVE on its own support, not on the fd's handshake.
    let kernel_has_move = uffd::probe().map_or(true, |info| info.features.contains(Features::MOVE));
    if config.strategy == Strategy::Move && !kernel_has_move {
        return Err(PagerError::Config(ConfigError::MoveUnsupported));
    }
    if config.strategy == Strategy::CopyWp && !uffd.features().contains(Features::PAGEFAULT_FLAG_WP)
    {
        return Err(PagerError::Config(ConfigError::CopyWpNeedsWp));
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
        self.stop.flag.load(Ordering::Relaxed)
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

    /// Queues a finished asynchronous read for the handler threads.
    fn complete(&self, done: Completion) {
        let in_flight = self.fetches_in_flight.fetch_sub(1, Ordering::SeqCst);
        self.counters
            .async_in_flight_max
            .fetch_max(in_flight as u64, Ordering::Relaxed);
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

    fn mark_gone(&self, target: &Target) {
        if !target.gone.swap(true, Ordering::SeqCst) {
            debug!(target = target.id, "target process gone");
            let mut live = lock(&self.live_targets);
            *live = live.saturating_sub(1);
            self.live_cv.notify_all();
        }
    }
}

fn spawn_handlers(shared: &Arc<Shared>, target: &Arc<Target>) -> Result<(), PagerError> {
    for n in 0..shared.config.threads {
        let s = Arc::clone(shared);
        let t = Arc::clone(target);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{}-{n}", shared.config.name, target.id))
            .spawn(move || handle_faults_surviving_panics(&s, &t))
            .map_err(io_err("spawning a handler thread"))?;
        lock(&shared.threads).push(handle);
    }
    Ok(())
}

/// Runs a handler thread; a panic in it (a source or the engine failing
/// unforeseen) is logged and counted, the pages it held are poisoned by
/// their [`ClaimGuard`], and the handler starts again after a pause that
/// grows while panics repeat: the target never loses its handler.
fn handle_faults_surviving_panics(shared: &Arc<Shared>, target: &Arc<Target>) {
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

/// The text of a panic payload, when it is one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn handler_main(shared: &Arc<Shared>, target: &Arc<Target>) {
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
    let waiter = match Waiter::new(&target.uffd, &shared.stop.fd, &shared.completion_fd, pidfd) {
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
        WaitMode::Block => SpinPolicy::block(),
        WaitMode::Spin(budget) => SpinPolicy::fixed(budget),
        WaitMode::Adaptive(budget) => SpinPolicy::adaptive(budget),
    };
    // While spinning, the handler reads the non-blocking userfaultfd again
    // at once (no epoll_wait before it), so a fault costs one read and its
    // resolving ioctl, and the handler is never woken.
    let mut spinning = false;
    while !shared.stopping() && !target.gone.load(Ordering::Relaxed) {
        if deferred.is_empty() && !spinning && !wait_for_messages(shared, target, &waiter) {
            continue;
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
        shared.demand_active.fetch_add(1, Ordering::SeqCst);
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
        shared.demand_active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sleeps until messages may be readable or asynchronous reads finished;
/// false when stopping, gone or nothing happened within a second.
fn wait_for_messages(shared: &Shared, target: &Target, waiter: &Waiter) -> bool {
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
fn drain(
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

fn apply_event(
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
            // Shared file mappings keep their page cache contents; only
            // private memory reads as zero after MADV_DONTNEED/REMOVE.
            if shared.config.strategy != Strategy::Continue {
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

/// Per-thread scratch: a staging buffer and a zero buffer, both 2 MiB.
#[derive(Debug)]
struct Worker<'a> {
    shared: &'a Arc<Shared>,
    staging: AlignedAnon,
    zeros: AlignedAnon,
    claims: Vec<u8>,
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

impl<'a> Worker<'a> {
    fn new(shared: &'a Arc<Shared>) -> std::io::Result<Worker<'a>> {
        let staging = AlignedAnon::new(BATCH_BYTES as usize)?;
        // MOVE needs source pages that only this process maps: a forked
        // child must not share them.
        staging.advise(Advice::LinuxDontFork)?;
        if shared.config.strategy == Strategy::Move && shared.config.granule == BATCH_BYTES {
            // Whole 2 MiB granules then move as one huge page.
            let _ = staging.advise(Advice::LinuxHugepage);
        }
        let zeros = AlignedAnon::new(BATCH_BYTES as usize)?;
        zeros.advise(Advice::LinuxDontFork)?;
        Ok(Worker {
            shared,
            staging,
            zeros,
            claims: Vec::with_capacity((BATCH_BYTES / 4096) as usize),
        })
    }

    fn strategy(&self) -> Strategy {
        self.shared.config.strategy
    }

    fn serve(&mut self, target: &Arc<Target>, fault: Pagefault, started: Instant) -> Step {
        if fault.kind() == uffd::FaultKind::WriteProtect {
            return self.serve_wp(target, fault);
        }
        for _ in 0..8 {
            match self.serve_missing(target, fault, started) {
                Step::Abandoned => continue,
                other => return other,
            }
        }
        // Repeatedly overtaken by events: let the thread fault again.
        let _ = target.uffd.wake(fault.page(4096), 4096);
        Step::Done
    }

    fn serve_wp(&mut self, target: &Target, fault: Pagefault) -> Step {
        let table = read(&target.table);
        let Some(span) = table.lookup(fault.address) else {
            drop(table);
            let _ = target.uffd.wake(fault.page(4096), 4096);
            return Step::Done;
        };
        let page = fault.page(span.page_size);
        if span.states.mark_dirty(span.index(page)) {
            self.shared
                .counters
                .pages_dirtied
                .fetch_add(1, Ordering::Relaxed);
        }
        match target
            .uffd
            .write_protect(page, span.page_size, WriteProtectMode::empty())
        {
            Ok(uffd::Outcome::RetryAfterEvents) => Step::Defer,
            Ok(uffd::Outcome::TargetGone) => Step::Gone,
            Ok(_) => Step::Done,
            Err(e) => {
                self.shared
                    .counters
                    .failed_unprotects
                    .fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "unprotecting a written page failed");
                let _ = target.uffd.wake(page, span.page_size);
                Step::Done
            }
        }
    }

    fn serve_missing(&mut self, target: &Arc<Target>, fault: Pagefault, started: Instant) -> Step {
        let c = &self.shared.counters;
        let table = read(&target.table);
        let Some(span) = table.lookup(fault.address) else {
            drop(table);
            return self.serve_outside(target, fault);
        };
        let p = span.index(fault.address);
        let current = span.states.get(p);
        match current {
            state::CLAIMED | state::CLAIMED_ZERO => {
                c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                if self.strategy() == Strategy::Continue {
                    // The fill thread writes through the alias without an
                    // ioctl, so nobody would map this page: come back.
                    return Step::Defer;
                }
                // The claimer's ioctl wakes the whole range.
                return Step::Done;
            }
            state::PREFETCHED | state::PRESENT | state::POISONED => {
                let hit =
                    current == state::PREFETCHED && span.states.cas(p, current, state::PRESENT);
                if hit {
                    c.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                }
                let addr = span.addr_of(p);
                let ps = span.page_size;
                if self.strategy() == Strategy::Continue && current != state::POISONED {
                    // The content is in the page cache; map it.
                    let r = target
                        .uffd
                        .continue_all(addr, ps, ps, ContinueMode::empty());
                    drop(table);
                    return match r {
                        Ok(Resolved::Complete {
                            installed,
                            existing,
                        }) => {
                            Counters::add(&c.pages_continued, installed / ps);
                            Counters::add(&c.eexist, existing / ps);
                            if !hit {
                                c.latency.record(started.elapsed());
                            }
                            Step::Done
                        }
                        Ok(Resolved::RetryAfterEvents { .. }) => Step::Defer,
                        Ok(Resolved::TargetGone) => Step::Gone,
                        Err(e) => {
                            c.failed_installs.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "CONTINUE failed");
                            let _ = target.uffd.wake(addr, ps);
                            Step::Done
                        }
                    };
                }
                if !hit {
                    c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                }
                if current == state::PRESENT
                    && !target.uffd.features().contains(Features::EVENT_REMOVE)
                    && span.states.cas(p, state::PRESENT, state::MISSING)
                {
                    // Without REMOVE events the page may have been dropped
                    // behind our back: fetch it again (EEXIST if not).
                    drop(table);
                    return Step::Abandoned;
                }
                drop(table);
                let _ = target.uffd.wake(addr, ps);
                return Step::Done;
            }
            _ => {}
        }
        // A page the fill or replay claimed is taken over: this fault is
        // served now, not after the background batch.
        let stolen = current == state::CLAIMED_BG
            && self.strategy() != Strategy::Continue
            && span.states.steal(p);
        let first_claim = if stolen {
            c.stolen_from_background.fetch_add(1, Ordering::Relaxed);
            state::CLAIMED
        } else {
            match span.states.claim(p) {
                Some(claim) => claim,
                None if current == state::CLAIMED_BG => {
                    // Continue: the fill writes it through the alias and
                    // maps nothing; come back once it is there.
                    c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                    return Step::Defer;
                }
                None => return Step::Abandoned,
            }
        };
        if first_claim == state::CLAIMED && self.shared.config.record {
            lock(&self.shared.recorded).push(span.source_of(p));
        }
        let (lo, demand_hi, hi) = self.window(target, span, p);
        self.claims.clear();
        for i in lo..hi {
            self.claims.push(if i == p {
                first_claim
            } else {
                span.states.claim(i).unwrap_or(0)
            });
        }
        let claim = Claim {
            span: span.clone(),
            generation: table.generation,
            map_now: true,
            demand_hi,
        };
        drop(table);
        if hi > demand_hi {
            self.shared.source.advise(
                claim.span.source_of(demand_hi),
                ((hi - demand_hi) as u64) * claim.span.page_size,
            );
        }
        if let Some(remote) = self.shared.source.asynchronous() {
            if matches!(self.strategy(), Strategy::Copy | Strategy::CopyWp) {
                let claims = self.claims.clone();
                self.fetch_in_background(remote, target, claim, lo, claims, started);
                return Step::Done;
            }
        }
        let claims = std::mem::take(&mut self.claims);
        let shared: &Shared = self.shared;
        let _guard = ClaimGuard {
            shared,
            target,
            claim: &claim,
            from: lo,
            claims: &claims,
        };
        // Demand part first: its thread wakes before the readahead runs.
        let (demand, ahead) = claims.split_at(demand_hi - lo);
        let mut step = self.fetch_and_install(target, &claim, lo, demand);
        if step == Step::Done {
            c.latency.record(started.elapsed());
            if !ahead.is_empty() {
                let ahead_step = self.fetch_and_install(target, &claim, demand_hi, ahead);
                if ahead_step == Step::Gone {
                    step = Step::Gone;
                }
            }
        } else if !ahead.is_empty() {
            self.release(target, &claim, demand_hi, ahead);
        }
        drop(_guard);
        self.claims = claims;
        step
    }

    /// Starts reading the claimed pages of `from..from + claims.len()` on
    /// the asynchronous source's runtime; a handler thread installs them
    /// when they arrive ([`Worker::finish_fetch`]). The faulting threads
    /// sleep until then; this thread goes back to other faults.
    fn fetch_in_background(
        &self,
        remote: &crate::AsyncSource,
        target: &Arc<Target>,
        claim: Claim,
        from: usize,
        claims: Vec<u8>,
        started: Instant,
    ) {
        let (Some(first), Some(last)) = (
            claims.iter().position(|&c| c != 0),
            claims.iter().rposition(|&c| c != 0),
        ) else {
            return;
        };
        let claims = claims[first..=last].to_vec();
        let from = from + first;
        let ps = claim.span.page_size;
        let offset = claim.span.source_of(from);
        let len = claims.len() * ps as usize;
        let shared = Arc::clone(self.shared);
        let target = Arc::clone(target);
        shared.fetches_in_flight.fetch_add(1, Ordering::SeqCst);
        Counters::add(&shared.counters.async_fetches, 1);
        let retries = shared.config.source_retries;
        // Weak: a read still in flight must not keep a stopped pager (and
        // so the runtime it runs on) alive.
        let done_shared = Arc::downgrade(&shared);
        remote.start(offset, len, retries, move |result| {
            let Some(done_shared) = done_shared.upgrade() else {
                return;
            };
            done_shared.complete(Completion {
                target,
                claim,
                from,
                claims,
                started,
                result,
            });
        });
    }

    /// Installs (or poisons) what an asynchronous read brought.
    fn finish_fetch(&mut self, done: Completion) {
        let Completion {
            target,
            claim,
            from,
            claims,
            started,
            result,
        } = done;
        let shared: &Shared = self.shared;
        let _guard = ClaimGuard {
            shared,
            target: &target,
            claim: &claim,
            from,
            claims: &claims,
        };
        let step = match result {
            Ok(Fetched::Zero) => self.install_fetched(
                &target,
                &claim,
                from,
                &claims,
                Content::Zero,
                std::ptr::null(),
                false,
            ),
            Ok(Fetched::Data(bytes)) => self.install_fetched(
                &target,
                &claim,
                from,
                &claims,
                Content::Data,
                bytes.as_ptr(),
                false,
            ),
            Err(e) if claims.iter().filter(|&&c| c != 0).count() > 1 => {
                // One bad page must not poison its neighbours: ask again
                // page by page.
                debug!(error = %e, "batch read failed; retrying page by page");
                let remote = self
                    .shared
                    .source
                    .asynchronous()
                    .expect("completions come from an asynchronous source");
                for (k, &c) in claims.iter().enumerate() {
                    if c != 0 {
                        self.fetch_in_background(
                            remote,
                            &target,
                            claim.clone(),
                            from + k,
                            vec![c],
                            started,
                        );
                    }
                }
                Step::Abandoned
            }
            Err(e) => self.poison(&target, &claim, from, &claims, &e),
        };
        match step {
            Step::Done => self.shared.counters.latency.record(started.elapsed()),
            Step::Gone => self.shared.mark_gone(&target),
            Step::Abandoned | Step::Defer => {}
        }
    }

    /// A fault outside every region (a range grown by mremap, say): what
    /// the kernel itself would map there, a zero page.
    fn serve_outside(&mut self, target: &Target, fault: Pagefault) -> Step {
        self.shared
            .counters
            .faults_outside_regions
            .fetch_add(1, Ordering::Relaxed);
        let page = fault.page(4096);
        match target
            .uffd
            .zeropage_all(page, 4096, 4096, ZeropageMode::empty())
        {
            Ok(Resolved::RetryAfterEvents { .. }) => Step::Defer,
            Ok(Resolved::TargetGone) => Step::Gone,
            Ok(Resolved::Complete { .. }) => Step::Done,
            Err(e) => {
                debug!(error = %e, address = fault.address, "fault outside the regions");
                let _ = target.uffd.wake(page, 4096);
                Step::Done
            }
        }
    }

    /// The pages to claim for a demand fault at `p`: `lo..demand_hi` is
    /// its granule, `demand_hi..hi` the readahead.
    fn window(&self, target: &Target, span: &Span, p: usize) -> (usize, usize, usize) {
        let ps = span.page_size;
        let granule = self.shared.config.granule.max(ps);
        let addr = span.addr_of(p);
        let g_start = (addr & !(granule - 1)).max(span.start);
        let g_end = ((addr & !(granule - 1)) + granule).min(span.end());
        let lo = span.index(g_start);
        let demand_hi = span.index(g_end - 1) + 1;
        let Prefetch::Readahead { max_bytes } = self.shared.config.prefetch else {
            return (lo, demand_hi, demand_hi);
        };
        let max_pages = (max_bytes.min(BATCH_BYTES) / ps).max(1) as usize;
        let granule_pages = demand_hi - lo;
        let mut ra = lock(&target.readahead);
        let same = ra.states == Arc::as_ptr(&span.states) as usize;
        let sequential = same && p >= ra.last && p <= ra.next + granule_pages;
        ra.window = if sequential {
            (ra.window * 2).max(granule_pages * 2).min(max_pages)
        } else {
            ra.window / 2
        };
        let hi = (p + ra.window).max(demand_hi).min(span.index_end());
        let hi = hi.min(lo + max_pages.max(granule_pages));
        ra.states = Arc::as_ptr(&span.states) as usize;
        ra.last = p;
        ra.next = hi;
        (lo, demand_hi, hi.max(demand_hi))
    }

    /// Undoes claims on `from..` and wakes those pages so that any thread
    /// waiting on them faults again.
    fn release(&self, target: &Target, claim: &Claim, from: usize, claims: &[u8]) {
        release(target, claim, from, claims);
    }

    /// Reads the claimed pages of `from..from + claims.len()` from the
    /// source and installs them.
    fn fetch_and_install(
        &mut self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
    ) -> Step {
        let n = claims.len();
        let Some(first) = claims.iter().position(|&c| c != 0) else {
            return Step::Done;
        };
        let last = claims
            .iter()
            .rposition(|&c| c != 0)
            .expect("one claim exists")
            + 1;
        let (from, claims) = (from + first, &claims[first..last]);
        debug_assert!(claims.len() <= n);
        let span = &claim.span;
        let ps = span.page_size;
        let len = claims.len() as u64 * ps;
        let offset = span.source_of(from);
        let all_zero_claims = claims.iter().all(|&c| c == state::CLAIMED_ZERO);
        let strategy = self.strategy();
        // Where the bytes end up before the ioctl.
        let in_place = self.shared.config.content_in_place;
        // True when `src` is the source's own mapping, which only the
        // kernel may read (see `MappedBytes`).
        let mut from_mapping = false;
        let fetched = if all_zero_claims {
            Ok((Content::Zero, std::ptr::null::<u8>()))
        } else if in_place {
            // The page cache holds the content already: map it as it is.
            let alias = span
                .alias_of(from)
                .expect("validated: Continue has an alias");
            Ok((Content::Data, alias.cast_const()))
        } else if strategy == Strategy::Continue {
            let alias = span
                .alias_of(from)
                .expect("validated: Continue has an alias");
            // SAFETY: the alias maps the claimed pages of the region; the
            // caller of `Region::with_alias` vouched that nothing else
            // references it, and we own these pages' claims.
            let buf = unsafe { std::slice::from_raw_parts_mut(alias, len as usize) };
            self.read_source(offset, buf)
                .map(|c| (c, alias.cast_const()))
        } else if let Some(bytes) = self
            .shared
            .source
            .mapped(offset, len as usize)
            .filter(|_| strategy != Strategy::Move)
        {
            from_mapping = true;
            Ok((Content::Data, bytes.as_ptr()))
        } else {
            let buf = self.staging_for(len);
            self.read_source(offset, buf)
                .map(|c| (c, self.staging.as_ptr().cast_const()))
        };
        let (content, src) = match fetched {
            Ok(r) => r,
            Err(e) if claims.len() > 1 => {
                debug!(error = %e, "batch read failed; retrying page by page");
                let mut step = Step::Done;
                for k in 0..claims.len() {
                    let s = self.fetch_and_install(target, claim, from + k, &claims[k..=k]);
                    if s != Step::Done {
                        step = s;
                    }
                }
                return step;
            }
            Err(e) => return self.poison(target, claim, from, claims, &e),
        };
        self.install_fetched(target, claim, from, claims, content, src, from_mapping)
    }

    /// Installs the claimed pages of `from..from + claims.len()` (trimmed
    /// to claimed ends) whose bytes are at `src` (`Content::Zero`: none
    /// needed). `from_mapping` says `src` is the source's own mapping,
    /// which only the kernel may read.
    #[allow(clippy::too_many_arguments)]
    fn install_fetched(
        &mut self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
        content: Content,
        src: *const u8,
        from_mapping: bool,
    ) -> Step {
        let span = &claim.span;
        let ps = span.page_size;
        let len = claims.len() as u64 * ps;
        let offset = span.source_of(from);
        let strategy = self.strategy();
        let in_place = self.shared.config.content_in_place;
        // Per page: zero or data.
        let zero_page = |k: usize| -> bool {
            claims[k] == state::CLAIMED_ZERO
                || content == Content::Zero
                || (self.shared.config.detect_zero_pages
                    && !in_place
                    && if from_mapping {
                        self.shared.source.is_known_zero(offset + k as u64 * ps, ps)
                    } else {
                        // SAFETY: `src` holds `len` readable bytes (the alias
                        // or the staging buffer, both this pager's memory).
                        let page = unsafe {
                            std::slice::from_raw_parts(src.add(k * ps as usize), ps as usize)
                        };
                        is_zero(page)
                    })
        };
        // A whole aligned huge page of data moves with one PMD update only
        // if it moves in one piece: keep its zero pages in it.
        let whole_huge_move = strategy == Strategy::Move
            && content == Content::Data
            && len == BATCH_BYTES
            && span.addr_of(from) % BATCH_BYTES == 0
            && claims
                .iter()
                .all(|&c| c == state::CLAIMED || c == state::CLAIMED_BG);
        // Unclaimed pages (present already, or not selected by a sparse
        // replay window) are never scanned.
        let mut kinds: Vec<u8> = (0..claims.len())
            .map(|k| {
                if claims[k] == 0 {
                    0
                } else if !whole_huge_move && zero_page(k) {
                    1
                } else {
                    2
                }
            })
            .collect();
        if strategy == Strategy::Continue {
            // Zero pages must read as zero through the alias too.
            for (k, &kind) in kinds.iter().enumerate() {
                if kind == 1 {
                    let alias = span.alias_of(from + k).expect("validated");
                    // SAFETY: a claimed page of the alias, as above.
                    let page = unsafe { std::slice::from_raw_parts_mut(alias, ps as usize) };
                    if !is_zero(page) {
                        page.fill(0);
                    }
                }
            }
            if !in_place {
                Counters::add(
                    &self.shared.counters.pages_written_through_alias,
                    kinds.iter().filter(|&&k| k == 2).count() as u64,
                );
            }
        }

        // Install under the read lock, after checking no event overtook us.
        let table = read(&target.table);
        // A background claim a demand fault took over is that fault's to
        // install: skip it, it does not make the batch stale.
        let stolen = |k: usize| {
            claims[k] == state::CLAIMED_BG
                && matches!(span.states.get(from + k), state::CLAIMED | state::PRESENT)
        };
        let intact = table.generation == claim.generation
            && claims
                .iter()
                .enumerate()
                .all(|(k, &cl)| cl == 0 || span.states.get(from + k) == cl || stolen(k));
        for (k, kind) in kinds.iter_mut().enumerate() {
            if stolen(k) {
                *kind = 0;
            }
        }
        if !intact {
            drop(table);
            self.shared
                .counters
                .abandoned
                .fetch_add(1, Ordering::Relaxed);
            self.release(target, claim, from, claims);
            return Step::Abandoned;
        }
        let mut k = 0;
        while k < kinds.len() {
            let kind = kinds[k];
            let mut end = k + 1;
            while end < kinds.len() && kinds[end] == kind {
                end += 1;
            }
            if kind == 0 {
                k = end;
                continue;
            }
            let idx = from + k;
            let addr = span.addr_of(idx);
            let run = (end - k) as u64 * ps;
            let map = idx < claim.demand_hi || claim.map_now;
            // SAFETY: `src + k * ps` lies inside the `len` bytes read above.
            let data = unsafe { src.add(k * ps as usize) };
            let result = self.install(target, addr, run, ps, kind == 1, data, map);
            let done = match result {
                Ok(Resolved::Complete {
                    installed,
                    existing,
                }) => {
                    Counters::add(&self.shared.counters.eexist, existing / ps);
                    Counters::add(&self.shared.counters.bytes_installed, installed);
                    let counter = match (kind, strategy) {
                        (1, _) => &self.shared.counters.pages_zero,
                        (_, Strategy::Move) => &self.shared.counters.pages_moved,
                        (_, Strategy::Continue) => &self.shared.counters.pages_continued,
                        _ => &self.shared.counters.pages_copied,
                    };
                    if strategy != Strategy::Continue || map || kind == 1 {
                        Counters::add(counter, installed / ps);
                    }
                    end - k
                }
                Ok(Resolved::RetryAfterEvents { done }) => {
                    self.shared.counters.eagain.fetch_add(1, Ordering::Relaxed);
                    let done_pages = (done / ps) as usize;
                    self.mark_installed(claim, from + k, done_pages);
                    drop(table);
                    self.release(
                        target,
                        claim,
                        from + k + done_pages,
                        &claims[k + done_pages..],
                    );
                    return Step::Defer;
                }
                Ok(Resolved::TargetGone) => return Step::Gone,
                Err(e) if from_mapping && e.errno() == Some(rustix::io::Errno::FAULT) => {
                    // The kernel could not read the source's mapping: the
                    // file lost these bytes (it shrank). Ask it again the
                    // way that reports why; pages it cannot produce are
                    // poisoned, never left to re-fault forever.
                    drop(table);
                    let rest = &claims[k..];
                    let run_offset = span.source_of(from + k);
                    let buf = self.staging_for(rest.len() as u64 * ps);
                    return match self.read_source(run_offset, buf) {
                        Err(source_error) => {
                            self.poison(target, claim, from + k, rest, &source_error)
                        }
                        Ok(_) => {
                            // Readable again (the file grew back): retry.
                            self.release(target, claim, from + k, rest);
                            Step::Abandoned
                        }
                    };
                }
                Err(e) => {
                    self.shared
                        .counters
                        .failed_installs
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, address = addr, "installing pages failed; waking the waiters");
                    drop(table);
                    self.release(target, claim, from + k, &claims[k..]);
                    return Step::Abandoned;
                }
            };
            self.mark_installed(claim, from + k, done);
            k = end;
        }
        Step::Done
    }

    /// Installs one run of pages of one kind.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        target: &Target,
        addr: u64,
        len: u64,
        ps: u64,
        zero: bool,
        data: *const u8,
        map: bool,
    ) -> Result<Resolved, uffd::Error> {
        let uffd = &target.uffd;
        match self.strategy() {
            Strategy::Continue => {
                if !map {
                    // Background: the page cache has the content now; the
                    // first touch costs only a CONTINUE.
                    return Ok(Resolved::Complete {
                        installed: len,
                        existing: 0,
                    });
                }
                let result = uffd.continue_all(addr, len, ps, ContinueMode::empty());
                let hole = matches!(
                    result,
                    Err(uffd::Error::Ioctl {
                        errno: uffd::Errno::FAULT,
                        ..
                    })
                );
                if !(hole && self.shared.config.content_in_place) {
                    return result;
                }
                // Content in place, but the run has holes (pages not in the
                // page cache: CONTINUE fails with EFAULT). A hole reads as
                // zeros: allocate it as such with an atomic OR of zero into
                // one byte through the alias, which leaves pages that exist
                // unchanged, then map the run again.
                for page in 0..(len / ps) as usize {
                    // SAFETY: in place, `data` is the run's alias address
                    // (writable, shared, mapped for the pager's life by
                    // `Region::with_alias`'s contract); an atomic OR of 0
                    // never changes a byte, even under a concurrent writer.
                    unsafe {
                        let byte = data.cast_mut().add(page * ps as usize);
                        std::sync::atomic::AtomicU8::from_ptr(byte).fetch_or(0, Ordering::Relaxed);
                    }
                }
                uffd.continue_all(addr, len, ps, ContinueMode::empty())
            }
            Strategy::CopyWp => {
                let src = if zero {
                    self.zeros.as_ptr().cast_const()
                } else {
                    data
                };
                // SAFETY: `src` holds `len` bytes (the zero buffer is 2 MiB
                // and runs never exceed it); `addr` is a claimed range of a
                // registered region.
                unsafe { uffd.copy_all(addr, src, len, ps, CopyMode::WP) }
            }
            _ if zero && ps == 4096 => uffd.zeropage_all(addr, len, ps, ZeropageMode::empty()),
            _ if zero => {
                // hugetlb has no ZEROPAGE: copy from the never-written buffer.
                // SAFETY: as above.
                unsafe { uffd.copy_all(addr, self.zeros.as_ptr(), len, ps, CopyMode::empty()) }
            }
            Strategy::Move => {
                // SAFETY: `data` is this worker's staging buffer, filled
                // just now; after the move those pages are gone from it and
                // the next read refills them. `addr` is claimed, registered.
                let r = unsafe { uffd.move_all(addr, data.cast_mut(), len, ps, MoveMode::empty()) };
                match r {
                    Err(e) if e.errno() == Some(rustix::io::Errno::BUSY) => {
                        // A shared source page (a fork raced the read): copy.
                        // SAFETY: as for COPY below.
                        unsafe { uffd.copy_all(addr, data, len, ps, CopyMode::empty()) }
                    }
                    r => r,
                }
            }
            Strategy::Copy => {
                // SAFETY: `data` holds `len` readable bytes that nobody
                // writes meanwhile (the source's mapping or our staging
                // buffer); `addr` is a claimed range of a registered region.
                unsafe { uffd.copy_all(addr, data, len, ps, CopyMode::empty()) }
            }
        }
    }

    fn mark_installed(&self, claim: &Claim, from: usize, pages: usize) {
        for i in from..from + pages {
            let s = if i < claim.demand_hi {
                state::PRESENT
            } else {
                state::PREFETCHED
            };
            claim.span.states.set(i, s);
        }
        if from + pages > claim.demand_hi {
            let prefetched = from + pages - from.max(claim.demand_hi);
            Counters::add(&self.shared.counters.prefetched_pages, prefetched as u64);
        }
        self.shared
            .installed_pages
            .fetch_add(pages as u64, Ordering::Relaxed);
    }

    /// The first `len` bytes of this worker's staging buffer.
    #[allow(clippy::mut_from_ref)]
    fn staging_for(&self, len: u64) -> &mut [u8] {
        assert!(len <= BATCH_BYTES, "a claim never exceeds BATCH_BYTES");
        // SAFETY: the staging buffer is this worker's own memory, BATCH_BYTES
        // long; only this worker's thread uses it, one read at a time, and
        // the slice does not outlive the read-and-install it serves.
        unsafe { std::slice::from_raw_parts_mut(self.staging.as_ptr(), len as usize) }
    }

    fn read_source(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let mut attempt = 0;
        loop {
            match self.shared.source.read_at(offset, buf) {
                Err(e) if e.is_transient() && attempt < self.shared.config.source_retries => {
                    attempt += 1;
                    self.shared
                        .counters
                        .source_retries
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, attempt, "retrying source read");
                    std::thread::sleep(Duration::from_millis(1 << attempt.min(6)));
                }
                r => return r,
            }
        }
    }

    /// The source cannot produce these pages: poison them so that access
    /// raises SIGBUS instead of reading wrong bytes or hanging.
    fn poison(
        &self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
        e: &SourceError,
    ) -> Step {
        self.shared
            .poison(target, claim, from, claims, &e.to_string())
    }
}

/// Undoes claims on `from..` and wakes those pages so that any thread
/// waiting on them faults again.
fn release(target: &Target, claim: &Claim, from: usize, claims: &[u8]) {
    let mut any = false;
    for (k, &cl) in claims.iter().enumerate() {
        if cl != 0 {
            claim.span.states.release(from + k, cl);
            any = true;
        }
    }
    if !any {
        return;
    }
    let ps = claim.span.page_size;
    let len = claims.len() as u64 * ps;
    let old = claim.span.addr_of(from);
    let _ = target.uffd.wake(old, len);
    // An event may have moved the pages: wake them where they are now.
    let table = read(&target.table);
    if let Some(now) = table.address_of(&claim.span.states, from) {
        if now != old {
            let _ = target.uffd.wake(now, len);
        }
    }
}

/// Holds claimed pages while a thread fetches and installs them. Dropped
/// during a panic (a source, or the engine itself, failed in a way nobody
/// foresaw), it poisons them: the faulting threads get SIGBUS instead of
/// waiting forever on pages nobody will install, and the same failure is
/// not retried in a loop.
struct ClaimGuard<'a> {
    shared: &'a Shared,
    target: &'a Target,
    claim: &'a Claim,
    from: usize,
    claims: &'a [u8],
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(
                pager = %self.shared.config.name,
                address = format_args!("{:#x}", self.claim.span.addr_of(self.from)),
                pages = self.claims.len(),
                "a panic while serving these pages; poisoning them"
            );
            self.shared.poison(
                self.target,
                self.claim,
                self.from,
                self.claims,
                "the engine panicked while serving the page",
            );
        }
    }
}

/// The fill thread: replays the working set, then fills everything else.
fn fill_main(shared: &Arc<Shared>, target: &Arc<Target>) {
    let _span = debug_span!("fill", pager = %shared.config.name).entered();
    let finish = || {
        *lock(&shared.fill_done) = true;
        shared.fill_cv.notify_all();
    };
    let mut worker = match Worker::new(shared) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "fill thread cannot allocate its buffers");
            finish();
            return;
        }
    };
    if let Some(ws) = &shared.config.replay {
        if replay(&mut worker, shared, target, ws) == FillEnd::Gone {
            shared.mark_gone(target);
            return finish();
        }
    }
    if shared.config.background_fill {
        match fill_missing(&mut worker, shared, target, None) {
            FillEnd::Gone => {
                shared.mark_gone(target);
                return finish();
            }
            FillEnd::Stopped | FillEnd::Done => {}
        }
    }
    finish();
}

/// Installs the recorded pages of `ws` in file order, one window of up to
/// [`BATCH_BYTES`] at a time: the source is read front to back, and each
/// window costs one claim pass and one install pass however sparse the
/// recorded pages are in it (only they are claimed). Demand faults keep
/// priority between windows.
fn replay(worker: &mut Worker<'_>, shared: &Shared, target: &Target, ws: &WorkingSet) -> FillEnd {
    let mut pages = ws.pages().to_vec();
    pages.sort_unstable();
    pages.dedup();
    let mut selected: Vec<bool> = Vec::new();
    let mut k = 0;
    let mut retries = 0;
    while k < pages.len() {
        if !fill_wait_turn(shared, target, None) {
            return FillEnd::Stopped;
        }
        let table = read(&target.table);
        let Some((span, lo)) = table.by_source(pages[k]) else {
            k += 1;
            continue;
        };
        let span = span.clone();
        let batch = ((BATCH_BYTES / span.page_size) as usize).max(1);
        let hi = (lo + batch).min(span.index_end());
        let window_end = span.source_of(hi);
        selected.clear();
        selected.resize(hi - lo, false);
        let mut next = k;
        while next < pages.len() && pages[next] < window_end {
            selected[((pages[next] - span.source_of(lo)) / span.page_size) as usize] = true;
            next += 1;
        }
        match fill_chunk(worker, target, table, span, lo, hi, Some(&selected)) {
            Step::Gone => return FillEnd::Gone,
            Step::Defer | Step::Abandoned if retries < 100 => {
                retries += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            _ => {
                retries = 0;
                k = next;
            }
        }
    }
    FillEnd::Done
}

/// Why [`fill_missing`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillEnd {
    /// Every chunk was visited (pages whose source failed are poisoned, or
    /// left missing when POISON failed).
    Done,
    /// Shutdown was requested or the deadline passed.
    Stopped,
    /// The target process is gone.
    Gone,
}

/// Installs every page of `target` still missing, in chunks aligned to
/// [`BATCH_BYTES`], yielding to demand faults (the handler threads keep
/// serving them meanwhile). Removed (ballooned) pages stay unpopulated:
/// they read as zero with or without a handler. Used by the background
/// fill and by [`Pager::detach`]; `deadline` stops it between chunks.
fn fill_missing(
    worker: &mut Worker<'_>,
    shared: &Shared,
    target: &Target,
    deadline: Option<Instant>,
) -> FillEnd {
    let states: Vec<Arc<PageStates>> = {
        let table = read(&target.table);
        let mut v: Vec<Arc<PageStates>> = Vec::new();
        for s in &table.spans {
            if !v.iter().any(|x| Arc::ptr_eq(x, &s.states)) {
                v.push(Arc::clone(&s.states));
            }
        }
        v
    };
    for st in states {
        let mut i = 0;
        let mut retries = 0;
        while i < st.len() {
            if !fill_wait_turn(shared, target, deadline) {
                return if target.gone.load(Ordering::Relaxed) {
                    FillEnd::Gone
                } else {
                    FillEnd::Stopped
                };
            }
            let table = read(&target.table);
            let Some(span) = table
                .spans
                .iter()
                .find(|s| Arc::ptr_eq(&s.states, &st) && i >= s.first && i < s.index_end())
                .cloned()
            else {
                i += 1;
                continue;
            };
            let batch = ((BATCH_BYTES / span.page_size) as usize).max(1);
            // Stay aligned to the batch so huge-page moves stay possible.
            let hi = ((i / batch + 1) * batch).min(span.index_end());
            match fill_chunk(worker, target, table, span, i, hi, None) {
                Step::Gone => return FillEnd::Gone,
                Step::Defer | Step::Abandoned if retries < 100 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                _ => {
                    retries = 0;
                    i = hi;
                }
            }
        }
    }
    FillEnd::Done
}

/// How the detach fill of one process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
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
fn settle(shared: &Arc<Shared>, target: &Target, deadline: Instant) -> Settled {
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
fn unsettled(s: u8) -> bool {
    matches!(s, state::MISSING | state::CLAIMED | state::CLAIMED_BG)
}

/// Missing pages, and pages a thread is installing right now.
fn unsettled_pages(target: &Target) -> (usize, usize) {
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
fn unregister_settled(
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

/// Demand faults first: waits while handlers serve them. False when the
/// fill should stop.
fn fill_wait_turn(shared: &Shared, target: &Target, deadline: Option<Instant>) -> bool {
    let go_on = || {
        !shared.stopping()
            && !target.gone.load(Ordering::Relaxed)
            && deadline.map_or(true, |d| Instant::now() < d)
    };
    while shared.demand_active.load(Ordering::SeqCst) > 0 {
        if !go_on() {
            return false;
        }
        std::thread::yield_now();
    }
    go_on()
}

/// Claims and installs the missing pages `lo..hi` of `span` (found under
/// `table`, which is released before reading the source); with `selected`,
/// only the pages it marks.
fn fill_chunk(
    worker: &mut Worker<'_>,
    target: &Target,
    table: std::sync::RwLockReadGuard<'_, Table>,
    span: Span,
    lo: usize,
    hi: usize,
    selected: Option<&[bool]>,
) -> Step {
    worker.claims.clear();
    let mut any = false;
    for i in lo..hi {
        let wanted = selected.map_or(true, |s| s[i - lo]);
        // Removed (ballooned) pages stay unpopulated.
        let c = if wanted {
            span.states.claim_background(i).unwrap_or(0)
        } else {
            0
        };
        any |= c != 0;
        worker.claims.push(c);
    }
    if !any {
        return Step::Done;
    }
    let claim = Claim {
        span,
        generation: table.generation,
        map_now: false,
        demand_hi: lo,
    };
    drop(table);
    let claims = std::mem::take(&mut worker.claims);
    let shared: &Shared = worker.shared;
    let guard = ClaimGuard {
        shared,
        target,
        claim: &claim,
        from: lo,
        claims: &claims,
    };
    let step = worker.fetch_and_install(target, &claim, lo, &claims);
    drop(guard);
    worker.claims = claims;
    step
}
