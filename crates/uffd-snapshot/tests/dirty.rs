//! DirtyTracker in both modes, and incremental snapshots built on it:
//! base + deltas, layered and merged, equal to memory.

use std::sync::Arc;

use uffd::{HugepageReservation, Mapping, MemoryKind};
use uffd_snapshot::check::{VersionedMemory, PAGE};
use uffd_snapshot::{
    layered, merge, write_delta, write_image, DirtyTracker, LiveSnapshot, Region, SnapshotOptions,
    TrackerMode,
};
use uffd_testkit::{skip, Need, Scratch};

fn pages_of(ranges: &[std::ops::Range<u64>], base: u64, page: u64) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(page as usize))
        .map(|a| (a - base) / page)
        .collect()
}

fn tracks_exactly(kind: MemoryKind, mode: TrackerMode) {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let _reservation = if kind.is_hugetlb() {
        match HugepageReservation::reserve(8) {
            Ok(r) => Some(r),
            Err(e) => return skip(Need::Hugetlb, e),
        }
    } else {
        None
    };
    let ps = kind.page_size();
    let m = Mapping::new(kind, 8 * ps).unwrap();
    // Some pages written before tracking starts: not reported.
    m.write_byte(0, 1);
    let region = Region::of(&m);
    let mut tracker = DirtyTracker::with_mode(&[region], mode).unwrap();
    assert_eq!(tracker.mode(), mode);
    let first = tracker.written().unwrap();
    assert!(
        first.is_empty(),
        "{kind} {mode:?}: reported {first:?} before any write"
    );
    for p in [1, 4, 7] {
        m.write_byte(p * ps + 9, 3);
    }
    let got = pages_of(&tracker.written().unwrap(), m.addr(), ps as u64);
    assert_eq!(got, [1, 4, 7], "{kind} {mode:?}");
    assert!(
        tracker.written().unwrap().is_empty(),
        "{kind} {mode:?}: still reported after a scan"
    );
    m.write_byte(2 * ps, 5);
    m.write_byte(0, 5);
    let got = pages_of(&tracker.written().unwrap(), m.addr(), ps as u64);
    assert_eq!(got, [0, 2], "{kind} {mode:?}");
    // Reads are not writes.
    let _ = m.read_byte(5 * ps);
    assert!(tracker.written().unwrap().is_empty());
}

#[test]
fn async_tracker_reports_exactly_the_written_pages_anon() {
    tracks_exactly(MemoryKind::Anon, TrackerMode::Async);
}

#[test]
fn async_tracker_reports_exactly_the_written_pages_shmem() {
    tracks_exactly(MemoryKind::Shmem, TrackerMode::Async);
}

#[test]
fn async_tracker_reports_whole_huge_pages_hugetlb() {
    tracks_exactly(MemoryKind::Hugetlb, TrackerMode::Async);
}

#[test]
fn sync_wp_fallback_reports_exactly_the_written_pages_anon() {
    tracks_exactly(MemoryKind::Anon, TrackerMode::SyncWp);
}

#[test]
fn sync_wp_fallback_reports_exactly_the_written_pages_shmem() {
    tracks_exactly(MemoryKind::Shmem, TrackerMode::SyncWp);
}

#[test]
fn sync_wp_fallback_reports_whole_huge_pages_hugetlb() {
    tracks_exactly(MemoryKind::Hugetlb, TrackerMode::SyncWp);
}

/// Whether this kernel keeps soft-dirty bits, found out independently of
/// the tracker: write a page of a fresh mapping, read pagemap bit 55.
fn kernel_has_soft_dirty() -> bool {
    use std::os::unix::fs::FileExt;
    let m = Mapping::new(MemoryKind::Anon, PAGE).unwrap();
    m.write_byte(0, 1);
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, m.addr() / 4096 * 8).unwrap();
    u64::from_le_bytes(e) & (1 << 55) != 0
}

/// The soft-dirty fallback tracks exactly where the kernel has soft-dirty
/// (CONFIG_MEM_SOFT_DIRTY), and is refused with that reason where not.
#[test]
fn soft_dirty_fallback_tracks_or_says_the_kernel_lacks_it() {
    if kernel_has_soft_dirty() {
        tracks_exactly(MemoryKind::Anon, TrackerMode::SoftDirty);
        tracks_exactly(MemoryKind::Shmem, TrackerMode::SoftDirty);
    } else {
        let m = Mapping::new(MemoryKind::Anon, 4 * PAGE).unwrap();
        let err = DirtyTracker::with_mode(&[Region::of(&m)], TrackerMode::SoftDirty).unwrap_err();
        assert!(err.to_string().contains("CONFIG_MEM_SOFT_DIRTY"), "{err}");
    }
}

#[test]
fn new_picks_async_where_wp_async_exists() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let m = Mapping::new(MemoryKind::Anon, 16 * PAGE).unwrap();
    let t = DirtyTracker::new(&[Region::of(&m)]).unwrap();
    let has = uffd::probe()
        .unwrap()
        .features
        .contains(uffd::Features::WP_ASYNC);
    assert_eq!(
        t.mode(),
        if has {
            TrackerMode::Async
        } else {
            TrackerMode::SoftDirty
        }
    );
}

/// A base taken live, then rounds of writes and deltas: base + deltas
/// (layered, and merged) equals memory after each round.
fn incremental(mode: TrackerMode) {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let vm = Arc::new(VersionedMemory::new(
        Mapping::new(MemoryKind::Anon, 4 << 20).unwrap(),
    ));
    let mut buf = [0u8; PAGE];
    for p in (0..vm.pages()).step_by(3) {
        vm.write_next(p, &mut buf);
    }
    let scratch = Scratch::new("incremental");
    let base = scratch.path("base");
    let region = Region::of(vm.mapping());
    let prepared =
        LiveSnapshot::prepare(&[region], &base, SnapshotOptions::new().track_writes(true)).unwrap();
    let running = vm.at_t0(|| prepared.protect()).unwrap();
    // Writes during the base snapshot: tracked by the snapshot itself.
    for p in [5u64, 6, 900] {
        vm.write_next(p, &mut buf);
    }
    assert!(running.wait_saved(Some(std::time::Duration::from_secs(60))));
    // Hand over to the tracker with writers stopped (none run here).
    let report = running.finish().unwrap();
    let mut tracker = DirtyTracker::with_mode(&[region], mode).unwrap();
    assert!(
        pages_of(&report.written, 0, PAGE as u64).starts_with(&[5, 6]),
        "{:?}",
        report.written
    );
    let mut carried = report.written.clone();
    let mut layers = Vec::new();
    for round in 0..3u64 {
        for p in (round..vm.pages()).step_by(97) {
            vm.write_next(p, &mut buf);
        }
        // A page written back to zero must read as zero over the base.
        vm.mapping().write(PAGE * 3, &[0u8; PAGE]);
        let mut ranges = tracker.written_image_ranges().unwrap();
        ranges.append(&mut carried);
        let path = scratch.path(&format!("d{round}"));
        let stats = write_delta(&[region], &ranges, &path).unwrap();
        assert!(stats.data_pages > 0 && stats.zero_pages > 0, "{stats:?}");
        layers.push(path);
        let now = vm.mismatches_now(&read_layered(&base, &layers, &scratch));
        assert!(
            now.is_empty(),
            "{mode:?} round {round}: layered image differs from memory at pages {now:?}"
        );
        let merged = scratch.path("merged");
        merge(&base, &layers, &merged).unwrap();
        let bytes = std::fs::read(&merged).unwrap();
        assert!(
            vm.mismatches_now(&bytes).is_empty(),
            "{mode:?} round {round}: merged image differs"
        );
    }
}

fn read_layered(
    base: &std::path::Path,
    layers: &[std::path::PathBuf],
    scratch: &Scratch,
) -> Vec<u8> {
    let src = uffd_pager::FileSource::open(base, uffd_pager::FileMode::Pread).unwrap();
    let source = layered(Arc::new(src), layers).unwrap();
    let out = scratch.path("layered-out");
    write_image(&*source, &out).unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn incremental_snapshots_with_async_tracker_equal_memory() {
    incremental(TrackerMode::Async);
}

#[test]
fn incremental_snapshots_with_sync_wp_fallback_equal_memory() {
    incremental(TrackerMode::SyncWp);
}

#[test]
fn a_delta_of_another_image_size_is_refused() {
    let scratch = Scratch::new("mismatch");
    let base = scratch.path("base");
    std::fs::write(&base, vec![0u8; 8 * PAGE]).unwrap();
    let d = scratch.path("d");
    std::fs::write(
        &d,
        uffd_snapshot::delta::encode(4096, 16 * PAGE as u64, &[(0, Some(vec![1; PAGE]))]),
    )
    .unwrap();
    let err = merge(&base, &[d], &scratch.path("out")).unwrap_err();
    assert!(err.to_string().contains("another snapshot"), "{err}");
}

/// True when the 2 MiB at `addr` are one transparent huge page
/// (pagemap's "THP" category through smaps' AnonHugePages for the VMA).
fn anon_huge_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        }
    }
    0
}

/// Transparent huge pages under the async tracker: a write to one 4 KiB
/// page of a THP is reported (the kernel unprotects and reports at the
/// granularity it mapped: the whole huge page), and nothing outside it.
#[test]
fn async_tracker_on_transparent_huge_pages() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let m = Mapping::new(MemoryKind::Anon, 4 << 20).unwrap();
    if m.advise(0, m.len(), rustix::mm::Advice::LinuxHugepage)
        .is_err()
    {
        return skip(Need::Feature, "madvise(MADV_HUGEPAGE) refused: no THP");
    }
    for off in (0..m.len()).step_by(PAGE) {
        m.write_byte(off, 1);
    }
    if anon_huge_kib(m.addr()) < 2048 {
        return skip(
            Need::Feature,
            "the kernel did not back the range with a transparent huge page",
        );
    }
    let mut tracker = DirtyTracker::with_mode(&[Region::of(&m)], TrackerMode::Async).unwrap();
    assert!(tracker.written().unwrap().is_empty());
    let page = m.addr() + (2 << 20) + 5 * PAGE as u64;
    m.write_byte((page - m.addr()) as usize, 9);
    let got = tracker.written().unwrap();
    assert!(
        got.iter().any(|r| r.contains(&page)),
        "the write at {page:#x} is not in {got:?}"
    );
    let huge = (page & !((2 << 20) - 1))..(page & !((2 << 20) - 1)) + (2 << 20);
    assert!(
        got.iter()
            .all(|r| huge.start <= r.start && r.end <= huge.end),
        "{got:?} reaches outside the huge page {huge:x?}"
    );
    eprintln!("THP write reported as {got:x?}");
    assert!(
        tracker.written().unwrap().is_empty(),
        "still reported after a scan"
    );
    // And the next write to the same huge page is seen again.
    m.write_byte((page - m.addr()) as usize + PAGE, 7);
    assert!(!tracker.written().unwrap().is_empty());
}

/// A page dropped with MADV_DONTNEED after a scan reads as zero now, so
/// it changed: a delta that missed it would restore its old contents.
#[test]
fn discarded_pages_are_reported_written() {
    for mode in [TrackerMode::Async, TrackerMode::SyncWp] {
        if !uffd_testkit::vmm_uffd() {
            return;
        }
        let m = Mapping::new(MemoryKind::Anon, 8 * PAGE).unwrap();
        for p in 0..8 {
            m.write_byte(p * PAGE, 1);
        }
        let mut tracker = DirtyTracker::with_mode(&[Region::of(&m)], mode).unwrap();
        assert!(tracker.written().unwrap().is_empty());
        m.advise(3 * PAGE, PAGE, rustix::mm::Advice::LinuxDontNeed)
            .unwrap();
        let got = pages_of(&tracker.written().unwrap(), m.addr(), PAGE as u64);
        assert_eq!(got, [3], "{mode:?}: a discarded page must be reported");
        assert_eq!(m.read_byte(3 * PAGE), 0);
    }
}
