//! What uffd is measured against, one of each kind:
//!
//! - the kernel's own fault-in of the snapshot file (`mmap` MAP_PRIVATE,
//!   warm page cache), and its allocation of fresh anonymous pages, the
//!   floor under any restore into private memory;
//! - a handler written like Firecracker's example on-demand handler: one
//!   thread, poll, read ONE message, one 4 KiB `UFFDIO_COPY` from the
//!   mapped memory file, a `UFFDIO_WAKE` after EEXIST (the example lacks it;
//!   without it a baseline could hang, which would measure nothing). It
//!   serves `uffd bench`'s in-process "typical" cases
//!   ([`typical_handler`]) and, as [`OneByOneEngine`] behind the real
//!   handshake, the `uffd-bench-baseline-handler` process of
//!   `uffd serve bench`. [`serve_faults`] is that one loop.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{CopyMode, Event, EventBuffer, Outcome, RegisterMode, Uffd};
use uffd_pager::{FileSource, Histogram, MappedBytes, PageSource, WorkingSet};
use uffd_serve::engine::{Engine, EngineError, RunningVm};
use uffd_serve::protocol::{Region, PAGE_4K};
use uffd_serve::stats::EngineStats;

use crate::workload::{in_process_uffd, touch, verify, Order, PhaseResult, ProgressLine};
use crate::BoxError;

/// The kernel's own fault-in of the file (MAP_PRIVATE, read): the
/// baseline. Returns (sequential over the first half, random over the
/// second half), the same split as the pager's workload in `run_plan`.
/// The caller warms the page cache first ([`FileSource::populate`]), so
/// the kernel and the pager read the same cached pages.
pub fn kernel_baseline(
    path: &Path,
    len: u64,
    orders: (Order, Order),
    progress: &ProgressLine,
) -> std::io::Result<(PhaseResult, PhaseResult)> {
    let map = private_file_map(path, len)?;
    let half = len / 4096 / 2;
    let first = touch(map.as_ptr(), 0, half, orders.0, |n| {
        progress.update("kernel fault-in", n, half * 2)
    });
    let second = touch(map.as_ptr(), half, len / 4096 - half, orders.1, |n| {
        progress.update("kernel fault-in", half + n, half * 2)
    });
    Ok((first, second))
}

/// The kernel's fault-in of the whole file in one order, on a fresh
/// private mapping (the page cache warmed by the caller).
pub fn kernel_fault_in(path: &Path, len: u64, order: Order) -> std::io::Result<PhaseResult> {
    let map = private_file_map(path, len)?;
    Ok(touch(map.as_ptr(), 0, len / 4096, order, |_| {}))
}

/// A fresh read-only private mapping of the snapshot, as a process that
/// restores it the kernel's way maps it.
fn private_file_map(path: &Path, len: u64) -> std::io::Result<uffd::FileMapping> {
    let file = File::open(path)?;
    Ok(uffd::FileMapping::read_only(&file, len as usize, false)?)
}
/// The kernel serving fresh anonymous memory: one write per page in order,
/// so every page is allocated and zeroed, as it must be for any private
/// copy of restored memory (COPY into anonymous memory pays this too).
pub fn kernel_anon_first_write(len: u64) -> Result<PhaseResult, BoxError> {
    let memory = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    let pages = len / 4096;
    let start = Instant::now();
    for page in 0..pages {
        memory.write_byte((page * 4096) as usize, 1);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(PhaseResult::untimed(len / 4096, seconds))
}

/// What [`serve_faults`] counted.
#[derive(Debug, Default)]
pub struct Served {
    /// Page-fault messages read.
    pub faults: AtomicU64,
    /// Bytes installed.
    pub installed_bytes: AtomicU64,
    /// Message read to page installed.
    pub latency: Histogram,
    /// The target process exited (ESRCH).
    pub gone: AtomicBool,
}

/// The one hand-written fault loop: until `stop`, polls `uffd` (50 ms at a
/// time), reads up to `batch` messages (the baseline reads one) and serves
/// each page fault in `regions` with `install(uffd, page, the memory file's
/// 4 KiB for that page)`; when the page was already there (EEXIST) it
/// wakes the faulting threads, which the kernel does not do after a failed
/// resolve. Returns when stopped or when the target has exited.
pub fn serve_faults(
    uffd: &Uffd,
    regions: &[Region],
    source: &dyn PageSource,
    batch: usize,
    stop: &AtomicBool,
    served: &Served,
    mut install: impl FnMut(&Uffd, u64, MappedBytes<'_>) -> Result<Outcome, uffd::Error>,
) -> Result<(), uffd::Error> {
    let mut events = EventBuffer::new(batch);
    let mut scratch = vec![0u8; PAGE_4K as usize];
    while !stop.load(Relaxed) {
        if !uffd.wait_readable(Some(Duration::from_millis(50)))? {
            continue;
        }
        let at = Instant::now();
        for event in uffd.read_events(&mut events)?.drain(..) {
            let Event::Pagefault(fault) = event else {
                continue;
            };
            let page = fault.page(PAGE_4K);
            let Some(r) = regions.iter().find(|r| r.contains(page)) else {
                continue;
            };
            served.faults.fetch_add(1, Relaxed);
            let offset = r.source_offset(page);
            let bytes = match source.mapped(offset, PAGE_4K as usize) {
                Some(mapped) => mapped,
                None => match source.read_at(offset, &mut scratch) {
                    Ok(_) => MappedBytes::new(&scratch[..]),
                    Err(_) => continue,
                },
            };
            match install(uffd, page, bytes)? {
                Outcome::TargetGone => {
                    served.gone.store(true, Relaxed);
                    return Ok(());
                }
                Outcome::AlreadyPresent => uffd.wake(page, PAGE_4K)?,
                _ => {
                    served.installed_bytes.fetch_add(PAGE_4K, Relaxed);
                    served.latency.record(at.elapsed());
                }
            }
        }
    }
    Ok(())
}

/// The baseline's install: one 4 KiB `UFFDIO_COPY`.
pub(crate) fn copy_4k(
    uffd: &Uffd,
    page: u64,
    bytes: MappedBytes<'_>,
) -> Result<Outcome, uffd::Error> {
    assert!(bytes.len() >= PAGE_4K as usize);
    // SAFETY: `bytes` is a live 4 KiB slice (the memory file's mapping or
    // a scratch buffer); `page` is registered memory whose faulting
    // threads wait for exactly this copy.
    unsafe { uffd.copy(page, bytes.as_ptr(), PAGE_4K, CopyMode::empty()) }
}

/// Spawns [`serve_faults`] on a thread of its own.
pub fn spawn_fault_handler(
    uffd: &Arc<Uffd>,
    regions: Vec<Region>,
    source: Arc<dyn PageSource>,
    batch: usize,
    stop: &Arc<AtomicBool>,
    served: &Arc<Served>,
    install: impl FnMut(&Uffd, u64, MappedBytes<'_>) -> Result<Outcome, uffd::Error> + Send + 'static,
) -> std::io::Result<JoinHandle<Result<(), uffd::Error>>> {
    let (uffd, stop, served) = (uffd.clone(), stop.clone(), served.clone());
    std::thread::Builder::new()
        .name("uffd-baseline".into())
        .spawn(move || serve_faults(&uffd, &regions, &*source, batch, &stop, &served, install))
}

/// Spawns the baseline handler itself: [`serve_faults`] reading one
/// message at a time, one 4 KiB `UFFDIO_COPY` per fault.
pub fn spawn_baseline_handler(
    uffd: &Arc<Uffd>,
    regions: Vec<Region>,
    source: Arc<dyn PageSource>,
    stop: &Arc<AtomicBool>,
    served: &Arc<Served>,
) -> std::io::Result<JoinHandle<Result<(), uffd::Error>>> {
    spawn_fault_handler(uffd, regions, source, 1, stop, served, copy_4k)
}

/// One region covering `len` bytes at `base`, file offset 0.
pub fn whole(base: u64, len: u64) -> Vec<Region> {
    vec![Region::new(base, len, 0, PAGE_4K)]
}

/// The baseline handler serving this process's own fresh memory while it
/// is touched in `order`: `uffd bench`'s typical-* cases.
pub fn typical_handler(
    source: &Arc<FileSource>,
    len: u64,
    order: Order,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let uffd = Arc::new(in_process_uffd().non_blocking(true).open()?);
    let target = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(Served::default());
    let handler = spawn_baseline_handler(
        &uffd,
        whole(target.addr(), len),
        source.clone(),
        &stop,
        &served,
    )?;
    let pages = len / 4096;
    let label = format!("typical handler {}", order.name());
    let result = touch(target.as_ptr(), 0, pages, order, |n| {
        progress.update(&label, n, pages)
    });
    stop.store(true, Relaxed);
    handler
        .join()
        .map_err(|_| "the typical handler panicked")??;
    let bad = verify(&target, source, len);
    if bad != 0 {
        return Err(format!("typical handler: {bad} pages differ from the snapshot").into());
    }
    progress.done(&format!("{label:<32} {:>8.0} MB/s", result.mb_per_s));
    Ok(result)
}

/// The baseline behind the real server and handshake: each VM is served
/// by one [`serve_faults`] thread reading one message at a time.
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

struct OneByOneVm {
    served: Arc<Served>,
    /// The VMM's pidfd: readable once it exited.
    pidfd: OwnedFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), uffd::Error>>>,
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
        let served = Arc::new(Served::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn_baseline_handler(
            &Arc::new(uffd),
            regions.to_vec(),
            self.source.clone(),
            &stop,
            &served,
        )
        .map_err(|e| EngineError::Start(e.to_string()))?;
        Ok(Box::new(OneByOneVm {
            served,
            pidfd,
            stop,
            thread: Some(thread),
        }))
    }
}

impl RunningVm for OneByOneVm {
    fn is_finished(&self) -> bool {
        let exited = || {
            let mut fds = [rustix::event::PollFd::new(
                &self.pidfd,
                rustix::event::PollFlags::IN,
            )];
            let now = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
        };
        self.served.gone.load(Relaxed)
            || self.thread.as_ref().is_none_or(|t| t.is_finished())
            || exited()
    }
    fn stats(&self) -> EngineStats {
        let s = &self.served;
        let l = s.latency.summary();
        EngineStats {
            faults: s.faults.load(Relaxed),
            installed_bytes: s.installed_bytes.load(Relaxed),
            p50_us: l.p50_us,
            p90_us: l.p90_us,
            p99_us: l.p99_us,
            max_us: l.max_us,
            ..EngineStats::default()
        }
    }
    fn working_set(&self) -> Option<WorkingSet> {
        None
    }
    fn shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("the baseline handler stopped: {e}"),
                Err(_) => tracing::error!("the baseline handler panicked"),
            }
        }
    }
}

impl Drop for OneByOneVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
