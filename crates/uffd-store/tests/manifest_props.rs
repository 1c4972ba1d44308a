//! The manifest and page index decoders on hostile input: any bytes decode
//! or are refused (never a panic, never an allocation beyond the input's
//! length), everything accepted is consistent (every extent inside its
//! image and inside its chunk, in order, not overlapping; an index's page
//! count matching its image), valid encodings of both manifest versions
//! survive a round trip, and mutated ones are refused or still consistent
//! (also once their checksum is fixed up, so the mutations reach the
//! validation behind it).

use proptest::prelude::*;
use uffd_store::manifest::{
    ChunkHash, ChunkRef, Compression, Extent, Manifest, MAX_CHUNK_SIZE, PAGE_SIZE,
};
use uffd_store::pages::{PageIndex, ZERO_PAGE};

const P: u64 = PAGE_SIZE;

/// One extent to lay down: (pages of gap before it, which chunk, pages
/// long, where in the chunk).
type Step = (u8, prop::sample::Index, u8, prop::sample::Index);

fn build_v2(
    chunk_pages: &[(u8, bool)],
    steps: &[Step],
    tail_pages: u8,
    cut: u16,
    shift: u32,
) -> Manifest {
    let chunks: Vec<ChunkRef> = chunk_pages
        .iter()
        .enumerate()
        .map(|(i, &(pages, lz4))| {
            let len = u32::from(pages) * P as u32;
            ChunkRef {
                hash: ChunkHash([i as u8; 32]),
                len,
                stored_len: if lz4 { len / 3 } else { len },
                compression: if lz4 {
                    Compression::Lz4
                } else {
                    Compression::None
                },
            }
        })
        .collect();
    let mut extents = Vec::new();
    let mut at = 0u64;
    for (gap, which, pages, start) in steps {
        at += u64::from(*gap) * P;
        let k = which.index(chunks.len());
        let have = u64::from(chunks[k].len) / P;
        let pages = u64::from(*pages).clamp(1, have);
        let first = start.index((have - pages + 1) as usize) as u64;
        extents.push(Extent {
            offset: at,
            len: (pages * P) as u32,
            chunk: k as u32,
            chunk_offset: (first * P) as u32,
        });
        at += pages * P;
    }
    let mut image_len = at + u64::from(tail_pages) * P;
    // An image ending mid-page: its last extent ends with it.
    if tail_pages == 0 && cut > 0 {
        if let Some(last) = extents.last_mut() {
            let cut = u32::from(cut) % P as u32;
            if last.len > cut {
                last.len -= cut;
                image_len -= u64::from(cut);
            }
        }
    }
    // Only the chunks used, renumbered.
    let mut used: Vec<Option<u32>> = vec![None; chunks.len()];
    let mut table = Vec::new();
    for e in &mut extents {
        let k = e.chunk as usize;
        let new = *used[k].get_or_insert_with(|| {
            table.push(chunks[k]);
            (table.len() - 1) as u32
        });
        e.chunk = new;
    }
    Manifest::new(1 << shift, image_len, table, extents).expect("a valid manifest")
}

fn valid_v2() -> impl Strategy<Value = Manifest> {
    (
        proptest::collection::vec((1u8..=16, any::<bool>()), 1..8),
        proptest::collection::vec(
            (
                0u8..4,
                any::<prop::sample::Index>(),
                1u8..6,
                any::<prop::sample::Index>(),
            ),
            0..48,
        ),
        0u8..3,
        0u16..4096,
        12u32..=22,
    )
        .prop_map(|(chunks, steps, tail, cut, shift)| build_v2(&chunks, &steps, tail, cut, shift))
}

/// A version 1 manifest as that version wrote it, and what it holds.
fn valid_v1() -> impl Strategy<Value = (Vec<u8>, u32, u64, Vec<(u64, u32)>)> {
    (
        12u32..=20,
        0u64..(1 << 26),
        proptest::collection::vec(any::<(bool, bool, u8)>(), 0..64),
    )
        .prop_map(|(shift, image_len, picks)| {
            let cs = 1u32 << shift;
            let chunks = image_len.div_ceil(u64::from(cs));
            let mut out = Vec::new();
            let mut held = Vec::new();
            let entries: Vec<_> = picks
                .iter()
                .enumerate()
                .filter(|(i, (keep, _, _))| *keep && (*i as u64) < chunks)
                .collect();
            out.extend_from_slice(b"UFFDSNAP");
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&cs.to_le_bytes());
            out.extend_from_slice(&image_len.to_le_bytes());
            out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            for (i, &(_, lz4, fill)) in entries {
                let offset = i as u64 * u64::from(cs);
                let len = u64::from(cs).min(image_len - offset) as u32;
                // Each chunk its own hash (the index), so none repeat with
                // another length.
                let mut hash = [fill; 32];
                hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&(if lz4 { (len / 2).max(1) } else { len }).to_le_bytes());
                out.push(u8::from(lz4));
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(&hash);
                held.push((offset, len));
            }
            let sum = blake3::hash(&out);
            out.extend_from_slice(sum.as_bytes());
            (out, cs, image_len, held)
        })
}

/// Re-seals `bytes` with a correct checksum, so mutations reach the
/// validation behind it.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(sum.as_bytes());
    }
    bytes
}

fn check_accepted(m: &Manifest) {
    let mut previous_end = 0;
    for e in m.extents() {
        let end = e.offset.checked_add(u64::from(e.len)).expect("no overflow");
        assert!(e.len > 0);
        assert!(end <= m.image_len(), "extent past the image");
        assert_eq!(e.offset % P, 0, "page aligned");
        assert!(end % P == 0 || end == m.image_len());
        assert!(e.offset >= previous_end, "in order, not overlapping");
        previous_end = end;
        let c = m
            .chunks()
            .get(e.chunk as usize)
            .expect("a chunk that exists");
        assert!(c.len <= MAX_CHUNK_SIZE);
        assert!(
            u64::from(e.chunk_offset) + u64::from(e.len) <= u64::from(c.len),
            "inside its chunk"
        );
        assert_eq!(m.extent_at(e.offset), Some(e));
        assert_eq!(m.extent_at(end - 1), Some(e));
    }
    for c in m.chunks() {
        assert!(c.stored_len <= c.len && c.len > 0);
    }
    assert!(m.data_bytes() <= m.image_len());
}

fn check_index(i: &PageIndex) {
    assert_eq!(i.hashes().len() as u64, i.image_len().div_ceil(P));
}

proptest! {
    #[test]
    fn valid_manifests_round_trip(m in valid_v2()) {
        check_accepted(&m);
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode(&bytes), Ok(m));
    }

    #[test]
    fn version_1_manifests_decode_to_whole_chunk_extents((bytes, cs, image_len, held) in valid_v1()) {
        let m = Manifest::decode(&bytes).unwrap();
        check_accepted(&m);
        prop_assert_eq!(m.version(), 1);
        prop_assert_eq!(m.chunk_size(), cs);
        prop_assert_eq!(m.image_len(), image_len);
        let got: Vec<(u64, u32)> = m.extents().iter().map(|e| (e.offset, e.len)).collect();
        prop_assert_eq!(got, held);
        // Written again as version 2, the same extents.
        let again = Manifest::decode(&m.encode()).unwrap();
        prop_assert_eq!(again.extents(), m.extents());
        prop_assert_eq!(again.chunks(), m.chunks());
    }

    #[test]
    fn arbitrary_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = Manifest::decode(&bytes) {
            check_accepted(&m);
        }
        if let Ok(i) = PageIndex::decode(&bytes) {
            check_index(&i);
        }
        let sealed = reseal(bytes);
        if let Ok(m) = Manifest::decode(&sealed) {
            check_accepted(&m);
        }
        if let Ok(i) = PageIndex::decode(&sealed) {
            check_index(&i);
        }
    }

    #[test]
    fn arbitrary_tables_behind_a_valid_header_decode_or_are_refused(
        version in 1u32..=2,
        counts in (0u64..4, 0u64..8),
        image_pages in 0u64..64,
        table in proptest::collection::vec(any::<u8>(), 4 * 52 + 8 * 20),
        slack in 0usize..3,
    ) {
        // Counts that fit the tables exactly (or miss by a few bytes), so
        // the random rows reach the row checks behind the size check.
        let mut bytes = b"UFFDSNAP".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&4096u32.to_le_bytes());
        bytes.extend_from_slice(&(image_pages * P).to_le_bytes());
        bytes.extend_from_slice(&counts.0.to_le_bytes());
        let rows = if version == 2 {
            bytes.extend_from_slice(&counts.1.to_le_bytes());
            counts.0 as usize * 48 + counts.1 as usize * 20
        } else {
            counts.0 as usize * 52
        };
        bytes.extend_from_slice(&table[..(rows + slack).min(table.len())]);
        bytes.extend_from_slice(&[0; 32]);
        let decoded = Manifest::decode(&reseal(bytes));
        if slack > 0 {
            prop_assert!(decoded.is_err(), "tables longer than the counts say");
        }
        if let Ok(m) = decoded {
            check_accepted(&m);
        }
    }

    #[test]
    fn mutated_valid_manifests_are_refused_or_still_valid(
        m in valid_v2(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = m.encode();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        // Without a new checksum any change is refused...
        if bytes != m.encode() {
            prop_assert!(Manifest::decode(&bytes).is_err());
        }
        // ...and with one, whatever is accepted is consistent.
        if let Ok(decoded) = Manifest::decode(&reseal(bytes)) {
            check_accepted(&decoded);
        }
    }

    #[test]
    fn mutated_version_1_manifests_are_refused_or_still_valid(
        (good, _, _, _) in valid_v1(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = good.clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if bytes != good {
            prop_assert!(Manifest::decode(&bytes).is_err());
        }
        if let Ok(decoded) = Manifest::decode(&reseal(bytes)) {
            check_accepted(&decoded);
        }
    }

    #[test]
    fn page_indexes_round_trip_and_mutations_are_refused_or_consistent(
        image_len in 0u64..(64 * P),
        seed in any::<u8>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let pages = image_len.div_ceil(P) as usize;
        let hashes = (0..pages)
            .map(|i| if (i + seed as usize) % 3 == 0 { ZERO_PAGE } else { [(i as u8) ^ seed | 1; 16] })
            .collect();
        let index = PageIndex::new(image_len, ChunkHash([seed; 32]), hashes).unwrap();
        let good = index.encode();
        prop_assert_eq!(PageIndex::decode(&good), Ok(index));
        let mut bytes = good.clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if bytes != good {
            prop_assert!(PageIndex::decode(&bytes).is_err());
        }
        if let Ok(i) = PageIndex::decode(&reseal(bytes)) {
            check_index(&i);
        }
    }
}
