//! Non-cooperative events: REMOVE, UNMAP, REMAP and FORK.

mod common;

use common::*;
use uffd::{Features, RegisterMode};
use uffd_pager::{Pager, Region};

const LEN: usize = 1 << 20;

#[test]
fn removed_pages_read_as_zero_afterwards() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, 21);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source).start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert_same(&read_all(&memory, "first read"), &bytes, "before REMOVE");
    // A balloon gives pages 16..32 back.
    memory
        .advise(16 * 4096, 16 * 4096, rustix::mm::Advice::LinuxDontNeed)
        .unwrap();
    let mut want = bytes.clone();
    want[16 * 4096..32 * 4096].fill(0);
    assert_same(
        &read_all(&memory, "read after REMOVE"),
        &want,
        "after REMOVE",
    );
    let stats = pager.shutdown();
    assert_eq!(stats.events_remove, 1, "{stats:?}");
    assert_eq!(stats.pages_zero, 16, "{stats:?}");
}

#[test]
fn unmapped_ranges_are_no_longer_served() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_UNMAP);
    if !uffd.features().contains(Features::EVENT_UNMAP) {
        uffd_testkit::skip(uffd_testkit::Need::Feature, format_args!("no EVENT_UNMAP"));
        return;
    }
    // A raw mapping: part of it is unmapped by the test.
    let memory = uffd::Mapping::new(uffd::MemoryKind::Anon, LEN).unwrap();
    let base = memory.addr();
    uffd.register(base, LEN as u64, RegisterMode::MISSING)
        .unwrap();
    let (source, bytes) = pattern_source(LEN, 23);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager =
        unsafe { Pager::builder(source).start(uffd, vec![Region::new(base, LEN as u64, 0, 4096)]) }
            .unwrap();
    // SAFETY: unmapping the middle of our own mapping; nothing refers to it
    // (the uffd::Mapping's own munmap at drop tolerates the hole).
    unsafe { rustix::mm::munmap((base + 64 * 4096) as *mut _, 64 * 4096) }.unwrap();
    // The rest is still served.
    let value = bounded("reading past the hole", move || {
        // SAFETY: page 200 is still mapped.
        unsafe { ((base + 200 * 4096) as *const u8).read_volatile() }
    });
    assert_eq!(value, bytes[200 * 4096]);
    let stats = pager.shutdown();
    assert_eq!(stats.events_unmap, 1, "{stats:?}");
    drop(memory);
}

#[test]
fn remapped_ranges_keep_their_source_offsets() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMAP);
    if !uffd.features().contains(Features::EVENT_REMAP) {
        uffd_testkit::skip(uffd_testkit::Need::Feature, format_args!("no EVENT_REMAP"));
        return;
    }
    let old = uffd::Mapping::new(uffd::MemoryKind::Anon, LEN).unwrap();
    let new = uffd::Mapping::new(uffd::MemoryKind::Anon, LEN).unwrap();
    uffd.register(old.addr(), LEN as u64, RegisterMode::MISSING)
        .unwrap();
    let (source, bytes) = pattern_source(LEN, 29);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source).start(uffd, vec![Region::new(old.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    // Touch one page, then move the whole range onto `new`.
    let first = old.addr();
    let v = bounded("reading before mremap", move || {
        // SAFETY: inside the registered mapping.
        unsafe { (first as *const u8).add(5).read_volatile() }
    });
    assert_eq!(v, bytes[5]);
    // SAFETY: moving our own mapping onto another of our own; neither is
    // referenced (both uffd::Mapping drops then unmap whatever is there).
    unsafe {
        rustix::mm::mremap_fixed(
            old.as_ptr().cast(),
            LEN,
            LEN,
            rustix::mm::MremapFlags::MAYMOVE,
            new.as_ptr().cast(),
        )
    }
    .unwrap();
    let at = new.addr();
    let got = bounded("reading after mremap", move || {
        let mut buf = vec![0u8; LEN];
        // SAFETY: the moved mapping is LEN bytes at `at`.
        unsafe { std::ptr::copy_nonoverlapping(at as *const u8, buf.as_mut_ptr(), LEN) };
        buf
    });
    assert_same(&got, &bytes, "after REMAP");
    let stats = pager.shutdown();
    assert_eq!(stats.events_remap, 1, "{stats:?}");
    drop(old);
}

#[test]
fn a_forked_child_is_served_through_its_own_userfaultfd() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let Some(uffd) = try_open(Features::EVENT_FORK | Features::EVENT_REMOVE) else {
        return;
    };
    if !uffd.features().contains(Features::EVENT_FORK) {
        uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("the kernel has no EVENT_FORK"),
        );
        return;
    }
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, 31);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source).start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    // The parent touches the first page only.
    assert_eq!(memory.read_byte(1), bytes[1]);
    // What the child must see on every page: the first word of each page.
    let expected: Vec<u64> = (0..LEN / 4096)
        .map(|p| u64::from_ne_bytes(bytes[p * 4096..p * 4096 + 8].try_into().unwrap()))
        .collect();
    let base = memory.as_ptr() as *const u64;
    // SAFETY: the child only reads memory and calls _exit (async-signal-safe);
    // its faults are served by the pager threads in this process through
    // the child's userfaultfd, which the FORK event hands over.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut bad = 0;
        for (p, want) in expected.iter().enumerate() {
            // SAFETY: page `p` of the inherited mapping.
            if unsafe { base.add(p * 512).read_volatile() } != *want {
                bad += 1;
            }
        }
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if bad == 0 { 0 } else { 1 }) };
    }
    let status = wait_child(pid);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: status {status:#x}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child saw wrong page contents"
    );
    let stats = pager.shutdown();
    assert_eq!(stats.events_fork, 1, "{stats:?}");
    // The child faulted on every page but the first (which it inherited).
    assert!(stats.faults_missing >= (LEN / 4096) as u64, "{stats:?}");
}
