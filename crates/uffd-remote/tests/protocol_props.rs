//! The frame decoder on hostile input: any bytes decode, ask for more, or
//! are refused; never a panic, and nothing is read past what a header
//! announced (which is itself bounded).

use proptest::prelude::*;
use uffd_remote::protocol::{decode, Frame, HEADER, MAX_PAYLOAD};

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(Some((_, used))) = decode(&bytes) {
            prop_assert!(used <= bytes.len());
            prop_assert!(used <= HEADER + MAX_PAYLOAD as usize);
        }
    }

    #[test]
    fn valid_headers_with_garbage_payloads_never_panic(
        kind in 1u8..=6,
        flags in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        id in any::<u64>(),
    ) {
        let mut buf = Vec::new();
        buf.extend_from_slice(b"UFPG");
        buf.extend_from_slice(&1u16.to_le_bytes());
        buf.push(kind);
        buf.push(flags);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&id.to_le_bytes());
        buf.extend_from_slice(&payload);
        let _ = decode(&buf);
    }

    #[test]
    fn data_frames_round_trip(offset in 0u64..(1 << 40), bytes in proptest::collection::vec(any::<u8>(), 1..512), id in any::<u64>()) {
        let f = Frame::Data { id, offset, len: bytes.len() as u32, bytes: Some(bytes) };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        prop_assert_eq!(decode(&buf).unwrap().unwrap().0, f);
    }
}
