//! Live snapshots on every memory type, with writers running: the image
//! must equal the memory at t0, page for page.

use std::sync::Arc;
use std::time::Duration;

use uffd::{HugepageReservation, Mapping, MemoryKind};
use uffd_snapshot::check::{page_contents, VersionedMemory, PAGE};
use uffd_snapshot::{
    DiscardPolicy, Error, LiveSnapshot, Prepared, Region, Running, SnapshotOptions,
};
use uffd_testkit::{skip, Need, Scratch};

/// Memory of `kind` or a skip (hugetlb reserves pages, restored on drop).
fn memory(kind: MemoryKind, len: usize) -> Option<(Mapping, Option<HugepageReservation>)> {
    if !uffd_testkit::vmm_uffd() {
        return None;
    }
    let reservation = if kind.is_hugetlb() {
        // A private mapping reserves its own pages beside the shared alias's.
        let copies = if kind.is_shared() { 1 } else { 2 };
        match HugepageReservation::reserve(copies * (len / kind.page_size()) as u64) {
            Ok(r) => Some(r),
            Err(e) => {
                skip(Need::Hugetlb, format_args!("no huge pages for {kind}: {e}"));
                return None;
            }
        }
    } else {
        None
    };
    let mapping = Mapping::new(kind, len).expect("mapping memory");
    Some((mapping, reservation))
}

/// Fills every page at version 1 or leaves it at 0 (zero): some holes.
fn fill(vm: &VersionedMemory) {
    let mut buf = [0u8; PAGE];
    for p in 0..vm.pages() {
        if p % 5 != 4 {
            vm.write_next(p, &mut buf);
        }
    }
}

/// Anonymous memory of `len` bytes, [`fill`]ed, or a skip.
fn filled_anon(len: usize) -> Option<VersionedMemory> {
    let (mapping, _) = memory(MemoryKind::Anon, len)?;
    let vm = VersionedMemory::new(mapping);
    fill(&vm);
    Some(vm)
}

/// Takes a live snapshot of `vm` while `writers` threads write, then
/// checks the image against t0.
fn snapshot_with_writers(
    vm: Arc<VersionedMemory>,
    writers: u64,
    options: SnapshotOptions,
    t0: T0,
) -> Result<Vec<u8>, Error> {
    let scratch = Scratch::new("live");
    let path = scratch.path("image");
    let region = Region::of(vm.mapping());
    let prepared = LiveSnapshot::prepare(&[region], &path, options)?;
    // The writers own pages p % (writers + 1) < writers; the rest are this
    // thread's, which writes one after t0 for sure (whatever the
    // scheduler lets the writers do meanwhile).
    let stride = writers + 1;
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.writer(i, stride, Duration::ZERO))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let running = t0.reach(&vm, prepared)?;
    let mut buf = [0u8; PAGE];
    let mine = (vm.pages() - 1) / stride * stride + writers;
    let mine = if mine < vm.pages() {
        mine
    } else {
        mine - stride
    };
    vm.write_next(mine, &mut buf);
    let result = running.finish();
    vm.stop();
    for t in threads {
        t.join().expect("writer");
    }
    let report = result?;
    assert!(
        report.saved_in_background + report.saved_on_fault
            >= vm.pages() * PAGE as u64 / region.page_size()
    );
    Ok(std::fs::read(&path).expect("reading the image"))
}

/// How a test reaches t0 (the writers are held for the call that is t0).
#[derive(Debug, Clone, Copy)]
enum T0 {
    /// `protect()`: the whole walk is t0.
    Walk,
    /// `arm()` with the writers running, then `protect()` of what they
    /// wrote meanwhile.
    Arm,
}

impl T0 {
    fn reach(self, vm: &VersionedMemory, prepared: Prepared) -> Result<Running, Error> {
        let arm = matches!(self, T0::Arm);
        vm.reach_t0(prepared, arm).map(|(running, _)| running)
    }
}

fn consistent_on(kind: MemoryKind, mib: usize, writers: u64) {
    consistent_reaching(kind, mib, writers, T0::Walk);
    consistent_reaching(kind, mib, writers, T0::Arm);
}

fn consistent_reaching(kind: MemoryKind, mib: usize, writers: u64, t0: T0) {
    let Some((mapping, _reservation)) = memory(kind, mib << 20) else {
        return;
    };
    let vm = Arc::new(VersionedMemory::new(mapping));
    fill(&vm);
    let image =
        snapshot_with_writers(vm.clone(), writers, SnapshotOptions::new(), t0).expect("snapshot");
    assert_eq!(image.len(), vm.mapping().len());
    let bad = vm.mismatches_at_t0(&image);
    assert!(
        bad.is_empty(),
        "{kind}, {t0:?}: pages {bad:?} of the image differ from t0"
    );
    // Memory moved on meanwhile: the image is not simply "now".
    assert!(
        !vm.mismatches_now(&image).is_empty(),
        "{kind}, {t0:?}: no write landed after t0; the test proved nothing"
    );
}

#[test]
fn anon_image_equals_t0_with_many_writers() {
    consistent_on(MemoryKind::Anon, 16, 8);
}

#[test]
fn anon_image_equals_t0_when_several_threads_walk_t0() {
    // 192 MiB: t0 is walked in pieces by up to three threads at once.
    consistent_on(MemoryKind::Anon, 192, 2);
}

#[test]
fn a_staging_bound_far_below_the_image_only_makes_the_saver_wait() {
    let Some(vm) = filled_anon(32 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    // 1 MiB of buffers for a 32 MiB image: the background pass and then
    // the faults wait for the image writer again and again.
    let options = SnapshotOptions::new().staging(1 << 20);
    let image = snapshot_with_writers(vm.clone(), 4, options, T0::Walk).expect("snapshot");
    let bad = vm.mismatches_at_t0(&image);
    assert!(bad.is_empty(), "pages {bad:?} of the image differ from t0");
    assert!(
        !vm.mismatches_now(&image).is_empty(),
        "no write landed after t0"
    );
}

#[test]
fn shmem_image_equals_t0_with_writers() {
    consistent_on(MemoryKind::Shmem, 16, 4);
}

#[test]
fn shmem_private_image_equals_t0_with_writers() {
    consistent_on(MemoryKind::ShmemPrivate, 8, 4);
}

#[test]
fn hugetlb_image_equals_t0_with_writers() {
    consistent_on(MemoryKind::Hugetlb, 16, 4);
}

#[test]
fn image_is_sparse_where_memory_is_zero() {
    let Some((mapping, _)) = memory(MemoryKind::Anon, 8 << 20) else {
        return;
    };
    let vm = VersionedMemory::new(mapping);
    let mut buf = [0u8; PAGE];
    vm.write_next(3, &mut buf);
    let scratch = Scratch::new("sparse");
    let path = scratch.path("image");
    vm.at_t0(|| ());
    let report = LiveSnapshot::take(&[Region::of(vm.mapping())], &path, SnapshotOptions::new())
        .expect("snapshot");
    assert_eq!(report.data_bytes, PAGE as u64);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 64 << 10,
        "{} bytes allocated for one page of data",
        meta.blocks() * 512
    );
    assert!(vm
        .mismatches_at_t0(&std::fs::read(&path).unwrap())
        .is_empty());
    // No temporary file left beside it.
    let names: Vec<_> = std::fs::read_dir(scratch.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["image"]);
}

#[test]
fn writers_hammering_the_pages_being_saved_see_no_tear() {
    // The saver copies the whole region as one chunk, so for the first
    // milliseconds every page is the page being saved; the writers hammer
    // the first 16 and fault on them meanwhile, and their faults wait for
    // the chunk. Whether a writer gets a core in that window is up to the
    // scheduler (two shared cores here), so the round is repeated until
    // one did; every round's image must be exact.
    let Some(vm) = filled_anon(4 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    let scratch = Scratch::new("hammer");
    let path = scratch.path("image");
    let mut faulted = false;
    for round in 0..20 {
        let prepared = LiveSnapshot::prepare(
            &[Region::of(vm.mapping())],
            &path,
            SnapshotOptions::new().chunk(4 << 20),
        )
        .unwrap();
        vm.restart();
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; PAGE];
                    let mut n = 0u64;
                    while !vm.is_stopped() && n < 2_000_000 {
                        vm.write_next(i + 4 * (n % 4), &mut buf);
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(10));
        let running = vm.at_t0(|| prepared.protect()).unwrap();
        let report = running.finish().unwrap();
        vm.stop();
        for t in threads {
            t.join().unwrap();
        }
        let image = std::fs::read(&path).unwrap();
        let bad = vm.mismatches_at_t0(&image);
        assert!(
            bad.is_empty(),
            "round {round}: pages {bad:?} differ from t0"
        );
        if report.faults > 0 {
            faulted = true;
            break;
        }
    }
    assert!(
        faulted,
        "in 20 rounds no writer faulted on a page being saved"
    );
}

#[test]
fn negative_control_saver_that_skips_the_copy_is_caught() {
    let Some(vm) = filled_anon(32 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    let last = vm.pages() - 1;
    let scratch = Scratch::new("negative");
    let path = scratch.path("image");
    let prepared = LiveSnapshot::prepare(
        &[Region::of(vm.mapping())],
        &path,
        SnapshotOptions::new()
            .skip_copy_on_fault(true)
            .defer_background(true),
    )
    .unwrap();
    let running = vm.at_t0(|| prepared.protect()).unwrap();
    // Before the background pass, which waits for finish().
    let mut buf = [0u8; PAGE];
    for p in (last - 7)..=last {
        vm.write_next(p, &mut buf);
    }
    running.finish().unwrap();
    let image = std::fs::read(&path).unwrap();
    let bad = vm.mismatches_at_t0(&image);
    assert!(
        bad.iter().any(|r| r.end > last - 7),
        "the checker did not notice pages saved after their write: {bad:?}"
    );
}

#[test]
fn read_syscall_into_protected_memory_waits_for_the_save() {
    let Some(vm) = filled_anon(4 << 20) else {
        return;
    };
    let target = vm.pages() - 2;
    let scratch = Scratch::new("read2");
    let path = scratch.path("image");
    let prepared =
        LiveSnapshot::prepare(&[Region::of(vm.mapping())], &path, SnapshotOptions::new()).unwrap();
    let running = vm.at_t0(|| prepared.protect()).unwrap();
    let (rx, tx) = rustix::pipe::pipe().unwrap();
    rustix::io::write(&tx, &[0xAB; PAGE]).unwrap();
    let dst = vm.mapping().as_ptr() as usize + target as usize * PAGE;
    // SAFETY: `dst` is one page inside the live mapping; no Rust reference
    // covers it (VersionedMemory copies through raw pointers), and the
    // kernel's write into it is what this test is about.
    let slice = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, PAGE) };
    let n = rustix::io::read(&rx, slice).expect("read(2) into protected memory");
    assert_eq!(n, PAGE);
    let report = running.finish().unwrap();
    let image = std::fs::read(&path).unwrap();
    let mut want = [0u8; PAGE];
    page_contents(target, 1, &mut want);
    assert_eq!(
        &image[target as usize * PAGE..][..PAGE],
        &want[..],
        "the image holds the page after read(2)"
    );
    let mut now = [0u8; PAGE];
    vm.mapping().read(target as usize * PAGE, &mut now);
    assert_eq!(now, [0xAB; PAGE]);
    assert!(report.faults >= 1);
}

/// MADV_DONTNEED during the snapshot: pages saved before the REMOVE hold
/// their t0 contents; unsaved ones are lost, which fails the snapshot or,
/// under DiscardPolicy::Zero, saves them as zero. Either way every page of
/// the image is exact or reported.
#[test]
fn remove_during_snapshot_is_exact_or_reported() {
    for policy in [DiscardPolicy::Fail, DiscardPolicy::Zero] {
        let Some(vm) = filled_anon(32 << 20) else {
            return;
        };
        let pages = vm.pages();
        // Two pages the saver reached and, at the end, 64 it has not.
        let scratch = Scratch::new("remove");
        let path = scratch.path("image");
        let prepared = LiveSnapshot::prepare(
            &[Region::of(vm.mapping())],
            &path,
            SnapshotOptions::new().discard(policy),
        )
        .unwrap();
        let running = vm.at_t0(|| prepared.protect()).unwrap();
        let tail = (pages - 64) as usize * PAGE;
        vm.mapping()
            .advise(tail, 64 * PAGE, rustix::mm::Advice::LinuxDontNeed)
            .unwrap();
        let finished = running.finish();
        let expected_t0: Vec<u64> = (0..pages).map(|p| if p % 5 != 4 { 1 } else { 0 }).collect();
        match (policy, finished) {
            (DiscardPolicy::Fail, Err(Error::Discarded { ranges })) => {
                assert!(ranges.iter().all(|r| r.start >= tail as u64), "{ranges:?}");
                assert!(
                    !path.exists(),
                    "an image was written although pages were lost"
                );
            }
            (_, Ok(report)) => {
                let image = std::fs::read(&path).unwrap();
                let mut want = [0u8; PAGE];
                for p in 0..pages {
                    let at = p * PAGE as u64;
                    let lost = report.discarded.iter().any(|r| r.contains(&at));
                    assert!(!lost || policy == DiscardPolicy::Zero);
                    page_contents(p, if lost { 0 } else { expected_t0[p as usize] }, &mut want);
                    assert_eq!(
                        &image[at as usize..][..PAGE],
                        &want[..],
                        "page {p} (lost: {lost})"
                    );
                }
                // Memory itself reads zero there now.
                assert_eq!(vm.version(pages - 1), 0);
                assert!(report.events >= 1, "no REMOVE event seen");
            }
            (policy, other) => panic!("{policy:?}: {other:?}"),
        }
    }
}

#[test]
fn munmap_of_part_of_a_region_during_snapshot() {
    let Some(vm) = filled_anon(8 << 20) else {
        return;
    };
    let scratch = Scratch::new("unmap");
    let path = scratch.path("image");
    let region = Region::of(vm.mapping());
    let prepared = LiveSnapshot::prepare(
        &[region],
        &path,
        SnapshotOptions::new().discard(DiscardPolicy::Zero),
    )
    .unwrap();
    let running = vm.at_t0(|| prepared.protect()).unwrap();
    // The last 1 MiB goes away (the Mapping's own munmap covers it again
    // on drop, which is harmless for an unmapped range).
    let tail = region.addr() + region.len() - (1 << 20);
    // SAFETY: the range is the tail of our mapping, which nothing reads
    // from now on (the test checks only the head).
    unsafe { rustix::mm::munmap(tail as *mut std::ffi::c_void, 1 << 20) }.unwrap();
    let report = running.finish().unwrap();
    let image = std::fs::read(&path).unwrap();
    let head_pages = (region.len() - (1 << 20)) / PAGE as u64;
    let mut want = [0u8; PAGE];
    for p in 0..head_pages {
        page_contents(p, if p % 5 != 4 { 1 } else { 0 }, &mut want);
        assert_eq!(&image[p as usize * PAGE..][..PAGE], &want[..], "page {p}");
    }
    assert!(report.events >= 1, "no UNMAP event seen");
    // Dropping `vm` unmaps the whole range again: harmless for its tail.
}

/// mremap of a whole region to another address while the snapshot runs:
/// the pages move with their protection (EVENT_REMAP), the saver follows
/// them, and a write at the new address still waits for its page to be
/// saved first.
#[test]
fn mremap_during_snapshot_is_followed() {
    let Some((mapping, _)) = memory(MemoryKind::Anon, 8 << 20) else {
        return;
    };
    let len = mapping.len();
    let mut page = [0u8; PAGE];
    for p in 0..len / PAGE {
        page_contents(p as u64, 1, &mut page);
        mapping.write(p * PAGE, &page);
    }
    let scratch = Scratch::new("remap");
    let path = scratch.path("image");
    let prepared =
        LiveSnapshot::prepare(&[Region::of(&mapping)], &path, SnapshotOptions::new()).unwrap();
    let running = prepared.protect().unwrap();
    let old = mapping.as_ptr();
    // A destination to move onto; neither Mapping may unmap its old
    // address later (something else may live there by then): the memory
    // lives at `new` and is unmapped by hand at the end.
    let dest = Mapping::new(MemoryKind::Anon, len).unwrap();
    let want = dest.as_ptr();
    std::mem::forget(dest);
    std::mem::forget(mapping);
    // SAFETY: `old..old+len` is our mapping and `want..want+len` our
    // placeholder, neither referenced any more.
    let new = unsafe {
        rustix::mm::mremap_fixed(
            old.cast(),
            len,
            len,
            rustix::mm::MremapFlags::MAYMOVE,
            want.cast(),
        )
    }
    .expect("mremap") as *mut u8;
    assert_ne!(new, old, "mremap did not move; the test proves nothing");
    let target = len / PAGE - 3;
    // SAFETY: inside the moved mapping, written through a raw pointer.
    unsafe {
        new.add(target * PAGE + 8)
            .cast::<u64>()
            .write_volatile(0xdead_beef)
    };
    let report = running.finish().unwrap();
    let image = std::fs::read(&path).unwrap();
    for p in 0..len / PAGE {
        page_contents(p as u64, 1, &mut page);
        assert!(
            image[p * PAGE..(p + 1) * PAGE] == page[..],
            "page {p} of the image is not its t0 contents"
        );
    }
    assert!(report.events >= 1, "no REMAP event seen: {report:?}");
    // SAFETY: the moved mapping is ours and unused from here on.
    unsafe { rustix::mm::munmap(new.cast(), len) }.unwrap();
}

/// The baselines the demo compares with are themselves right: fork() with
/// the child writing, and a stop-the-world copy, both equal t0.
#[test]
fn fork_and_stop_the_world_baselines_equal_t0() {
    let Some(vm) = filled_anon(8 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    let region = Region::of(vm.mapping());
    // Writers own pages p % 4 < 3; this thread writes page 3 while the
    // child is writing the image.
    let writers: Vec<_> = (0..3u64)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.writer(i, 4, Duration::ZERO))
        })
        .collect();
    let scratch = Scratch::new("baselines");
    let (fork_path, stw_path) = (scratch.path("fork"), scratch.path("stw"));
    let forked = vm
        .at_t0(|| uffd_snapshot::ForkImage::start(&[region], &fork_path))
        .unwrap();
    vm.write_next(3, &mut [0u8; PAGE]);
    forked.wait().unwrap();
    let fork_ok = {
        let _held = vm.pause();
        vm.mismatches_at_t0(&std::fs::read(&fork_path).unwrap())
    };
    vm.at_t0(|| uffd_snapshot::copy_image(&[region], &stw_path))
        .unwrap();
    vm.stop();
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        fork_ok.is_empty(),
        "fork image differs from t0 at {fork_ok:?}"
    );
    let stw = std::fs::read(&stw_path).unwrap();
    assert!(vm.mismatches_at_t0(&stw).is_empty());
    assert!(
        !vm.mismatches_now(&std::fs::read(&fork_path).unwrap())
            .is_empty(),
        "no write after the fork"
    );
}

/// Abandoning a snapshot midway (dropping it) closes its userfaultfd:
/// writers never stay blocked, and no image is left behind.
#[test]
fn dropping_a_running_snapshot_releases_every_writer() {
    let Some(vm) = filled_anon(64 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    let scratch = Scratch::new("abandon");
    let path = scratch.path("image");
    let prepared =
        LiveSnapshot::prepare(&[Region::of(vm.mapping())], &path, SnapshotOptions::new()).unwrap();
    let running = vm.at_t0(|| prepared.protect()).unwrap();
    drop(running);
    let (tx, rx) = std::sync::mpsc::channel();
    let w = vm.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; PAGE];
        for p in (0..w.pages()).rev().step_by(7) {
            w.write_next(p, &mut buf);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a writer stayed blocked after the snapshot was dropped");
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(scratch.dir()).unwrap().count(),
        0,
        "temporary file left behind"
    );
}

#[test]
fn hugetlb_private_image_equals_t0_with_writers() {
    consistent_on(MemoryKind::HugetlbPrivate, 8, 3);
}

/// Pages written between arm() and t0, and pages discarded then (anonymous
/// memory loses its protection with its pages), are protected again at
/// t0: writes after t0 do not reach the image. The same run with the
/// re-protection skipped is caught, so the check can fail.
#[test]
fn pages_written_or_discarded_after_arm_are_protected_again_at_t0() {
    for skip in [false, true] {
        let Some(vm) = filled_anon(32 << 20) else {
            return;
        };
        let pages = vm.pages();
        let scratch = Scratch::new("rearm");
        let path = scratch.path("image");
        let prepared = LiveSnapshot::prepare(
            &[Region::of(vm.mapping())],
            &path,
            SnapshotOptions::new()
                .skip_rearm(skip)
                .defer_background(true),
        )
        .unwrap();
        let armed = prepared.arm().unwrap();
        // After the walk: each of these writes faults once and is recorded.
        let mut buf = [0u8; PAGE];
        let written: Vec<u64> = (pages - 40..pages - 32).collect();
        for &p in &written {
            vm.write_next(p, &mut buf);
        }
        // Discarded after the walk, then written with no fault at all.
        let discarded = pages - 16;
        vm.mapping()
            .advise(
                discarded as usize * PAGE,
                8 * PAGE,
                rustix::mm::Advice::LinuxDontNeed,
            )
            .unwrap();
        for p in discarded..discarded + 8 {
            vm.write_next(p, &mut buf);
        }
        let running = vm.at_t0(|| armed.protect()).unwrap();
        // After t0, before the background pass, which waits for finish().
        for &p in written
            .iter()
            .chain(&(discarded..discarded + 8).collect::<Vec<_>>())
        {
            vm.write_next(p, &mut buf);
        }
        let report = running.finish().unwrap();
        let image = std::fs::read(&path).unwrap();
        let bad = vm.mismatches_at_t0(&image);
        if skip {
            assert!(
                !bad.is_empty(),
                "the checker did not notice writes after t0 to pages left unprotected"
            );
            continue;
        }
        assert!(bad.is_empty(), "pages {bad:?} differ from t0");
        assert!(
            report.rearmed >= written.len() as u64 + 8,
            "{} pages protected again at t0",
            report.rearmed
        );
        assert!(report.arm_time > Duration::ZERO);
        assert!(report.events >= 1, "no REMOVE event seen");
        assert!(report.discarded.is_empty(), "{:?}", report.discarded);
    }
}

/// An armed snapshot dropped before t0 stops its saver and closes its
/// userfaultfd: no writer stays blocked, no file is left.
#[test]
fn dropping_an_armed_snapshot_releases_every_writer() {
    let Some(vm) = filled_anon(16 << 20) else {
        return;
    };
    let vm = Arc::new(vm);
    let scratch = Scratch::new("abandon-armed");
    let path = scratch.path("image");
    let armed = LiveSnapshot::prepare(&[Region::of(vm.mapping())], &path, SnapshotOptions::new())
        .unwrap()
        .arm()
        .unwrap();
    drop(armed);
    let (tx, rx) = std::sync::mpsc::channel();
    let w = vm.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; PAGE];
        for p in (0..w.pages()).rev().step_by(3) {
            w.write_next(p, &mut buf);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a writer stayed blocked after the armed snapshot was dropped");
    assert_eq!(
        std::fs::read_dir(scratch.dir()).unwrap().count(),
        0,
        "temporary file left behind"
    );
}
