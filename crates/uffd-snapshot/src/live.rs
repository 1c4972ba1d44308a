//! Live snapshots: a point-in-time image of this process's memory taken
//! while its threads keep writing (QEMU's background snapshot, without a VM).
//!
//! 1. [`LiveSnapshot::prepare`] opens a userfaultfd (write-protect faults,
//!    REMOVE/UNMAP/REMAP events, WP_UNPOPULATED so untouched anonymous
//!    pages are protected too) and registers every region for WP.
//! 2. t0, one of two ways:
//!    - [`Prepared::protect`]: `UFFDIO_WRITEPROTECT` over every region,
//!      cut into pieces walked by one thread per core. The walk costs
//!      about 80 ns per present 4 KiB page per thread here (20 ms per
//!      GiB), and a writer may land a write on a page the walk has not
//!      reached yet, so for an image of one instant across threads the
//!      writers are held for the whole walk, as fork() holds them for its
//!      page-table copy.
//!    - [`Prepared::arm`], then [`Armed::protect`]: the same walk while
//!      the writers run, with the saver thread already serving them; a
//!      write to a page the walk has passed faults once, and the saver
//!      unprotects the page and records it. t0 protects again only the
//!      recorded pages (and ranges discarded meanwhile, which lose their
//!      protection with their pages), so writers held across it wait for
//!      a few thousand pages, not for every page table: 1.4–14 ms for
//!      4 GiB here (1k–11k pages), against 76 ms for the walk.
//! 3. One saver thread does the rest: it serves write faults first (the
//!    faulting page is saved, then unprotected, which wakes the writer),
//!    and between faults saves the other pages in order, a chunk at a
//!    time, unprotecting each chunk once it is copied. Saved pages go to
//!    memory buffers that a second thread writes to the image
//!    ([`SnapshotOptions::staging`] bounds them), so no writer waits for
//!    the disk. A write from the
//!    kernel (`read(2)` into protected memory) faults the same way, so the
//!    userfaultfd catches kernel-mode faults unless
//!    [`SnapshotOptions::user_mode_only`] is set.
//! 4. [`Running::finish`] waits for the image: sparse (zero pages stay
//!    holes), fsync'd, renamed into place: the raw layout
//!    `uffd serve --mem-file` restores.
//!
//! Events: the kernel delivers REMOVE (`MADV_DONTNEED`/`MADV_REMOVE`)
//! before it drops the pages and waits until the event is read; since the
//! one saver thread both reads events and copies pages, every page it
//! copied before reading a REMOVE held its t0 contents. Pages a REMOVE or
//! UNMAP covers that were not saved yet are lost: [`DiscardPolicy`]
//! decides whether that fails the snapshot or saves them as zero. REMAP
//! (`mremap`) moves pages with their protection; the saver follows them.
//!
//! The saver reads memory through `/proc/self/mem`, so a page unmapped
//! under it is an error it recovers from, not a crash. If the thread dies,
//! the userfaultfd closes with it and every blocked writer runs on.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{Event, EventBuffer, Features, Outcome, RegisterMode, Uffd, WriteProtectMode};

use crate::error::Error;
use crate::image::{ProcMem, SparseImage};
use crate::region::{validate, Region};
use crate::staging::{self, Staging};

/// What to do with pages discarded or unmapped during a snapshot before
/// they were saved (their t0 contents are gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardPolicy {
    /// Fail the snapshot ([`Error::Discarded`]); no image is written.
    #[default]
    Fail,
    /// Save them as zero: right when discarded memory is garbage to the
    /// application (a balloon), as Firecracker treats REMOVE.
    Zero,
}

/// Options of a live snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    chunk: u64,
    discard: DiscardPolicy,
    track_writes: bool,
    user_mode_only: bool,
    skip_copy_on_fault: bool,
    skip_rearm: bool,
    defer_background: bool,
    staging: Option<u64>,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            chunk: 64 << 10,
            discard: DiscardPolicy::Fail,
            track_writes: false,
            user_mode_only: false,
            skip_copy_on_fault: false,
            skip_rearm: false,
            defer_background: false,
            staging: None,
        }
    }
}

impl SnapshotOptions {
    /// Defaults: 64 KiB chunks, [`DiscardPolicy::Fail`], no write tracking,
    /// kernel-mode faults caught.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the background saver copies between looks at the fault queue
    /// (rounded up to a page): the longest a faulting writer waits behind
    /// it. Default 64 KiB.
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.chunk = bytes.max(4096);
        self
    }

    /// Most bytes of saved pages held in memory on their way to the image
    /// (a writer that faults waits for a copy into memory, not for the
    /// disk; at this bound the background pass waits for the disk and,
    /// past a reserve kept for them, so do faults). Default: a quarter of
    /// the memory available at [`LiveSnapshot::prepare`], at least 16 MiB.
    pub fn staging(mut self, bytes: u64) -> Self {
        self.staging = Some(bytes);
        self
    }

    /// See [`DiscardPolicy`].
    pub fn discard(mut self, policy: DiscardPolicy) -> Self {
        self.discard = policy;
        self
    }

    /// Keep saved pages protected, so that the first write to each after
    /// t0 faults and is recorded: [`Report::written`] then lists every page
    /// written since t0, the first delta of an incremental chain. Costs one
    /// fault per page first written during the snapshot.
    pub fn track_writes(mut self, on: bool) -> Self {
        self.track_writes = on;
        self
    }

    /// Open the userfaultfd user-mode-only (needs no privilege): a kernel
    /// write into protected memory (`read(2)` into it) then fails with
    /// EFAULT instead of waiting for the page to be saved.
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }

    /// Negative control for tests: unprotect a faulting page without saving
    /// it first (the image then holds the later contents). Never use.
    #[doc(hidden)]
    pub fn skip_copy_on_fault(mut self, on: bool) -> Self {
        self.skip_copy_on_fault = on;
        self
    }

    /// Negative control for tests: [`Armed::protect`] does not protect
    /// again the pages written since [`Prepared::arm`] (writes to them
    /// after t0 then reach the image). Never use.
    #[doc(hidden)]
    pub fn skip_rearm(mut self, on: bool) -> Self {
        self.skip_rearm = on;
        self
    }

    /// For tests of the negative controls: the background pass saves
    /// nothing until [`Running::stop`] or [`Running::finish`] (faults are
    /// served meanwhile), so a write made after t0 is certain to come
    /// before the pass reaches its page, however the test is scheduled.
    #[doc(hidden)]
    pub fn defer_background(mut self, on: bool) -> Self {
        self.defer_background = on;
        self
    }
}

/// What a live snapshot did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The image written.
    pub image: PathBuf,
    /// Its length.
    pub image_len: u64,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
    /// How long t0 took: protecting every region, or after
    /// [`Prepared::arm`] only the pages written since.
    pub protect_time: Duration,
    /// After [`Prepared::arm`]: how long its walk of every region took
    /// (writers running).
    pub arm_time: Duration,
    /// After [`Prepared::arm`]: pages written or discarded between the arm
    /// walk and t0, protected again at t0.
    pub rearmed: u64,
    /// From t0 to the last page saved.
    pub save_time: Duration,
    /// Pages saved because a writer faulted on them.
    pub saved_on_fault: u64,
    /// Pages saved by the background pass.
    pub saved_in_background: u64,
    /// Write faults served (including those on pages already saved).
    pub faults: u64,
    /// The longest time from reading a fault to unprotecting its page.
    pub longest_fault: Duration,
    /// REMOVE, UNMAP and REMAP events handled.
    pub events: u64,
    /// Image offsets of pages discarded or unmapped before they were saved
    /// (saved as zero under [`DiscardPolicy::Zero`]).
    pub discarded: Vec<Range<u64>>,
    /// With [`SnapshotOptions::track_writes`]: image offsets of pages
    /// written (or discarded) since t0, until [`Running::finish`].
    pub written: Vec<Range<u64>>,
}

/// Entry point; see the module docs.
#[derive(Debug)]
pub struct LiveSnapshot;

const UNSAVED: u8 = 0;
const SAVED: u8 = 1;
const LOST: u8 = 2;
const STATE: u8 = 3;
const WRITTEN: u8 = 4;

#[derive(Debug, Clone, Copy)]
struct Segment {
    region: usize,
    first_unit: u64,
    addr: u64,
    units: u64,
}

#[derive(Debug)]
struct Saver {
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    units: Vec<Vec<u8>>,
    segments: Vec<Segment>,
    remaining: u64,
    cursor: (usize, u64),
    mem: ProcMem,
    staging: Staging,
    /// Largest run the background pass saves at once.
    chunk: usize,
    /// Saved by the background pass, still protected: `(region, first
    /// unit, units)`, unprotected together (see [`UNPROTECT_SPAN`]).
    unprotect_later: Option<(usize, u64, u64)>,
    events: EventBuffer,
    options: SnapshotOptions,
    report: Report,
    t0: Option<Instant>,
    /// Between [`Prepared::arm`] and t0: a write fault unprotects its page
    /// and records it here, to be protected again at t0.
    arming: Option<Vec<(usize, u64, u64)>>,
    /// Faults read and not yet served (kept to keep its allocation).
    fault_queue: VecDeque<(u64, Instant)>,
}

/// Snapshot registered, not yet protected.
#[derive(Debug)]
pub struct Prepared {
    saver: Saver,
}

/// A snapshot in progress: the saver thread runs until the image is
/// complete (and, with write tracking, until [`Running::finish`]).
#[derive(Debug)]
pub struct Running {
    thread: Option<JoinHandle<Result<Saver, Error>>>,
    saved: Arc<(Mutex<bool>, Condvar)>,
    stop: Arc<AtomicBool>,
    /// Set by [`Running::stop`]: releases a deferred background pass.
    finishing: Arc<AtomicBool>,
}

/// A snapshot armed by [`Prepared::arm`]: every region is write-protected
/// and the saver thread records the pages written since; t0 is
/// [`Armed::protect`].
#[derive(Debug)]
pub struct Armed {
    /// Taken by [`Armed::protect`].
    running: Option<Running>,
    control: Arc<T0Control>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            // Abandoned before t0: the saver leaves its wait and stops,
            // closing the userfaultfd (Running's drop joins it).
            running.stop.store(true, Ordering::Release);
            self.control.wake();
        }
    }
}

impl T0Control {
    /// Waits until the saver reaches `phase` (true) or `ended` says its
    /// thread is gone (false).
    fn wait_for(&self, phase: ArmPhase, ended: impl Fn() -> bool) -> bool {
        let (lock, cv) = &self.phase;
        let mut at = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *at < phase {
            if ended() {
                return false;
            }
            at = cv
                .wait_timeout(at, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn enter(&self, phase: ArmPhase) {
        let (lock, cv) = &self.phase;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        cv.notify_all();
    }

    fn wake(&self) {
        // An eventfd write fails only when its counter is full, and then
        // the saver is awake anyway.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// How [`Armed::protect`] asks the saver thread for t0 and hears back.
#[derive(Debug)]
struct T0Control {
    /// Wakes the saver from its wait on the userfaultfd.
    wake: rustix::fd::OwnedFd,
    requested: AtomicBool,
    /// The arm walk's duration, for the report.
    arm_time: Mutex<Duration>,
    phase: (Mutex<ArmPhase>, Condvar),
}

/// Where the saver thread of an armed snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ArmPhase {
    Starting,
    /// Serving faults: the walk may start.
    Serving,
    /// t0 passed: every page is protected.
    AtT0,
}

impl LiveSnapshot {
    /// Opens the userfaultfd, registers `regions` for write-protect and
    /// creates the image's temporary file beside `path`.
    pub fn prepare(
        regions: &[Region],
        path: &Path,
        options: SnapshotOptions,
    ) -> Result<Prepared, Error> {
        let image_len = validate(regions)?;
        let supported = uffd::probe()
            .map_err(Error::uffd("probing userfaultfd"))?
            .features;
        let mut features = Features::PAGEFAULT_FLAG_WP
            | Features::WP_UNPOPULATED
            | Features::EVENT_REMOVE
            | Features::EVENT_UNMAP
            | Features::EVENT_REMAP;
        let missing = features - supported;
        if !missing.is_empty() {
            return Err(Error::Unsupported(format!(
                "a live snapshot needs userfaultfd features this kernel lacks: {missing:?} \
                 (write-protect of unpopulated memory needs Linux 6.4)"
            )));
        }
        features |= supported & Features::WP_HUGETLBFS_SHMEM;
        let uffd = uffd::OpenOptions::new()
            .non_blocking(true)
            .user_mode_only(options.user_mode_only)
            .features(features)
            .open()
            .map_err(Error::uffd("opening a userfaultfd for the snapshot"))?;
        for r in regions {
            uffd.register(r.addr(), r.len(), RegisterMode::WP).map_err(|source| Error::Uffd {
                step: "registering a region for write-protect (shmem and hugetlb need WP_HUGETLBFS_SHMEM, Linux 5.19)",
                source,
            })?;
        }
        let image = SparseImage::create(path, image_len)?;
        let max_page = regions.iter().map(Region::page_size).max().unwrap_or(4096);
        let chunk = options.chunk.next_multiple_of(4096).max(max_page);
        let cap = options
            .staging
            .unwrap_or_else(|| staging::default_cap(image_len));
        let staging = Staging::start(image, cap, chunk as usize)?;
        Ok(Prepared {
            saver: Saver {
                uffd: Arc::new(uffd),
                units: regions
                    .iter()
                    .map(|r| vec![UNSAVED; r.pages() as usize])
                    .collect(),
                segments: regions
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Segment {
                        region: i,
                        first_unit: 0,
                        addr: r.addr(),
                        units: r.pages(),
                    })
                    .collect(),
                remaining: regions.iter().map(Region::pages).sum(),
                regions: regions.to_vec(),
                cursor: (0, 0),
                mem: ProcMem::open()?,
                staging,
                chunk: chunk as usize,
                unprotect_later: None,
                events: EventBuffer::new(64),
                options,
                report: Report {
                    image: path.to_path_buf(),
                    image_len,
                    ..Report::default()
                },
                t0: None,
                arming: None,
                fault_queue: VecDeque::new(),
            },
        })
    }

    /// prepare, protect and finish: the whole snapshot in one call.
    pub fn take(
        regions: &[Region],
        path: &Path,
        options: SnapshotOptions,
    ) -> Result<Report, Error> {
        Self::prepare(regions, path, options)?.protect()?.finish()
    }
}

impl Prepared {
    /// t0: write-protects every region and starts the saver thread. The
    /// writers wait for the whole walk (about 20 ms per GiB of 4 KiB pages
    /// here) if they are held across this call; [`Prepared::arm`] leaves
    /// them only the pages written during it.
    pub fn protect(mut self) -> Result<Running, Error> {
        let started = Instant::now();
        let mut pending: Vec<(u64, u64)> = protect_parts(&self.saver.regions);
        while !pending.is_empty() {
            pending = protect_in_parallel(&self.saver.uffd, pending, None)?;
            if !pending.is_empty() {
                self.saver.drain()?;
            }
        }
        self.saver.report.protect_time = started.elapsed();
        self.saver.t0 = Some(Instant::now());
        spawn_saver(self.saver, None)
    }

    /// Write-protects every region while the writers run, with the saver
    /// thread already serving their faults: a write to a page the walk
    /// has protected faults once, and the saver unprotects the page and
    /// records it. t0 is then [`Armed::protect`], which protects again only
    /// the pages recorded, so writers held across it wait for those, not
    /// for a walk of every page table. Costs one fault per page written
    /// between this call and t0.
    pub fn arm(mut self) -> Result<Armed, Error> {
        let started = Instant::now();
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::io("creating the saver's wake-up eventfd", "eventfd")(e.into()))?;
        let control = Arc::new(T0Control {
            wake,
            requested: AtomicBool::new(false),
            arm_time: Mutex::new(Duration::ZERO),
            phase: (Mutex::new(ArmPhase::Starting), Condvar::new()),
        });
        self.saver.arming = Some(Vec::new());
        let uffd = self.saver.uffd.clone();
        let mut pending: Vec<(u64, u64)> = protect_parts(&self.saver.regions);
        let running = spawn_saver(self.saver, Some(control.clone()))?;
        // From here an early return drops `armed`, which wakes the saver
        // to stop.
        let armed = Armed {
            running: Some(running),
            control,
        };
        let saver_ended = || {
            armed
                .running
                .as_ref()
                .and_then(|r| r.thread.as_ref())
                .is_some_and(JoinHandle::is_finished)
        };
        if !armed.control.wait_for(ArmPhase::Serving, saver_ended) {
            return Err(armed.into_saver_error());
        }
        let mut tries = 0u32;
        while !pending.is_empty() && !saver_ended() {
            pending = protect_in_parallel(&uffd, pending, Some(ARM_WALKER_NICE))?;
            if !pending.is_empty() {
                // Events are queued; the saver thread is reading them.
                tries += 1;
                if tries > 100_000 {
                    return Err(Error::Stuck(
                        "write-protecting the regions kept failing with EAGAIN".into(),
                    ));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        drop(uffd);
        *armed
            .control
            .arm_time
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = started.elapsed();
        Ok(armed)
    }
}

impl Armed {
    /// t0: protects again the pages written (or discarded) since
    /// [`Prepared::arm`]; every page then holds its t0 contents until
    /// saved. Hold the writers across this call for an image of one
    /// instant.
    pub fn protect(mut self) -> Result<Running, Error> {
        self.control.requested.store(true, Ordering::Release);
        self.control.wake();
        let running = self.running.as_ref().expect("protect runs once");
        let ended = || running.thread.as_ref().is_some_and(JoinHandle::is_finished);
        if !self.control.wait_for(ArmPhase::AtT0, ended) {
            return Err(self.into_saver_error());
        }
        Ok(self.running.take().expect("protect runs once"))
    }

    /// The error the saver thread ended with (it ended before t0).
    fn into_saver_error(mut self) -> Error {
        let thread = self.running.as_mut().and_then(|r| r.thread.take());
        thread
            .map(join_saver)
            .and_then(Result::err)
            .unwrap_or_else(|| Error::Stuck("the saver thread ended before t0".into()))
    }
}

fn spawn_saver(mut saver: Saver, control: Option<Arc<T0Control>>) -> Result<Running, Error> {
    let saved = Arc::new((Mutex::new(false), Condvar::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let finishing = Arc::new(AtomicBool::new(false));
    let (s, st, fin) = (saved.clone(), stop.clone(), finishing.clone());
    let thread = std::thread::Builder::new()
        .name("uffd-snapshot".into())
        .spawn(move || {
            // Every unprotect wakes a writer, which then preempts the
            // saver (it slept, so the scheduler favours it); behind
            // CPU-bound writers the saver waited up to 36 ms for the
            // CPU with each writer stalled behind it. Ahead of them it
            // serves a fault in tens of microseconds. Needs
            // CAP_SYS_NICE or RLIMIT_NICE; without, it runs as it is.
            let _ =
                rustix::process::setpriority_process(Some(rustix::thread::gettid()), SAVER_NICE);
            if let Some(control) = control {
                saver.arm_until_t0(&control, &st)?;
            }
            saver.run(&s, &st, &fin).map(|()| saver)
        })
        .map_err(Error::io("starting the saver thread", "/proc/self"))?;
    Ok(Running {
        thread: Some(thread),
        saved,
        stop,
        finishing,
    })
}

fn join_saver(thread: JoinHandle<Result<Saver, Error>>) -> Result<Saver, Error> {
    match thread.join() {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::SaverPanicked(why))
        }
    }
}

/// The arm walk's threads' nice value: no writer waits for that walk, so
/// it yields the cores to them (a single piece is walked on the caller's
/// thread, at the caller's priority).
const ARM_WALKER_NICE: i32 = 10;

/// Writes recorded between arm and t0 that need no allocation.
const ARM_RECORD_RESERVE: usize = 64 << 10;

/// The saver's nice value, where the process may raise priority.
const SAVER_NICE: i32 = -10;

/// The background pass unprotects what it saved in runs of up to this
/// many bytes: every unprotect ends in a TLB shootdown (an IPI to each CPU
/// running a writer, slow in a VM: most of the saver's time here when it
/// unprotected every 64 KiB), while a writer faulting inside a run being
/// unprotected waits for its walk (about 1 ms for 16 MiB).
const UNPROTECT_SPAN: u64 = 16 << 20;

/// Pieces of at least this many bytes are protected by a thread each: the
/// t0 walk is the writers' longest stall, and its cost is per page-table
/// entry (about 80 ns per 4 KiB page on this project's VM), so it divides
/// by the cores that walk at once while the writers are held.
const PARALLEL_PROTECT_MIN: u64 = 64 << 20;

/// The `(addr, len)` pieces the t0 walk protects, one per walking thread:
/// each region cut at huge-page-aligned (2 MiB, or its page size if larger)
/// boundaries into about equal parts.
fn protect_parts(regions: &[Region]) -> Vec<(u64, u64)> {
    let total: u64 = regions.iter().map(Region::len).sum();
    let walkers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8) as u64;
    let walkers = walkers.min(total / PARALLEL_PROTECT_MIN).max(1);
    let target = total.div_ceil(walkers);
    let mut parts = Vec::new();
    for r in regions {
        let align = r.page_size().max(2 << 20);
        let mut at = r.addr();
        let end = r.addr() + r.len();
        while at < end {
            let mut to = at.saturating_add(target).next_multiple_of(align).min(end);
            if to <= at {
                to = end;
            }
            parts.push((at, to - at));
            at = to;
        }
    }
    parts
}

/// Write-protects every piece, one thread per piece; returns the pieces
/// the kernel refused until queued events are read (EAGAIN).
fn protect_in_parallel(
    uffd: &Uffd,
    parts: Vec<(u64, u64)>,
    nice: Option<i32>,
) -> Result<Vec<(u64, u64)>, Error> {
    let protect = |&(addr, len): &(u64, u64)| {
        uffd.write_protect(addr, len, WriteProtectMode::WP)
            .map_err(Error::uffd("write-protecting a region at t0"))
    };
    if parts.len() == 1 {
        return Ok(match protect(&parts[0])? {
            Outcome::RetryAfterEvents => parts,
            _ => Vec::new(),
        });
    }
    // Every walker is a thread that starts walking only once all of them
    // are running: starting a thread takes the mmap lock for writing,
    // which waits for a walk in progress (each holds it for reading), so a
    // walker started beside a walk began only after it (measured: two
    // halves of 4 GiB took 65 ms each, one after the other).
    let start = std::sync::Barrier::new(parts.len() + 1);
    let outcomes: Vec<Result<Outcome, Error>> = std::thread::scope(|scope| {
        let walkers: Vec<_> = parts
            .iter()
            .map(|part| {
                let start = &start;
                scope.spawn(move || {
                    if let Some(nice) = nice {
                        let _ = rustix::process::setpriority_process(
                            Some(rustix::thread::gettid()),
                            nice,
                        );
                    }
                    start.wait();
                    protect(part)
                })
            })
            .collect();
        start.wait();
        walkers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::SaverPanicked("a t0 walker panicked".into())))
            })
            .collect()
    });
    let mut retry = Vec::new();
    for (part, outcome) in parts.into_iter().zip(outcomes) {
        if let Outcome::RetryAfterEvents = outcome? {
            retry.push(part);
        }
    }
    Ok(retry)
}

impl Running {
    /// Waits until every page is saved (true), or `timeout` passes.
    pub fn wait_saved(&self, timeout: Option<Duration>) -> bool {
        let (lock, cv) = &*self.saved;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = timeout.map(|t| Instant::now() + t);
        while !*done {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                return false;
            }
            let wait = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_millis(100));
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            done = cv
                .wait_timeout(done, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits for every page to be saved, stops the saver (closing the
    /// userfaultfd: nothing stays protected) and commits the image.
    pub fn finish(self) -> Result<Report, Error> {
        self.stop()?.commit()
    }

    /// Waits for every page to be saved and stops the saver, closing the
    /// userfaultfd (with write tracking, the written set ends here), but
    /// leaves the image's fsync and rename to [`Stopped::commit`]: stop
    /// writers across this call to hand tracking over to a
    /// [`crate::DirtyTracker`], and commit after resuming them.
    pub fn stop(mut self) -> Result<Stopped, Error> {
        self.finishing.store(true, Ordering::Release);
        while !self.wait_saved(None) {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                break;
            }
        }
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("stop runs once");
        let saver = join_saver(thread)?;
        saver.close()
    }
}

/// A snapshot whose pages are all saved and whose userfaultfd is closed;
/// the image is not yet durable.
#[derive(Debug)]
pub struct Stopped {
    image: SparseImage,
    report: Report,
    discard: DiscardPolicy,
}

impl Stopped {
    /// What the snapshot did (the image is not in place yet).
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// fsync, rename into place, fsync the directory; fails (and removes
    /// the temporary file) if pages were lost under [`DiscardPolicy::Fail`].
    pub fn commit(self) -> Result<Report, Error> {
        if !self.report.discarded.is_empty() && self.discard == DiscardPolicy::Fail {
            return Err(Error::Discarded {
                ranges: self.report.discarded,
            });
        }
        self.image.commit()?;
        Ok(self.report)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }
}

/// Why saving a run of pages did not complete.
enum Step {
    Done,
    /// An event is pending (EAGAIN) or memory moved under the read: drain
    /// events and retry.
    Retry,
}

impl Saver {
    fn run(
        &mut self,
        saved: &(Mutex<bool>, Condvar),
        stop: &AtomicBool,
        finishing: &AtomicBool,
    ) -> Result<(), Error> {
        let mut announced = false;
        let mut read_failures = 0u32;
        loop {
            self.drain()?;
            if stop.load(Ordering::Acquire) && (self.remaining == 0 || announced) {
                return Ok(());
            }
            if stop.load(Ordering::Acquire) {
                return Err(Error::Stuck(
                    "the snapshot was abandoned before it completed".into(),
                ));
            }
            if self.remaining == 0 {
                self.unprotect_pending()?;
                self.staging.send_current()?;
                if !announced && self.staging.written_out() {
                    announced = true;
                    self.report.save_time = self.t0.map_or(Duration::ZERO, |t| t.elapsed());
                    let (lock, cv) = saved;
                    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    cv.notify_all();
                }
                // Until finish(): serve write faults (with tracking, saved
                // pages stay protected) and read events, which madvise and
                // munmap of the regions wait for.
                self.uffd
                    .wait_readable(Some(Duration::from_millis(5)))
                    .map_err(Error::uffd("waiting for write faults"))?;
                continue;
            }
            if self.options.defer_background && !finishing.load(Ordering::Acquire) {
                self.uffd
                    .wait_readable(Some(Duration::from_millis(5)))
                    .map_err(Error::uffd("waiting for write faults"))?;
                continue;
            }
            if !self.staging.background_room(self.chunk) {
                // The disk is behind: serve faults (from the reserve) until
                // the image writer gives buffers back.
                self.uffd
                    .wait_readable(Some(Duration::from_millis(1)))
                    .map_err(Error::uffd("waiting for write faults"))?;
                continue;
            }
            match self.save_next()? {
                Step::Done => read_failures = 0,
                Step::Retry => {
                    read_failures += 1;
                    if read_failures > 2000 {
                        return Err(Error::Stuck(
                            "memory of a snapshot region stayed unreadable with no UNMAP/REMAP event to explain it".into(),
                        ));
                    }
                    self.uffd
                        .wait_readable(Some(Duration::from_millis(1)))
                        .map_err(Error::uffd("waiting for events"))?;
                }
            }
        }
    }

    /// Between [`Prepared::arm`] and t0: serves write faults (unprotect and
    /// record) and events until t0 is requested, then protects again what
    /// was recorded and tells [`Armed::protect`].
    fn arm_until_t0(&mut self, control: &T0Control, stop: &AtomicBool) -> Result<(), Error> {
        use rustix::event::{PollFd, PollFlags};
        // Allocate now what serving faults needs: the first allocation of
        // a thread maps its malloc arena, and growing one changes the
        // mappings; both take the mmap lock for writing, which would wait
        // for the walk (it holds the lock for reading) with every writer
        // waiting behind this thread.
        if let Some(written) = &mut self.arming {
            written.reserve(ARM_RECORD_RESERVE);
        }
        self.fault_queue.reserve(self.events.capacity());
        control.enter(ArmPhase::Serving);
        loop {
            self.drain()?;
            if stop.load(Ordering::Acquire) {
                return Err(Error::Stuck("the snapshot was abandoned before t0".into()));
            }
            if control.requested.load(Ordering::Acquire) {
                break;
            }
            let mut fds = [
                PollFd::new(&*self.uffd, PollFlags::IN),
                PollFd::new(&control.wake, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(Error::io("waiting for write faults", "userfaultfd")(
                        e.into(),
                    ))
                }
            }
            if fds[1].revents().contains(PollFlags::IN) {
                let mut count = [0u8; 8];
                let _ = rustix::io::read(&control.wake, &mut count);
            }
        }
        let started = Instant::now();
        let mut tries = 0u32;
        // Faults read while protecting (from threads not held) unprotect
        // and record their page again: go round until nothing is left.
        loop {
            self.drain()?;
            let written = self.arming.as_mut().map(std::mem::take).unwrap_or_default();
            if written.is_empty() || self.options.skip_rearm {
                break;
            }
            let units = |runs: &[(usize, u64, u64)]| runs.iter().map(|w| w.2).sum::<u64>();
            let asked = units(&written);
            let left = self.protect_again(written)?;
            self.report.rearmed += asked - units(&left);
            if !left.is_empty() {
                tries += 1;
                if tries > 10_000 {
                    return Err(Error::Stuck(
                        "protecting the pages written before t0 kept failing with EAGAIN".into(),
                    ));
                }
                if let Some(w) = &mut self.arming {
                    w.extend(left);
                }
            }
        }
        self.arming = None;
        self.report.protect_time = started.elapsed();
        self.report.arm_time = *control.arm_time.lock().unwrap_or_else(|e| e.into_inner());
        self.t0 = Some(Instant::now());
        control.enter(ArmPhase::AtT0);
        Ok(())
    }

    /// Write-protects the runs `(region, first unit, units)`, merged where
    /// they touch; returns those the kernel refused until queued events
    /// are read (EAGAIN).
    fn protect_again(
        &mut self,
        mut runs: Vec<(usize, u64, u64)>,
    ) -> Result<Vec<(usize, u64, u64)>, Error> {
        runs.sort_unstable();
        let mut merged: Vec<(usize, u64, u64)> = Vec::with_capacity(runs.len());
        for (r, u, n) in runs {
            match merged.last_mut() {
                Some((lr, lu, ln)) if *lr == r && *lu + *ln >= u => {
                    *ln = (*ln).max(u + n - *lu);
                }
                _ => merged.push((r, u, n)),
            }
        }
        let mut refused = Vec::new();
        for (r, u, n) in merged {
            let ps = self.regions[r].page_size();
            self.for_each_mapped_run(r, u, n, |addr, at, k| {
                let step = self.write_protect(
                    addr,
                    k * ps,
                    WriteProtectMode::WP,
                    "write-protecting the pages written before t0",
                )?;
                if let Step::Retry = step {
                    refused.push((r, at, k));
                }
                Ok(())
            })?;
        }
        Ok(refused)
    }

    /// Reads every queued message; applies the events first (faults and
    /// events arrive out of order), then serves the faults.
    fn drain(&mut self) -> Result<(), Error> {
        let mut faults = std::mem::take(&mut self.fault_queue);
        faults.clear();
        let result = self.drain_into(&mut faults);
        self.fault_queue = faults;
        result
    }

    fn drain_into(&mut self, faults: &mut VecDeque<(u64, Instant)>) -> Result<(), Error> {
        let mut stuck = 0u32;
        loop {
            let events: Vec<Event> = self
                .uffd
                .read_events(&mut self.events)
                .map_err(Error::uffd("reading userfaultfd messages"))?
                .drain(..)
                .collect();
            if events.is_empty() && faults.is_empty() {
                return Ok(());
            }
            for event in events {
                match event {
                    Event::Pagefault(f) => faults.push_back((f.address, Instant::now())),
                    Event::Remove { start, end } => {
                        self.report.events += 1;
                        self.discard(start, end, false);
                    }
                    Event::Unmap { start, end } => {
                        self.report.events += 1;
                        self.discard(start, end, true);
                    }
                    Event::Remap { from, to, len } => {
                        self.report.events += 1;
                        self.remap(from, to, len);
                    }
                    Event::Fork { .. } | Event::Unknown { .. } => {}
                }
            }
            while let Some(&(addr, seen)) = faults.front() {
                match self.fault(addr)? {
                    Step::Done => {
                        self.report.longest_fault = self.report.longest_fault.max(seen.elapsed());
                        faults.pop_front();
                        stuck = 0;
                    }
                    Step::Retry => {
                        // An event is pending, or the page was unmapped
                        // or moved and its event is on its way: wait for
                        // it, but not forever (an error closes the
                        // userfaultfd, which releases every writer).
                        stuck += 1;
                        if stuck > 2000 {
                            return Err(Error::Stuck(format!(
                                "a write fault at {addr:#x} could not be served: its page stayed \
                                 unreadable or unprotectable with no event to explain it"
                            )));
                        }
                        self.uffd
                            .wait_readable(Some(Duration::from_millis(1)))
                            .map_err(Error::uffd("waiting for events"))?;
                        break;
                    }
                }
            }
        }
    }

    fn lookup(&self, addr: u64) -> Option<(usize, u64, u64)> {
        self.segments.iter().find_map(|s| {
            let ps = self.regions[s.region].page_size();
            let end = s.addr + s.units * ps;
            (s.addr <= addr && addr < end).then(|| {
                let unit = (addr - s.addr) / ps;
                (s.region, s.first_unit + unit, s.addr + unit * ps)
            })
        })
    }

    fn address_of(&self, region: usize, unit: u64) -> Option<(u64, u64)> {
        self.segments.iter().find_map(|s| {
            (s.region == region && s.first_unit <= unit && unit < s.first_unit + s.units).then(
                || {
                    let ps = self.regions[region].page_size();
                    (
                        s.addr + (unit - s.first_unit) * ps,
                        s.first_unit + s.units - unit,
                    )
                },
            )
        })
    }

    /// Calls `f(addr, first unit, units)` for each run of units `u..u + n`
    /// of region `r` at its current address (a REMAP may have split them
    /// across segments); units unmapped since are left out.
    fn for_each_mapped_run(
        &self,
        r: usize,
        u: u64,
        n: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut at = u;
        while at < u + n {
            match self.address_of(r, at) {
                Some((addr, run)) => {
                    let k = run.min(u + n - at);
                    f(addr, at, k)?;
                    at += k;
                }
                None => at += 1,
            }
        }
        Ok(())
    }

    fn fault(&mut self, addr: u64) -> Result<Step, Error> {
        self.report.faults += 1;
        let Some((r, unit, page_addr)) = self.lookup(addr) else {
            // Not ours (any more): let the writer retry.
            let page = addr & !4095;
            let _ = self.uffd.wake(page, 4096);
            return Ok(Step::Done);
        };
        let ps = self.regions[r].page_size();
        if let Some(written) = &mut self.arming {
            // Before t0: nothing to save yet, only to protect again at t0.
            written.push((r, unit, 1));
            return self.unprotect(page_addr, ps);
        }
        if self.units[r][unit as usize] & STATE == UNSAVED && !self.options.skip_copy_on_fault {
            if let Step::Retry = self.save(r, unit, 1, page_addr)? {
                return Ok(Step::Retry);
            }
            self.report.saved_on_fault += 1;
        }
        if self.options.track_writes {
            self.units[r][unit as usize] |= WRITTEN;
        }
        self.unprotect(page_addr, ps)
    }

    fn unprotect(&self, addr: u64, len: u64) -> Result<Step, Error> {
        self.write_protect(
            addr,
            len,
            WriteProtectMode::empty(),
            "unprotecting a saved page",
        )
    }

    /// `UFFDIO_WRITEPROTECT` of `addr..addr + len` with `mode`: `Retry`
    /// while events are queued (EAGAIN); a range unmapped or unregistered
    /// meanwhile is done, since nothing there is left to protect or wake.
    fn write_protect(
        &self,
        addr: u64,
        len: u64,
        mode: WriteProtectMode,
        step: &'static str,
    ) -> Result<Step, Error> {
        match self.uffd.write_protect(addr, len, mode) {
            Ok(Outcome::RetryAfterEvents) => Ok(Step::Retry),
            Ok(_) => Ok(Step::Done),
            Err(e) if e.errno() == Some(uffd::Errno::NOENT) => Ok(Step::Done),
            Err(source) => Err(Error::Uffd { step, source }),
        }
    }

    /// Copies `n` units of region `r` from `addr` into the image and marks
    /// them saved.
    fn save(&mut self, r: usize, first: u64, n: u64, addr: u64) -> Result<Step, Error> {
        let region = self.regions[r];
        let len = (n * region.page_size()) as usize;
        let offset = region.offset() + first * region.page_size();
        let mem = &self.mem;
        if self
            .staging
            .stage(offset, len, |buf| mem.read(addr, buf))?
            .is_err()
        {
            return Ok(Step::Retry);
        }
        for u in first..first + n {
            let s = &mut self.units[r][u as usize];
            if *s & STATE == UNSAVED {
                self.remaining -= 1;
            }
            *s = (*s & !STATE) | SAVED;
        }
        Ok(Step::Done)
    }

    /// Saves the next run of unsaved pages after the cursor.
    fn save_next(&mut self) -> Result<Step, Error> {
        let (mut r, mut u) = self.cursor;
        let total = self.regions.len();
        let mut scanned = 0;
        loop {
            if r >= total {
                r = 0;
                u = 0;
                scanned += 1;
                if scanned > 1 {
                    // Every remaining unit is unreachable (should not happen:
                    // the count and the states disagree).
                    return Err(Error::Stuck(format!(
                        "{} pages neither saved nor reachable",
                        self.remaining
                    )));
                }
            }
            let units = &self.units[r];
            match units[u as usize..]
                .iter()
                .position(|s| s & STATE == UNSAVED)
            {
                Some(p) => {
                    u += p as u64;
                    break;
                }
                None => {
                    r += 1;
                    u = 0;
                }
            }
        }
        let Some((addr, contiguous)) = self.address_of(r, u) else {
            // Unsaved but in no segment: unmapped and its event not handled?
            // UNMAP marks such pages lost, so this is a moment of a REMAP.
            self.cursor = (r, u);
            return Ok(Step::Retry);
        };
        let ps = self.regions[r].page_size();
        let max = (self.chunk as u64 / ps).max(1).min(contiguous);
        let mut n = 1;
        while n < max && self.units[r][(u + n) as usize] & STATE == UNSAVED {
            n += 1;
        }
        if let Step::Retry = self.save(r, u, n, addr)? {
            self.cursor = (r, u);
            return Ok(Step::Retry);
        }
        self.report.saved_in_background += n;
        self.cursor = (r, u + n);
        if !self.options.track_writes {
            match self.unprotect_later {
                Some((pr, pu, pn))
                    if pr == r && pu + pn == u && (pn + n) * ps <= UNPROTECT_SPAN =>
                {
                    self.unprotect_later = Some((pr, pu, pn + n));
                }
                _ => {
                    self.unprotect_pending()?;
                    self.unprotect_later = Some((r, u, n));
                }
            }
        }
        Ok(Step::Done)
    }

    /// Unprotects the saved run the background pass has gathered.
    fn unprotect_pending(&mut self) -> Result<(), Error> {
        let Some((r, u, n)) = self.unprotect_later.take() else {
            return Ok(());
        };
        let ps = self.regions[r].page_size();
        let mut tries = 0;
        loop {
            // The units are saved; their addresses may have moved if
            // events were drained in between.
            let mut retry = false;
            self.for_each_mapped_run(r, u, n, |addr, _, k| {
                if let Step::Retry = self.unprotect(addr, k * ps)? {
                    retry = true;
                }
                Ok(())
            })?;
            if !retry {
                return Ok(());
            }
            tries += 1;
            if tries > 10_000 {
                return Err(Error::Stuck(
                    "unprotecting saved pages kept failing with EAGAIN".into(),
                ));
            }
            self.drain()?;
        }
    }

    /// Makes `addr` a segment boundary.
    fn split_at(&mut self, addr: u64) {
        let mut i = 0;
        while i < self.segments.len() {
            let s = self.segments[i];
            let ps = self.regions[s.region].page_size();
            let end = s.addr + s.units * ps;
            if s.addr < addr && addr < end {
                let head = (addr - s.addr) / ps;
                if head > 0 && head < s.units {
                    self.segments[i].units = head;
                    self.segments.insert(
                        i + 1,
                        Segment {
                            region: s.region,
                            first_unit: s.first_unit + head,
                            addr: s.addr + head * ps,
                            units: s.units - head,
                        },
                    );
                }
                return;
            }
            i += 1;
        }
    }

    /// REMOVE (`unmapped` false) or UNMAP of `start..end`: unsaved pages
    /// there lose their t0 contents; unmapped ones leave the segments.
    fn discard(&mut self, start: u64, end: u64, unmapped: bool) {
        self.split_at(start);
        self.split_at(end);
        let mut keep = Vec::with_capacity(self.segments.len());
        for s in std::mem::take(&mut self.segments) {
            let ps = self.regions[s.region].page_size();
            let (a, b) = (s.addr.max(start), (s.addr + s.units * ps).min(end));
            if a < b {
                let first = s.first_unit + (a - s.addr) / ps;
                let last = s.first_unit + (b - s.addr).div_ceil(ps);
                if let (Some(written), false) = (&mut self.arming, unmapped) {
                    // Discarded before t0: whatever the range holds at t0
                    // is its t0 contents, but anonymous memory loses its
                    // protection with its pages, so protect it again then.
                    written.push((s.region, first, last - first));
                    keep.push(s);
                    continue;
                }
                for u in first..last {
                    let st = &mut self.units[s.region][u as usize];
                    if *st & STATE == UNSAVED {
                        *st = (*st & !STATE) | LOST;
                        self.remaining -= 1;
                    }
                    if self.options.track_writes {
                        *st |= WRITTEN;
                    }
                }
                if unmapped && s.addr >= start && s.addr + s.units * ps <= end {
                    continue;
                }
            }
            keep.push(s);
        }
        self.segments = keep;
    }

    /// REMAP: pages moved from `from` to `to`, protection and all.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        self.split_at(from);
        self.split_at(from + len);
        for s in &mut self.segments {
            let ps = self.regions[s.region].page_size();
            if s.addr >= from && s.addr + s.units * ps <= from + len {
                s.addr = s.addr - from + to;
            }
        }
    }

    fn close(mut self) -> Result<Stopped, Error> {
        let ranges = |units: &[Vec<u8>], regions: &[Region], test: &dyn Fn(u8) -> bool| {
            let mut out: Vec<Range<u64>> = Vec::new();
            for (r, states) in units.iter().enumerate() {
                let region = regions[r];
                let ps = region.page_size();
                for (u, &s) in states.iter().enumerate() {
                    if test(s) {
                        let start = region.offset() + u as u64 * ps;
                        match out.last_mut() {
                            Some(last) if last.end == start => last.end += ps,
                            _ => out.push(start..start + ps),
                        }
                    }
                }
            }
            out.sort_by_key(|r| r.start);
            out
        };
        self.report.discarded = ranges(&self.units, &self.regions, &|s| s & STATE == LOST);
        if self.options.track_writes {
            self.report.written = ranges(&self.units, &self.regions, &|s| s & WRITTEN != 0);
        }
        // Close the userfaultfd before anything else can fail: nothing
        // stays protected.
        drop(self.uffd);
        let image = self.staging.finish()?;
        self.report.data_bytes = image.data_bytes;
        Ok(Stopped {
            image,
            report: self.report,
            discard: self.options.discard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t0_pieces_cover_every_region_exactly_on_huge_page_boundaries() {
        let two_mib = 2u64 << 20;
        for lens in [
            vec![4096u64],
            vec![64 << 20],
            vec![1 << 30],
            vec![(1 << 30) + 4096, 8192, 3 << 30],
        ] {
            let mut at = 1u64 << 40;
            let regions: Vec<Region> = lens
                .iter()
                .map(|&len| {
                    let r = Region::new(at, len, 4096).expect("a valid region");
                    at += len.next_multiple_of(two_mib) + two_mib;
                    r
                })
                .collect();
            let parts = protect_parts(&regions);
            let walkers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
            let total: u64 = lens.iter().sum();
            assert!(parts.len() as u64 >= lens.len() as u64);
            assert!(
                parts.len() as u64 <= lens.len() as u64 + walkers.min(8),
                "{parts:?}"
            );
            for r in &regions {
                let mut next = r.addr();
                for &(a, l) in parts
                    .iter()
                    .filter(|p| p.0 >= r.addr() && p.0 < r.addr() + r.len())
                {
                    assert_eq!(a, next, "a gap or overlap in {parts:?}");
                    assert!(l > 0);
                    let end = a + l;
                    assert!(end == r.addr() + r.len() || end % two_mib == 0);
                    next = end;
                }
                assert_eq!(next, r.addr() + r.len());
            }
            assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), total);
        }
    }
}
