//! When the source cannot produce a page, the page is poisoned: a process
//! reading it gets SIGBUS, never a zero page and never a hang. The target
//! here is another process, as with a VMM: it sends its userfaultfd, the
//! pager serves it remotely.

mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uffd::Features;
use uffd_pager::{FileMode, FileSource, PageSource, Pager, Region};
use uffd_testkit::FailingSource;

const PAGES: usize = 8;
const BAD: usize = 3;

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().unwrap()
}

/// Forks a target process that registers `PAGES` pages of its own memory,
/// hands over its userfaultfd, reads page 0 (expects `first_byte`) and then
/// page BAD. Serves it with `source`; returns the child's wait status and
/// the pager's poisoned list.
fn run_remote_target(source: Arc<dyn PageSource>, first_byte: u8) -> Option<(i32, Vec<u64>)> {
    if !uffd_testkit::user_uffd() || !features(Features::POISON).contains(Features::POISON) {
        uffd_testkit::skip(uffd_testkit::Need::Feature, "no UFFDIO_POISON");
        return None;
    }
    let (go_r, go_w) = pipe();
    let RemoteTarget { pid, uffd, addr } = fork_target(PAGES, Features::POISON, |m| {
        let mut go = [0u8; 1];
        rustix::io::read(&go_r, &mut go).ok()?;
        if m.read_byte(0) != first_byte {
            return Some(2);
        }
        let _ = m.read_byte(BAD * 4096); // SIGBUS expected here
        Some(3)
    })?;
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .source_retries(2)
            .target_pid(pid)
            .start(
                uffd,
                vec![Region::new(addr, (PAGES * 4096) as u64, 0, 4096)],
            )
    }
    .unwrap();
    rustix::io::write(&go_w, &[1]).unwrap();
    let status = wait_child(pid);
    assert!(
        pager.wait_finished(Duration::from_secs(10)),
        "the pager did not notice the exit"
    );
    let poisoned = pager.poisoned().iter().map(|p| p.address - addr).collect();
    let stats = pager.shutdown();
    eprintln!("{stats:?}");
    Some((status, poisoned))
}

fn assert_sigbus(status: i32) {
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "the target should die of SIGBUS; status {status:#x} (exit code {} means: 2 wrong page 0, \
         3 read a page that should be poisoned, 4 setup failed)",
        libc::WEXITSTATUS(status)
    );
}

#[test]
fn an_io_error_poisons_the_page_and_the_reader_gets_sigbus() {
    let Some((status, poisoned)) = run_remote_target(
        Arc::new(FailingSource {
            pages: PAGES,
            bad: BAD,
            transient: true,
        }),
        1,
    ) else {
        return;
    };
    assert_sigbus(status);
    assert_eq!(poisoned, vec![(BAD * 4096) as u64]);
}

#[test]
fn a_short_snapshot_file_poisons_the_missing_pages() {
    // The file holds only BAD pages; page BAD and later lie past its end.
    let path = std::env::temp_dir().join(format!("uffd-pager-short-{}", std::process::id()));
    std::fs::write(&path, vec![9u8; BAD * 4096]).unwrap();
    let source = Arc::new(FileSource::open(&path, FileMode::Pread).unwrap());
    std::fs::remove_file(&path).unwrap();
    let Some((status, poisoned)) = run_remote_target(source, 9) else {
        return;
    };
    assert_sigbus(status);
    assert_eq!(poisoned, vec![(BAD * 4096) as u64]);
}

/// Page i holds i + 1; reading page BAD panics (a buggy source).
#[derive(Debug)]
struct PanickingSource;

impl PageSource for PanickingSource {
    fn len(&self) -> u64 {
        (PAGES * 4096) as u64
    }
    fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<uffd_pager::Content, uffd_pager::SourceError> {
        let bad = (BAD * 4096) as u64;
        assert!(
            !(offset <= bad && bad < offset + buf.len() as u64),
            "injected panic: the source cannot read page {BAD}"
        );
        for (i, page) in buf.chunks_mut(4096).enumerate() {
            page.fill((offset / 4096) as u8 + i as u8 + 1);
        }
        Ok(uffd_pager::Content::Data)
    }
    fn describe(&self) -> String {
        "panicking".into()
    }
}

#[test]
fn a_panic_while_serving_poisons_that_page_and_the_handler_carries_on() {
    let Some((status, poisoned)) = run_remote_target(Arc::new(PanickingSource), 1) else {
        return;
    };
    // The target got SIGBUS for the page being served when the panic hit,
    // instead of waiting forever; page 0, served before, was right.
    assert_sigbus(status);
    assert_eq!(poisoned, vec![(BAD * 4096) as u64]);
}

#[test]
fn a_handler_that_panicked_serves_the_next_faults() {
    if !uffd_testkit::vmm_uffd() || !features(Features::POISON).contains(Features::POISON) {
        return;
    }
    // Kernel-mode faults are caught too, so the kernel itself can touch
    // page BAD (in write(2)) and get EFAULT instead of this test SIGBUS.
    let uffd = uffd::OpenOptions::new().non_blocking(true).open().unwrap();
    let memory = anon_registered(&uffd, PAGES * 4096);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::new(PanickingSource)).threads(1).start(
            uffd,
            vec![Region::new(memory.addr(), (PAGES * 4096) as u64, 0, 4096)],
        )
    }
    .unwrap();
    let (_r, w) = pipe();
    let bad = memory.addr() + (BAD * 4096) as u64;
    let written = bounded("write(2) from the page whose read panics", move || {
        use std::os::fd::AsRawFd;
        // SAFETY: write(2) reads 16 bytes at `bad` in the kernel; the page
        // belongs to `memory`, which outlives the call (the test holds it),
        // and no Rust reference covers it.
        let n = unsafe { libc::write(w.as_raw_fd(), bad as *const libc::c_void, 16) };
        (n, std::io::Error::last_os_error().raw_os_error())
    });
    assert_eq!(
        written,
        (-1, Some(libc::EFAULT)),
        "the poisoned page must fail the kernel's read"
    );
    // The one handler thread panicked once and serves on.
    let m = Arc::clone(&memory);
    assert_eq!(
        bounded("a fault after the panic", move || m.read_byte(2 * 4096)),
        3
    );
    let stats = pager.shutdown();
    assert_eq!(stats.handler_panics, 1, "{stats:?}");
    assert_eq!(stats.poisoned, 1, "{stats:?}");
}
