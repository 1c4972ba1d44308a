//! The manifest decoder on hostile input: any bytes decode or are refused
//! (never a panic, never an allocation beyond the input's length), every
//! accepted manifest's entries lie inside its image, and valid manifests
//! survive an encode/decode round trip.

use proptest::prelude::*;
use uffd_store::manifest::{ChunkHash, ChunkRef, Compression, Manifest};

fn valid_manifest() -> impl Strategy<Value = Manifest> {
    (
        12u32..=20,
        0u64..(1 << 26),
        proptest::collection::vec(any::<(bool, bool, u8)>(), 0..64),
    )
        .prop_map(|(shift, image_len, picks)| {
            let cs = 1u32 << shift;
            let chunks = image_len.div_ceil(u64::from(cs));
            let entries = picks
                .iter()
                .enumerate()
                .filter(|(i, (keep, _, _))| *keep && (*i as u64) < chunks)
                .map(|(i, &(_, lz4, fill))| {
                    let offset = i as u64 * u64::from(cs);
                    let len = u64::from(cs).min(image_len - offset) as u32;
                    ChunkRef {
                        offset,
                        len,
                        stored_len: if lz4 { (len / 2).max(1) } else { len },
                        compression: if lz4 {
                            Compression::Lz4
                        } else {
                            Compression::None
                        },
                        hash: ChunkHash([fill; 32]),
                    }
                })
                .collect();
            Manifest::new(cs, image_len, entries).unwrap()
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
    let mut previous = None;
    for e in m.entries() {
        let end = e.offset.checked_add(u64::from(e.len)).expect("no overflow");
        assert!(end <= m.image_len(), "entry past the image");
        assert_eq!(e.offset % u64::from(m.chunk_size()), 0);
        assert!(e.len <= m.chunk_size() && e.len > 0);
        assert!(e.stored_len <= e.len);
        assert!(previous.is_none_or(|p| p < e.offset), "entries in order");
        previous = Some(e.offset);
    }
}

proptest! {
    #[test]
    fn valid_manifests_round_trip(m in valid_manifest()) {
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode(&bytes), Ok(m));
    }

    #[test]
    fn arbitrary_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = Manifest::decode(&bytes) {
            check_accepted(&m);
        }
        if let Ok(m) = Manifest::decode(&reseal(bytes)) {
            check_accepted(&m);
        }
    }

    #[test]
    fn mutated_valid_manifests_are_refused_or_still_valid(
        m in valid_manifest(),
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
}
