//! Snapshots against a real S3 server (s3s-fs on loopback, started here),
//! through a proxy that injects faults: push (zero pages, dedup against a
//! parent, working-set-first packing), pull, info, ls, version 1
//! manifests, hostile manifests and page indexes, and the page source's
//! cache, single-flight, warming, retries, corruption and timeouts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_pager::{AsyncPageSource, Content, Fetched, WorkingSet};
use uffd_store::snapshot::{self, stored_chunks};
use uffd_store::{CacheConfig, Location, ObjectSource, PushOptions, StoreOptions, ThenFill};
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

/// `pages` pages none of which is zero (so chunks are packed exactly as
/// the image's CHUNK-sized ranges are), with range `zero_chunk` made zero.
fn full_image(pages: usize, zero_chunk: Option<usize>) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    for (i, page) in data.chunks_mut(4096).enumerate() {
        uffd_testkit::page_pattern(i, page);
        page[8] = 0xee;
    }
    if let Some(z) = zero_chunk {
        let cs = CHUNK as usize;
        data[z * cs..(z + 1) * cs].fill(0);
    }
    data
}

fn push(endpoint: &str, name: &str, file: &std::path::Path) -> snapshot::PushReport {
    let loc = location(endpoint, name);
    block_on(snapshot::push(
        file,
        &loc,
        &PushOptions::new(CHUNK),
        &|_, _| {},
    ))
    .unwrap()
}

/// The hash of the chunk holding image byte `offset` of `src`'s snapshot.
fn chunk_hash_at(src: &ObjectSource, offset: u64) -> uffd_store::ChunkHash {
    let m = src.manifest();
    m.chunks()[m.extent_at(offset).unwrap().chunk as usize].hash
}

#[test]
fn push_omits_zero_pages_stores_identical_chunks_once_and_pulls_back_every_byte() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-push");
    let ep = s3.endpoint();
    // 640 pages: every 4th zero, and range 3 (16 pages) zero: 172 zero.
    let data = image(40 * 16, 3);
    let a = dir.path("a.mem");
    std::fs::write(&a, &data).unwrap();
    let first = push(&ep, "vm-a", &a);
    assert_eq!(first.pages, 640);
    assert_eq!(first.zero_pages, 172, "{first:?}");
    assert_eq!(first.new_pages, 468);
    // 468 pages packed 16 to a chunk.
    assert_eq!(first.unique_chunks, 30, "{first:?}");
    assert_eq!(first.uploaded_chunks, 30);
    assert_eq!(first.reused_chunks, 0);
    assert!(first.index_bytes > 640 * 16, "{first:?}");
    assert!(
        first.compressed_chunks > 0,
        "the pattern compresses: {first:?}"
    );
    let loc = location(&ep, "vm-a");
    let stored = block_on(stored_chunks(&*loc.store, &loc.folder())).unwrap();
    assert_eq!(stored.len(), 30, "one object per distinct chunk");

    // The same file again, without a parent: the same packing, the same
    // chunks, so nothing but the index and the manifest is uploaded.
    let again = push(&ep, "vm-again", &a);
    assert_eq!(again.uploaded_chunks, 0, "{again:?}");
    assert_eq!(again.reused_chunks, 30);
    assert_eq!(
        again.uploaded_bytes,
        again.manifest_bytes + again.index_bytes
    );
    let stored = block_on(stored_chunks(&*loc.store, &loc.folder())).unwrap();
    assert_eq!(stored.len(), 30, "shared chunks are stored once");

    let info = block_on(snapshot::info(&location(&ep, "vm-a"), true)).unwrap();
    assert_eq!(info.version, uffd_store::manifest::VERSION);
    assert_eq!(info.image_len, data.len() as u64);
    assert_eq!(info.zero_pages, 172);
    assert_eq!(info.chunks, 30);
    assert!((info.zero_share - 172.0 / 640.0).abs() < 1e-9, "{info:?}");
    assert_eq!(info.unique_bytes, 468 * 4096);
    assert_eq!(info.other_snapshots, Some(1));
    assert_eq!(info.shared_chunks, Some(30), "all shared with vm-again");
    assert_eq!(info.shared_bytes, Some(info.stored_bytes));

    let folder = Location::open(&format!("s3://{BUCKET}/fleet"), &options(&ep)).unwrap();
    let listed = block_on(snapshot::list(&folder)).unwrap();
    let names: Vec<_> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["vm-a", "vm-again"],
        "the chunk and index folders are not snapshots"
    );
    assert_eq!(listed[1].image_len, data.len() as u64);

    let out = dir.path("pulled.mem");
    let report = block_on(snapshot::pull(&location(&ep, "vm-a"), &out, &|_, _| {})).unwrap();
    assert_eq!(report.downloaded_chunks, 30);
    assert!(std::fs::read(&out).unwrap() == data, "pulled bytes differ");
}

/// Writes `data` to `name` in `dir` and pushes it as `name` with `options`
/// through `endpoint`.
fn push_with(
    endpoint: &str,
    dir: &Scratch,
    name: &str,
    data: &[u8],
    options: &PushOptions<'_>,
) -> Result<snapshot::PushReport, uffd_store::SnapshotError> {
    let file = dir.path(&format!("{name}.mem"));
    std::fs::write(&file, data).unwrap();
    block_on(snapshot::push(
        &file,
        &location(endpoint, name),
        options,
        &|_, _| {},
    ))
}

#[test]
fn a_push_against_a_parent_uploads_only_the_changed_pages_and_restores_exactly() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-parent");
    let ep = s3.endpoint();
    let base = image(40 * 16, 3);
    push_with(&ep, &dir, "base", &base, &PushOptions::new(CHUNK)).unwrap();
    // Five pages changed, scattered over the image; one zero page made
    // non-zero, one non-zero page made zero.
    let mut changed = base.clone();
    for page in [1usize, 77, 200, 333, 601] {
        changed[page * 4096 + 100] ^= 0x5a;
    }
    changed[11 * 4096] = 1;
    changed[500 * 4096..501 * 4096].fill(0);
    let parent = location(&proxy.endpoint(), "base");
    let folder = parent.folder();
    let before = block_on(stored_chunks(&*parent.store, &folder)).unwrap();
    proxy.clear();
    let r = push_with(
        &proxy.endpoint(),
        &dir,
        "child",
        &changed,
        &PushOptions {
            parent: Some(&parent),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap();
    assert_eq!(r.new_pages, 6, "five changed and one no longer zero: {r:?}");
    assert_eq!(r.zero_pages, 172, "{r:?}");
    assert_eq!(r.parent_pages, 640 - 172 - 6);
    assert_eq!(r.uploaded_chunks, 1, "six pages fit one chunk: {r:?}");
    assert_eq!(r.parent_chunks, 30, "{r:?}");
    // Downloaded: the parent's manifest and index, no chunk.
    let seen = proxy.seen();
    let count = |m: &str| seen.iter().filter(|s| s.method == m).count();
    let gets: Vec<_> = seen.iter().filter(|s| s.method == "GET").collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets.iter().all(|g| !g.target.contains("/.chunks/")),
        "{gets:?}"
    );
    let size = |key: &str| std::fs::metadata(s3.object_file(key)).unwrap().len();
    assert_eq!(
        r.downloaded_bytes,
        size("fleet/base") + size("fleet/.pages/base"),
        "{r:?}"
    );
    assert!(
        r.downloaded_bytes * 100 < changed.len() as u64,
        "under 1% of the image"
    );
    // Uploaded: one chunk, the index, the manifest; nothing else.
    assert_eq!(count("PUT"), 3, "{seen:?}");
    let after = block_on(stored_chunks(&*parent.store, &folder)).unwrap();
    let new: Vec<_> = after.iter().filter(|c| !before.contains(c)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        r.uploaded_bytes,
        new[0].1 + r.index_bytes + r.manifest_bytes
    );
    assert!(new[0].1 <= 6 * 4096);
    assert!(
        r.uploaded_bytes * 20 < changed.len() as u64,
        "under 5% of the image: {r:?}"
    );

    // Every byte back, through pull and through the page source.
    let out = dir.path("child.pulled");
    block_on(snapshot::pull(&location(&ep, "child"), &out, &|_, _| {})).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == changed,
        "pulled bytes differ"
    );
    let src = source(&ep, "child", CacheConfig::default());
    let got = bytes(read(&src, 0, changed.len()).unwrap(), changed.len());
    assert!(got == changed, "served bytes differ");
    // A grandchild against the child: unchanged pages keep pointing at
    // the base's chunks (through the child's table), nothing is uploaded.
    let g = push_with(
        &ep,
        &dir,
        "grandchild",
        &changed,
        &PushOptions {
            parent: Some(&location(&ep, "child")),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap();
    assert_eq!(g.new_pages, 0, "{g:?}");
    assert_eq!(g.uploaded_chunks, 0);
    let src = source(&ep, "grandchild", CacheConfig::default());
    assert!(bytes(read(&src, 0, changed.len()).unwrap(), changed.len()) == changed);

    // A grown image (three more pages and a partial one): the old pages
    // still come from the parent; the old last page was whole, so only the
    // four new ones are new. Shrunk back, the partial page is new only.
    let mut grown = changed.clone();
    let extra = full_image(644, None);
    grown.extend_from_slice(&extra[640 * 4096..643 * 4096 + 100]);
    let r = push_with(
        &ep,
        &dir,
        "grown",
        &grown,
        &PushOptions {
            parent: Some(&location(&ep, "child")),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap();
    assert_eq!(r.new_pages, 4, "{r:?}");
    assert_eq!(r.pages, 644);
    let src = source(&ep, "grown", CacheConfig::default());
    assert!(bytes(read(&src, 0, grown.len()).unwrap(), grown.len()) == grown);
    let shrunk = &grown[..642 * 4096 + 10];
    let r = push_with(
        &ep,
        &dir,
        "shrunk",
        shrunk,
        &PushOptions {
            parent: Some(&location(&ep, "grown")),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap();
    assert_eq!(r.new_pages, 1, "a page cut short is another page: {r:?}");
    let src = source(&ep, "shrunk", CacheConfig::default());
    assert!(bytes(read(&src, 0, shrunk.len()).unwrap(), shrunk.len()) == shrunk);

    // A parent in another folder cannot lend its chunks.
    let elsewhere = Location::open(&format!("s3://{BUCKET}/other/base"), &options(&ep)).unwrap();
    let err = push_with(
        &ep,
        &dir,
        "orphan",
        &changed,
        &PushOptions {
            parent: Some(&elsewhere),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("same folder") || err.to_string().contains("folder of"),
        "{err}"
    );
}

#[test]
fn a_damaged_or_foreign_page_index_is_refused_as_a_parent() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-bad-index");
    let ep = s3.endpoint();
    let data = image(8 * 16, 2);
    push_with(&ep, &dir, "base", &data, &PushOptions::new(CHUNK)).unwrap();
    push_with(
        &ep,
        &dir,
        "other",
        &image(4 * 16, 1),
        &PushOptions::new(CHUNK),
    )
    .unwrap();
    let index = s3.object_file("fleet/.pages/base");
    let good = std::fs::read(&index).unwrap();
    let try_push = || {
        push_with(
            &ep,
            &dir,
            "child",
            &data,
            &PushOptions {
                parent: Some(&location(&ep, "base")),
                ..PushOptions::new(CHUNK)
            },
        )
    };
    // Flipped bits: the checksum.
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&index, &bad).unwrap();
    let err = try_push().unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Resealed, but claiming another image length: refused by its size
    // before it is read, or by its header.
    let mut lying = good.clone();
    lying[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let body = lying.len() - 32;
    let sum = blake3::hash(&lying[..body]);
    lying[body..].copy_from_slice(sum.as_bytes());
    std::fs::write(&index, &lying).unwrap();
    assert!(try_push().is_err());
    // Another snapshot's index (of another length) and one left over from
    // an earlier push of another image under the same name.
    std::fs::write(
        &index,
        std::fs::read(s3.object_file("fleet/.pages/other")).unwrap(),
    )
    .unwrap();
    let err = try_push().unwrap_err();
    assert!(err.to_string().contains("page index"), "{err}");
    let mut stale = good.clone();
    stale[40] ^= 0xff; // the manifest checksum it names
    let body = stale.len() - 32;
    let sum = blake3::hash(&stale[..body]);
    stale[body..].copy_from_slice(sum.as_bytes());
    std::fs::write(&index, &stale).unwrap();
    let err = try_push().unwrap_err();
    assert!(err.to_string().contains("another manifest"), "{err}");
    // No index at all.
    std::fs::remove_file(&index).unwrap();
    let err = try_push().unwrap_err();
    assert!(err.to_string().contains("no page index"), "{err}");
    // Restored: the push goes through and nothing changed is uploaded.
    std::fs::write(&index, &good).unwrap();
    let r = try_push().unwrap();
    assert_eq!(r.new_pages, 0, "{r:?}");
}

#[test]
fn working_set_pages_are_packed_first_and_warming_them_fetches_only_their_chunks() {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new("store-ws");
    let data = image(16 * 16, 5);
    // Recorded order, scattered; page 7 is zero and page 85 in the zero
    // range (not stored), page 100 twice, and a 2-page run.
    let ws_pages: Vec<u64> = vec![200, 7, 33, 85, 100, 2, 100, 149, 150, 0, 4];
    let ws = WorkingSet::new(4096, ws_pages.iter().map(|p| p * 4096).collect())
        .with_source_len(data.len() as u64);
    let r = push_with(
        &s3.endpoint(),
        &dir,
        "vm",
        &data,
        &PushOptions {
            working_set: Some(&ws),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap();
    let stored: Vec<u64> = vec![200, 33, 100, 2, 149, 150, 0, 4];
    assert_eq!(r.working_set_pages, stored.len() as u64, "{r:?}");
    let src = source(&proxy.endpoint(), "vm", CacheConfig::default());
    let m = src.manifest();
    for (k, &p) in stored.iter().enumerate() {
        let e = m.extent_at(p * 4096).unwrap();
        assert_eq!(e.chunk, 0, "page {p} is in the first chunk");
        assert_eq!(
            u64::from(e.chunk_offset) + (p * 4096 - e.offset),
            k as u64 * 4096,
            "page {p} in recorded order"
        );
    }
    assert!(
        m.chunks()[0].len as usize == stored.len() * 4096,
        "the working set's chunk is its own"
    );
    proxy.clear();
    src.warm(ws.pages().iter().copied(), 8, ThenFill::No);
    wait_for_gets(&src, 1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.stats().gets, 1, "one chunk holds the whole working set");
    for &p in &ws_pages {
        let at = p as usize * 4096;
        let got = bytes(read(&src, p * 4096, 4096).unwrap(), 4096);
        assert!(got == data[at..at + 4096], "page {p}");
    }
    assert_eq!(src.stats().gets, 1, "served from the warmed chunk");
    // Background fill: every other chunk, in packed order.
    src.warm(std::iter::empty(), 8, ThenFill::Every(2));
    let n = m.chunks().len() as u64;
    wait_for_gets(&src, n);
    let got = bytes(read(&src, 0, data.len()).unwrap(), data.len());
    assert!(got == data, "every byte");
    assert_eq!(src.stats().gets, n, "each chunk once");
}

fn wait_for_gets(src: &ObjectSource, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while src.stats().gets < n {
        assert!(
            Instant::now() < deadline,
            "warming stuck: {:?}",
            src.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A version 1 snapshot, as the first layout wrote it: fixed chunks at
/// fixed offsets, entries for the non-zero ones.
fn push_v1(loc: &Location, data: &[u8]) {
    use object_store::ObjectStoreExt as _;
    let cs = CHUNK as usize;
    let mut entries = Vec::new();
    for (i, c) in data.chunks(cs).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let hash = uffd_store::ChunkHash::of(c);
        let e = uffd_store::chunk::encode(c);
        let code = u8::from(e.compression == uffd_store::Compression::Lz4);
        entries.push((
            (i * cs) as u64,
            c.len() as u32,
            e.stored.len() as u32,
            code,
            hash,
        ));
        block_on(loc.store.put(&loc.chunk_path(&hash), e.stored.into())).unwrap();
    }
    let mut m = Vec::new();
    m.extend_from_slice(b"UFFDSNAP");
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&CHUNK.to_le_bytes());
    m.extend_from_slice(&(data.len() as u64).to_le_bytes());
    m.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (offset, len, stored, code, hash) in &entries {
        m.extend_from_slice(&offset.to_le_bytes());
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&stored.to_le_bytes());
        m.push(*code);
        m.extend_from_slice(&[0; 3]);
        m.extend_from_slice(&hash.0);
    }
    let sum = blake3::hash(&m);
    m.extend_from_slice(sum.as_bytes());
    block_on(loc.store.put(&loc.path, m.into())).unwrap();
}

#[test]
fn version_1_snapshots_are_still_served_pulled_and_described() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-v1");
    let ep = s3.endpoint();
    let data = image(8 * 16 + 3, 2);
    let loc = location(&ep, "old");
    push_v1(&loc, &data);
    let info = block_on(snapshot::info(&loc, false)).unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.image_len, data.len() as u64);
    let src = source(&ep, "old", CacheConfig::default());
    let got = bytes(read(&src, 0, data.len()).unwrap(), data.len());
    assert!(got == data, "served bytes differ");
    let out = dir.path("old.pulled");
    block_on(snapshot::pull(&loc, &out, &|_, _| {})).unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    // It has no page index, so it cannot be a parent; said so.
    let err = push_with(
        &ep,
        &dir,
        "new",
        &data,
        &PushOptions {
            parent: Some(&loc),
            ..PushOptions::new(CHUNK)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("no page index"), "{err}");
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
fn the_source_serves_every_byte_fetching_each_chunk_once_and_zero_pages_never() {
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
    // The zero range: no request at all.
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
    // 180 non-zero pages, 16 to a chunk.
    assert_eq!(src.manifest().chunks().len(), 12);
    assert_eq!(gets(&proxy), 12, "each chunk fetched once");
    // Past the end: refused, not fetched.
    assert!(read(&src, data.len() as u64 - 4096, 8192).is_err());
    // Everything is in memory now: the synchronous path serves any range,
    // zero ranges included, without a request.
    let mut buf = vec![0xffu8; 5 * 4096];
    let at = 2 * cs - 8192;
    let got = src.read_cached(at, &mut buf).unwrap().unwrap();
    assert_eq!(got, Content::Data);
    assert!(buf == data[at as usize..at as usize + 5 * 4096]);
    assert_eq!(
        src.read_cached(2 * cs, &mut buf).unwrap().unwrap(),
        Content::Zero
    );
    assert!(src
        .read_cached(data.len() as u64, &mut buf)
        .unwrap()
        .is_err());
    assert_eq!(gets(&proxy), 12);
    assert!(src.is_cached(at, 5 * 4096));
    assert!(src.is_cached(0, data.len() as u64));
    assert!(
        !src.is_cached(data.len() as u64 - 4096, 8192),
        "past the end"
    );
    // A source that has fetched nothing has nothing ready but zeros.
    let cold = source(&proxy.endpoint(), "vm", CacheConfig::default());
    let opened = gets(&proxy);
    assert!(cold.read_cached(0, &mut buf).is_none());
    assert!(!cold.is_cached(0, 4096));
    assert!(cold.is_cached(2 * cs, 8192), "a zero range needs nothing");
    assert_eq!(gets(&proxy), opened, "asking costs no request");
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
    let object = s3.object_file(&format!("fleet/.chunks/{}", chunk_hash_at(&src, cs)));
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
    // No zero page: chunk k holds image range k (range 1 zero: none).
    let data = full_image(8 * 16, Some(1));
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
    let victim = chunk_hash_at(
        &source(&s3.endpoint(), "vm", CacheConfig::default()),
        3 * cs,
    );
    std::fs::write(cache.join(victim.to_hex()), b"garbage").unwrap();
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
    let data = full_image(8 * 16, Some(7));
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
    let reseal = |bytes: &mut Vec<u8>| {
        let body = bytes.len() - 32;
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(sum.as_bytes());
    };
    std::fs::create_dir_all(s3.object_file("fleet")).unwrap();
    // A manifest whose chunk count promises more than the object holds.
    let m = uffd_store::Manifest::new(CHUNK, u64::from(CHUNK) * 4, vec![], vec![]).unwrap();
    let mut bytes = m.encode();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal(&mut bytes);
    std::fs::write(s3.object_file("fleet/evil"), &bytes).unwrap();
    let err = ObjectSource::open(location(&ep, "evil"), CacheConfig::default()).unwrap_err();
    assert!(err.to_string().contains("chunks and"), "{err}");
    // One whose extent reaches past its chunk's bytes (a read there would
    // copy out of bounds): its last extent's length made larger.
    let data = image(4 * 16, 1);
    let dir = Scratch::new("store-evil");
    push_with(&ep, &dir, "vm", &data, &PushOptions::new(CHUNK)).unwrap();
    let mut bytes = std::fs::read(s3.object_file("fleet/vm")).unwrap();
    let len_at = bytes.len() - 32 - 20 + 8;
    bytes[len_at..len_at + 4].copy_from_slice(&(CHUNK * 2).to_le_bytes());
    reseal(&mut bytes);
    std::fs::write(s3.object_file("fleet/evil2"), &bytes).unwrap();
    let err = ObjectSource::open(location(&ep, "evil2"), CacheConfig::default()).unwrap_err();
    assert!(err.to_string().contains("extent"), "{err}");
}

#[test]
fn a_snapshot_in_a_local_directory_works_the_same_way() {
    let dir = Scratch::new("store-file");
    let data = image(4 * 16, 2);
    let file = dir.path("vm.mem");
    std::fs::write(&file, &data).unwrap();
    let url = format!("file://{}", dir.path("store/vm").display());
    let loc = Location::open(&url, &StoreOptions::default()).unwrap();
    let report = block_on(snapshot::push(
        &file,
        &loc,
        &PushOptions::new(CHUNK),
        &|_, _| {},
    ))
    .unwrap();
    assert_eq!(report.zero_pages, 16 + 12, "{report:?}");
    assert!(dir.path("store/.pages/vm").is_file());
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
    assert_eq!(src.stats().gets, 3, "36 non-zero pages in 3 chunks");
}

#[test]
fn warming_fetches_a_working_sets_chunks_in_the_background_up_to_the_memory_bound() {
    let s3 = S3Server::start();
    let dir = Scratch::new("store-warm");
    let data = full_image(8 * 16, Some(4));
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
    // Pages of ranges 6, 6, 4 (zero: nothing to fetch), 1, 0, 2: the
    // first three chunks fit.
    let pages = [6 * cs + 4096, 6 * cs, 4 * cs, cs + 8192, 0, 2 * cs];
    src.warm(pages, 8, ThenFill::No);
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
