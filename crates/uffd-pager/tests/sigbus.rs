//! SIGBUS mode: faulting threads serve their own faults in a SIGBUS
//! handler. The SIGBUS disposition is process-wide: under nextest each test
//! has its own process, and under plain `cargo test` the tests of this file
//! take `DISPOSITION` so they never overlap. Tests that must die re-run this
//! test binary as a child process.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;

use common::*;
use uffd::{Features, Mapping, MemoryKind};
use uffd_pager::{
    sigbus_handler_installed, FileMode, FileSource, MemorySource, Region, SigbusPager,
    SignalSafeSource,
};

const CHILD_ENV: &str = "UFFD_PAGER_SIGBUS_CHILD";

/// Held by every test here that installs or checks the SIGBUS disposition.
static DISPOSITION: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn own_disposition() -> std::sync::MutexGuard<'static, ()> {
    DISPOSITION.lock().unwrap_or_else(|e| e.into_inner())
}

fn sigbus_available() -> bool {
    if !uffd_testkit::user_uffd() {
        return false;
    }
    if !features(Features::SIGBUS).contains(Features::SIGBUS) {
        uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("the kernel has no userfaultfd SIGBUS feature"),
        );
        return false;
    }
    true
}

/// `pattern` with every fifth page zeroed (zero-page detection).
fn snapshot_bytes(len: usize) -> Vec<u8> {
    let mut bytes = pattern(len, 0x51B5);
    for page in bytes.chunks_mut(4096).step_by(5) {
        page.fill(0);
    }
    bytes
}

/// A snapshot file of `bytes`, with a 64 KiB hole at 1 MiB; removed on drop.
struct SnapshotFile {
    path: std::path::PathBuf,
}

impl SnapshotFile {
    fn new(name: &str, bytes: &mut [u8]) -> SnapshotFile {
        let path = std::env::temp_dir().join(format!(
            "uffd-pager-sigbus-{name}-{}.snap",
            std::process::id()
        ));
        bytes[1 << 20..(1 << 20) + (64 << 10)].fill(0);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(bytes.len() as u64).unwrap();
        for (i, chunk) in bytes.chunks(64 << 10).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                rustix::io::pwrite(&file, chunk, (i * (64 << 10)) as u64).unwrap();
            }
        }
        SnapshotFile { path }
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Four threads read every page of a SIGBUS-served mapping, each in its
/// own order (so they race on the same pages), then every byte is checked.
fn serve_from_threads(source: SignalSafeSource, want: &[u8], granule: u64) {
    let len = want.len();
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, len).unwrap());
    // SAFETY: a fresh anonymous mapping of this test, alive until after
    // shutdown; nothing relies on its (missing) contents.
    let pager = unsafe {
        SigbusPager::builder(source)
            .granule(granule)
            .scratch_buffers(2)
            .start(vec![Region::new(memory.addr(), len as u64, 0, 4096)])
    }
    .expect("start the SIGBUS pager");
    assert!(sigbus_handler_installed());
    let pages = len / 4096;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = Arc::clone(&memory);
            std::thread::spawn(move || {
                let mut sum = 0u64;
                for i in 0..pages {
                    // Thread 0 forwards, 1 backwards, 2 and 3 strided.
                    let p = match t {
                        0 => i,
                        1 => pages - 1 - i,
                        _ => (i * (2 * t as usize + 5)) % pages,
                    };
                    sum = sum.wrapping_add(u64::from(m.read_byte(p * 4096 + 8)));
                }
                sum
            })
        })
        .collect();
    bounded("threads reading SIGBUS-served pages", move || {
        for t in threads {
            t.join().expect("a reading thread panicked");
        }
    });
    let got = read_all(&memory, "reading the served mapping");
    assert_same(&got, want, "SIGBUS-served mapping");
    let stats = pager.shutdown();
    assert!(stats.faults > 0, "no fault was served: {stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(
        (stats.pages_copied + stats.pages_zero) as usize,
        pages,
        "every page installed exactly once: {stats:?}"
    );
    assert!(!sigbus_handler_installed());
}

/// `serve_from_threads` over a 4 MiB snapshot file (named for `name`) read
/// with `mode`, served in `granule`s.
fn serve_snapshot_file(name: &str, mode: FileMode, granule: u64) {
    let mut bytes = snapshot_bytes(4 << 20);
    let file = SnapshotFile::new(name, &mut bytes);
    let source = Arc::new(FileSource::open(&file.path, mode).unwrap());
    serve_from_threads(SignalSafeSource::file(source), &bytes, granule);
}

#[test]
fn memory_source_many_threads() {
    let _disposition = own_disposition();
    if !sigbus_available() {
        return;
    }
    let bytes = snapshot_bytes(4 << 20);
    let source = SignalSafeSource::memory(Arc::new(MemorySource::new(bytes.clone())));
    serve_from_threads(source, &bytes, 4096);
}

#[test]
fn file_mmap_source_granules() {
    let _disposition = own_disposition();
    if !sigbus_available() {
        return;
    }
    serve_snapshot_file("mmap", FileMode::Mmap, 64 << 10);
}

#[test]
fn file_pread_source_granules() {
    let _disposition = own_disposition();
    if !sigbus_available() {
        return;
    }
    // Four threads, two scratch buffers: some faults use the stack page.
    serve_snapshot_file("pread", FileMode::Pread, 16 << 10);
}

#[test]
fn zero_source() {
    let _disposition = own_disposition();
    if !sigbus_available() {
        return;
    }
    let want = vec![0u8; 1 << 20];
    serve_from_threads(SignalSafeSource::zero(1 << 20), &want, 4096);
}

#[test]
fn handler_uninstalled_on_shutdown() {
    let _disposition = own_disposition();
    if !sigbus_available() {
        return;
    }
    let previous = sigbus_disposition();
    let bytes = pattern(64 << 10, 7);
    let source = SignalSafeSource::memory(Arc::new(MemorySource::new(bytes.clone())));
    let a = Mapping::new(MemoryKind::Anon, bytes.len()).unwrap();
    let b = Mapping::new(MemoryKind::Anon, bytes.len()).unwrap();
    let start = |m: &Mapping| {
        // SAFETY: fresh anonymous mappings of this test that outlive the
        // pagers; nothing relies on their contents.
        unsafe {
            SigbusPager::builder(source.clone()).start(vec![Region::new(
                m.addr(),
                m.len() as u64,
                0,
                4096,
            )])
        }
        .unwrap()
    };
    let first = start(&a);
    let second = start(&b);
    assert!(sigbus_handler_installed());
    assert_eq!(a.read_byte(4096 + 3), bytes[4096 + 3]);
    first.shutdown();
    // The second pager still needs the handler.
    assert!(sigbus_handler_installed());
    assert_eq!(b.read_byte(8192 + 5), bytes[8192 + 5]);
    drop(second);
    assert!(!sigbus_handler_installed());
    assert_eq!(
        sigbus_disposition(),
        previous,
        "the previous disposition is back"
    );
    // Served pages stay; unregistered missing pages are plain anonymous memory.
    assert_eq!(a.read_byte(4096 + 3), bytes[4096 + 3]);
    assert_eq!(a.read_byte(12288), 0);
}

fn sigbus_disposition() -> (usize, libc::c_int) {
    // SAFETY: querying the disposition into a live local.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        assert_eq!(
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current),
            0
        );
        (current.sa_sigaction, current.sa_flags)
    }
}

/// Runs this test binary's test `name` in a child process with
/// `CHILD_ENV=mode`; returns (terminating signal, stdout).
fn run_child(name: &str, mode: &str) -> (Option<i32>, String) {
    let exe = std::env::current_exe().unwrap();
    let (name, mode_owned) = (name.to_string(), mode.to_string());
    let output = bounded("the child test process", move || {
        Command::new(exe)
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode_owned)
            .output()
    })
    .expect("run the child test process");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!(
        "child {mode}: {:?}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.signal(), stdout)
}

/// In the child: serves a page (proving the handler is live), then
/// `mode` raises a SIGBUS the pager must not swallow.
fn child_body(mode: &str) {
    let bytes = pattern(64 << 10, 3);
    let memory = Mapping::new(MemoryKind::Anon, bytes.len()).unwrap();
    let path = std::env::temp_dir().join(format!("uffd-pager-sigbus-child-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(bytes.len() as u64).unwrap();
    rustix::io::pwrite(&file, &bytes, 0).unwrap();
    let source = match mode {
        // The snapshot shrinks under a pread source: the page cannot be
        // produced.
        "short-source" => {
            SignalSafeSource::file(Arc::new(FileSource::open(&path, FileMode::Pread).unwrap()))
        }
        _ => SignalSafeSource::memory(Arc::new(MemorySource::new(bytes.clone()))),
    };
    // SAFETY: a fresh anonymous mapping that outlives the pager (the
    // process dies first); nothing relies on its contents.
    let pager = unsafe {
        SigbusPager::builder(source).start(vec![Region::new(
            memory.addr(),
            memory.len() as u64,
            0,
            4096,
        )])
    }
    .unwrap();
    assert_eq!(memory.read_byte(100), bytes[100]);
    println!("served");
    match mode {
        "truncated-mapping" => {
            // A genuine bus error: reading past the end of a shrunk file mapping.
            let map = uffd::FileMapping::read_only(&file, bytes.len(), true).unwrap();
            file.set_len(0).unwrap();
            let _ = std::fs::remove_file(&path);
            // SAFETY: inside the mapping; the read raises SIGBUS.
            let v = unsafe { map.as_ptr().add(8192).read_volatile() };
            println!("survived a truncated mapping, read {v}");
        }
        "short-source" => {
            file.set_len(4096).unwrap();
            let _ = std::fs::remove_file(&path);
            let v = memory.read_byte(8192);
            println!("survived a page the source cannot produce, read {v}");
        }
        _ => panic!("unknown child mode {mode}"),
    }
    drop(pager);
}

#[test]
fn genuine_sigbus_outside_ranges_kills() {
    let _disposition = own_disposition();
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child_body(&mode);
        return;
    }
    if !sigbus_available() {
        return;
    }
    let (signal, stdout) = run_child("genuine_sigbus_outside_ranges_kills", "truncated-mapping");
    assert!(stdout.contains("served"), "the child served a page first");
    assert_eq!(signal, Some(libc::SIGBUS), "killed by SIGBUS");
}

#[test]
fn unproducible_page_kills_not_zero() {
    let _disposition = own_disposition();
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child_body(&mode);
        return;
    }
    if !sigbus_available() {
        return;
    }
    let (signal, stdout) = run_child("unproducible_page_kills_not_zero", "short-source");
    assert!(stdout.contains("served"), "the child served a page first");
    assert!(!stdout.contains("survived"), "no silent zero page");
    assert_eq!(signal, Some(libc::SIGBUS), "killed by SIGBUS");
}
