//! `Pager::detach`: the target keeps its own copy of the userfaultfd (as a
//! VMM does) and must run on without any handler once the pager is gone:
//! every page installed, every settled range unregistered, never a hang
//! and never a zero page where the source had data.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uffd::{Features, Mapping, Uffd};
use uffd_pager::{PageSource, Pager, PagerError, Region, RegisteredRange, StillRegistered};
use uffd_testkit::FailingSource;

const LEN: usize = 1 << 20;

/// The pager's userfaultfd (EVENT_REMOVE) with `LEN` anonymous bytes
/// registered MISSING, and a second copy of it, as the VMM keeps one: while
/// that copy is open, a fault on a missing page in a registered range waits
/// for a handler instead of being served by the kernel.
fn registered_with_vmm_copy() -> (Uffd, Uffd, Arc<Mapping>) {
    let uffd = open(Features::EVENT_REMOVE);
    let fd = uffd.as_fd().try_clone_to_owned().expect("dup userfaultfd");
    let ours = Uffd::from_fd(fd, uffd.features()).expect("the copy is a userfaultfd");
    let memory = anon_registered(&uffd, LEN);
    (uffd, ours, memory)
}

fn dont_need(memory: &Arc<Mapping>, page: usize, pages: usize) {
    let m = Arc::clone(memory);
    bounded("MADV_DONTNEED", move || {
        m.advise(page * 4096, pages * 4096, rustix::mm::Advice::LinuxDontNeed)
            .unwrap()
    });
}

#[test]
fn detach_installs_every_page_and_the_target_reads_them_with_no_handler() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (uffd, ours, memory) = registered_with_vmm_copy();
    let (source, bytes) = pattern_source(LEN, 41);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .threads(2)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    // Some pages touched, some ballooned away (REMOVE), most still missing.
    let m = Arc::clone(&memory);
    let touched = bounded("touching some pages", move || {
        (0..LEN / 4096)
            .step_by(7)
            .map(|p| m.read_byte(p * 4096 + 5))
            .collect::<Vec<u8>>()
    });
    for (k, b) in touched.iter().enumerate() {
        assert_eq!(*b, bytes[k * 7 * 4096 + 5], "page {} before detach", k * 7);
    }
    dont_need(&memory, 100, 10);
    let detached = bounded("detach", move || pager.detach(Duration::from_secs(30)))
        .expect("a healthy source detaches completely");
    assert!(detached.is_complete());
    assert_eq!(detached.processes, 1);
    assert_eq!(detached.unregistered_bytes, LEN as u64, "{detached:?}");
    assert!(
        detached.installed_pages > 0,
        "most pages were missing: {detached:?}"
    );
    assert!(detached.poisoned.is_empty());
    // No handler exists now, and our copy keeps the userfaultfd alive: a
    // page still missing in a registered range would hang this read.
    let mut want = bytes.clone();
    want[100 * 4096..110 * 4096].fill(0);
    assert_same(
        &read_all(&memory, "reading every page after detach, with no handler"),
        &want,
        "after detach",
    );
    // The range is unregistered: a page dropped now reads as zero (a
    // registered one would wait for a REMOVE reader, then for a fault
    // handler, forever).
    dont_need(&memory, 3, 1);
    let m = Arc::clone(&memory);
    assert_eq!(
        bounded("reading a dropped page after detach", move || m
            .read_byte(3 * 4096)),
        0
    );
    drop(ours);
}

#[test]
fn pages_not_installed_by_the_deadline_stay_registered_and_are_reported() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (uffd, ours, memory) = registered_with_vmm_copy();
    let source = Arc::new(GatedSource::new(LEN as u64, 4 * 4096));
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::clone(&source) as Arc<dyn PageSource>)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let m = Arc::clone(&memory);
    bounded("touching the first 4 pages", move || {
        for p in 0..4 {
            assert_eq!(m.read_byte(p * 4096), 0x5A);
        }
    });
    // The fill of pages 4.. blocks in the source past the deadline.
    let result = bounded("detach with a blocked source", move || {
        pager.detach(Duration::from_millis(300))
    });
    source.open();
    let Err(PagerError::DetachIncomplete(detached)) = result else {
        panic!("a blocked source cannot detach completely: {result:?}");
    };
    assert_eq!(
        detached.still_registered,
        vec![RegisteredRange {
            process: 0,
            start: memory.addr() + 4 * 4096,
            len: (LEN - 4 * 4096) as u64,
            why: StillRegistered::Timeout,
        }],
        "{detached:?}"
    );
    assert_eq!(detached.unregistered_bytes, 4 * 4096);
    // The installed part is unregistered: a page dropped there reads zero.
    dont_need(&memory, 1, 1);
    let m = Arc::clone(&memory);
    assert_eq!(
        bounded("reading a dropped page", move || m.read_byte(4096)),
        0
    );
    drop(ours);
}

#[test]
fn detach_completes_faults_pending_when_it_is_called() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (uffd, ours, memory) = registered_with_vmm_copy();
    let source = Arc::new(GatedSource::new(LEN as u64, 0));
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::clone(&source) as Arc<dyn PageSource>)
            .threads(2)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let readers: Vec<_> = (0..6)
        .map(|t| {
            let m = Arc::clone(&memory);
            std::thread::spawn(move || m.read_byte(t * 8 * 4096 + 1))
        })
        .collect();
    wait_for_missing_faults(&pager, 2);
    // Faults are pending (their source reads wait at the gate) when the
    // detach starts; the gate opens while it runs.
    let detach = std::thread::spawn(move || pager.detach(Duration::from_secs(30)));
    source.open();
    let detached = bounded("detach with pending faults", move || detach.join().unwrap())
        .expect("complete detach");
    assert_eq!(detached.unregistered_bytes, LEN as u64);
    let values = bounded("readers after detach", move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Served with the source's bytes, never the kernel's zero page.
    assert!(values.iter().all(|&v| v == 0x5A), "{values:?}");
    assert_same(
        &read_all(&memory, "reading every page after detach"),
        &vec![0x5A; LEN],
        "after detach",
    );
    drop(ours);
}

const PAGES: usize = 64;
const BAD: usize = 40;

/// A separate target process, as a VMM: it keeps its userfaultfd, touches
/// a few pages, and after the detach checks every page with no handler
/// left: each good page holds its bytes, and the page the source could not
/// produce was poisoned and stays poisoned after UFFDIO_UNREGISTER (SIGBUS,
/// never a zero page).
#[test]
fn a_page_the_source_cannot_produce_stays_poisoned_after_detach() {
    if !uffd_testkit::user_uffd() || !features(Features::POISON).contains(Features::POISON) {
        uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("no UFFDIO_POISON"),
        );
        return;
    }
    let (go_r, go_w) = rustix::pipe::pipe().unwrap();
    let (touched_r, touched_w) = rustix::pipe::pipe().unwrap();
    // Like Firecracker: EVENT_REMOVE only; POISON works on any userfaultfd
    // of a kernel that has it.
    let Some(RemoteTarget { pid, uffd, addr }) = fork_target(PAGES, Features::EVENT_REMOVE, |m| {
        let mut go = [0u8; 1];
        rustix::io::read(&go_r, &mut go).ok()?;
        for p in 0..4 {
            if m.read_byte(p * 4096) != p as u8 + 1 {
                return Some(2);
            }
        }
        rustix::io::write(&touched_w, &[1]).ok()?;
        rustix::io::read(&go_r, &mut go).ok()?;
        // The pager is gone now; our copy of the userfaultfd is open.
        for p in (0..PAGES).filter(|&p| p != BAD) {
            for at in [0, 2048, 4095] {
                if m.read_byte(p * 4096 + at) != p as u8 + 1 {
                    return Some(2);
                }
            }
        }
        // Unregistered: a dropped page reads as zero (still registered,
        // the REMOVE would wait for a reader that is gone: a hang).
        m.advise(5 * 4096, 4096, rustix::mm::Advice::LinuxDontNeed)
            .ok()?;
        if m.read_byte(5 * 4096) != 0 {
            return Some(5);
        }
        let _ = m.read_byte(BAD * 4096); // SIGBUS expected here
        Some(3)
    }) else {
        return;
    };
    drop(touched_w);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::new(FailingSource {
            pages: PAGES,
            bad: BAD,
            transient: false,
        }))
        .source_retries(0)
        .target_pid(pid)
        .start(
            uffd,
            vec![Region::new(addr, (PAGES * 4096) as u64, 0, 4096)],
        )
    }
    .unwrap();
    rustix::io::write(&go_w, &[1]).unwrap();
    let mut touched = [0u8; 1];
    let n = rustix::io::read(&touched_r, &mut touched).unwrap();
    assert_eq!(n, 1, "the target failed (status {})", wait_child(pid));
    let detached = bounded("detach of a remote target", move || {
        pager.detach(Duration::from_secs(30))
    })
    .expect("a poisoned page is settled: the detach is complete");
    assert_eq!(detached.processes, 1);
    assert_eq!(detached.unregistered_bytes, (PAGES * 4096) as u64);
    let poisoned: Vec<u64> = detached.poisoned.iter().map(|p| p.address - addr).collect();
    assert_eq!(poisoned, vec![(BAD * 4096) as u64], "{detached:?}");
    rustix::io::write(&go_w, &[1]).unwrap();
    let status = wait_child(pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "the target should die of SIGBUS on the poisoned page after UNREGISTER; status \
         {status:#x} (exit code {}: 2 = a good page read wrong, 3 = the poisoned page read \
         without SIGBUS, 4 = setup failed, 5 = a dropped page did not read zero)",
        libc::WEXITSTATUS(status)
    );
}
