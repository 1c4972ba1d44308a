//! What every case shares: verdicts, feature gates, the two areas of the
//! kernel's tests, handler threads with a shutdown path, a watchdog that
//! turns a sleeping faulting thread into a FAIL, and forked children for the
//! parts that fork or install signal handlers.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::fs::OFlags;
use uffd::{
    CopyMode, Errno, Error, Event, EventBuffer, Features, Mapping, MemoryKind, OpenOptions,
    Outcome, Uffd, WriteProtectMode,
};

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The case cannot run here; the reason says what is missing.
    Skip(String),
    /// The case ran and found a fault; the reason says what.
    Fail(String),
}

/// A case's verdict: `Ok(note)` is a pass (the note says what was checked
/// or observed), `Err` a skip or a failure.
pub type CaseResult = Result<String, Stop>;

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fail(e.to_string())
    }
}

/// Returns from the case with a FAIL built like `format!`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::harness::Stop::Fail(format!($($arg)*))) };
}

/// Returns from the case with a SKIP built like `format!`.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => { return Err($crate::harness::Stop::Skip(format!($($arg)*))) };
}

/// FAILs the case unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => { if !$cond { $crate::fail!($($arg)*) } };
}

/// How long a faulting thread, a child process or a handler may take
/// before the case gives up on it and FAILs, naming what is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(15);

/// Settings of the stress bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressConfig {
    /// Size of each of the two areas in MiB; `None` picks a short default
    /// per memory type.
    pub mib: Option<usize>,
    /// Number of bounces; every 16 consecutive bounces cover all mode
    /// combinations.
    pub bounces: u32,
    /// Print a line per bounce on stderr.
    pub progress: bool,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            mib: None,
            bounces: 16,
            progress: false,
        }
    }
}

impl StressConfig {
    /// Pages per area for `kind`: the configured size, or 4 MiB (16 MiB of
    /// huge pages) by default; at least two pages per CPU.
    pub fn pages(&self, kind: MemoryKind) -> usize {
        let default_mib = if kind.is_hugetlb() { 16 } else { 4 };
        let bytes = self.mib.unwrap_or(default_mib) << 20;
        let per_cpu = (bytes / kind.page_size() / parallelism()).max(2);
        per_cpu * parallelism()
    }
}

/// Handler, locking and background threads per area: one per CPU, at most 32.
pub fn parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(32)
}

/// The size of each area in the unit cases unless `--mib` says otherwise:
/// the kernel's `UFFD_TEST_MEM_SIZE` in uffd-unit-tests.c, for every
/// memory type (8192 base pages, 16 huge pages of 2 MiB).
pub const UNIT_AREA_MIB: usize = 32;

/// Everything a case gets: the memory type and the seed of its random choices.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    /// The memory type under test (meaningless for the handshake cases).
    pub kind: MemoryKind,
    /// Seeds every random choice, so a failure can be replayed.
    pub seed: u64,
    /// The size of each unit-case area in MiB; `None` is [`UNIT_AREA_MIB`].
    pub mib: Option<usize>,
    /// The stress bounce's size.
    pub stress: StressConfig,
}

impl Env {
    /// The page size faults are served in.
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }

    /// Pages per area in the unit cases, as the kernel computes them:
    /// `MAX(UFFD_TEST_MEM_SIZE, 2 * page_size) / page_size`, with the
    /// size from `--mib` when given.
    pub fn nr_pages(&self) -> usize {
        let ps = self.page_size();
        let bytes = self.mib.unwrap_or(UNIT_AREA_MIB) << 20;
        bytes.max(2 * ps) / ps
    }

    /// SKIPs unless the kernel supports all of `features`.
    pub fn require(&self, features: Features) -> Result<(), Stop> {
        let supported = match uffd::probe() {
            Ok(info) => info.features,
            Err(e) if e.is_denied() => skip!("userfaultfd is not permitted here: {e}"),
            Err(e) => fail!("probing userfaultfd failed: {e}"),
        };
        let missing = features - supported;
        if !missing.is_empty() {
            skip!("the kernel lacks UFFD_FEATURE_{missing}");
        }
        Ok(())
    }

    /// A non-blocking, user-mode-only userfaultfd with `features` (plus
    /// the memory type's MISSING capability), SKIPping when
    /// the kernel or the privileges do not allow it.
    pub fn open(&self, features: Features) -> Result<Uffd, Stop> {
        // Registering MISSING on shmem or hugetlbfs needs the kernel to
        // support it; asking for the capability bit gates the case.
        let features = features | self.kind.missing_feature();
        self.require(features)?;
        // User-mode-only, as the kernel's tests open it: no case lets the
        // kernel itself touch registered memory, and it needs no privilege.
        match OpenOptions::new()
            .non_blocking(true)
            .user_mode_only(true)
            .features(features)
            .open()
        {
            Ok(uffd) => Ok(uffd),
            Err(Error::Api { errno, .. })
                if errno == Errno::PERM && features.contains(Features::EVENT_FORK) =>
            {
                skip!("UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE (EPERM)")
            }
            Err(e) if e.is_denied() => skip!("userfaultfd is not permitted here: {e}"),
            Err(e) => fail!("opening a userfaultfd with {features}: {e}"),
        }
    }

    /// A mapping of this case's memory type, SKIPping when hugetlb memory
    /// cannot be had.
    pub fn map(&self, len: usize) -> Result<Mapping, Stop> {
        map(self.kind, len)
    }
}

/// A mapping of `kind`, SKIPping when hugetlb memory cannot be had.
pub fn map(kind: MemoryKind, len: usize) -> Result<Mapping, Stop> {
    match Mapping::new(kind, len) {
        Ok(m) => Ok(m),
        Err(e) if kind.is_hugetlb() => skip!(
            "cannot map {} MiB of hugetlb memory ({e}); {} huge pages free",
            len >> 20,
            uffd::free_hugepages()
        ),
        Err(e) => fail!("mapping {kind} memory: {e}"),
    }
}

/// Offset of the counter in each page (the lock word is at offset 0, so
/// the first access to a page is the lock's read).
pub const COUNT_OFFSET: usize = 8;

/// Reads the u64 at `addr`, which must be inside a live mapping.
///
/// # Safety
/// `addr..addr+8` is mapped for the whole call (it may fault and block
/// until a handler resolves it) and 8-byte aligned.
pub unsafe fn peek(addr: u64) -> u64 {
    // SAFETY: the caller vouches for the address; volatile so the access
    // (and its fault) really happens.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Writes the u64 at `addr`.
///
/// # Safety
/// As for [`peek`]; no Rust reference covers the location.
pub unsafe fn poke(addr: u64, value: u64) {
    // SAFETY: as above.
    unsafe { (addr as *mut u64).write_volatile(value) }
}

/// The src and dst areas of the kernel's tests: every src page holds a
/// counter of 1 (and an out-of-band copy of it), dst starts empty.
#[derive(Debug)]
pub struct Areas {
    /// The source pages COPY and MOVE read from.
    pub src: Mapping,
    /// The destination, which cases register.
    pub dst: Mapping,
    /// Pages per area.
    pub pages: usize,
    /// Page size.
    pub page_size: usize,
}

impl Areas {
    /// Two areas of `pages` pages of `env.kind`, src initialised, dst empty.
    pub fn new(env: &Env, pages: usize) -> Result<Areas, Stop> {
        Self::with_src_advice(env, pages, None)
    }

    /// As [`Areas::new`], applying `advice` to src before it is populated
    /// (the move cases ask for or against transparent huge pages).
    pub fn with_src_advice(
        env: &Env,
        pages: usize,
        advice: Option<rustix::mm::Advice>,
    ) -> Result<Areas, Stop> {
        let ps = env.page_size();
        let src = env.map(pages * ps)?;
        let dst = env.map(pages * ps)?;
        if let Some(advice) = advice {
            if let Err(e) = src.advise(0, src.len(), advice) {
                skip!("madvise({advice:?}) on the source area: {e}");
            }
        }
        for nr in 0..pages {
            let page = src.addr() + (nr * ps) as u64;
            // SAFETY: inside src, which is ours and not registered.
            unsafe {
                poke(page, 0);
                poke(page + COUNT_OFFSET as u64, 1);
                poke(page + 2 * COUNT_OFFSET as u64, 1);
            }
        }
        release(&dst)?;
        Ok(Areas {
            src,
            dst,
            pages,
            page_size: ps,
        })
    }

    /// Length of one area in bytes.
    pub fn len(&self) -> u64 {
        (self.pages * self.page_size) as u64
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Drops every page of the mapping so that it reads as missing again: a
/// hole punched in the file for shared memory (MADV_REMOVE), the private
/// copies dropped for private memory (MADV_DONTNEED) and, for private
/// mappings of a file, the file's pages punched too, so that no page-cache
/// page hides the next MISSING fault.
pub fn release(m: &Mapping) -> Result<(), Stop> {
    release_range(m.kind(), m.as_ptr(), m.len(), m.file())
}

/// [`release`] for a raw range of a mapping of `kind` (which may have been
/// moved by mremap), with the mapping's memfd if it has one.
pub fn release_range(
    kind: MemoryKind,
    ptr: *mut u8,
    len: usize,
    file: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), Stop> {
    let advice = if kind.is_shared() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the range is a mapping this case owns; dropping its pages is
    // the point (they read back as missing, or as zero when unregistered).
    if unsafe { libc::madvise(ptr.cast::<c_void>(), len, advice) } != 0 {
        fail!(
            "madvise({}) of {len:#x} bytes at {ptr:p}: {}",
            if kind.is_shared() {
                "MADV_REMOVE"
            } else {
                "MADV_DONTNEED"
            },
            std::io::Error::last_os_error()
        );
    }
    if let (false, Some(file)) = (kind.is_shared(), file) {
        let offset = 0;
        if let Err(e) = rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len as u64,
        ) {
            fail!("punching the {kind} memfd: {e}");
        }
    }
    Ok(())
}

/// Switches `O_NONBLOCK` on a userfaultfd (the stress test alternates
/// blocking reads and poll).
pub fn set_nonblocking(uffd: impl AsFd, on: bool) -> Result<(), Stop> {
    let fd = uffd.as_fd();
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| Stop::Fail(format!("F_GETFL: {e}")))?;
    let flags = if on {
        flags | OFlags::NONBLOCK
    } else {
        flags - OFlags::NONBLOCK
    };
    rustix::fs::fcntl_setfl(fd, flags).map_err(|e| Stop::Fail(format!("F_SETFL: {e}")))
}

/// The shutdown path of a handler thread: an eventfd polled next to the
/// userfaultfd.
#[derive(Debug)]
pub struct Stopper {
    fd: OwnedFd,
    ready: std::sync::atomic::AtomicBool,
}

impl Stopper {
    /// A fresh, unsignalled stopper.
    pub fn new() -> Stopper {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .expect("eventfd");
        Stopper {
            fd,
            ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the handler as polling (called by [`serve`]).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Waits until a handler is polling, at most [`STUCK_AFTER`]. A fork
    /// with EVENT_FORK must not start before: glibc's fork holds malloc's
    /// locks until the kernel has delivered the FORK event, so the handler
    /// must already be in its allocation-free loop.
    pub fn wait_ready(&self) -> bool {
        let deadline = Instant::now() + STUCK_AFTER;
        while !self.ready.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Asks every handler polling this stopper to return.
    pub fn stop(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }
}

impl Default for Stopper {
    fn default() -> Self {
        Self::new()
    }
}

/// What a handler's event callback asks the loop to do next.
#[derive(Debug)]
pub enum Next {
    /// Keep serving the same userfaultfd.
    Continue,
    /// Serve this one from now on (the child's, after a FORK event).
    Switch(Uffd),
}

/// The poll loop of a handler thread: waits on the userfaultfd and the
/// stopper, reads many events per call and hands each to `on_event` until
/// the stopper fires. Follows a FORK when `on_event` asks to.
pub fn serve(
    uffd: &Uffd,
    stop: &Stopper,
    mut on_event: impl FnMut(&Uffd, Event) -> Result<Next, String>,
) -> Result<(), String> {
    let mut switched: Option<Uffd> = None;
    let mut buf = EventBuffer::new(64);
    // Events move here without allocating: while a fork with EVENT_FORK is
    // in progress, the forking thread holds malloc's locks until this loop
    // has read the FORK event.
    let mut pending: Vec<Event> = Vec::with_capacity(buf.capacity());
    stop.set_ready();
    loop {
        let current = switched.as_ref().unwrap_or(uffd);
        let mut fds = [
            PollFd::new(current, PollFlags::IN),
            PollFd::new(&stop.fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        if !fds[1].revents().is_empty() {
            return Ok(());
        }
        let revents = fds[0].revents();
        if revents.contains(PollFlags::ERR) {
            return Err("the userfaultfd reported POLLERR".into());
        }
        if !revents.contains(PollFlags::IN) {
            continue;
        }
        pending.append(current.read_events(&mut buf).map_err(|e| e.to_string())?);
        for event in pending.drain(..) {
            let current = switched.as_ref().unwrap_or(uffd);
            if let Next::Switch(child) = on_event(current, event)? {
                set_nonblocking(&child, true).map_err(|s| format!("{s:?}"))?;
                switched = Some(child);
            }
        }
    }
}

/// Fault counters of a handler, as the kernel's tests keep them.
#[derive(Debug, Default)]
pub struct Counters {
    /// MISSING faults resolved by this handler (EEXIST not counted).
    pub missing: AtomicU64,
    /// WP faults resolved.
    pub wp: AtomicU64,
    /// MINOR faults resolved.
    pub minor: AtomicU64,
    /// Resolves that found the page present (and woke it).
    pub eexist: AtomicU64,
}

impl Counters {
    /// Missing faults so far.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Relaxed)
    }
    /// WP faults so far.
    pub fn wp(&self) -> u64 {
        self.wp.load(Ordering::Relaxed)
    }
    /// Minor faults so far.
    pub fn minor(&self) -> u64 {
        self.minor.load(Ordering::Relaxed)
    }
    /// EEXIST outcomes so far.
    pub fn eexist(&self) -> u64 {
        self.eexist.load(Ordering::Relaxed)
    }
}

/// COPYs one page from `src` to `dst` (with `CopyMode::WP` when `wp`), the
/// kernel tests' `copy_page`: EEXIST is fine but the page is woken, since
/// the kernel does not wake on failure. Returns whether this call installed it.
pub fn copy_page(uffd: &Uffd, dst: u64, src: u64, ps: u64, wp: bool) -> Result<bool, String> {
    let mode = if wp { CopyMode::WP } else { CopyMode::empty() };
    // SAFETY: `src` is a page of a source area owned by the case and not
    // written while handlers run; `dst` is registered memory no reference covers.
    match unsafe { uffd.copy(dst, src as *const u8, ps, mode) } {
        Ok(Outcome::Complete { bytes }) if bytes == ps => Ok(true),
        Ok(Outcome::AlreadyPresent) => {
            uffd.wake(dst, ps).map_err(|e| e.to_string())?;
            Ok(false)
        }
        Ok(other) => Err(format!("UFFDIO_COPY of {dst:#x}: unexpected {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Unprotects one page and wakes its writers (a WP fault's resolution).
pub fn unprotect(uffd: &Uffd, page: u64, ps: u64) -> Result<(), String> {
    match uffd.write_protect(page, ps, WriteProtectMode::empty()) {
        Ok(Outcome::Complete { .. }) => Ok(()),
        Ok(other) => Err(format!("unprotecting {page:#x}: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `work` (which touches registered memory) while a watchdog waits
/// up to [`STUCK_AFTER`]. If the time passes, the watchdog unregisters
/// `ranges` (which wakes every thread asleep there, so the run goes on) and
/// the case FAILs naming the address in `at` that the work was touching.
pub fn guarded<T>(
    what: &str,
    uffd: &Uffd,
    ranges: &[(u64, u64)],
    at: &AtomicU64,
    work: impl FnOnce() -> T,
) -> Result<T, Stop> {
    guarded_within(STUCK_AFTER, what, uffd, ranges, at, work)
}

/// [`guarded`] with a chosen time limit.
pub fn guarded_within<T>(
    limit: Duration,
    what: &str,
    uffd: &Uffd,
    ranges: &[(u64, u64)],
    at: &AtomicU64,
    work: impl FnOnce() -> T,
) -> Result<T, Stop> {
    let (done, wait) = mpsc::channel::<()>();
    let stuck = std::thread::scope(|s| {
        let watchdog = s.spawn(move || match wait.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let addr = at.load(Ordering::Relaxed);
                for &(start, len) in ranges {
                    let _ = uffd.unregister(start, len);
                }
                Some(addr)
            }
            _ => None,
        });
        let out = work();
        drop(done);
        (watchdog.join().expect("watchdog panicked"), out)
    });
    match stuck {
        (Some(addr), _) => fail!(
            "{what}: a faulting thread was still asleep at {addr:#x} after {:?}; \
             unregistered the range to release it",
            limit
        ),
        (None, out) => Ok(out),
    }
}

/// A page shared with a forked child, through which it reports a failure
/// message and counters.
struct ChildReport {
    ptr: *mut u8,
}

const REPORT_LEN: usize = 4096;
const REPORT_MSG: usize = 64;

impl ChildReport {
    fn new() -> ChildReport {
        // SAFETY: a fresh shared anonymous page aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REPORT_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of the child report page");
        ChildReport { ptr: ptr.cast() }
    }

    fn write(&self, msg: &str) {
        let bytes = msg.as_bytes();
        let n = bytes.len().min(REPORT_LEN - REPORT_MSG - 1);
        // SAFETY: inside the page; only the child writes, and the parent
        // reads after the child exited.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(REPORT_MSG), n);
            self.ptr.add(REPORT_MSG + n).write(0);
        }
    }

    fn read(&self) -> String {
        // SAFETY: the child has exited; the message is NUL terminated
        // within the page (the page starts zeroed).
        let text =
            unsafe { std::ffi::CStr::from_ptr(self.ptr.add(REPORT_MSG).cast::<libc::c_char>()) };
        text.to_string_lossy().into_owned()
    }
}

impl Drop for ChildReport {
    fn drop(&mut self) {
        // SAFETY: the page mapped in `new`.
        unsafe { libc::munmap(self.ptr.cast(), REPORT_LEN) };
    }
}

/// Runs `child` in a forked child process and FAILs with its message if it
/// returns an error, panics, dies of a signal or outlives [`STUCK_AFTER`]
/// (then it is killed).
///
/// The child is a copy of a possibly multithreaded process: it must not
/// take locks another thread may have held at the fork (no printing; glibc
/// makes malloc safe after fork), and it leaves by `_exit`, never returning
/// into the caller.
pub fn in_child(what: &str, child: impl FnOnce() -> Result<(), String>) -> Result<(), Stop> {
    let report = ChildReport::new();
    // SAFETY: the child only runs `child` and then `_exit`s; see above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child));
        let code = match result {
            Ok(Ok(())) => 0,
            Ok(Err(msg)) => {
                report.write(&msg);
                1
            }
            Err(_) => {
                report.write("the child panicked");
                2
            }
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + STUCK_AFTER;
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            fail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if Instant::now() > deadline {
            // SAFETY: our own child, which is stuck.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            fail!(
                "{what}: the child process was stuck for {}s and was killed",
                STUCK_AFTER.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else if libc::WIFEXITED(status) {
        fail!("{what}: {}", report.read())
    } else {
        fail!(
            "{what}: the child died of signal {}",
            libc::WTERMSIG(status)
        )
    }
}

/// Bit 57 of a pagemap entry: the PTE is uffd write-protected.
pub const PM_UFFD_WP: u64 = 1 << 57;
/// Bit 62: the page is swapped out.
pub const PM_SWAP: u64 = 1 << 62;
/// Bit 63: the page is present.
pub const PM_PRESENT: u64 = 1 << 63;

/// The `/proc/self/pagemap` entry of the page holding `addr` (opened anew,
/// so a forked child sees its own).
pub fn pagemap_entry(addr: u64) -> Result<u64, String> {
    Ok(pagemap_entries(addr, 1)?[0])
}

/// The pagemap entries of `pages` consecutive base pages from the one
/// holding `addr`, in one read (a 1 GiB huge page has 262144 of them).
pub fn pagemap_entries(addr: u64, pages: usize) -> Result<Vec<u64>, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("opening /proc/self/pagemap: {e}"))?;
    let mut buf = vec![0u8; pages * 8];
    file.read_exact_at(&mut buf, addr / 4096 * 8)
        .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
    Ok(buf
        .chunks_exact(8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8-byte chunk")))
        .collect())
}

/// A `<field>: N kB` line (e.g. `Swap`, `ShmemPmdMapped`) of the VMA
/// starting at `addr` in `/proc/self/smaps`, in kB.
pub fn smaps_kb(addr: u64, field: &str) -> Result<u64, String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|e| format!("smaps: {e}"))?;
    let start = format!("{addr:x}-");
    let prefix = format!("{field}:");
    let mut in_vma = false;
    for line in smaps.lines() {
        if line.contains('-') && line.split_whitespace().count() >= 5 && !line.ends_with("kB") {
            in_vma = line.starts_with(&start);
            continue;
        }
        if in_vma {
            if let Some(v) = line.strip_prefix(&prefix) {
                return v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|e| format!("{field}: {e}"));
            }
        }
    }
    Err(format!("no {field} of a VMA at {addr:#x} in smaps"))
}

/// Whether the uffd-wp bit of the page at `addr` is set.
pub fn wp_bit(addr: u64) -> Result<bool, String> {
    Ok(pagemap_entry(addr)? & PM_UFFD_WP != 0)
}

/// Reserves an address range of `len` bytes aligned to `align` (PROT_NONE),
/// for mremap and collapse targets. Unmapped on drop.
#[derive(Debug)]
pub struct Reserved {
    base: *mut u8,
    total: usize,
    /// The aligned start.
    pub addr: u64,
}

impl Reserved {
    /// Reserves `len` bytes at an `align`-aligned address.
    pub fn new(len: usize, align: usize) -> Result<Reserved, Stop> {
        let total = len + align;
        // SAFETY: a fresh inaccessible reservation aliases nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            fail!(
                "reserving {total:#x} bytes: {}",
                std::io::Error::last_os_error()
            );
        }
        let addr = (base as u64).next_multiple_of(align as u64);
        Ok(Reserved {
            base: base.cast(),
            total,
            addr,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new` (parts of it may have been
        // replaced by mappings the case moved there; those go too).
        unsafe { libc::munmap(self.base.cast(), self.total) };
    }
}

/// A small deterministic generator (xorshift64*), seeded per case so that
/// a failure replays with `--seed`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Text of the last OS error.
pub fn os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Runs `work` while a handler thread serves `uffd` with `on_event`, then
/// stops the handler through its [`Stopper`] and joins it. The work runs
/// [`guarded`] over `ranges` (naming the address in `at` if it gets stuck);
/// a handler that fails unregisters `ranges` at once so that the work is
/// released, and its error is the case's FAIL.
pub fn with_handler<T>(
    what: &str,
    uffd: &Uffd,
    ranges: &[(u64, u64)],
    at: &AtomicU64,
    mut on_event: impl FnMut(&Uffd, Event) -> Result<Next, String> + Send,
    work: impl FnOnce() -> Result<T, String>,
) -> Result<T, Stop> {
    let stop = Stopper::new();
    let (handled, worked) = std::thread::scope(|s| {
        let handler = s.spawn(|| {
            let r = serve(uffd, &stop, &mut on_event);
            if r.is_err() {
                for &(start, len) in ranges {
                    let _ = uffd.unregister(start, len);
                }
            }
            r
        });
        let worked = if stop.wait_ready() {
            guarded(what, uffd, ranges, at, work)
        } else {
            Err(Stop::Fail("the handler thread did not start".into()))
        };
        stop.stop();
        let handled = handler
            .join()
            .unwrap_or_else(|_| Err("the handler thread panicked".into()));
        (handled, worked)
    });
    if let Err(e) = handled {
        fail!("{what}: handler: {e}");
    }
    match worked? {
        Ok(v) => Ok(v),
        Err(e) => fail!("{what}: {e}"),
    }
}

impl Stop {
    /// The reason, whether skip or failure.
    pub fn into_message(self) -> String {
        match self {
            Stop::Skip(m) => format!("skipped: {m}"),
            Stop::Fail(m) => m,
        }
    }
}
