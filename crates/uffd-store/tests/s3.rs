//! Snapshots against a real S3 server (s3s-fs on loopback, started here),
//! through a proxy that injects faults: push, dedup, zero chunks, pull,
//! info, ls, and the page source's cache, single-flight, retries,
//! corruption and timeouts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_pager::{AsyncPageSource, Fetched};
use uffd_store::snapshot::{self, stored_chunks};
use uffd_store::{CacheConfig, Location, ObjectSource, StoreOptions};
use uffd_testkit::s3::{aws_env, Proxy, S3Server, BUCKET};
use uffd_testkit::Scratch;

const CHUNK: u32 = 64 << 10;

fn options(endpoint: &str) -> StoreOptions {
    StoreOptions {
        config: aws_env(endpoint)
            .into_iter()
            .map(|(k, v)| {
                // AWS_ENDPOINT_URL's config key is aws_endpoint_url.
                (k.to_ascii_lowercase(), v)
            })
            .collect(),
        timeout: Duration::from_secs(10),
    }
}

fn location(endpoint: &str, name: &str) -> Location {
    Location::open(&format!("s3://{BUCKET}/fleet/{name}"), &options(endpoint)).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    uffd_store::io_runtime().unwrap().block_on(f)
}

/// `pages` 4 KiB pages of testkit's pattern (every 4th page zero), with
/// chunk `zero_chunk` (of CHUNK bytes) made all zero.
fn image(pages: usize, zero_chunk: usize) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    for (i, page) in data.chunks_mut(4096).enumerate() {
        uffd_testkit::page_pattern(i, page);
    }
    let cs = CHUNK as usize;
    data[zero_chunk * cs..(zero_chunk + 1) * cs].fill(0);
    data
}

fn push(endpoint: &str, name: &str, file: &std::path::Path) -> snapshot::PushReport {
    let loc = location(endpoint, name);
    block_on(snapshot::push(file, &loc, CHUNK, &|_, _| {})).unwrap()
}

#[test]
fn push_omits_zero_chunks_dedups_across_snapshots_and_pulls_back_every_byte() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-push");
    let ep = s3.endpoint();
    // 40 chunks; chunk 3 is zero; chunks 10 and 20 are made identical.
    let mut data = image(40 * 16, 3);
    let cs = CHUNK as usize;
    let copy = data[10 * cs..11 * cs].to_vec();
    data[20 * cs..21 * cs].copy_from_slice(&copy);
    let a = dir.path("a.mem");
    std::fs::write(&a, &data).unwrap();
    let first = push(&ep, "vm-a", &a);
    assert_eq!(first.chunks, 40);
    assert_eq!(first.zero_chunks, 1, "{first:?}");
    assert_eq!(first.unique_chunks, 38, "two identical chunks are one");
    assert_eq!(first.uploaded_chunks, 38);
    assert_eq!(first.reused_chunks, 0);
    assert!(
        first.compressed_chunks > 0,
        "the pattern compresses: {first:?}"
    );
    let loc = location(&ep, "vm-a");
    let stored = block_on(stored_chunks(&*loc.store, &loc.folder())).unwrap();
    assert_eq!(stored.len(), 38, "one object per distinct non-zero chunk");

    // A second snapshot differing in 2 chunks: only those are uploaded.
    let mut changed = data.clone();
    changed[5 * cs + 100] ^= 0xff;
    changed[30 * cs + 7] ^= 0x55;
    let b = dir.path("b.mem");
    std::fs::write(&b, &changed).unwrap();
    let second = push(&ep, "vm-b", &b);
    assert_eq!(second.uploaded_chunks, 2, "{second:?}");
    assert_eq!(second.reused_chunks, second.unique_chunks - 2);
    let stored = block_on(stored_chunks(&*loc.store, &loc.folder())).unwrap();
    assert_eq!(stored.len(), 40, "shared chunks are stored once");
    assert!(
        second.uploaded_bytes < first.uploaded_bytes / 10,
        "{second:?} vs {first:?}"
    );

    let info = block_on(snapshot::info(&location(&ep, "vm-b"))).unwrap();
    assert_eq!(info.image_len, changed.len() as u64);
    assert_eq!(info.zero_chunks, 1);
    assert_eq!(info.unique_chunks, 38);
    assert!((info.zero_share - 1.0 / 40.0).abs() < 1e-9, "{info:?}");
    assert_eq!(info.unique_bytes, 38 * u64::from(CHUNK));

    let folder = Location::open(&format!("s3://{BUCKET}/fleet"), &options(&ep)).unwrap();
    let listed = block_on(snapshot::list(&folder)).unwrap();
    let names: Vec<_> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["vm-a", "vm-b"],
        "the chunk folder is not a snapshot"
    );
    assert_eq!(listed[1].image_len, changed.len() as u64);

    let out = dir.path("pulled.mem");
    let report = block_on(snapshot::pull(&location(&ep, "vm-b"), &out, &|_, _| {})).unwrap();
    assert_eq!(report.downloaded_chunks, 38);
    assert!(
        std::fs::read(&out).unwrap() == changed,
        "pulled bytes differ"
    );
}

fn source(endpoint: &str, name: &str, config: CacheConfig) -> ObjectSource {
    ObjectSource::open(location(endpoint, name), config).unwrap()
}

fn read(src: &ObjectSource, offset: u64, len: usize) -> Result<Fetched, uffd_pager::SourceError> {
    block_on(src.read(offset, len))
}

fn bytes(f: Fetched, len: usize) -> Vec<u8> {
    match f {
        Fetched::Data(b) => b,
        Fetched::Zero => vec![0; len],
    }
}

#[test]
fn the_source_serves_every_byte_fetching_each_chunk_once_and_zero_chunks_never() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-source");
    let data = image(16 * 16, 2);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let src = Arc::new(source(&proxy.endpoint(), "vm", CacheConfig::default()));
    proxy.clear();
    // 64 concurrent reads of pages of chunk 5: one GET.
    let cs = u64::from(CHUNK);
    let rt = uffd_store::io_runtime().unwrap();
    let reads: Vec<_> = (0..64u64)
        .map(|i| {
            let src = Arc::clone(&src);
            rt.spawn(async move { src.read(5 * cs + (i % 16) * 4096, 4096).await })
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let got = bytes(rt.block_on(r).unwrap().unwrap(), 4096);
        let at = 5 * cs as usize + (i % 16) * 4096;
        assert!(got == data[at..at + 4096], "read {i} differs");
    }
    let gets = |p: &Proxy| p.seen().iter().filter(|s| s.method == "GET").count();
    assert_eq!(gets(&proxy), 1, "single flight: {:?}", proxy.seen());
    assert_eq!(src.stats().gets, 1);
    // The zero chunk: no request at all.
    assert_eq!(read(&src, 2 * cs, 8192).unwrap(), Fetched::Zero);
    assert_eq!(gets(&proxy), 1);
    // A read spanning chunks, and then every byte.
    let got = bytes(read(&src, cs - 4096, 3 * 4096).unwrap(), 3 * 4096);
    assert!(got == data[cs as usize - 4096..cs as usize + 8192]);
    for c in 0..16u64 {
        let got = bytes(read(&src, c * cs, cs as usize).unwrap(), cs as usize);
        assert!(
            got == data[(c * cs) as usize..((c + 1) * cs) as usize],
            "chunk {c}"
        );
    }
    assert_eq!(gets(&proxy), 15, "each non-zero chunk fetched once");
    // Past the end: refused, not fetched.
    assert!(read(&src, data.len() as u64 - 4096, 8192).is_err());
}

#[test]
fn injected_5xx_and_lost_connections_are_retried() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-5xx");
    let data = image(4 * 16, 0);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let src = source(&proxy.endpoint(), "vm", CacheConfig::default());
    proxy.fail_next(3);
    let cs = u64::from(CHUNK);
    let got = bytes(read(&src, cs, 4096).unwrap(), 4096);
    assert!(got == data[cs as usize..cs as usize + 4096]);
    let injected = proxy.seen().iter().filter(|s| s.injected.is_some()).count();
    assert_eq!(injected, 3, "{:?}", proxy.seen());
    // Down for a while, then up: the fetch in between completes.
    proxy.set_down(true);
    let started = Instant::now();
    let p = &proxy;
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            p.set_down(false);
        });
        let got = bytes(read(&src, 2 * cs, 4096).unwrap(), 4096);
        assert!(got == data[2 * cs as usize..2 * cs as usize + 4096]);
    });
    assert!(started.elapsed() >= Duration::from_millis(700));
}

#[test]
fn a_corrupt_chunk_is_fetched_again_and_past_the_timeout_fails_without_hanging() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-corrupt");
    let data = image(4 * 16, 0);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let timeout = Duration::from_secs(3);
    let src = Arc::new(source(
        &s3.endpoint(),
        "vm",
        CacheConfig {
            fetch_timeout: timeout,
            ..CacheConfig::default()
        },
    ));
    let cs = u64::from(CHUNK);
    let entry = *src.manifest().chunk_at(cs).unwrap();
    let object = s3.object_file(&format!("fleet/.chunks/{}", entry.hash));
    let good = std::fs::read(&object).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x5a;
    std::fs::write(&object, &bad).unwrap();

    // Corrupt for good: the read fails within the bound, and says why.
    let started = Instant::now();
    let err = read(&src, cs, 4096).unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.is_transient(), "{err}");
    assert!(src.stats().corrupt >= 2, "fetched again: {:?}", src.stats());
    assert_eq!(src.stats().failed, 1);
    // Asked again at once (as the engine does, page by page, after a
    // failed batch): it fails at once instead of waiting out the timeout.
    let again = Instant::now();
    assert!(read(&src, cs + 4096, 4096).is_err());
    assert!(
        again.elapsed() < Duration::from_millis(500),
        "{:?}",
        again.elapsed()
    );
    assert_eq!(src.stats().failed, 1, "no second fetch");
    std::thread::sleep(Duration::from_millis(1100));

    // Corrupt at first, repaired while retrying: the read succeeds.
    let before = src.stats().corrupt;
    std::thread::scope(|s| {
        let (src, object) = (&src, &object);
        let good = &good;
        s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while src.stats().corrupt == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::fs::write(object, good).unwrap();
        });
        let got = bytes(read(src, cs, 4096).unwrap(), 4096);
        assert!(got == data[cs as usize..cs as usize + 4096]);
    });
    assert!(src.stats().corrupt > before);
}

#[test]
fn a_store_slower_than_the_fetch_timeout_fails_the_read_in_bounded_time() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-slow");
    let data = image(2 * 16, 0);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let timeout = Duration::from_secs(1);
    let src = source(
        &proxy.endpoint(),
        "vm",
        CacheConfig {
            fetch_timeout: timeout,
            ..CacheConfig::default()
        },
    );
    proxy.set_delay(Duration::from_secs(30));
    let started = Instant::now();
    let err = read(&src, u64::from(CHUNK), 4096).unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}: {err}",
        started.elapsed()
    );
    // A small delay is only slower (once the chunk given up on may be
    // tried again, a second later).
    proxy.set_delay(Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(1100));
    let got = bytes(read(&src, u64::from(CHUNK), 4096).unwrap(), 4096);
    assert!(got == data[CHUNK as usize..CHUNK as usize + 4096]);
}

#[test]
fn the_cache_directory_survives_a_restart_and_bad_files_in_it_are_fetched_again() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-cache");
    let data = image(8 * 16, 1);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let cache = dir.path("cache");
    let config = CacheConfig {
        dir: Some(cache.clone()),
        ..CacheConfig::default()
    };
    let cs = u64::from(CHUNK);
    {
        let src = source(&proxy.endpoint(), "vm", config.clone());
        for c in 0..8u64 {
            read(&src, c * cs, 4096).unwrap();
        }
        assert_eq!(src.stats().gets, 7);
    }
    // "Restarted": a new source over the same directory, the store down.
    let files = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(files, 7, "one file per fetched chunk");
    let src = source(&proxy.endpoint(), "vm", config.clone());
    // Corrupt one cached file: it is dropped and fetched again.
    let victim = *source(&s3.endpoint(), "vm", CacheConfig::default())
        .manifest()
        .chunk_at(3 * cs)
        .unwrap();
    std::fs::write(cache.join(victim.hash.to_hex()), b"garbage").unwrap();
    proxy.clear();
    for c in 0..8u64 {
        let got = bytes(read(&src, c * cs, cs as usize).unwrap(), cs as usize);
        assert!(
            got == data[(c * cs) as usize..((c + 1) * cs) as usize],
            "chunk {c}"
        );
    }
    let stats = src.stats();
    assert_eq!(stats.disk_hits, 6, "{stats:?}");
    assert_eq!(
        stats.gets, 1,
        "only the bad file is fetched again: {stats:?}"
    );
    assert_eq!(stats.corrupt, 1);
    let gets = proxy.seen().iter().filter(|s| s.method == "GET").count();
    assert_eq!(gets, 1);
}

#[test]
fn a_bounded_cache_directory_evicts_the_least_recently_used_chunks() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-evict");
    let data = image(8 * 16, 7);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let cache = dir.path("cache");
    let cs = u64::from(CHUNK);
    let src = source(
        &s3.endpoint(),
        "vm",
        CacheConfig {
            dir: Some(cache.clone()),
            dir_bytes: 3 * cs,
            memory_bytes: 2 * cs,
            ..CacheConfig::default()
        },
    );
    for c in 0..7u64 {
        read(&src, c * cs, 4096).unwrap();
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);
    // Chunk 0 was evicted from both tiers: fetched again.
    read(&src, 0, 4096).unwrap();
    assert_eq!(src.stats().gets, 8);
    // Chunk 6 is in memory still.
    read(&src, 6 * cs, 4096).unwrap();
    assert_eq!(src.stats().gets, 8);
    assert!(src.stats().memory_hits >= 1);
}

#[test]
fn a_missing_snapshot_and_a_hostile_manifest_are_refused() {
    let s3 = S3Server::start();
    let ep = s3.endpoint();
    let err = ObjectSource::open(location(&ep, "nope"), CacheConfig::default()).unwrap_err();
    assert!(err.to_string().contains("no snapshot"), "{err}");
    // A manifest whose entry count promises more than the object holds.
    let m = uffd_store::Manifest::new(CHUNK, u64::from(CHUNK) * 4, vec![]).unwrap();
    let mut bytes = m.encode();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let body = bytes.len() - 32;
    let sum = blake3::hash(&bytes[..body]);
    bytes[body..].copy_from_slice(sum.as_bytes());
    std::fs::create_dir_all(s3.object_file("fleet")).unwrap();
    std::fs::write(s3.object_file("fleet/evil"), &bytes).unwrap();
    let err = ObjectSource::open(location(&ep, "evil"), CacheConfig::default()).unwrap_err();
    assert!(err.to_string().contains("entries"), "{err}");
}

#[test]
fn a_snapshot_in_a_local_directory_works_the_same_way() {
    let dir = Scratch::new("store-file");
    let data = image(4 * 16, 2);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    let url = format!("file://{}", dir.path("store/vm").display());
    let loc = Location::open(&url, &StoreOptions::default()).unwrap();
    let report = block_on(snapshot::push(&file, &loc, CHUNK, &|_, _| {})).unwrap();
    assert_eq!(report.zero_chunks, 1);
    assert!(dir.path("store/.chunks").is_dir());
    let src = ObjectSource::open(loc, CacheConfig::default()).unwrap();
    let cs = u64::from(CHUNK);
    for c in 0..4u64 {
        let got = bytes(read(&src, c * cs, cs as usize).unwrap(), cs as usize);
        assert!(
            got == data[(c * cs) as usize..((c + 1) * cs) as usize],
            "chunk {c}"
        );
    }
    assert_eq!(src.stats().gets, 3);
}

#[test]
fn warming_fetches_a_working_sets_chunks_in_the_background_up_to_the_memory_bound() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-warm");
    let data = image(8 * 16, 4);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    push(&s3.endpoint(), "vm", &file);
    let cs = u64::from(CHUNK);
    let src = source(
        &s3.endpoint(),
        "vm",
        CacheConfig {
            memory_bytes: 3 * cs,
            ..CacheConfig::default()
        },
    );
    // Pages of chunks 6, 6, 4 (zero: nothing to fetch), 1, 0, 2: the
    // first three non-zero chunks fit.
    let pages = [6 * cs + 4096, 6 * cs, 4 * cs, cs + 8192, 0, 2 * cs];
    src.warm(pages, 8);
    let deadline = Instant::now() + Duration::from_secs(20);
    while src.stats().gets < 3 {
        assert!(
            Instant::now() < deadline,
            "warming stuck: {:?}",
            src.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.stats().gets, 3, "no more than the memory bound");
    for c in [6u64, 1, 0] {
        let got = bytes(read(&src, c * cs, 4096).unwrap(), 4096);
        assert!(got == data[(c * cs) as usize..(c * cs) as usize + 4096]);
    }
    assert_eq!(src.stats().gets, 3, "served from the warmed cache");
    assert_eq!(src.stats().memory_hits, 3);
}
