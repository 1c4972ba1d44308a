//! How a VM's faults are served, behind a small trait so the server loop
//! does not care which engine does the work.
//!
//! The server starts one [`RunningVm`] per accepted handshake, watches the
//! VMM's pid, and asks the engine for its working set and statistics. The
//! built-in [`CopyEngine`] serves from an mmap of the memory file with
//! UFFDIO_COPY / UFFDIO_ZEROPAGE; [`OneByOneEngine`] is the baseline written
//! like Firecracker's example on-demand handler.

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::mm::{MapFlags, ProtFlags};
use uffd::{CopyMode, Event, EventBuffer, Resolved, Uffd, ZeropageMode};

use crate::protocol::{Region, PAGE_4K};
use crate::stats::VmCounters;
use crate::workingset::WorkingSet;

/// Why an engine could not start serving a VM.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A thread or an fd could not be created.
    #[error("starting the handler for the VM failed: {0}")]
    Start(String),
    /// The working set does not fit this VM.
    #[error(transparent)]
    WorkingSet(#[from] crate::workingset::WorkingSetError),
}

/// Starts serving VMs.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Starts serving `regions` of the VMM behind `uffd`.
    fn start(&self, uffd: Uffd, regions: &[Region]) -> Result<Box<dyn RunningVm>, EngineError>;
}

/// One VM being served.
pub trait RunningVm: Send + Sync {
    /// True once the VMM is gone (an ioctl returned ESRCH).
    fn is_finished(&self) -> bool;
    /// The counters, live.
    fn counters(&self) -> &VmCounters;
    /// First-touched pages so far, when recording.
    fn working_set(&self) -> Option<WorkingSet>;
    /// Whether the prefetch (and background fill) is done.
    fn is_filled(&self) -> bool;
    /// Stops every thread, waking any fault still waiting, and closes the
    /// server's copy of the userfaultfd.
    fn shutdown(&mut self);
}

/// The memory snapshot file, mapped read-only and shared by every VM.
#[derive(Debug)]
pub struct MemoryFile {
    addr: usize,
    len: u64,
    _file: std::fs::File,
}

// SAFETY: the mapping is read-only and lives as long as this value; it is
// only read through raw pointers handed to the kernel or copied from.
unsafe impl Send for MemoryFile {}
// SAFETY: as above.
unsafe impl Sync for MemoryFile {}

impl MemoryFile {
    /// Opens and maps `path`.
    pub fn open(path: &Path) -> std::io::Result<MemoryFile> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the memory file is empty",
            ));
        }
        // SAFETY: a fresh read-only shared mapping of a file we opened; no
        // Rust reference into it is ever created. The file must not be
        // truncated meanwhile (as for any snapshot server).
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        }?;
        Ok(MemoryFile {
            addr: addr as usize,
            len,
            _file: file,
        })
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty files are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn ptr(&self, offset: u64) -> *const u8 {
        debug_assert!(offset < self.len);
        (self.addr + offset as usize) as *const u8
    }

    /// Whether `len` bytes at `offset` are all zero.
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let words = len as usize / 8;
        let base = self.ptr(offset).cast::<u64>();
        // SAFETY: inside the mapping (regions were checked against the file
        // length); the offset is page aligned, so the words are aligned.
        (0..words).all(|i| unsafe { base.add(i).read() } == 0)
    }

    /// Hints the kernel to read `offset..offset+len` ahead.
    fn will_need(&self, offset: u64, len: u64) {
        let len = len.min(self.len - offset);
        // SAFETY: advice only; the range lies inside our mapping.
        let _ = unsafe {
            rustix::mm::madvise(
                self.ptr(offset) as *mut _,
                len as usize,
                rustix::mm::Advice::WillNeed,
            )
        };
    }
}

/// Settings of the built-in engine.
#[derive(Debug, Clone, Default)]
pub struct CopyEngineConfig {
    /// Handler threads per VM (at least one).
    pub threads: usize,
    /// Record first-touched pages.
    pub record: bool,
    /// Install these pages first, in file order, while faults keep priority.
    pub prefetch: Option<Arc<WorkingSet>>,
    /// Then install everything else.
    pub background_fill: bool,
    /// Before sleeping in poll(2), keep reading the userfaultfd for this
    /// long: a fault arriving meanwhile is served without a thread wake-up.
    /// Zero blocks right away (no CPU spent while the VM is idle).
    pub spin: Duration,
}

/// The built-in engine: COPY from an mmap of the memory file, ZEROPAGE for
/// all-zero and removed pages, several handler threads per VM, working-set
/// recording and prefetch.
#[derive(Debug)]
pub struct CopyEngine {
    file: Arc<MemoryFile>,
    config: CopyEngineConfig,
}

impl CopyEngine {
    /// An engine serving from `file`.
    pub fn new(file: Arc<MemoryFile>, config: CopyEngineConfig) -> Self {
        Self { file, config }
    }
}

/// Per-page flags of one VM, indexed over all regions in address order.
#[derive(Debug)]
struct PageBits {
    bits: Vec<AtomicU64>,
}

impl PageBits {
    fn new(pages: u64) -> Self {
        Self {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn get(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize].load(Relaxed) & (1 << (i % 64)) != 0
    }
    /// Sets the bit; true if it was clear.
    fn set(&self, i: u64) -> bool {
        let mask = 1 << (i % 64);
        self.bits[(i / 64) as usize].fetch_or(mask, Relaxed) & mask == 0
    }
    fn clear(&self, i: u64) {
        self.bits[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Relaxed);
    }
}

/// Everything the threads of one VM share.
#[derive(Debug)]
struct VmShared {
    uffd: Uffd,
    file: Arc<MemoryFile>,
    regions: Vec<Region>,
    /// Index of each region's first page in the page bitmaps.
    first_page: Vec<u64>,
    page_size: u64,
    counters: VmCounters,
    installed: PageBits,
    removed: PageBits,
    in_working_set: PageBits,
    recorded: PageBits,
    record: Option<Mutex<Vec<u64>>>,
    /// Held for writing while events are read and applied, for reading
    /// while a page is checked and resolved: a page removed by a balloon
    /// can then never be filled with stale contents between the kernel
    /// handing us the REMOVE and us marking the page.
    events: RwLock<()>,
    /// Faults being served right now; the prefetcher yields to them.
    demand_in_flight: AtomicUsize,
    spin: Duration,
    stop: AtomicBool,
    stop_fd: OwnedFd,
    gone: AtomicBool,
    filled: AtomicBool,
    zero_page: ZeroBuffer,
}

/// A zeroed buffer of one huge page, for hugetlb targets (no ZEROPAGE there).
#[derive(Debug)]
struct ZeroBuffer(Vec<u8>);

impl VmShared {
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.regions.iter().position(|r| r.contains(addr))?;
        let r = &self.regions[i];
        Some((i, self.first_page[i] + (addr - r.base) / self.page_size))
    }

    /// Installs the page at `page_addr` (region `ri`, bitmap index `pi`).
    /// Returns `Ok(true)` when done, `Ok(false)` when events must be drained first.
    fn install(
        &self,
        ri: usize,
        pi: u64,
        page_addr: u64,
        demand: bool,
    ) -> Result<bool, uffd::Error> {
        let _guard = self.events.read().unwrap_or_else(|e| e.into_inner());
        if self.installed.get(pi) {
            // Someone installed it already; the faulting thread may still
            // sleep if that resolve raced with its fault, so wake it.
            if demand {
                self.uffd.wake(page_addr, self.page_size)?;
                self.counters.already_present.fetch_add(1, Relaxed);
            }
            return Ok(true);
        }
        let ps = self.page_size;
        let region = &self.regions[ri];
        let file_offset = region.file_offset(page_addr);
        let zero = self.removed.get(pi) || self.file.is_zero(file_offset, ps);
        let result = if zero && ps == PAGE_4K {
            self.uffd
                .zeropage_all(page_addr, ps, ps, ZeropageMode::empty())?
        } else {
            let src = if zero {
                self.zero_page.0.as_ptr()
            } else {
                self.file.ptr(file_offset)
            };
            // SAFETY: `src` points at `ps` readable bytes (the file mapping,
            // checked against the file length at the handshake, or the zero
            // buffer); the destination is the VMM's registered memory.
            unsafe {
                self.uffd
                    .copy_all(page_addr, src, ps, ps, CopyMode::empty())?
            }
        };
        match result {
            Resolved::Complete {
                installed,
                existing,
            } => {
                self.installed.set(pi);
                if installed > 0 {
                    if zero {
                        self.counters.zero_pages.fetch_add(1, Relaxed);
                    }
                    if demand {
                        self.counters.demand_bytes.fetch_add(installed, Relaxed);
                    } else {
                        self.counters.prefetch_bytes.fetch_add(installed, Relaxed);
                    }
                } else if existing > 0 && demand {
                    self.counters.already_present.fetch_add(1, Relaxed);
                }
                Ok(true)
            }
            Resolved::RetryAfterEvents { .. } => {
                self.counters.retries.fetch_add(1, Relaxed);
                Ok(false)
            }
            Resolved::TargetGone => {
                self.gone.store(true, Relaxed);
                Ok(true)
            }
        }
    }

    fn apply(&self, event: Event, faults: &mut Vec<(u64, Instant)>, now: Instant) {
        match event {
            Event::Pagefault(fault) => faults.push((fault.page(self.page_size), now)),
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                self.counters.removes.fetch_add(1, Relaxed);
                self.counters
                    .removed_bytes
                    .fetch_add(end.saturating_sub(start), Relaxed);
                let mut addr = start & !(self.page_size - 1);
                while addr < end {
                    if let Some((_, pi)) = self.locate(addr) {
                        self.removed.set(pi);
                        self.installed.clear(pi);
                    }
                    addr += self.page_size;
                }
            }
            // Firecracker enables neither; a forked child's uffd is closed
            // by dropping it, and remaps are not expected.
            Event::Fork { .. } | Event::Remap { .. } => {}
        }
    }

    fn serve_fault(&self, page_addr: u64, read_at: Instant) -> Result<bool, uffd::Error> {
        let Some((ri, pi)) = self.locate(page_addr) else {
            // Not ours: wake it so the kernel reports the error to the VMM.
            let _ = self.uffd.wake(page_addr, self.page_size);
            return Ok(true);
        };
        if self.in_working_set.get(pi) && !self.installed.get(pi) {
            self.counters.prefetch_misses.fetch_add(1, Relaxed);
            self.in_working_set.clear(pi);
        }
        let done = self.install(ri, pi, page_addr, true)?;
        if done {
            if let Some(record) = &self.record {
                if self.recorded.set(pi) {
                    let offset = self.regions[ri].file_offset(page_addr);
                    record
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(offset / self.page_size);
                }
            }
            self.counters.latency.record(read_at.elapsed());
        }
        Ok(done)
    }

    fn handler_loop(&self) {
        let mut buf = EventBuffer::new(64);
        let mut faults: Vec<(u64, Instant)> = Vec::new();
        let mut deferred: Vec<(u64, Instant)> = Vec::new();
        while !self.stop.load(Relaxed) && !self.gone.load(Relaxed) {
            if deferred.is_empty() && !self.spin_then_wait(&mut buf, &mut faults) {
                continue;
            }
            {
                let _guard = self.events.write().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                match self.uffd.read_events(&mut buf) {
                    Ok(events) => {
                        for event in events.drain(..) {
                            self.apply(event, &mut faults, now);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("reading the VM's userfaultfd failed, stopping: {e}");
                        self.gone.store(true, Relaxed);
                        break;
                    }
                }
            }
            self.counters.faults.fetch_add(faults.len() as u64, Relaxed);
            self.demand_in_flight.fetch_add(1, SeqCst);
            for (page, at) in deferred
                .drain(..)
                .chain(faults.drain(..))
                .collect::<Vec<_>>()
            {
                match self.serve_fault(page, at) {
                    Ok(true) => {}
                    Ok(false) => deferred.push((page, at)),
                    Err(e) => tracing::warn!("serving the fault at {page:#x} failed: {e}"),
                }
            }
            self.demand_in_flight.fetch_sub(1, SeqCst);
            if !deferred.is_empty() {
                // A REMOVE (or other event) is queued: it is read at the top
                // of the loop; give the thread that raised it a moment.
                std::thread::yield_now();
            }
        }
    }

    /// Spins on non-blocking reads for up to the configured time, applying
    /// anything read; then waits in poll(2). True if there may be work.
    fn spin_then_wait(&self, buf: &mut EventBuffer, faults: &mut Vec<(u64, Instant)>) -> bool {
        if !self.spin.is_zero() {
            let until = Instant::now() + self.spin;
            while Instant::now() < until && !self.stopping() {
                let guard = self.events.write().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                match self.uffd.read_events(buf) {
                    Ok(events) if !events.is_empty() => {
                        for event in events.drain(..) {
                            self.apply(event, faults, now);
                        }
                        return true;
                    }
                    Ok(_) => {}
                    Err(_) => return true,
                }
                drop(guard);
                std::hint::spin_loop();
            }
        }
        self.wait(Duration::from_millis(500))
    }

    /// Waits for the userfaultfd or the stop signal; true if there is
    /// something to read.
    fn wait(&self, timeout: Duration) -> bool {
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = [
            PollFd::new(&self.uffd, PollFlags::IN),
            PollFd::new(&self.stop_fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => false,
            Ok(_) => {
                if fds[0].revents().contains(PollFlags::ERR) {
                    self.gone.store(true, Relaxed);
                }
                fds[0].revents().contains(PollFlags::IN)
            }
            Err(_) => false,
        }
    }

    /// Installs the working set in file order, then optionally the rest.
    fn prefetch_loop(&self, working_set: Option<Arc<WorkingSet>>, fill: bool) {
        // Demand faults come first: lower this thread's priority.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
        let mut targets: Vec<(u64, usize, u64)> = Vec::new(); // (file offset, region, page index)
        if let Some(ws) = &working_set {
            for &page in &ws.pages {
                let offset = page * self.page_size;
                for (ri, r) in self.regions.iter().enumerate() {
                    if offset >= r.offset && offset < r.offset + r.size {
                        let addr = r.base + (offset - r.offset);
                        targets.push((
                            offset,
                            ri,
                            self.first_page[ri] + (addr - r.base) / self.page_size,
                        ));
                    }
                }
            }
            targets.sort_unstable();
            targets.dedup();
            self.install_in_batches(&targets);
        }
        if fill && !self.stopping() {
            let mut all = Vec::new();
            for (ri, r) in self.regions.iter().enumerate() {
                for p in 0..r.size / self.page_size {
                    all.push((r.offset + p * self.page_size, ri, self.first_page[ri] + p));
                }
            }
            all.sort_unstable();
            self.install_in_batches(&all);
        }
        self.filled.store(true, Release);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Relaxed) || self.gone.load(Relaxed)
    }

    fn install_in_batches(&self, targets: &[(u64, usize, u64)]) {
        const BATCH: u64 = 4 << 20;
        let mut i = 0;
        while i < targets.len() && !self.stopping() {
            let window_start = targets[i].0;
            let mut j = i;
            while j < targets.len() && targets[j].0 < window_start + BATCH {
                j += 1;
            }
            // Read the next window ahead while this one is installed.
            if let Some(next) = targets.get(j) {
                self.file.will_need(next.0, BATCH);
            }
            for &(offset, ri, pi) in &targets[i..j] {
                if self.stopping() {
                    return;
                }
                // Faults have priority: let the handlers finish first.
                let mut spins = 0;
                while self.demand_in_flight.load(SeqCst) > 0 && spins < 1000 {
                    std::thread::yield_now();
                    spins += 1;
                }
                let r = &self.regions[ri];
                let addr = r.base + (offset - r.offset);
                let was_missing = !self.installed.get(pi);
                loop {
                    match self.install(ri, pi, addr, false) {
                        Ok(true) => break,
                        Ok(false) => std::thread::sleep(Duration::from_micros(50)),
                        Err(e) => {
                            tracing::warn!("prefetching {addr:#x} failed: {e}");
                            break;
                        }
                    }
                    if self.stopping() {
                        return;
                    }
                }
                if was_missing && self.in_working_set.get(pi) {
                    self.counters.prefetch_hits.fetch_add(1, Relaxed);
                } else if was_missing {
                    self.counters.fill_pages.fetch_add(1, Relaxed);
                }
            }
            i = j;
        }
    }
}

struct CopyVm {
    shared: Arc<VmShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Engine for CopyEngine {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn start(&self, uffd: Uffd, regions: &[Region]) -> Result<Box<dyn RunningVm>, EngineError> {
        let page_size = regions[0].page_size;
        if let Some(ws) = &self.config.prefetch {
            ws.check_matches(self.file.len(), page_size)?;
        }
        let mut first_page = Vec::with_capacity(regions.len());
        let mut pages = 0;
        for r in regions {
            first_page.push(pages);
            pages += r.size / page_size;
        }
        let stop_fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| EngineError::Start(format!("eventfd: {e}")))?;
        let shared = Arc::new(VmShared {
            uffd,
            file: self.file.clone(),
            regions: regions.to_vec(),
            first_page,
            page_size,
            counters: VmCounters::default(),
            installed: PageBits::new(pages),
            removed: PageBits::new(pages),
            in_working_set: PageBits::new(pages),
            recorded: PageBits::new(pages),
            record: self.config.record.then(|| Mutex::new(Vec::new())),
            events: RwLock::new(()),
            demand_in_flight: AtomicUsize::new(0),
            spin: self.config.spin,
            stop: AtomicBool::new(false),
            stop_fd,
            gone: AtomicBool::new(false),
            filled: AtomicBool::new(false),
            zero_page: ZeroBuffer(if page_size == PAGE_4K {
                Vec::new()
            } else {
                vec![0; page_size as usize]
            }),
        });
        if let Some(ws) = &self.config.prefetch {
            for &page in &ws.pages {
                let offset = page * page_size;
                for (ri, r) in shared.regions.iter().enumerate() {
                    if offset >= r.offset && offset < r.offset + r.size {
                        shared
                            .in_working_set
                            .set(shared.first_page[ri] + (offset - r.offset) / page_size);
                    }
                }
            }
        }
        let mut threads = Vec::new();
        for n in 0..self.config.threads.max(1) {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("uffd-vm-fault-{n}"))
                    .spawn(move || s.handler_loop())
                    .map_err(|e| EngineError::Start(e.to_string()))?,
            );
        }
        if self.config.prefetch.is_some() || self.config.background_fill {
            let s = shared.clone();
            let ws = self.config.prefetch.clone();
            let fill = self.config.background_fill;
            threads.push(
                std::thread::Builder::new()
                    .name("uffd-vm-prefetch".into())
                    .spawn(move || s.prefetch_loop(ws, fill))
                    .map_err(|e| EngineError::Start(e.to_string()))?,
            );
        } else {
            shared.filled.store(true, Release);
        }
        Ok(Box::new(CopyVm { shared, threads }))
    }
}

impl RunningVm for CopyVm {
    fn is_finished(&self) -> bool {
        self.shared.gone.load(Relaxed)
    }
    fn counters(&self) -> &VmCounters {
        &self.shared.counters
    }
    fn working_set(&self) -> Option<WorkingSet> {
        let record = self.shared.record.as_ref()?;
        Some(WorkingSet {
            page_size: self.shared.page_size,
            file_len: self.shared.file.len(),
            pages: record.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }
    fn is_filled(&self) -> bool {
        self.shared.filled.load(Acquire)
    }
    fn shutdown(&mut self) {
        self.shared.stop.store(true, SeqCst);
        let _ = rustix::io::write(&self.shared.stop_fd, &1u64.to_ne_bytes());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Wake anything still waiting so no VMM thread sleeps on a handler
        // that is gone (it faults again and waits for the next server).
        for r in &self.shared.regions {
            let _ = self.shared.uffd.wake(r.base, r.size);
        }
    }
}

impl Drop for CopyVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The baseline: written like Firecracker's example on-demand handler — one
/// thread, poll, read one message, one 4 KiB COPY per fault, no batching,
/// no zero-page detection, no wake after EEXIST.
#[derive(Debug)]
pub struct OneByOneEngine {
    file: Arc<MemoryFile>,
}

impl OneByOneEngine {
    /// A baseline engine serving from `file`.
    pub fn new(file: Arc<MemoryFile>) -> Self {
        Self { file }
    }
}

struct OneByOneVm {
    counters: Arc<VmCounters>,
    stop: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Engine for OneByOneEngine {
    fn name(&self) -> &'static str {
        "one-by-one"
    }

    fn start(&self, uffd: Uffd, regions: &[Region]) -> Result<Box<dyn RunningVm>, EngineError> {
        let counters = Arc::new(VmCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let gone = Arc::new(AtomicBool::new(false));
        let (c, s, g, file, regions) = (
            counters.clone(),
            stop.clone(),
            gone.clone(),
            self.file.clone(),
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
                        // SAFETY: the source lies inside the file mapping
                        // (checked at the handshake); the destination is
                        // the VMM's registered memory.
                        let out = unsafe {
                            uffd.copy(
                                page,
                                file.ptr(r.file_offset(page)),
                                PAGE_4K,
                                CopyMode::empty(),
                            )
                        };
                        match out {
                            Ok(uffd::Outcome::TargetGone) => g.store(true, Relaxed),
                            Ok(_) => {
                                c.demand_bytes.fetch_add(PAGE_4K, Relaxed);
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
            stop,
            gone,
            thread: Some(thread),
        }))
    }
}

impl RunningVm for OneByOneVm {
    fn is_finished(&self) -> bool {
        self.gone.load(Relaxed)
    }
    fn counters(&self) -> &VmCounters {
        &self.counters
    }
    fn working_set(&self) -> Option<WorkingSet> {
        None
    }
    fn is_filled(&self) -> bool {
        true
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
