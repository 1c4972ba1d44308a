//! A malicious or broken page server cannot make a destination allocate
//! without bound, install wrong bytes or hang: frames announcing huge
//! payloads are refused from their header, wrong answers end the link, and
//! past the reconnect timeout reads fail (the engine then poisons).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_pager::{AsyncSource, PageSource};
use uffd_remote::protocol::{Frame, HEADER};
use uffd_remote::{RemoteConfig, RemoteSource};

/// A server that greets properly and then answers every request with
/// `reply(request_id)`.
fn hostile(reply: fn(u64) -> Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut hello = Vec::new();
                Frame::Hello {
                    page_size: 4096,
                    image_len: 1 << 20,
                    identity: 1,
                }
                .encode(&mut hello);
                if conn.write_all(&hello).is_err() {
                    return;
                }
                loop {
                    let mut h = [0u8; HEADER];
                    if conn.read_exact(&mut h).is_err() {
                        return;
                    }
                    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
                    let mut payload = vec![0u8; len];
                    if conn.read_exact(&mut payload).is_err() {
                        return;
                    }
                    if h[6] == 3 {
                        let id = u64::from_le_bytes(h[16..24].try_into().unwrap());
                        if conn.write_all(&reply(id)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn read_fails_in_time(addr: &str) {
    let remote = RemoteSource::connect(
        addr,
        RemoteConfig {
            reconnect_timeout: Duration::from_millis(300),
            ..RemoteConfig::default()
        },
    )
    .unwrap();
    let source = AsyncSource::new(Arc::new(remote)).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let result = source.read_at(8192, &mut buf);
    assert!(result.is_err(), "a hostile answer was accepted: {result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_frame_announcing_4_gib_is_refused_from_its_header() {
    read_fails_in_time(&hostile(|id| {
        let mut f = Vec::new();
        Frame::Data {
            id,
            offset: 8192,
            len: 4096,
            bytes: Some(vec![1; 4096]),
        }
        .encode(&mut f);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        f
    }));
}

#[test]
fn an_answer_for_other_bytes_is_never_used() {
    read_fails_in_time(&hostile(|id| {
        let mut f = Vec::new();
        Frame::Data {
            id,
            offset: 0,
            len: 4096,
            bytes: Some(vec![7; 4096]),
        }
        .encode(&mut f);
        f
    }));
}

#[test]
fn answers_that_always_fail_their_checksum_end_in_an_error() {
    read_fails_in_time(&hostile(|id| {
        let mut f = Vec::new();
        Frame::Data {
            id,
            offset: 8192,
            len: 4096,
            bytes: Some(vec![9; 4096]),
        }
        .encode(&mut f);
        let last = f.len() - 1;
        f[last] ^= 1;
        f
    }));
}
