//! Serving a snapshot from object storage: an [`AsyncPageSource`] that
//! fetches the chunk holding a faulting page into a host-wide cache.
//!
//! - A fault finds its page's extent by binary search (no allocation),
//!   fetches that extent's whole chunk and copies its pages out; a page in
//!   no extent is zero and costs no request.
//! - One fetch per chunk however many faults and VMs want it: concurrent
//!   readers of a chunk that is being fetched wait for that fetch
//!   (single-flight), and a fetched chunk is kept in a bounded memory
//!   cache (LRU by bytes), shared by every VM the server serves.
//! - With a cache directory, chunks are also kept on disk (LRU by bytes),
//!   so a restarted server starts warm; a file whose bytes do not hash to
//!   its name is deleted and fetched again.
//! - A chunk is one whole-object GET; 5xx answers, timeouts and lost
//!   connections are retried with backoff and jitter by `object_store`,
//!   and a chunk whose bytes do not match its hash is fetched again, all
//!   within the fetch timeout. Past it the read fails for good, so the
//!   engine poisons the pages (the VM gets SIGBUS on them): never a silent
//!   zero page, never a VM waiting forever.
//! - Warming goes chunk by chunk: a working set's chunks in the order its
//!   pages were recorded (pushed with `--working-set`, they are its own
//!   chunks, packed in that order), then, for background fill, every other
//!   chunk in the order the push packed them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use uffd_pager::{AsyncPageSource, Content, Fetched, ReadFuture, SourceError};

use crate::cache::{self, Lru};
use crate::chunk;
use crate::manifest::{ChunkHash, ChunkRef, Extent, Manifest};
use crate::snapshot::{read_manifest, SnapshotError};
use crate::store::Location;

/// Settings of an [`ObjectSource`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes of chunks kept in memory.
    pub memory_bytes: u64,
    /// A directory keeping chunks on disk across restarts.
    pub dir: Option<PathBuf>,
    /// Bytes of chunks kept in `dir`.
    pub dir_bytes: u64,
    /// How long one chunk may take, retries included, before its pages
    /// are given up (poisoned).
    pub fetch_timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 1 << 30,
            dir: None,
            dir_bytes: 16 << 30,
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// What an [`ObjectSource`] did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceStats {
    /// GET requests for chunks that completed (each may hide retries done
    /// by `object_store`).
    pub gets: u64,
    /// Bytes those GETs brought.
    pub fetched_bytes: u64,
    /// Chunks found in memory.
    pub memory_hits: u64,
    /// Chunks found in the cache directory.
    pub disk_hits: u64,
    /// Reads that waited for a fetch another read had started.
    pub joined: u64,
    /// Chunks that arrived (or were found on disk) not matching their hash.
    pub corrupt: u64,
    /// Chunks given up on: their pages are poisoned.
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    gets: AtomicU64,
    fetched_bytes: AtomicU64,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    joined: AtomicU64,
    corrupt: AtomicU64,
    failed: AtomicU64,
}

/// Why a chunk could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The store has no such chunk object: the snapshot is incomplete.
    #[error("chunk {hash} ({path}) is missing from the store: the snapshot is incomplete")]
    Missing {
        /// The chunk.
        hash: ChunkHash,
        /// Its object.
        path: String,
    },
    /// Not fetched correctly within the fetch timeout.
    #[error(
        "chunk {hash} could not be fetched within {timeout:?} ({attempts} attempts; last: {last})"
    )]
    GaveUp {
        /// The chunk.
        hash: ChunkHash,
        /// The bound.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The fetch task died.
    #[error("fetching chunk {hash} was abandoned: {why}")]
    Abandoned {
        /// The chunk.
        hash: ChunkHash,
        /// Why.
        why: String,
    },
}

type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

#[derive(Debug)]
struct State {
    memory: Lru<Bytes>,
    disk: Lru<()>,
    in_flight: HashMap<ChunkHash, Pending>,
    /// Chunks given up on recently, and why: the engine asks again page
    /// by page right after a failed batch, and those reads should fail at
    /// once rather than wait out another fetch timeout.
    gave_up: HashMap<ChunkHash, (std::time::Instant, FetchError)>,
}

/// How long a chunk given up on fails at once before it is tried again.
const GAVE_UP_FOR: Duration = Duration::from_secs(1);

struct Inner {
    location: Location,
    manifest: Manifest,
    config: CacheConfig,
    state: Mutex<State>,
    counters: Counters,
    handle: tokio::runtime::Handle,
    identity: String,
}

/// A memory image in object storage as a page source (see the module's
/// documentation). Wrap it in `uffd_pager::AsyncSource` to serve it.
pub struct ObjectSource {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSource")
            .field("url", &self.inner.location.url)
            .field("image_len", &self.inner.manifest.image_len())
            .field("chunks", &self.inner.manifest.chunks().len())
            .field("extents", &self.inner.manifest.extents().len())
            .finish()
    }
}

impl Drop for ObjectSource {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            uffd_pager::drop_runtime(rt);
        }
    }
}

/// The runtime the store's requests, hashing and cache files run on.
pub fn io_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .thread_name("uffd-store-io")
        .enable_all()
        .build()
}

impl ObjectSource {
    /// Reads the snapshot's manifest at `location` and prepares to serve
    /// it. With a cache directory, creates it if needed and learns what it
    /// holds (verified when each chunk is first used).
    pub fn open(location: Location, config: CacheConfig) -> Result<ObjectSource, SnapshotError> {
        let runtime = io_runtime().map_err(|e| SnapshotError::Io {
            what: "starting the store's runtime".into(),
            source: e,
        })?;
        let manifest = runtime.block_on(read_manifest(&location))?;
        let mut disk = Lru::new(config.dir_bytes);
        if let Some(dir) = &config.dir {
            let io = |what: &str, source| SnapshotError::Io {
                what: format!("{what} {}", dir.display()),
                source,
            };
            std::fs::create_dir_all(dir).map_err(|e| io("creating the cache directory", e))?;
            for (hash, len) in
                cache::scan_dir(dir).map_err(|e| io("reading the cache directory", e))?
            {
                for (old, ()) in disk.insert(hash, (), len) {
                    let _ = std::fs::remove_file(cache::chunk_file(dir, &old));
                }
            }
            tracing::info!(dir = %dir.display(), chunks = disk.len(), bytes = disk.used(), "chunk cache directory opened");
        }
        let identity = format!("{} (manifest {})", location.url, manifest.checksum());
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                memory: Lru::new(config.memory_bytes),
                disk,
                in_flight: HashMap::new(),
                gave_up: HashMap::new(),
            }),
            location,
            manifest,
            config,
            counters: Counters::default(),
            handle: runtime.handle().clone(),
            identity,
        });
        Ok(ObjectSource {
            inner,
            runtime: Some(runtime),
        })
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// Names the snapshot exactly (URL and manifest checksum), so a server
    /// taking over VMs can tell it serves the same one.
    pub fn identity(&self) -> String {
        self.inner.identity.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> SourceStats {
        let c = &self.inner.counters;
        SourceStats {
            gets: c.gets.load(Relaxed),
            fetched_bytes: c.fetched_bytes.load(Relaxed),
            memory_hits: c.memory_hits.load(Relaxed),
            disk_hits: c.disk_hits.load(Relaxed),
            joined: c.joined.load(Relaxed),
            corrupt: c.corrupt.load(Relaxed),
            failed: c.failed.load(Relaxed),
        }
    }
}

/// What warming fetches after the chunks of the pages it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThenFill {
    /// Nothing.
    No,
    /// Every other chunk, in the order the push packed them, this many in
    /// flight (background fill: fewer than for the working set, so faults
    /// keep most of the link).
    Every(usize),
}

/// Chunk fetches in flight at once for [`ThenFill::Every`], by default.
pub const FILL_IN_FLIGHT: usize = 4;

impl ObjectSource {
    /// Starts fetching the chunks that hold the image bytes at `offsets`
    /// (a working set's pages, say) into the cache, `parallel` at a time,
    /// in the background, in the order given; then, with
    /// [`ThenFill::Every`], the other chunks in packed order. Returns at
    /// once. Stops at as many chunks as the memory cache holds (more would
    /// evict the first before they are used). Reads of those chunks
    /// meanwhile join these fetches.
    pub fn warm(&self, offsets: impl IntoIterator<Item = u64>, parallel: usize, then: ThenFill) {
        let manifest = &self.inner.manifest;
        let mut seen = vec![false; manifest.chunks().len()];
        let mut room = self.inner.config.memory_bytes;
        let mut first = Vec::new();
        let mut full = false;
        let mut take = |k: u32, into: &mut Vec<ChunkRef>| {
            if full || std::mem::replace(&mut seen[k as usize], true) {
                return;
            }
            let chunk = manifest.chunks()[k as usize];
            match room.checked_sub(u64::from(chunk.len)) {
                Some(left) => {
                    room = left;
                    into.push(chunk);
                }
                None => full = true,
            }
        };
        for offset in offsets {
            if let Some(e) = manifest.extent_at(offset) {
                take(e.chunk, &mut first);
            }
        }
        let mut rest = Vec::new();
        if let ThenFill::Every(_) = then {
            for k in 0..manifest.chunks().len() {
                take(k as u32, &mut rest);
            }
        }
        let inner = Arc::clone(&self.inner);
        self.inner.handle.spawn(async move {
            let inner: &Arc<Inner> = &inner;
            let fetch_all = move |chunks: Vec<ChunkRef>, parallel: usize| {
                futures::stream::iter(chunks).for_each_concurrent(parallel.max(1), move |chunk| {
                    async move {
                        // Failures are logged by the fetch; a fault on those
                        // pages later tries again.
                        let _ = inner.chunk(chunk).await;
                    }
                })
            };
            let started = std::time::Instant::now();
            let n = first.len();
            fetch_all(first, parallel).await;
            tracing::info!(
                chunks = n,
                seconds = started.elapsed().as_secs_f64(),
                "working set's chunks fetched into the cache"
            );
            if let ThenFill::Every(parallel) = then {
                let n = rest.len();
                fetch_all(rest, parallel).await;
                tracing::info!(
                    chunks = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "every chunk fetched into the cache"
                );
            }
        });
    }

    /// True when every chunk holding `offset..offset + len` is in the
    /// memory cache (or the range is all zero): [`ObjectSource::read_cached`]
    /// will then most likely produce it. One lock, no allocation, the
    /// cache's order unchanged.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        let inner = &self.inner;
        let Some(end) = offset
            .checked_add(len)
            .filter(|&end| end <= inner.manifest.image_len())
        else {
            return false;
        };
        let extents = inner.manifest.extents_in(offset, end);
        if extents.is_empty() {
            return true;
        }
        let state = inner.state.lock().expect("cache lock");
        extents.iter().all(|e| {
            state
                .memory
                .contains(&inner.manifest.chunks()[e.chunk as usize].hash)
        })
    }

    /// Copies image bytes `offset..offset + buf.len()` into `buf` if every
    /// chunk they need is in the memory cache: the synchronous fast path,
    /// one lock and no allocation. `None` when a chunk is missing (read
    /// with [`AsyncPageSource::read`] then); `Content::Zero` (with `buf`
    /// untouched) when the bytes are all zero.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Content, SourceError>> {
        let inner = &self.inner;
        let end = match inner.range(offset, buf.len()) {
            Ok(end) => end,
            Err(e) => return Some(Err(e)),
        };
        let extents = inner.manifest.extents_in(offset, end);
        if extents.is_empty() {
            return Some(Ok(Content::Zero));
        }
        let mut state = inner.state.lock().expect("cache lock");
        let mut filled = offset;
        for e in extents {
            let chunk = &inner.manifest.chunks()[e.chunk as usize];
            let bytes = state.memory.get(&chunk.hash)?;
            let (lo, hi) = (e.offset.max(offset), e.end().min(end));
            buf[(filled - offset) as usize..(lo - offset) as usize].fill(0);
            if let Err(e) = copy_out(e, &bytes, lo, hi, &mut buf[(lo - offset) as usize..]) {
                return Some(Err(e));
            }
            filled = hi;
        }
        drop(state);
        buf[(filled - offset) as usize..].fill(0);
        inner.counters.memory_hits.fetch_add(1, Relaxed);
        Some(Ok(Content::Data))
    }
}

/// Copies image bytes `lo..hi` of extent `e` from its chunk's `bytes` to
/// the start of `out`. The manifest was validated against the chunk's
/// length and the chunk's bytes against it, so this cannot fail on a
/// well-formed cache; it refuses rather than panics all the same.
fn copy_out(e: &Extent, bytes: &[u8], lo: u64, hi: u64, out: &mut [u8]) -> Result<(), SourceError> {
    let n = (hi - lo) as usize;
    let from = e.chunk_offset as usize + (lo - e.offset) as usize;
    match bytes.get(from..from + n) {
        Some(part) => {
            out[..n].copy_from_slice(part);
            Ok(())
        }
        None => Err(SourceError::Failed {
            offset: lo,
            len: n as u64,
            source: std::io::Error::other(format!(
                "chunk {} holds {} bytes, the extent needs {}..{}",
                e.chunk,
                bytes.len(),
                from,
                from + n
            )),
        }),
    }
}

impl Inner {
    /// The end of `offset..offset + len`, if it lies inside the image.
    fn range(&self, offset: u64, len: usize) -> Result<u64, SourceError> {
        offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.manifest.image_len())
            .ok_or(SourceError::OutOfRange {
                offset,
                len: len as u64,
                size: self.manifest.image_len(),
            })
    }

    /// The bytes of `entry`'s chunk: from memory, from a fetch in flight,
    /// or from a new fetch (disk first, then the store).
    async fn chunk(self: &Arc<Self>, entry: ChunkRef) -> Result<Bytes, FetchError> {
        let pending = {
            let mut state = self.state.lock().expect("cache lock");
            if let Some(bytes) = state.memory.get(&entry.hash) {
                self.counters.memory_hits.fetch_add(1, Relaxed);
                return Ok(bytes);
            }
            if let Some((when, e)) = state.gave_up.get(&entry.hash) {
                if when.elapsed() < GAVE_UP_FOR {
                    return Err(e.clone());
                }
                state.gave_up.remove(&entry.hash);
            }
            if let Some(p) = state.in_flight.get(&entry.hash) {
                self.counters.joined.fetch_add(1, Relaxed);
                p.clone()
            } else {
                let me = Arc::clone(self);
                // A task of its own: the fetch goes on (and fills the
                // cache) even if the read that started it is dropped.
                let task = self.handle.spawn(async move { me.load(entry).await });
                let hash = entry.hash;
                let p = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(FetchError::Abandoned {
                            hash,
                            why: e.to_string(),
                        })
                    })
                }
                .boxed()
                .shared();
                state.in_flight.insert(entry.hash, p.clone());
                p
            }
        };
        pending.await
    }

    async fn load(self: Arc<Self>, entry: ChunkRef) -> Result<Bytes, FetchError> {
        let mut result = match self.read_disk(entry).await {
            Some(bytes) => Ok(bytes),
            None => self.fetch(entry).await,
        };
        if let Ok(bytes) = &result {
            self.write_disk(entry, bytes.clone()).await;
        }
        let mut state = self.state.lock().expect("cache lock");
        match &mut result {
            Ok(bytes) => {
                state
                    .memory
                    .insert(entry.hash, bytes.clone(), bytes.len() as u64);
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Relaxed);
                state
                    .gave_up
                    .insert(entry.hash, (std::time::Instant::now(), e.clone()));
                tracing::error!(chunk = %entry.hash, len = entry.len, "giving up on a chunk; its pages will be poisoned: {e}");
            }
        }
        // Under the same lock as the insertion: a reader sees the chunk in
        // memory or in flight, never neither.
        state.in_flight.remove(&entry.hash);
        result
    }

    async fn read_disk(&self, entry: ChunkRef) -> Option<Bytes> {
        let dir = self.config.dir.clone()?;
        let known = self
            .state
            .lock()
            .expect("cache lock")
            .disk
            .get(&entry.hash)
            .is_some();
        if !known {
            return None;
        }
        let path = cache::chunk_file(&dir, &entry.hash);
        let checked = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
            chunk::verify(&entry, &bytes).map_err(|e| e.to_string())?;
            Ok::<_, String>(Bytes::from(bytes))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match checked {
            Ok(bytes) => {
                self.counters.disk_hits.fetch_add(1, Relaxed);
                Some(bytes)
            }
            Err(why) => {
                self.counters.corrupt.fetch_add(1, Relaxed);
                tracing::warn!(chunk = %entry.hash, "dropping a cached chunk file ({why}); fetching it again");
                self.state
                    .lock()
                    .expect("cache lock")
                    .disk
                    .remove(&entry.hash);
                let _ = std::fs::remove_file(cache::chunk_file(&dir, &entry.hash));
                None
            }
        }
    }

    async fn write_disk(&self, entry: ChunkRef, bytes: Bytes) {
        let Some(dir) = self.config.dir.clone() else {
            return;
        };
        let written = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || {
                let path = cache::chunk_file(&dir, &entry.hash);
                let tmp = dir.join(format!("{}.{}.tmp", entry.hash, std::process::id()));
                std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path))
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = written {
            tracing::warn!(dir = %dir.display(), "writing a chunk to the cache directory failed: {e}");
            return;
        }
        let evicted = self.state.lock().expect("cache lock").disk.insert(
            entry.hash,
            (),
            u64::from(entry.len),
        );
        for (old, ()) in evicted {
            let _ = std::fs::remove_file(cache::chunk_file(&dir, &old));
        }
    }

    async fn fetch(&self, entry: ChunkRef) -> Result<Bytes, FetchError> {
        let timeout = self.config.fetch_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let path = self.location.chunk_path(&entry.hash);
        let mut jitter = Jitter::new(&entry.hash);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let got = tokio::time::timeout_at(deadline, async {
                let r = self.location.store.get(&path).await?;
                if r.meta.size != u64::from(entry.stored_len) {
                    // Refused before downloading: the allocation stays
                    // bounded by the manifest's (validated) sizes.
                    return Ok(Err(format!(
                        "the object is {} bytes, the manifest says {}",
                        r.meta.size, entry.stored_len
                    )));
                }
                r.bytes().await.map(Ok)
            })
            .await;
            let last = match got {
                Err(_) => "timed out".to_string(),
                Ok(Err(object_store::Error::NotFound { .. })) => {
                    return Err(FetchError::Missing {
                        hash: entry.hash,
                        path: path.to_string(),
                    })
                }
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(Err(why))) => {
                    self.counters.corrupt.fetch_add(1, Relaxed);
                    why
                }
                Ok(Ok(Ok(stored))) => {
                    self.counters.gets.fetch_add(1, Relaxed);
                    self.counters
                        .fetched_bytes
                        .fetch_add(stored.len() as u64, Relaxed);
                    let decoded =
                        tokio::task::spawn_blocking(move || chunk::decode(&entry, stored))
                            .await
                            .map_err(|e| e.to_string());
                    match decoded {
                        Ok(Ok(bytes)) => return Ok(bytes),
                        Ok(Err(e)) => {
                            self.counters.corrupt.fetch_add(1, Relaxed);
                            tracing::warn!(chunk = %entry.hash, attempt = attempts, "{e}; fetching it again");
                            e.to_string()
                        }
                        Err(e) => e,
                    }
                }
            };
            let pause = jitter.backoff(attempts);
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(FetchError::GaveUp {
                    hash: entry.hash,
                    timeout,
                    attempts,
                    last,
                });
            }
            tracing::debug!(chunk = %entry.hash, attempt = attempts, ?pause, "chunk fetch failed ({last}); retrying");
            tokio::time::sleep(pause).await;
        }
    }
}

/// Exponential backoff from 50 ms up to 2 s, each pause drawn uniformly
/// from its upper half (so many chunks failing together do not retry in
/// lockstep). `object_store` does the same for each request; this is the
/// loop around it, for corrupt chunks and errors it gave up on.
struct Jitter(u64);

impl Jitter {
    fn new(hash: &ChunkHash) -> Jitter {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        let seed = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes")) ^ nanos;
        Jitter(seed | 1)
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let cap_ms = (50u64 << attempt.min(6)).min(2000);
        Duration::from_millis(cap_ms / 2 + self.0 % (cap_ms / 2 + 1))
    }
}

impl AsyncPageSource for ObjectSource {
    fn len(&self) -> u64 {
        self.inner.manifest.image_len()
    }

    fn is_ready(&self, offset: u64, len: u64) -> bool {
        self.is_cached(offset, len)
    }

    fn read_ready(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Content, SourceError>> {
        self.read_cached(offset, buf)
    }

    fn read(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let end = inner.range(offset, len)?;
            let manifest = &inner.manifest;
            let extents = manifest.extents_in(offset, end);
            if extents.is_empty() {
                return Ok(Fetched::Zero);
            }
            let failed = |source: FetchError| SourceError::Failed {
                offset,
                len: len as u64,
                source: std::io::Error::other(source),
            };
            let copy = |e: &Extent, bytes: &[u8], buf: &mut [u8]| {
                let (lo, hi) = (e.offset.max(offset), e.end().min(end));
                copy_out(e, bytes, lo, hi, &mut buf[(lo - offset) as usize..])
            };
            let mut buf = vec![0u8; len];
            // A fault's page is in one extent, or a few of one chunk: one
            // fetch, awaited directly, nothing allocated but the page. A
            // larger read needing several chunks fetches them all at once.
            let first = extents[0].chunk;
            if extents.iter().all(|e| e.chunk == first) {
                let chunk = manifest.chunks()[first as usize];
                let bytes = inner.chunk(chunk).await.map_err(failed)?;
                for e in extents {
                    copy(e, &bytes, &mut buf)?;
                }
            } else {
                let mut wanted: Vec<u32> = extents.iter().map(|e| e.chunk).collect();
                wanted.sort_unstable();
                wanted.dedup();
                let inner = &inner;
                let fetched = futures::future::try_join_all(
                    wanted
                        .iter()
                        .map(|&k| async move { inner.chunk(manifest.chunks()[k as usize]).await }),
                )
                .await
                .map_err(failed)?;
                for e in extents {
                    // `wanted` is sorted and holds every extent's chunk.
                    let at = wanted
                        .binary_search(&e.chunk)
                        .expect("every chunk was fetched");
                    copy(e, &fetched[at], &mut buf)?;
                }
            }
            Ok(Fetched::Data(buf))
        })
    }

    fn io_size(&self) -> usize {
        self.inner.manifest.chunk_size() as usize
    }

    fn describe(&self) -> String {
        let m = &self.inner.manifest;
        format!(
            "{} ({} bytes, {} in {} extents of {} chunks packed to {} KiB)",
            self.inner.location.url,
            m.image_len(),
            m.data_bytes(),
            m.extents().len(),
            m.chunks().len(),
            m.chunk_size() >> 10
        )
    }
}
