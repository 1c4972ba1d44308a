//! The delta decoder against hostile input: any bytes decode or are
//! refused, never a panic; encoded deltas decode back; a damaged byte
//! anywhere is caught.

use proptest::prelude::*;
use uffd_snapshot::delta::{encode, DeltaIndex, EntryKind, HEADER_LEN};

/// Image offsets with their page bytes (`None`: a zero page).
type Pages = Vec<(u64, Option<Vec<u8>>)>;

fn delta() -> impl Strategy<Value = (u64, Pages)> {
    (
        1u64..64,
        proptest::collection::vec((0u64..4, any::<bool>(), any::<u8>()), 0..12),
    )
        .prop_map(|(pages, runs)| {
            let mut at = 0u64;
            let mut out = Vec::new();
            for (gap, zero, fill) in runs {
                at += gap;
                if at >= pages {
                    break;
                }
                let bytes = (!zero).then(|| vec![fill | 1; 4096]);
                out.push((at * 4096, bytes));
                at += 1;
            }
            (pages * 4096, out)
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = DeltaIndex::decode(&bytes);
    }

    #[test]
    fn a_valid_header_over_arbitrary_fields_never_panics(
        fields in proptest::collection::vec(any::<u64>(), 6),
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        // A header with a right checksum but hostile fields: the checks
        // after the checksum are what is exercised.
        let mut h = Vec::new();
        h.extend_from_slice(b"UFFDDLT\0");
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&64u32.to_le_bytes());
        h.extend_from_slice(&((fields[0] as u32) & 0x7fff_f000 | 0x1000).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        for f in &fields[1..5] {
            h.extend_from_slice(&f.to_le_bytes());
        }
        h.extend_from_slice(&(fields[5] as u32).to_le_bytes());
        let crc = crc(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&tail);
        let _ = DeltaIndex::decode(&h);
    }

    #[test]
    fn encoded_deltas_decode_to_what_was_encoded((image_len, pages) in delta()) {
        let bytes = encode(4096, image_len, &pages);
        let index = DeltaIndex::decode(&bytes).expect("a valid delta");
        prop_assert_eq!(index.image_len, image_len);
        prop_assert_eq!(index.entries.len(), pages.len());
        for (e, (offset, data)) in index.entries.iter().zip(&pages) {
            prop_assert_eq!(e.range.start, *offset);
            prop_assert_eq!(e.kind == EntryKind::Zero, data.is_none());
            if let Some(d) = data {
                let at = e.file_offset as usize;
                prop_assert_eq!(&bytes[at..at + 4096], &d[..]);
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_caught_or_harmless((image_len, pages) in delta(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let bytes = encode(4096, image_len, &pages);
        let mut bad = bytes.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        match DeltaIndex::decode(&bad) {
            Err(_) => {}
            // Only padding between the table and the data is unchecked.
            Ok(_) => {
                let table_end = HEADER_LEN + 24 * pages.len();
                let data_offset = DeltaIndex::decode(&bytes).unwrap().data_offset as usize;
                prop_assert!(i >= table_end && i < data_offset, "flip at {} went unnoticed", i);
            }
        }
    }
}

fn crc(bytes: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise: independent of the crate's implementation.
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
