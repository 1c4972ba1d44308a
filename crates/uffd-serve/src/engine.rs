//! How a VM's faults are served, behind a small trait so the server loop
//! does not care which engine does the work.
//!
//! The server starts one [`RunningVm`] per accepted handshake, watches the
//! VMM's pid, and asks the engine for its working set and statistics.
//! [`PagerEngine`] serves with the project's pager runtime (`uffd-pager`):
//! batched event reads, zero-page detection, REMOVE handling, working-set
//! record and replay, background fill. [`OneByOneEngine`] is the baseline
//! written like Firecracker's example on-demand handler.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use std::os::fd::OwnedFd;
use uffd::{CopyMode, Event, EventBuffer, Uffd};

use uffd_pager::{HandedOver, PageSource, Pager, PagerState, Strategy, WaitMode, WorkingSet};

use crate::protocol::{Region, PAGE_4K};
use crate::stats::{DrainOutcome, DrainReport, EngineStats, LatencyHistogram, RegisteredRange};

/// Why an engine could not start serving a VM.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A thread or an fd could not be created.
    #[error("starting the handler for the VM failed: {0}")]
    Start(String),
    /// The pager refused the VM's regions or userfaultfd.
    #[error(transparent)]
    Pager(#[from] uffd_pager::PagerError),
}

/// Starts serving VMs.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Starts serving `regions` of the VMM (process `pid`, watched through
    /// `pidfd`, the one watcher of this VM) behind `uffd`.
    fn start(
        &self,
        uffd: Uffd,
        regions: &[Region],
        pid: i32,
        pidfd: OwnedFd,
    ) -> Result<Box<dyn RunningVm>, EngineError>;
    /// Whether [`RunningVm::hand_over`] and [`Engine::resume`] work, so that
    /// a new server can take its VMs over.
    fn can_hand_over(&self) -> bool {
        false
    }
    /// Carries on serving a VM another server handed over: its userfaultfd
    /// and what that server's pager knew (see [`RunningVm::hand_over`]).
    fn resume(
        &self,
        uffd: Uffd,
        pid: i32,
        pidfd: OwnedFd,
        page_size: u64,
        state: PagerState,
    ) -> Result<Box<dyn RunningVm>, EngineError> {
        let _ = (uffd, pid, pidfd, page_size, state);
        Err(EngineError::Start(format!(
            "the {} engine cannot take VMs over",
            self.name()
        )))
    }
}

/// One VM being served.
pub trait RunningVm: Send {
    /// True once the VMM is gone (its pid exited, or an ioctl returned ESRCH).
    fn is_finished(&self) -> bool;
    /// The counters so far.
    fn stats(&self) -> EngineStats;
    /// First-touched pages so far, when recording.
    fn working_set(&self) -> Option<WorkingSet>;
    /// Stops every thread, waking any fault still waiting, and closes the
    /// server's copy of the userfaultfd.
    fn shutdown(&mut self);
    /// Stops serving without leaving the VM without a handler, for a new
    /// server to carry on ([`Engine::resume`]): the userfaultfd and pidfd
    /// (copies) and the pager's state. `None` when the engine cannot, or
    /// the VM was stopped already.
    fn hand_over(&mut self) -> Option<HandedOver> {
        None
    }
    /// For a VM that runs on after the server stops: makes it independent
    /// of the server (every page installed, every range unregistered)
    /// within `timeout`, then shuts down as [`RunningVm::shutdown`] does.
    /// The default only shuts down and says so.
    fn detach(&mut self, timeout: Duration) -> DrainReport {
        let _ = timeout;
        self.shutdown();
        DrainReport {
            outcome: DrainOutcome::NotSupported,
            error: None,
            installed_pages: 0,
            unregistered_bytes: 0,
            still_registered: Vec::new(),
            poisoned_pages: 0,
        }
    }
}

/// Settings of the pager engine.
#[derive(Debug, Clone)]
pub struct PagerEngineConfig {
    /// Handler threads per VM (at least one).
    pub threads: usize,
    /// Record first-touched pages.
    pub record: bool,
    /// Install these pages first, in large batches, while faults keep priority.
    pub prefetch: Option<WorkingSet>,
    /// Then install everything else in the background.
    pub background_fill: bool,
    /// Before sleeping, keep reading the userfaultfd this long.
    pub spin: Duration,
    /// Spin only while no other thread wants the core (see
    /// [`WaitMode::Adaptive`]); false spins regardless.
    pub spin_adaptive: bool,
    /// Unit of one resolve on 4 KiB regions (4 KiB = exactly the faulting page).
    pub granule: u64,
    /// Adaptive sequential readahead up to this many bytes per fault (0:
    /// none): a guest reading its memory in order gets large installs
    /// without a recorded working set, a guest touching it at random only
    /// what it touches.
    pub readahead: u64,
}

impl Default for PagerEngineConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            record: false,
            prefetch: None,
            background_fill: false,
            spin: Duration::ZERO,
            spin_adaptive: true,
            granule: PAGE_4K,
            readahead: 0,
        }
    }
}

/// Serves each VM with a [`uffd_pager::Pager`] (COPY strategy), all VMs
/// sharing one page source.
#[derive(Debug)]
pub struct PagerEngine {
    source: Arc<dyn PageSource>,
    config: PagerEngineConfig,
}

impl PagerEngine {
    /// An engine serving from `source` (e.g. a `uffd_pager::FileSource`).
    pub fn new(source: Arc<dyn PageSource>, config: PagerEngineConfig) -> Self {
        Self { source, config }
    }
}

struct PagerVm {
    pager: Option<Pager>,
    record: bool,
    /// What the pager reported when it was shut down.
    last: EngineStats,
    last_working_set: Option<WorkingSet>,
}

fn engine_stats(s: &uffd_pager::Stats) -> EngineStats {
    EngineStats {
        faults: s.faults_missing,
        duplicate_faults: s.duplicate_faults,
        installed_bytes: s.bytes_installed,
        zero_pages: s.pages_zero,
        prefetched_pages: s.prefetched_pages,
        prefetch_hits: s.prefetch_hits,
        removes: s.events_remove,
        eagain: s.eagain,
        poisoned: s.poisoned,
        p50_us: s.latency.p50_us,
        p90_us: s.latency.p90_us,
        p99_us: s.latency.p99_us,
        max_us: s.latency.max_us,
    }
}

impl Engine for PagerEngine {
    fn name(&self) -> &'static str {
        "pager"
    }

    fn start(
        &self,
        uffd: Uffd,
        regions: &[Region],
        pid: i32,
        pidfd: OwnedFd,
    ) -> Result<Box<dyn RunningVm>, EngineError> {
        let pager = self.builder(regions[0].page_size, pid, pidfd).start(
            uffd,
            regions
                .iter()
                .map(|r| uffd_pager::Region::new(r.base, r.size, r.offset, r.page_size))
                .collect(),
        )?;
        Ok(self.running(pager))
    }

    fn can_hand_over(&self) -> bool {
        true
    }

    fn resume(
        &self,
        uffd: Uffd,
        pid: i32,
        pidfd: OwnedFd,
        page_size: u64,
        state: PagerState,
    ) -> Result<Box<dyn RunningVm>, EngineError> {
        let pager = self.builder(page_size, pid, pidfd).resume(uffd, state)?;
        Ok(self.running(pager))
    }
}

impl PagerEngine {
    fn running(&self, pager: Pager) -> Box<dyn RunningVm> {
        Box::new(PagerVm {
            pager: Some(pager),
            record: self.config.record,
            last: EngineStats::default(),
            last_working_set: None,
        })
    }

    fn builder(&self, page_size: u64, pid: i32, pidfd: OwnedFd) -> uffd_pager::PagerBuilder {
        let replay = match &self.config.prefetch {
            Some(ws) if ws.page_size() != page_size => {
                tracing::warn!(
                    recorded = ws.page_size(),
                    page_size,
                    "the working set was recorded with another page size; not prefetching"
                );
                None
            }
            other => other.clone(),
        };
        let wait = match (self.config.spin.is_zero(), self.config.spin_adaptive) {
            (true, _) => WaitMode::Block,
            (false, true) => WaitMode::Adaptive(self.config.spin),
            (false, false) => WaitMode::Spin(self.config.spin),
        };
        Pager::builder(self.source.clone())
            .strategy(Strategy::Copy)
            .granule(self.config.granule.max(page_size))
            .prefetch(if self.config.readahead == 0 {
                uffd_pager::Prefetch::None
            } else {
                uffd_pager::Prefetch::Readahead {
                    max_bytes: self.config.readahead,
                }
            })
            .threads(self.config.threads.max(1))
            .wait(wait)
            .replay(replay)
            .background_fill(self.config.background_fill)
            .record(self.config.record)
            .target_pidfd(pidfd)
            .name(format!("vm-{pid}"))
    }
}

impl RunningVm for PagerVm {
    fn is_finished(&self) -> bool {
        self.pager.as_ref().map_or(true, Pager::is_finished)
    }
    fn stats(&self) -> EngineStats {
        self.pager
            .as_ref()
            .map_or_else(|| self.last.clone(), |p| engine_stats(&p.stats()))
    }
    fn working_set(&self) -> Option<WorkingSet> {
        if !self.record {
            return None;
        }
        match &self.pager {
            Some(p) => Some(p.working_set()),
            None => self.last_working_set.clone(),
        }
    }
    fn shutdown(&mut self) {
        if let Some(pager) = self.pager.take() {
            if self.record {
                self.last_working_set = Some(pager.working_set());
            }
            self.last = engine_stats(&pager.shutdown());
        }
    }
    fn hand_over(&mut self) -> Option<HandedOver> {
        let pager = self.pager.take()?;
        self.last = engine_stats(&pager.stats());
        match pager.hand_over() {
            Ok(handed) => Some(handed),
            Err(e) => {
                tracing::error!("handing the VM over failed: {e}");
                None
            }
        }
    }
    fn detach(&mut self, timeout: Duration) -> DrainReport {
        let Some(pager) = self.pager.take() else {
            return DrainReport {
                outcome: DrainOutcome::AlreadyStopped,
                error: None,
                installed_pages: 0,
                unregistered_bytes: 0,
                still_registered: Vec::new(),
                poisoned_pages: 0,
            };
        };
        if self.record {
            self.last_working_set = Some(pager.working_set());
        }
        let (outcome, detached) = match pager.detach(timeout) {
            Ok(d) => (DrainOutcome::Released, d),
            Err(uffd_pager::PagerError::DetachIncomplete(d)) => (DrainOutcome::Incomplete, *d),
            Err(e) => {
                // Not produced by today's pager; reported rather than trusted.
                tracing::error!("the drain failed: {e}");
                return DrainReport {
                    outcome: DrainOutcome::Failed,
                    error: Some(e.to_string()),
                    installed_pages: 0,
                    unregistered_bytes: 0,
                    still_registered: Vec::new(),
                    poisoned_pages: 0,
                };
            }
        };
        self.last = engine_stats(&detached.stats);
        DrainReport {
            outcome,
            error: None,
            installed_pages: detached.installed_pages,
            unregistered_bytes: detached.unregistered_bytes,
            still_registered: detached
                .still_registered
                .iter()
                .map(|r| RegisteredRange {
                    start: r.start,
                    len: r.len,
                    why: r.why.to_string(),
                })
                .collect(),
            poisoned_pages: detached.poisoned.len() as u64,
        }
    }
}

/// The baseline: written like Firecracker's example on-demand handler — one
/// thread, poll, read one message, one 4 KiB COPY per fault, no batching,
/// no zero-page detection, no wake after EEXIST.
#[derive(Debug)]
pub struct OneByOneEngine {
    source: Arc<dyn PageSource>,
}

impl OneByOneEngine {
    /// A baseline engine serving from `source`, as the example does from
    /// its mmap of the memory file.
    pub fn new(source: Arc<dyn PageSource>) -> Self {
        Self { source }
    }
}

/// The baseline's counters.
#[derive(Debug, Default)]
struct BaselineCounters {
    faults: AtomicU64,
    installed_bytes: AtomicU64,
    latency: LatencyHistogram,
}

struct OneByOneVm {
    counters: Arc<BaselineCounters>,
    pidfd: OwnedFd,
    stop: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Engine for OneByOneEngine {
    fn name(&self) -> &'static str {
        "one-by-one"
    }

    fn start(
        &self,
        uffd: Uffd,
        regions: &[Region],
        _pid: i32,
        pidfd: OwnedFd,
    ) -> Result<Box<dyn RunningVm>, EngineError> {
        let counters = Arc::new(BaselineCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let gone = Arc::new(AtomicBool::new(false));
        let (c, s, g, source, regions) = (
            counters.clone(),
            stop.clone(),
            gone.clone(),
            self.source.clone(),
            regions.to_vec(),
        );
        let thread = std::thread::Builder::new()
            .name("uffd-vm-baseline".into())
            .spawn(move || {
                let mut buf = EventBuffer::new(1);
                while !s.load(Relaxed) {
                    let mut fds = [PollFd::new(&uffd, PollFlags::IN)];
                    let ts = rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 50_000_000,
                    };
                    if !matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
                        continue;
                    }
                    let at = Instant::now();
                    let Ok(events) = uffd.read_events(&mut buf) else {
                        break;
                    };
                    for event in events.drain(..) {
                        let Event::Pagefault(fault) = event else {
                            continue;
                        };
                        let page = fault.page(PAGE_4K);
                        let Some(r) = regions.iter().find(|r| r.contains(page)) else {
                            continue;
                        };
                        c.faults.fetch_add(1, Relaxed);
                        let offset = r.file_offset(page);
                        let mut scratch = [0u8; PAGE_4K as usize];
                        let bytes = match source.mapped(offset, PAGE_4K as usize) {
                            Some(mapped) => mapped,
                            None => match source.read_at(offset, &mut scratch) {
                                Ok(_) => uffd_pager::MappedBytes::new(&scratch[..]),
                                Err(_) => continue,
                            },
                        };
                        // SAFETY: `bytes` is a live 4 KiB slice (the source's
                        // mapping or `scratch`); the destination is the VMM's
                        // registered memory.
                        let out =
                            unsafe { uffd.copy(page, bytes.as_ptr(), PAGE_4K, CopyMode::empty()) };
                        match out {
                            Ok(uffd::Outcome::TargetGone) => g.store(true, Relaxed),
                            Ok(_) => {
                                c.installed_bytes.fetch_add(PAGE_4K, Relaxed);
                                c.latency.record(at.elapsed());
                            }
                            Err(_) => {}
                        }
                    }
                }
            })
            .map_err(|e| EngineError::Start(e.to_string()))?;
        Ok(Box::new(OneByOneVm {
            counters,
            pidfd,
            stop,
            gone,
            thread: Some(thread),
        }))
    }
}

impl RunningVm for OneByOneVm {
    fn is_finished(&self) -> bool {
        let exited = || {
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            let now = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
        };
        self.gone.load(Relaxed) || exited()
    }
    fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            faults: c.faults.load(Relaxed),
            installed_bytes: c.installed_bytes.load(Relaxed),
            p50_us: c.latency.quantile_us(0.50),
            p90_us: c.latency.quantile_us(0.90),
            p99_us: c.latency.quantile_us(0.99),
            max_us: c.latency.max_us(),
            ..EngineStats::default()
        }
    }
    fn working_set(&self) -> Option<WorkingSet> {
        None
    }
    fn shutdown(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OneByOneVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
