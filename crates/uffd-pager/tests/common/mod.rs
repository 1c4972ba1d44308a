//! Helpers shared by the pager's integration tests.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use uffd::{Features, Mapping, MemoryKind, OpenOptions, RegisterMode, Uffd};
use uffd_pager::{Content, MemorySource, PageSource, Pager, SourceError};

/// How long any wait in a test may take before it fails naming what is stuck.
pub const LIMIT: Duration = Duration::from_secs(30);

/// The supported subset of `wanted`.
pub fn features(wanted: Features) -> Features {
    uffd::probe()
        .map(|a| a.features & wanted)
        .unwrap_or(Features::empty())
}

/// Options for the tests' own userfaultfds, with `wanted` features (those
/// the kernel has). The memory is this process's and only user-space code
/// touches it, so user-mode-only suffices, which needs no privilege.
fn options(wanted: Features) -> OpenOptions {
    OpenOptions::new()
        .non_blocking(true)
        .user_mode_only(true)
        .features(features(wanted))
}

/// A userfaultfd with `wanted` features (those the kernel has).
pub fn open(wanted: Features) -> Uffd {
    options(wanted).open().expect("open userfaultfd")
}

/// Like [`open`], but `None` (after saying why) when this process may not
/// have those features, e.g. EVENT_FORK without CAP_SYS_PTRACE.
pub fn try_open(wanted: Features) -> Option<Uffd> {
    match options(wanted).open() {
        Ok(uffd) => Some(uffd),
        Err(e) if e.is_denied() => {
            uffd_testkit::skip(
                uffd_testkit::Need::Root,
                format_args!("a userfaultfd with {wanted} is denied here: {e}"),
            );
            None
        }
        Err(e) => panic!("open userfaultfd: {e}"),
    }
}

/// Deterministic page contents: every 8-byte word holds its source offset
/// mixed with a seed, so misplaced pages are caught.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        let x = (i as u64 * 8) ^ seed.rotate_left(17) ^ 0x9E37_79B9_7F4A_7C15;
        w.copy_from_slice(&x.to_ne_bytes());
    }
    v
}

/// A memory source over `pattern(len, seed)`.
pub fn pattern_source(len: usize, seed: u64) -> (Arc<dyn PageSource>, Vec<u8>) {
    let bytes = pattern(len, seed);
    (Arc::new(MemorySource::new(bytes.clone())), bytes)
}

/// A source of `len` bytes of 0x5A whose reads reaching `open_below` or
/// past it wait until [`GatedSource::open`] (or 10 s pass), so faults stay
/// pending while a test shuts the pager down or detaches it.
#[derive(Debug)]
pub struct GatedSource {
    gate: AtomicBool,
    len: u64,
    open_below: u64,
}

impl GatedSource {
    /// A closed gate over `len` bytes; reads wholly below `open_below` pass.
    pub fn new(len: u64, open_below: u64) -> GatedSource {
        GatedSource {
            gate: AtomicBool::new(false),
            len,
            open_below,
        }
    }

    /// Lets every waiting and later read through.
    pub fn open(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }
}

impl PageSource for GatedSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        if offset + buf.len() as u64 > self.open_below {
            for _ in 0..10_000 {
                if self.gate.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        buf.fill(0x5A);
        Ok(Content::Data)
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

/// Waits (about 10 s at most) until `pager` has seen `count` missing
/// faults; fails naming the readers otherwise.
pub fn wait_for_missing_faults(pager: &Pager, count: u64) {
    let mut seen = false;
    for _ in 0..10_000 {
        if pager.stats().faults_missing >= count {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        seen,
        "the readers' faults never reached the pager: {:?}",
        pager.stats()
    );
}

/// Runs `f` on another thread and waits at most `LIMIT` for it; a panic
/// there or a timeout fails the test, naming `what`.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("stuck for {LIMIT:?}: {what}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// Reads the whole mapping on another thread (bounded).
pub fn read_all(memory: &Arc<Mapping>, what: &str) -> Vec<u8> {
    let m = Arc::clone(memory);
    bounded(what, move || {
        let mut buf = vec![0u8; m.len()];
        m.read(0, &mut buf);
        buf
    })
}

/// An anonymous mapping of `len` bytes registered MISSING on `uffd`.
pub fn anon_registered(uffd: &Uffd, len: usize) -> Arc<Mapping> {
    let m = Mapping::new(MemoryKind::Anon, len).expect("map anon");
    uffd.register(m.addr(), m.len() as u64, RegisterMode::MISSING)
        .expect("register");
    Arc::new(m)
}

/// Asserts two byte slices are equal, naming the first differing page.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x} (page {}): got {:#x}, want {:#x}",
            i / 4096,
            got[i],
            want[i]
        );
    }
}

/// Waits for child `pid` (bounded: kills it and fails after `LIMIT`).
pub fn wait_child(pid: i32) -> i32 {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert!(r == 0, "waitpid failed");
        if std::time::Instant::now() > deadline {
            // SAFETY: killing our own stuck child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("child {pid} is stuck after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A target process that made its own userfaultfd, as a VMM does, and
/// handed it over: `uffd` is this process's copy of it.
pub struct RemoteTarget {
    /// The target's pid (wait for it with [`wait_child`]).
    pub pid: i32,
    /// Our copy of the target's userfaultfd.
    pub uffd: Uffd,
    /// Where the target's registered mapping starts, in its address space.
    pub addr: u64,
}

/// Forks a target process that opens a userfaultfd with `features`, maps
/// `pages` anonymous pages, registers them MISSING, sends the fd number and
/// the address over a pipe, then runs `body` on its mapping and exits with
/// the code `body` returns (4 when the setup or `body` fails). This process
/// takes the userfaultfd with pidfd_open + pidfd_getfd.
///
/// Call it while no other thread of the test runs: the child runs `body`
/// after a fork, so `body` must only touch memory, pipes and the mapping.
/// `None` (after saying why) where such a userfaultfd is denied.
pub fn fork_target(
    pages: usize,
    features: Features,
    body: impl FnOnce(&Mapping) -> Option<i32>,
) -> Option<RemoteTarget> {
    if !uffd_testkit::vmm_uffd() {
        return None;
    }
    let (info_r, info_w) = rustix::pipe::pipe().unwrap();
    // SAFETY: the caller runs no other thread; the child only maps, makes
    // its userfaultfd, runs `body` (memory and pipes) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = (|| {
            let uffd = OpenOptions::new()
                .non_blocking(true)
                .features(features)
                .open()
                .ok()?;
            let m = Mapping::new(MemoryKind::Anon, pages * 4096).ok()?;
            uffd.register(m.addr(), m.len() as u64, RegisterMode::MISSING)
                .ok()?;
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&(uffd.as_raw_fd() as u64).to_ne_bytes());
            msg[8..].copy_from_slice(&m.addr().to_ne_bytes());
            rustix::io::write(&info_w, &msg).ok()?;
            body(&m)
        })()
        .unwrap_or(4);
        // SAFETY: leave without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    drop(info_w);
    let mut msg = [0u8; 16];
    let n = rustix::io::read(&info_r, &mut msg).unwrap();
    assert_eq!(
        n,
        16,
        "the target process failed to set up (status {})",
        wait_child(pid)
    );
    let fd = u64::from_ne_bytes(msg[..8].try_into().unwrap()) as i32;
    let addr = u64::from_ne_bytes(msg[8..].try_into().unwrap());
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let theirs =
        rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
            .unwrap();
    let uffd = Uffd::from_fd(theirs, features).unwrap();
    Some(RemoteTarget { pid, uffd, addr })
}
