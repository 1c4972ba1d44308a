//! The working-set decoder against hostile files: property tests (any
//! bytes, any mutation of a valid file with its checksum fixed up, never a
//! panic, never more pages than the memory holds) and the crafted files
//! the audit found (CRC-valid, 34-147 bytes: a capacity-overflow panic, a
//! 256 GiB allocation, 2^28 pages accepted for a 16 MiB VM), kept as
//! regression cases.

use proptest::prelude::*;
use uffd_pager::{WorkingSet, WorkingSetError};

const MIB: u64 = 1 << 20;

/// CRC-32 (IEEE), to forge files whose checksum is right.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xEDB8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A file with a right checksum: `version`, `page_size`, `count`, the
/// source length (version 2), then raw LEB128 numbers.
fn forge(version: u32, page_size: u32, count: u64, source_len: u64, numbers: &[u64]) -> Vec<u8> {
    let mut out = b"UFFDWSET".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&page_size.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    if version >= 2 {
        out.extend_from_slice(&source_len.to_le_bytes());
    }
    for &n in numbers {
        leb(&mut out, n);
    }
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What every accepted working set must satisfy for `source_len`.
fn check_accepted(ws: &WorkingSet, source_len: u64) {
    assert!(ws.len() as u64 <= source_len / ws.page_size());
    for &p in ws.pages() {
        assert_eq!(p % ws.page_size(), 0);
        assert!(
            p + ws.page_size() <= source_len,
            "page {p:#x} past {source_len:#x}"
        );
    }
}

#[test]
fn audit_capacity_overflow_is_refused() {
    // count u64::MAX, one run of u64::MAX pages.
    let file = forge(1, 4096, u64::MAX, 0, &[0, u64::MAX]);
    assert!(file.len() < 64);
    assert!(WorkingSet::from_bytes(&file, 16 * MIB).is_err());
}

#[test]
fn audit_huge_allocation_is_refused() {
    // 2^35 pages claimed: a 256 GiB vector before this check existed.
    let file = forge(1, 4096, 1 << 35, 0, &[0, 1 << 35]);
    assert!(matches!(
        WorkingSet::from_bytes(&file, 16 * MIB),
        Err(WorkingSetError::Format(_))
    ));
}

#[test]
fn audit_more_pages_than_the_memory_holds_are_refused() {
    // 2^28 pages for a 16 MiB memory (4,096 pages).
    let file = forge(1, 4096, 1 << 28, 0, &[0, 1 << 28]);
    assert!(WorkingSet::from_bytes(&file, 16 * MIB).is_err());
    // Exactly the memory's pages is fine.
    let file = forge(1, 4096, 4096, 0, &[0, 4096]);
    let ws = WorkingSet::from_bytes(&file, 16 * MIB).unwrap();
    check_accepted(&ws, 16 * MIB);
    assert_eq!(ws.len(), 4096);
}

#[test]
fn audit_overflowing_deltas_are_refused() {
    // A start page far past anything, and one before page 0.
    for numbers in [
        &[u64::MAX - 1, 1][..],
        &[1, 1, u64::MAX, 1],
        &[(i64::MAX as u64) << 1, 1],
    ] {
        let file = forge(1, 4096, 2, 0, numbers);
        assert!(
            WorkingSet::from_bytes(&file, 16 * MIB).is_err(),
            "{numbers:?}"
        );
    }
}

#[test]
fn recorded_on_another_snapshot_is_refused_by_name() {
    let ws = WorkingSet::new(4096, vec![0, 4096, 8192]).with_source_len(256 * MIB);
    match WorkingSet::from_bytes(&ws.to_bytes(), 64 * MIB) {
        Err(e @ WorkingSetError::OtherSnapshot { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("268435456") && text.contains("67108864"),
                "{text}"
            );
        }
        other => panic!("a working set of another snapshot was {other:?}"),
    }
    // A version-1 file (no length) whose pages do not fit is refused too.
    let file = forge(1, 4096, 1, 0, &[(100 * MIB / 4096) << 1, 1]);
    assert!(matches!(
        WorkingSet::from_bytes(&file, 64 * MIB),
        Err(WorkingSetError::PageOutOfRange { .. })
    ));
}

#[test]
fn page_sizes_outside_4k_to_1g_are_refused() {
    for page_size in [0u32, 1, 512, 3 << 12, 1 << 31] {
        let file = forge(2, page_size, 0, 16 * MIB, &[]);
        assert!(
            WorkingSet::from_bytes(&file, 16 * MIB).is_err(),
            "{page_size}"
        );
    }
}

#[test]
fn load_refuses_a_file_larger_than_the_memory_allows_before_reading_it() {
    let path = std::env::temp_dir().join(format!("uffd-ws-big-{}", std::process::id()));
    // 1 MiB of memory = 256 pages; no working set of it needs 1 MiB.
    std::fs::write(&path, vec![0x80u8; 1 << 20]).unwrap();
    let r = WorkingSet::load(&path, MIB);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(r, Err(WorkingSetError::Format(_))), "{r:?}");
}

fn pages_in(source_pages: u64) -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(0..source_pages, 0..300).prop_map(|mut v| {
        // A working set names each page once, in touch order.
        let mut seen = std::collections::HashSet::new();
        v.retain(|p| seen.insert(*p));
        v
    })
}

proptest! {
    #[test]
    fn round_trip_keeps_pages_in_order(pages in pages_in(4096), huge in any::<bool>()) {
        let page_size = if huge { 2 * MIB } else { 4096 };
        let source_len = 4096 * 2 * MIB;
        let pages: Vec<u64> = pages.into_iter().map(|p| p * page_size).collect();
        let ws = WorkingSet::new(page_size, pages.clone()).with_source_len(source_len);
        let back = WorkingSet::from_bytes(&ws.to_bytes(), source_len).unwrap();
        prop_assert_eq!(back.pages(), &pages[..]);
        prop_assert_eq!(back.source_len(), Some(source_len));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), len_mib in 0u64..64) {
        if let Ok(ws) = WorkingSet::from_bytes(&bytes, len_mib * MIB) {
            check_accepted(&ws, len_mib * MIB);
        }
    }

    #[test]
    fn mutated_files_with_valid_checksums_never_panic(
        pages in pages_in(1024),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<Option<usize>>(),
        len_mib in 1u64..32,
    ) {
        let ws = WorkingSet::new(4096, pages.into_iter().map(|p| p * 4096).collect())
            .with_source_len(len_mib * MIB);
        let mut bytes = ws.to_bytes();
        if let Some(cut) = cut {
            let keep = 28 + cut % bytes.len().saturating_sub(27).max(1);
            bytes.truncate(keep.min(bytes.len()));
        }
        for (at, value) in edits {
            let n = bytes.len().saturating_sub(4).max(1);
            bytes[at % n] = value;
        }
        fix_crc(&mut bytes);
        // Either refused or within the memory, whatever the header says.
        for source_len in [len_mib * MIB, 4 * MIB] {
            if let Ok(ws) = WorkingSet::from_bytes(&bytes, source_len) {
                check_accepted(&ws, source_len);
            }
        }
    }

    #[test]
    fn forged_headers_never_allocate_past_the_memory(
        count in any::<u64>(),
        numbers in proptest::collection::vec(any::<u64>(), 0..12),
        page_shift in 0u32..32,
    ) {
        let file = forge(2, 1u32 << page_shift, count, 8 * MIB, &numbers);
        if let Ok(ws) = WorkingSet::from_bytes(&file, 8 * MIB) {
            check_accepted(&ws, 8 * MIB);
        }
    }
}
