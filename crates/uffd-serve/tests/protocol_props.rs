//! The handshake decoder against hostile messages: any bytes, any JSON
//! array of region-like objects, and valid messages cut at every length.
//! It never panics; what it accepts is always inside user space and the
//! memory file, aligned, and free of overlaps.

use proptest::prelude::*;
use uffd_serve::protocol::{
    encode_message, parse_message, validate, GuestRegionUffdMapping, Region, MAX_MESSAGE,
    USER_SPACE_END,
};

fn check_accepted(regions: &[Region], file_len: u64) {
    for r in regions {
        assert!(r.page_size == 4096 || r.page_size == 2 << 20);
        assert!(r.len > 0 && r.len % r.page_size == 0);
        assert_eq!(r.start % r.page_size, 0);
        assert_eq!(r.offset % r.page_size, 0);
        assert!(r
            .start
            .checked_add(r.len)
            .is_some_and(|e| e <= USER_SPACE_END));
        assert!(r.offset.checked_add(r.len).is_some_and(|e| e <= file_len));
    }
    for pair in regions.windows(2) {
        assert!(
            pair[0].start + pair[0].len <= pair[1].start,
            "overlap accepted"
        );
    }
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(USER_SPACE_END),
        (0u64..64).prop_map(|p| p << 12),
        (0u64..64).prop_map(|p| p << 21),
        (0u64..64).prop_map(|p| (p << 12) + 1),
    ]
}

fn raw_region() -> impl Strategy<Value = GuestRegionUffdMapping> {
    (
        edge_u64(),
        edge_u64(),
        edge_u64(),
        proptest::option::of(prop_oneof![Just(4096u64), Just(2 << 20), any::<u64>()]),
        proptest::option::of(prop_oneof![Just(4096u64), Just(2 << 20), any::<u64>()]),
    )
        .prop_map(
            |(base, size, offset, page_size, page_size_kib)| GuestRegionUffdMapping {
                base_host_virt_addr: base,
                size,
                offset,
                page_size,
                page_size_kib,
            },
        )
}

#[test]
fn a_message_past_the_limit_is_refused_without_parsing() {
    let mut big = b"[".to_vec();
    big.resize(MAX_MESSAGE + 1, b' ');
    assert!(parse_message(&big).is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some(regions)) = parse_message(&bytes) {
            if let Ok(ok) = validate(&regions, 1 << 30) {
                check_accepted(&ok, 1 << 30);
            }
        }
    }

    #[test]
    fn arbitrary_regions_are_accepted_only_when_sound(
        regions in proptest::collection::vec(raw_region(), 0..6),
        file_len in edge_u64(),
    ) {
        let json = serde_json::to_vec(&regions).unwrap();
        let parsed = parse_message(&json).unwrap().expect("a complete message");
        if let Ok(ok) = validate(&parsed, file_len) {
            check_accepted(&ok, file_len);
        }
    }

    #[test]
    fn valid_messages_cut_short_are_incomplete_or_refused(
        count in 1u64..8,
        cut in any::<proptest::sample::Index>(),
    ) {
        let regions: Vec<Region> = (0..count)
            .map(|i| Region::new((i + 1) << 30, 1 << 20, i << 20, 4096))
            .collect();
        let message = encode_message(&regions);
        let whole = validate(&parse_message(&message).unwrap().unwrap(), count << 20).unwrap();
        prop_assert_eq!(&whole, &regions);
        let at = cut.index(message.len());
        match parse_message(&message[..at]) {
            Ok(None) | Err(_) => {}
            Ok(Some(short)) => prop_assert!(validate(&short, count << 20).map(|r| r.len()).unwrap_or(0) <= regions.len()),
        }
    }
}
