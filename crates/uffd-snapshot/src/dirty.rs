//! Dirty tracking: which pages were written since the last look.
//!
//! [`TrackerMode::Async`] registers the regions for write-protect on a
//! `WP_ASYNC` userfaultfd (Linux 6.7): the kernel resolves a write to a
//! protected page itself, with no message and no handler thread, and
//! `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` on
//! `PAGE_IS_WRITTEN` reports the written pages and protects them again in
//! the same page-table walk: no write can fall between the report and the
//! re-protection.
//!
//! [`TrackerMode::SyncWp`] is the fallback for kernels without WP_ASYNC
//! (Linux 5.7 to 6.6): the same registration on an ordinary userfaultfd,
//! with a thread that records each first write and unprotects the page
//! (a write fault round trip each, some microseconds). A page is
//! unprotected only while it is in the recorded set, and
//! [`DirtyTracker::written`] takes the set and protects its pages again,
//! so nothing written after a scan is missed (a write between the take
//! and the re-protection is in the pages being returned, which the caller
//! reads afterwards). Pages dropped with `MADV_DONTNEED` are recorded from
//! the REMOVE event (PAGEMAP_SCAN reports them in async mode by itself:
//! an empty PTE has no protection marker, so it counts as written).
//!
//! [`TrackerMode::SoftDirty`] is the last resort: `/proc/self/pagemap` bit 55 after `echo 4 >
//! /proc/self/clear_refs`. It is two steps, read then clear, and the clear
//! is process-wide (other users of soft-dirty in this process are reset
//! too): a page first written between the two is missed, so stop the
//! writers across [`DirtyTracker::written`] in this mode. It also reports
//! false positives (VMA merges, mprotect; CRIU #2604), and it cannot see
//! a page dropped with `MADV_DONTNEED` (an empty PTE has no soft-dirty
//! bit), which the other modes report.
//!
//! In every mode the regions must stay where they are while tracked: a
//! tracker follows no mremap and forgets nothing on munmap (a live
//! snapshot does both).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use uffd::{Event, EventBuffer, Features, Outcome, Pagemap, RegisterMode, Uffd, WriteProtectMode};

use crate::error::Error;
use crate::region::{validate, Region};

/// How a [`DirtyTracker`] learns what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerMode {
    /// WP_ASYNC + PAGEMAP_SCAN: atomic, cheap first writes, fast scans.
    Async,
    /// Synchronous write-protect faults recorded by a thread.
    SyncWp,
    /// Soft-dirty bits: clear_refs + pagemap (see the module docs).
    SoftDirty,
}

impl TrackerMode {
    /// `async` or `soft-dirty`.
    pub fn name(self) -> &'static str {
        match self {
            TrackerMode::Async => "async",
            TrackerMode::SyncWp => "sync-wp",
            TrackerMode::SoftDirty => "soft-dirty",
        }
    }
}

/// Reports the address ranges of `regions` written since the previous
/// call (or since it was created).
#[derive(Debug)]
pub struct DirtyTracker {
    regions: Vec<Region>,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Async { _uffd: Uffd, pagemap: Pagemap },
    SyncWp(SyncWp),
    SoftDirty { pagemap: File },
}

/// The thread of [`TrackerMode::SyncWp`] and what it recorded.
#[derive(Debug)]
struct SyncWp {
    uffd: Arc<Uffd>,
    written: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), uffd::Error>>>,
}

impl Drop for SyncWp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DirtyTracker {
    /// A tracker in the best mode this kernel has: [`TrackerMode::Async`]
    /// where WP_ASYNC is supported, else [`TrackerMode::SyncWp`] where
    /// write-protect is, else [`TrackerMode::SoftDirty`].
    pub fn new(regions: &[Region]) -> Result<DirtyTracker, Error> {
        let mode = match uffd::probe() {
            Ok(info) if info.features.contains(Features::WP_ASYNC) => TrackerMode::Async,
            Ok(info) if info.features.contains(Features::PAGEFAULT_FLAG_WP) => TrackerMode::SyncWp,
            _ => TrackerMode::SoftDirty,
        };
        Self::with_mode(regions, mode)
    }

    /// A tracker in `mode` (forcing the fallback is how it is tested).
    pub fn with_mode(regions: &[Region], mode: TrackerMode) -> Result<DirtyTracker, Error> {
        validate(regions)?;
        let inner = match mode {
            TrackerMode::Async => {
                let supported = uffd::probe()
                    .map_err(Error::uffd("probing userfaultfd"))?
                    .features;
                if !supported.contains(Features::WP_ASYNC) {
                    return Err(Error::Unsupported(
                        "WP_ASYNC dirty tracking needs Linux 6.7; use TrackerMode::SoftDirty"
                            .into(),
                    ));
                }
                let features = Features::WP_ASYNC
                    | Features::WP_UNPOPULATED
                    | (supported & Features::WP_HUGETLBFS_SHMEM);
                // No messages are ever sent in async mode, so user-mode-only
                // loses nothing and needs no privilege.
                let uffd = uffd::OpenOptions::new()
                    .user_mode_only(true)
                    .features(features)
                    .open()
                    .map_err(Error::uffd("opening a WP_ASYNC userfaultfd"))?;
                for r in regions {
                    uffd.register(r.addr(), r.len(), RegisterMode::WP)
                        .map_err(Error::uffd("registering a region for WP_ASYNC tracking"))?;
                    match uffd
                        .write_protect(r.addr(), r.len(), WriteProtectMode::WP)
                        .map_err(Error::uffd("write-protecting a tracked region"))?
                    {
                        Outcome::Complete { .. } => {}
                        other => {
                            return Err(Error::Unsupported(format!(
                                "write-protecting {} returned {other:?} on a userfaultfd without events",
                                r.describe()
                            )))
                        }
                    }
                }
                let pagemap =
                    Pagemap::open_self().map_err(Error::uffd("opening /proc/self/pagemap"))?;
                Inner::Async {
                    _uffd: uffd,
                    pagemap,
                }
            }
            TrackerMode::SyncWp => Inner::SyncWp(SyncWp::start(regions)?),
            TrackerMode::SoftDirty => {
                if !soft_dirty_works() {
                    return Err(Error::Unsupported(
                        "soft-dirty tracking is not available: this kernel is built without \
                         CONFIG_MEM_SOFT_DIRTY (pagemap bit 55 never sets); use TrackerMode::Async \
                         (Linux 6.7) or TrackerMode::SyncWp"
                            .into(),
                    ));
                }
                clear_refs()?;
                let path = "/proc/self/pagemap";
                let pagemap = File::open(path).map_err(Error::io("opening the pagemap", path))?;
                Inner::SoftDirty { pagemap }
            }
        };
        Ok(DirtyTracker {
            regions: regions.to_vec(),
            inner,
        })
    }

    /// The mode in use.
    pub fn mode(&self) -> TrackerMode {
        match self.inner {
            Inner::Async { .. } => TrackerMode::Async,
            Inner::SyncWp(_) => TrackerMode::SyncWp,
            Inner::SoftDirty { .. } => TrackerMode::SoftDirty,
        }
    }

    /// The regions tracked.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Address ranges written since the last call, sorted and merged; the
    /// pages are tracked again from now on. Ranges of a hugetlb region are
    /// whole huge pages.
    pub fn written(&mut self) -> Result<Vec<Range<u64>>, Error> {
        let mut out: Vec<Range<u64>> = Vec::new();
        match &self.inner {
            Inner::Async { pagemap, .. } => {
                for r in &self.regions {
                    let ranges = pagemap
                        .written(r.addr(), r.addr() + r.len(), true)
                        .map_err(Error::uffd("PAGEMAP_SCAN of a tracked region"))?;
                    let ps = r.page_size();
                    // Huge pages are reported whole; round to the region's
                    // page size regardless.
                    out.extend(
                        ranges
                            .into_iter()
                            .map(|(s, e)| (s & !(ps - 1))..e.next_multiple_of(ps)),
                    );
                }
            }
            Inner::SyncWp(sync) => {
                if let Some(t) = &sync.thread {
                    if t.is_finished() {
                        return Err(Error::Unsupported(
                            "the write-fault thread of the sync-wp tracker stopped".into(),
                        ));
                    }
                }
                let pages =
                    std::mem::take(&mut *sync.written.lock().unwrap_or_else(|e| e.into_inner()));
                for &page in &pages {
                    let ps = self
                        .regions
                        .iter()
                        .find(|r| r.addr() <= page && page < r.addr() + r.len())
                        .map_or(4096, Region::page_size);
                    // No events are enabled on this userfaultfd, so a retry
                    // is only ever a transient race.
                    loop {
                        match sync.uffd.write_protect(page, ps, WriteProtectMode::WP) {
                            // A REMOVE being read by the thread: retry.
                            Ok(Outcome::RetryAfterEvents) => std::thread::yield_now(),
                            Ok(_) => break,
                            // Unmapped since: nothing left to track there.
                            Err(e) if e.errno() == Some(uffd::Errno::NOENT) => break,
                            Err(e) => {
                                return Err(Error::Uffd {
                                    step: "re-protecting written pages",
                                    source: e,
                                })
                            }
                        }
                    }
                    out.push(page..page + ps);
                }
            }
            Inner::SoftDirty { pagemap } => {
                let mut entries = vec![0u8; 8 * 4096];
                for r in &self.regions {
                    let first = r.addr() / 4096;
                    let pages = r.len() / 4096;
                    let ps = r.page_size();
                    let mut p = 0;
                    while p < pages {
                        let n = (pages - p).min(4096);
                        let buf = &mut entries[..(n * 8) as usize];
                        pagemap
                            .read_exact_at(buf, (first + p) * 8)
                            .map_err(Error::io("reading the pagemap", "/proc/self/pagemap"))?;
                        for (i, e) in buf.chunks_exact(8).enumerate() {
                            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                            if entry & (1 << 55) != 0 {
                                let addr = (first + p + i as u64) * 4096;
                                let start = addr & !(ps - 1);
                                let range = start..start + ps;
                                match out.last_mut() {
                                    Some(last) if last.end >= range.start => {
                                        last.end = last.end.max(range.end)
                                    }
                                    _ => out.push(range),
                                }
                            }
                        }
                        p += n;
                    }
                }
                clear_refs()?;
            }
        }
        out.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// [`DirtyTracker::written`] as image offsets (through the regions'
    /// offsets), sorted and merged.
    pub fn written_image_ranges(&mut self) -> Result<Vec<Range<u64>>, Error> {
        let ranges = self.written()?;
        Ok(to_image(&self.regions, &ranges))
    }
}

/// Address ranges of `regions` as image offsets, sorted and merged.
pub fn to_image(regions: &[Region], ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = ranges
        .iter()
        .flat_map(|a| regions.iter().filter_map(move |r| r.image_range(a.clone())))
        .collect();
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

impl SyncWp {
    fn start(regions: &[Region]) -> Result<SyncWp, Error> {
        let supported = uffd::probe()
            .map_err(Error::uffd("probing userfaultfd"))?
            .features;
        // REMOVE: a page dropped by MADV_DONTNEED changed (it reads as
        // zero now) without a write fault, and on anonymous memory it
        // lost its protection too; it is recorded like a written page.
        let features = Features::PAGEFAULT_FLAG_WP
            | Features::EVENT_REMOVE
            | (supported & (Features::WP_UNPOPULATED | Features::WP_HUGETLBFS_SHMEM));
        let uffd = uffd::OpenOptions::new()
            .non_blocking(true)
            .features(features)
            .open()
            .map_err(Error::uffd("opening a userfaultfd for write tracking"))?;
        for r in regions {
            uffd.register(r.addr(), r.len(), RegisterMode::WP)
                .map_err(Error::uffd("registering a region for write tracking"))?;
            let _ = uffd
                .write_protect(r.addr(), r.len(), WriteProtectMode::WP)
                .map_err(Error::uffd("write-protecting a tracked region"))?;
        }
        let uffd = Arc::new(uffd);
        let written = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sizes: Vec<(u64, u64, u64)> = regions
            .iter()
            .map(|r| (r.addr(), r.len(), r.page_size()))
            .collect();
        let (u, w, st) = (uffd.clone(), written.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("uffd-dirty".into())
            .spawn(move || {
                let mut buf = EventBuffer::new(64);
                while !st.load(Ordering::Acquire) {
                    if !u.wait_readable(Some(Duration::from_millis(20)))? {
                        continue;
                    }
                    // The set stays locked from the read to the last
                    // insert: madvise returns once its REMOVE is read, and
                    // a written() after it must find the range recorded.
                    let mut set = w.lock().unwrap_or_else(|e| e.into_inner());
                    let mut faults = Vec::new();
                    for e in u.read_events(&mut buf)?.drain(..) {
                        match e {
                            Event::Pagefault(f) => faults.push(f.address),
                            Event::Remove { start, end } => {
                                for &(a, l, ps) in &sizes {
                                    let (from, to) = (start.max(a), end.min(a + l));
                                    let mut page = from & !(ps - 1);
                                    while page < to {
                                        set.insert(page);
                                        page += ps;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    for addr in faults {
                        let ps = sizes
                            .iter()
                            .find(|(a, l, _)| *a <= addr && addr < a + l)
                            .map_or(4096, |s| s.2);
                        let page = addr & !(ps - 1);
                        // Recorded before it is unprotected: an unprotected
                        // page is always in the set.
                        set.insert(page);
                        let _ = u.write_protect(page, ps, WriteProtectMode::empty())?;
                    }
                    drop(set);
                }
                Ok(())
            })
            .map_err(Error::io("starting the write-fault thread", "/proc/self"))?;
        Ok(SyncWp {
            uffd,
            written,
            stop,
            thread: Some(thread),
        })
    }
}

/// True when this kernel keeps soft-dirty bits: a page written in a fresh
/// mapping is soft-dirty.
fn soft_dirty_works() -> bool {
    let Ok(m) = uffd::Mapping::new(uffd::MemoryKind::Anon, 4096) else {
        return false;
    };
    m.write_byte(0, 1);
    let Ok(f) = File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, m.addr() / 4096 * 8).is_ok() && u64::from_le_bytes(e) & (1 << 55) != 0
}

fn clear_refs() -> Result<(), Error> {
    let path = "/proc/self/clear_refs";
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(Error::io(
            "clearing soft-dirty bits (needs CONFIG_MEM_SOFT_DIRTY)",
            path,
        ))
}
