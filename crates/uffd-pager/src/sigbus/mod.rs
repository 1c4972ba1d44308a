//! SIGBUS mode: the faulting thread resolves its own fault.
//!
//! With the userfaultfd feature `SIGBUS`, a missing-page fault in a
//! registered range raises SIGBUS in the faulting thread instead of queueing
//! a message and putting the thread to sleep. [`SigbusPager`] installs a
//! process-wide SIGBUS handler that finds the page from `si_addr`, produces
//! its bytes from a [`SignalSafeSource`], installs them with `UFFDIO_COPY`
//! (or `UFFDIO_ZEROPAGE` for known-zero pages) and returns, so the access
//! restarts and finds the page. No handler thread, no message, no wake-up:
//! the thread never sleeps.
//!
//! # Limits
//! - **In-process only.** The memory must belong to this process: the
//!   signal is delivered to the faulting thread, so a userfaultfd received
//!   from another process (Firecracker's) cannot use this mode; serve it
//!   with [`crate::Pager`].
//! - **Kernel accesses fail instead of faulting in.** A system call that
//!   touches a missing page of a registered range (`read(2)` into it,
//!   `write(2)` from it, a futex in it) gets `EFAULT`: no signal is raised
//!   for kernel-mode faults. Touch such buffers from user space first.
//! - **4 KiB pages, MISSING faults only** (anonymous or shmem memory
//!   registered MISSING; no hugetlb, no MINOR, no write-protect).
//! - **Restricted sources.** The handler runs inside a signal handler, so it
//!   may only do async-signal-safe work: no allocation, no lock the
//!   interrupted code might hold, no blocking on other threads. That is why
//!   it takes a [`SignalSafeSource`] (a file read with `pread(2)` or through
//!   its read-only mapping, a buffer in memory, or zeros), not an arbitrary
//!   [`crate::PageSource`].
//! - **One SIGBUS disposition per process.** The handler is installed when
//!   the first pager starts and the previous disposition is restored when
//!   the last one shuts down (unless somebody replaced ours meanwhile).
//!   SIGBUS that is not a missing page of a registered range — a poisoned
//!   page, a truncated file mapping, a source that cannot produce the page
//!   — is passed on to the previous handler (the default kills the process
//!   with SIGBUS), so genuine bus errors still crash.
//! - While the handler runs, every other signal is blocked, so another
//!   signal handler cannot interrupt it (and fault on a registered page
//!   while SIGBUS is blocked, which the kernel would turn into a kill).

#![allow(unsafe_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use uffd::{CopyMode, Features, RegisterMode, Resolved, Uffd, ZeropageMode};

use crate::runs::runs;
use crate::source::{is_zero, FileSource, MappedBytes, MemorySource};
use crate::stats::{Histogram, LatencySummary};
use crate::{PageSource, Region};

mod handler;

pub use handler::sigbus_handler_installed;
use handler::{install_handler, publish, uninstall_handler};

const PAGE: u64 = 4096;

/// Largest granule the handler installs per fault.
pub const MAX_SIGBUS_GRANULE: u64 = 2 << 20;

/// A page source whose reads are async-signal-safe, for [`SigbusPager`].
///
/// Every read the SIGBUS handler makes is one of: a binary search of the
/// file's hole list (immutable after open), a pointer into a read-only
/// mapping or an in-memory buffer handed to `UFFDIO_COPY` (the kernel
/// copies; a bad pointer gives EFAULT, not a signal), or `pread(2)` into a
/// pre-allocated scratch buffer. None allocates or takes a lock.
#[derive(Clone)]
pub struct SignalSafeSource {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    File(Arc<FileSource>),
    Memory(Arc<MemorySource>),
    Zero(u64),
}

impl fmt::Debug for SignalSafeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SignalSafeSource")
            .field(&self.describe())
            .finish()
    }
}

impl SignalSafeSource {
    /// A snapshot file, in either [`crate::FileMode`]: mmap mode hands its
    /// mapping to `UFFDIO_COPY`, pread mode reads into per-pager scratch
    /// buffers. Holes are installed as zero pages. The file must not be
    /// truncated while served (mmap mode: the copy fails and the faulting
    /// process is killed with SIGBUS).
    pub fn file(source: Arc<FileSource>) -> SignalSafeSource {
        SignalSafeSource {
            kind: Kind::File(source),
        }
    }

    /// Bytes held in memory.
    pub fn memory(source: Arc<MemorySource>) -> SignalSafeSource {
        SignalSafeSource {
            kind: Kind::Memory(source),
        }
    }

    /// `len` bytes of zeros (every page a zero page).
    pub fn zero(len: u64) -> SignalSafeSource {
        SignalSafeSource {
            kind: Kind::Zero(len),
        }
    }

    /// Bytes the source can provide.
    pub fn len(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.len(),
            Kind::Memory(m) => m.len(),
            Kind::Zero(len) => *len,
        }
    }

    /// True when the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::File(f) => f.describe(),
            Kind::Memory(m) => m.describe(),
            Kind::Zero(len) => format!("zero ({len} bytes)"),
        }
    }

    /// True when serving needs scratch buffers (a file read with pread).
    fn needs_scratch(&self) -> bool {
        matches!(&self.kind, Kind::File(f) if f.mapped(0, 0).is_none())
    }
}

/// Counters of a [`SigbusPager`], updated from the signal handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SigbusStats {
    /// SIGBUS signals served (missing-page faults of registered ranges).
    pub faults: u64,
    /// Pages installed with `UFFDIO_COPY`.
    pub pages_copied: u64,
    /// Pages installed as zero pages.
    pub pages_zero: u64,
    /// Pages another thread installed first (EEXIST: fine).
    pub eexist: u64,
    /// Resolves retried after EAGAIN.
    pub eagain: u64,
    /// Faults that could not be served (source error, unexpected errno):
    /// passed on to the previous SIGBUS handler.
    pub failed: u64,
    /// Time in the handler, from entry to the installed page.
    pub latency: LatencySummary,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    pages_copied: AtomicU64,
    pages_zero: AtomicU64,
    eexist: AtomicU64,
    eagain: AtomicU64,
    failed: AtomicU64,
}

/// Pre-allocated buffers for pread sources, claimed lock-free by handlers.
struct Scratch {
    memory: uffd::Mapping,
    busy: Box<[AtomicBool]>,
    size: usize,
}

impl Scratch {
    /// Claims a free buffer; `None` when every one is in use.
    fn claim(&self) -> Option<ScratchGuard<'_>> {
        let index = self
            .busy
            .iter()
            .position(|b| !b.swap(true, Ordering::Acquire))?;
        // SAFETY: buffer `index` lies inside `memory` (busy.len() buffers of
        // `size` bytes), and the flag just claimed gives this handler sole
        // use of it until the guard drops.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.memory.as_ptr().add(index * self.size), self.size)
        };
        Some(ScratchGuard {
            flag: &self.busy[index],
            bytes,
        })
    }
}

struct ScratchGuard<'a> {
    flag: &'a AtomicBool,
    bytes: &'a mut [u8],
}

impl Drop for ScratchGuard<'_> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
    }
}

/// What one pager shares with the signal handler. Immutable after start
/// except for atomics.
struct Shared {
    uffd: Uffd,
    regions: Vec<Region>,
    source: SignalSafeSource,
    granule: u64,
    detect_zero_pages: bool,
    scratch: Option<Scratch>,
    closing: AtomicBool,
    counters: Counters,
    latency: Histogram,
}

/// Builds a [`SigbusPager`].
#[derive(Debug)]
pub struct SigbusPagerBuilder {
    source: SignalSafeSource,
    granule: u64,
    detect_zero_pages: bool,
    scratch_buffers: usize,
}

/// Why a [`SigbusPager`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigbusError {
    /// The kernel lacks the userfaultfd SIGBUS feature (Linux 4.14).
    #[error("the kernel has no userfaultfd SIGBUS feature")]
    Unsupported,
    /// A configuration or region is not usable in SIGBUS mode.
    #[error("invalid SIGBUS pager setup: {0}")]
    Invalid(String),
    /// Opening or registering the userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// Mapping scratch buffers or installing the signal handler failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SigbusPagerBuilder {
    /// Pages installed per fault: the aligned granule around the faulting
    /// page, clipped to its region (a small readahead). A power of two from
    /// 4 KiB to 2 MiB; default 4 KiB.
    pub fn granule(mut self, bytes: u64) -> Self {
        self.granule = bytes;
        self
    }

    /// Install all-zero pages as zero pages (scans each page read; default
    /// on). File holes are always zero pages.
    pub fn detect_zero_pages(mut self, on: bool) -> Self {
        self.detect_zero_pages = on;
        self
    }

    /// Scratch buffers (one granule each) for a pread source: as many
    /// threads as may fault at once. When all are busy a handler reads a
    /// single page into a buffer on its own stack. Default: twice the
    /// number of CPUs.
    pub fn scratch_buffers(mut self, count: usize) -> Self {
        self.scratch_buffers = count.max(1);
        self
    }

    /// Opens a userfaultfd with the SIGBUS feature, registers every region
    /// MISSING, installs the SIGBUS handler (first pager of the process)
    /// and starts serving.
    ///
    /// # Safety
    /// - Every region must be memory of this process (anonymous or shmem,
    ///   4 KiB pages) that stays mapped until the pager is shut down.
    /// - No Rust object may rely on the contents of a page of a region that
    ///   is missing now: the handler fills missing pages with the source's
    ///   bytes (memory that would otherwise read as zeros).
    pub unsafe fn start(self, regions: Vec<Region>) -> Result<SigbusPager, SigbusError> {
        let features = uffd::probe()?.features;
        if !features.contains(Features::SIGBUS) {
            return Err(SigbusError::Unsupported);
        }
        if !self.granule.is_power_of_two() || !(PAGE..=MAX_SIGBUS_GRANULE).contains(&self.granule) {
            return Err(SigbusError::Invalid(format!(
                "granule {} is not a power of two from 4 KiB to 2 MiB",
                self.granule
            )));
        }
        for r in &regions {
            if r.page_size != PAGE || r.start % PAGE != 0 || r.len % PAGE != 0 || r.len == 0 {
                return Err(SigbusError::Invalid(format!(
                    "region {:#x}+{:#x}: SIGBUS mode serves 4 KiB pages of page-aligned, non-empty regions",
                    r.start, r.len
                )));
            }
            if !matches!(r.offset.checked_add(r.len), Some(end) if end <= self.source.len()) {
                return Err(SigbusError::Invalid(format!(
                    "region {:#x}+{:#x} at source offset {:#x} lies past the end of the source ({} bytes)",
                    r.start,
                    r.len,
                    r.offset,
                    self.source.len()
                )));
            }
        }
        let scratch = if self.source.needs_scratch() {
            let size = self.granule as usize;
            let memory = uffd::Mapping::new(uffd::MemoryKind::Anon, size * self.scratch_buffers)?;
            // Populated now, so the handler takes no fault writing to it.
            memory.advise(0, memory.len(), rustix::mm::Advice::LinuxPopulateWrite)?;
            Some(Scratch {
                memory,
                busy: (0..self.scratch_buffers)
                    .map(|_| AtomicBool::new(false))
                    .collect(),
                size,
            })
        } else {
            None
        };
        let uffd = uffd::OpenOptions::new()
            .user_mode_only(true)
            .features(Features::SIGBUS)
            .open()?;
        let shared = Arc::new(Shared {
            uffd,
            regions,
            source: self.source,
            granule: self.granule,
            detect_zero_pages: self.detect_zero_pages,
            scratch,
            closing: AtomicBool::new(false),
            counters: Counters::default(),
            latency: Histogram::default(),
        });
        // Visible to the handler before any page can fault.
        let slot = publish(&shared)?;
        let pager = SigbusPager {
            shared,
            slot,
            stopped: false,
        };
        if let Err(e) = install_handler() {
            let mut pager = pager;
            pager.withdraw();
            pager.stopped = true;
            return Err(e.into());
        }
        for r in &pager.shared.regions {
            pager
                .shared
                .uffd
                .register(r.start, r.len, RegisterMode::MISSING)?;
        }
        Ok(pager)
    }
}

/// A pager in SIGBUS mode: faults of its regions are served by the
/// faulting thread itself, in a SIGBUS handler. How it works and its
/// limits are described at the top of this crate's `src/sigbus/mod.rs`.
///
/// Dropping it shuts it down like [`SigbusPager::shutdown`].
pub struct SigbusPager {
    shared: Arc<Shared>,
    slot: usize,
    stopped: bool,
}

impl fmt::Debug for SigbusPager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigbusPager")
            .field("regions", &self.shared.regions)
            .field("source", &self.shared.source)
            .field("granule", &self.shared.granule)
            .finish()
    }
}

impl SigbusPager {
    /// A builder serving from `source`.
    pub fn builder(source: SignalSafeSource) -> SigbusPagerBuilder {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        SigbusPagerBuilder {
            source,
            granule: PAGE,
            detect_zero_pages: true,
            scratch_buffers: 2 * cpus,
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SigbusStats {
        let c = &self.shared.counters;
        SigbusStats {
            faults: c.faults.load(Ordering::Relaxed),
            pages_copied: c.pages_copied.load(Ordering::Relaxed),
            pages_zero: c.pages_zero.load(Ordering::Relaxed),
            eexist: c.eexist.load(Ordering::Relaxed),
            eagain: c.eagain.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            latency: self.shared.latency.summary(),
        }
    }

    /// Stops serving: unregisters the regions (pages still missing then
    /// read as the kernel serves unregistered memory: zeros for anonymous
    /// memory), waits for handlers still running on them, uninstalls the
    /// SIGBUS handler when this was the process's last SIGBUS pager, and
    /// closes the userfaultfd. Returns the final counters.
    pub fn shutdown(mut self) -> SigbusStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.shared.closing.store(true, Ordering::SeqCst);
        for r in &self.shared.regions {
            // Failure means the range is gone already (unmapped): nothing
            // can fault there any more.
            let _ = self.shared.uffd.unregister(r.start, r.len);
        }
        self.withdraw();
        uninstall_handler();
    }

    /// Removes this pager from the handler's table and waits until no
    /// handler uses it.
    fn withdraw(&mut self) {
        handler::withdraw(self.slot);
    }
}

impl Drop for SigbusPager {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Installs the granule around `address`. Returns false only when the
    /// page cannot be produced (the signal is then passed on).
    fn serve(&self, region: &Region, address: u64) -> bool {
        let started = now_ns();
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let page = address & !(PAGE - 1);
        let start = (address & !(self.granule - 1)).max(region.start);
        let end = (start + self.granule).min(region.end());
        let ok = match &self.source.kind {
            Kind::Zero(_) => self.zero(start, end),
            Kind::Memory(m) => {
                let offset = region.offset + (start - region.start);
                // Regions were checked against the source's length at start.
                match m.mapped(offset, (end - start) as usize) {
                    Some(bytes) => self.copy_or_zero(start, bytes, |i| {
                        m.is_known_zero(offset + i as u64 * PAGE, PAGE)
                    }),
                    None => false,
                }
            }
            Kind::File(f) => {
                let offset = region.offset + (start - region.start);
                if f.is_hole(offset, offset + (end - start)) {
                    self.zero(start, end)
                } else if let Some(bytes) = f.mapped(offset, (end - start) as usize) {
                    // Zero pages were found at open: the mapping itself is
                    // only read by the kernel.
                    self.copy_or_zero(start, bytes, |i| {
                        f.is_known_zero(offset + i as u64 * PAGE, PAGE)
                    })
                } else {
                    self.pread_and_copy(f, region, page, start, end)
                }
            }
        };
        if !ok {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record_ns(now_ns().saturating_sub(started));
        ok
    }

    fn pread_and_copy(
        &self,
        file: &FileSource,
        region: &Region,
        page: u64,
        start: u64,
        end: u64,
    ) -> bool {
        let scratch = self.scratch.as_ref().and_then(Scratch::claim);
        match scratch {
            Some(buf) => {
                let bytes = &mut buf.bytes[..(end - start) as usize];
                let offset = region.offset + (start - region.start);
                file.pread_signal_safe(offset, bytes).is_ok()
                    && self.copy_or_zero(start, MappedBytes::new(bytes), |i| {
                        is_zero(&bytes[i * PAGE as usize..(i + 1) * PAGE as usize])
                    })
            }
            None => {
                // Every scratch buffer is busy: one page via the stack.
                let mut one = [0u8; PAGE as usize];
                let offset = region.offset + (page - region.start);
                file.pread_signal_safe(offset, &mut one).is_ok()
                    && self.copy_or_zero(page, MappedBytes::new(&one), |_| is_zero(&one))
            }
        }
    }

    /// Installs `bytes` at `start` in runs of equal pages: zero pages (as
    /// `is_zero_page(i)` tells for page `i`) as zero pages when detection is
    /// on, the rest with COPY; one ioctl per run.
    fn copy_or_zero(
        &self,
        start: u64,
        bytes: MappedBytes<'_>,
        is_zero_page: impl Fn(usize) -> bool,
    ) -> bool {
        let pages = bytes.len() / PAGE as usize;
        let detect = self.detect_zero_pages;
        let mut runs = runs(pages, move |i| detect && is_zero_page(i));
        runs.all(|(run, zero)| {
            let at = start + run.start as u64 * PAGE;
            if zero {
                self.zero(at, start + run.end as u64 * PAGE)
            } else {
                self.copy(at, bytes, run.start, run.end)
            }
        })
    }

    /// Copies pages `first..end` of `bytes` to `start` (the address of
    /// page `first`).
    fn copy(&self, start: u64, bytes: MappedBytes<'_>, first: usize, end: usize) -> bool {
        debug_assert!(end * PAGE as usize <= bytes.len());
        let src = bytes.as_ptr().wrapping_add(first * PAGE as usize);
        self.settle(start, (end - first) as u64 * PAGE, true, |at, len| {
            // SAFETY: `src + (at - start)..` plus `len` lies in `bytes` (a
            // read-only mapping, an in-memory source or a scratch buffer
            // this handler owns); `at..at + len` is missing memory of a
            // registered region of this process, which no Rust reference
            // covers (`start`'s contract). No thread waits on a SIGBUS-mode
            // uffd: DONTWAKE skips the wake-up scan.
            unsafe {
                self.uffd.copy_all(
                    at,
                    src.wrapping_add((at - start) as usize),
                    len,
                    PAGE,
                    CopyMode::DONTWAKE,
                )
            }
        })
    }

    fn zero(&self, start: u64, end: u64) -> bool {
        self.settle(start, end - start, false, |at, len| {
            self.uffd
                .zeropage_all(at, len, PAGE, ZeropageMode::DONTWAKE)
        })
    }

    /// Drives one of the core's whole-range resolvers (the same ones the
    /// engine uses: partial progress continued, present pages skipped)
    /// over `start..start + len`, retrying after pending events a bounded
    /// number of times (then returns: the access faults again and retries
    /// anyway).
    fn settle(
        &self,
        start: u64,
        len: u64,
        copied: bool,
        mut resolve: impl FnMut(u64, u64) -> Result<Resolved, uffd::Error>,
    ) -> bool {
        let counter = if copied {
            &self.counters.pages_copied
        } else {
            &self.counters.pages_zero
        };
        let end = start + len;
        let mut at = start;
        for _ in 0..=100 {
            match resolve(at, end - at) {
                Ok(Resolved::Complete {
                    installed,
                    existing,
                }) => {
                    counter.fetch_add(installed / PAGE, Ordering::Relaxed);
                    self.counters
                        .eexist
                        .fetch_add(existing / PAGE, Ordering::Relaxed);
                    return true;
                }
                Ok(Resolved::RetryAfterEvents { done }) => {
                    counter.fetch_add(done / PAGE, Ordering::Relaxed);
                    self.counters.eagain.fetch_add(1, Ordering::Relaxed);
                    at += done;
                }
                // Our own process cannot be gone while it runs this.
                Ok(Resolved::TargetGone) => return true,
                // Unregistered by a concurrent shutdown: the access
                // restarts as an ordinary fault.
                Err(_) if self.closing.load(Ordering::SeqCst) => return true,
                Err(_) => return false,
            }
        }
        true
    }
}

/// Monotonic nanoseconds (vDSO `clock_gettime`, async-signal-safe).
fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
