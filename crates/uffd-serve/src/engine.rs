//! How a VM's faults are served, behind a small trait so the server loop
//! does not care which engine does the work.
//!
//! The server starts one [`RunningVm`] per accepted handshake, watches the
//! VMM's pid, and asks the engine for its working set and statistics.
//! [`PagerEngine`] serves with the project's pager runtime (`uffd-pager`):
//! batched event reads, zero-page detection, REMOVE handling, working-set
//! record and replay, background fill. The baseline written like
//! Firecracker's example on-demand handler is `uffd-bench`'s
//! `OneByOneEngine`, behind this same trait.

// Handing a VMM's memory to the pager is `unsafe` (see `Engine::start`).
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use uffd::Uffd;
use uffd_pager::{HandedOver, PageSource, Pager, PagerState, Strategy, WaitMode, WorkingSet};

use crate::protocol::{Region, PAGE_4K};
use crate::stats::{DrainOutcome, DrainReport, EngineStats, RegisteredRange};

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
    ///
    /// `uffd` and `regions` are what a VMM sent in its handshake: its own
    /// memory, which no Rust reference of this process covers (a VMM in
    /// another process; in tests, one in this process that touches its
    /// memory only through raw copies, as [`uffd::Mapping`] does). That is
    /// what makes serving it sound (see `PagerBuilder::start`).
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
    /// One handler thread per CPU, pinned, sleeping (see
    /// [`uffd_pager::PagerBuilder::handler_per_cpu`]); `threads` and
    /// `spin` are then unused.
    pub handler_per_cpu: bool,
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
            handler_per_cpu: false,
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
        let builder = self.builder(regions[0].page_size, pid, pidfd);
        // SAFETY: the VMM's memory, sent in its handshake, which no Rust
        // reference of this process covers (this trait method's contract).
        let pager = unsafe { builder.start(uffd, regions.to_vec()) }?;
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
        let builder = self.builder(page_size, pid, pidfd);
        // SAFETY: as in `start`: a VMM's memory that a previous server
        // handed over.
        let pager = unsafe { builder.resume(uffd, state) }?;
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
            .handler_per_cpu(self.config.handler_per_cpu)
            .replay(replay)
            .background_fill(self.config.background_fill)
            .record(self.config.record)
            .target_pidfd(pidfd)
            .name(format!("vm-{pid}"))
    }
}

impl RunningVm for PagerVm {
    fn is_finished(&self) -> bool {
        self.pager.as_ref().is_none_or(Pager::is_finished)
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
