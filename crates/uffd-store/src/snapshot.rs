//! Pushing a memory file as a snapshot, pulling it back, and describing
//! what a store holds.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use uffd_pager::WorkingSet;

use crate::chunk;
use crate::manifest::{
    check_header, ChunkHash, ChunkRef, Compression, Extent, Manifest, ManifestError,
    MAX_MANIFEST_LEN, PAGE_SIZE,
};
use crate::pages::{index_len, page_hash, PageHash, PageIndex, PageIndexError, ZERO_PAGE};
use crate::store::{Location, StoreError, CHUNK_DIR, PAGES_DIR};

/// Chunk uploads or downloads in flight at once.
pub const TRANSFERS_IN_FLIGHT: usize = 16;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No manifest at the URL.
    #[error("no snapshot at {0}")]
    NotFound(String),
    /// A request failed (after `object_store`'s retries).
    #[error("{what}: {source}")]
    Request {
        /// The step.
        what: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The manifest is invalid.
    #[error("the manifest of {url} is unusable: {source}")]
    Manifest {
        /// The snapshot.
        url: String,
        /// Why.
        source: ManifestError,
    },
    /// The page index is invalid.
    #[error("the page index of {url} is unusable: {source}")]
    Index {
        /// The snapshot.
        url: String,
        /// Why.
        source: PageIndexError,
    },
    /// The snapshot has no page index (pushed by an older version, or too
    /// large), so it cannot be a parent.
    #[error("{0} has no page index (pushed by an older uffd?): it cannot be a --parent; push without --parent, or push it again first")]
    NoIndex(String),
    /// A chunk is not what the manifest says.
    #[error("{0}")]
    Chunk(#[from] chunk::ChunkError),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

fn request(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Request { what, source }
}

/// Reads and validates the manifest at `location`; one larger than
/// [`MAX_MANIFEST_LEN`] is refused before it is downloaded.
pub async fn read_manifest(location: &Location) -> Result<Manifest, SnapshotError> {
    Ok(read_manifest_sized(location).await?.0)
}

/// [`read_manifest`], and the manifest object's length.
async fn read_manifest_sized(location: &Location) -> Result<(Manifest, u64), SnapshotError> {
    let got = match location.store.get(&location.path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(SnapshotError::NotFound(location.url.clone()))
        }
        Err(e) => return Err(request(format!("reading the manifest {}", location.url))(e)),
    };
    let invalid = |source| SnapshotError::Manifest {
        url: location.url.clone(),
        source,
    };
    if got.meta.size > MAX_MANIFEST_LEN {
        return Err(invalid(ManifestError::Size {
            len: got.meta.size,
            why: "larger than any manifest this build accepts",
        }));
    }
    let bytes = got
        .bytes()
        .await
        .map_err(request(format!("reading the manifest {}", location.url)))?;
    Ok((
        Manifest::decode(&bytes).map_err(invalid)?,
        bytes.len() as u64,
    ))
}

/// Reads and validates the page index of the snapshot at `location`,
/// which must belong to `manifest`; refused by its size (which the
/// manifest fixes) before it is downloaded. Returns it and its length.
pub async fn read_index(
    location: &Location,
    manifest: &Manifest,
) -> Result<(PageIndex, u64), SnapshotError> {
    let path = location.index_path()?;
    let invalid = |source| SnapshotError::Index {
        url: location.url.clone(),
        source,
    };
    let want = index_len(manifest.image_len()).ok_or_else(|| {
        invalid(PageIndexError::Mismatch(format!(
            "an image of {} bytes is too large to have a page index",
            manifest.image_len()
        )))
    })?;
    let got = match location.store.get(&path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(SnapshotError::NoIndex(location.url.clone()))
        }
        Err(e) => {
            return Err(request(format!(
                "reading the page index of {}",
                location.url
            ))(e))
        }
    };
    if got.meta.size != want {
        return Err(invalid(PageIndexError::Size {
            len: got.meta.size,
            why: format!("the manifest's image needs an index of {want} bytes"),
        }));
    }
    let bytes = got.bytes().await.map_err(request(format!(
        "reading the page index of {}",
        location.url
    )))?;
    let index = PageIndex::decode(&bytes).map_err(invalid)?;
    if index.image_len() != manifest.image_len() || index.manifest() != manifest.checksum() {
        return Err(invalid(PageIndexError::Mismatch(
            "it belongs to another manifest (left over from an earlier push under this name?)"
                .into(),
        )));
    }
    Ok((index, want))
}

/// Called with (bytes done, bytes in all) as a transfer goes on.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// How to push.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions<'a> {
    /// The size to pack chunks to: a power of two from 4 KiB to 64 MiB.
    pub chunk_size: u32,
    /// A snapshot in the same folder to dedup against page by page: pages
    /// it holds unchanged are referenced in its chunks, not stored again.
    pub parent: Option<&'a Location>,
    /// Pages to pack first, in this order, into chunks of their own (a
    /// working set recorded by `uffd serve --record`), so that prefetching
    /// them downloads about their own bytes.
    pub working_set: Option<&'a WorkingSet>,
}

impl PushOptions<'_> {
    /// Chunks of `chunk_size`, no parent, no working set.
    pub fn new(chunk_size: u32) -> PushOptions<'static> {
        PushOptions {
            chunk_size,
            parent: None,
            working_set: None,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    /// The snapshot's URL.
    pub url: String,
    /// The parent's URL, with `--parent`.
    pub parent: Option<String>,
    /// The image's length.
    pub image_len: u64,
    /// The size chunks were packed to.
    pub chunk_size: u32,
    /// 4 KiB pages in the image.
    pub pages: u64,
    /// Of them, all zero (not stored).
    pub zero_pages: u64,
    /// Pages found unchanged in the parent, referenced in its chunks.
    pub parent_pages: u64,
    /// Pages packed into new chunks.
    pub new_pages: u64,
    /// Of the new pages, those packed first for the working set.
    pub working_set_pages: u64,
    /// Extents in the manifest.
    pub extents: u64,
    /// Distinct chunks the manifest names.
    pub unique_chunks: u64,
    /// Of them, the parent's.
    pub parent_chunks: u64,
    /// Of them, chunks the store already held (not uploaded).
    pub reused_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Uploaded chunks stored compressed.
    pub compressed_chunks: u64,
    /// Bytes uploaded: chunk objects (compressed where that helped), the
    /// page index and the manifest.
    pub uploaded_bytes: u64,
    /// Of them, the manifest's.
    pub manifest_bytes: u64,
    /// Of them, the page index's (0 for an image too large to index).
    pub index_bytes: u64,
    /// Bytes downloaded: the parent's manifest and page index.
    pub downloaded_bytes: u64,
}

/// Where a page's bytes come from in the new manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Zero,
    /// Chunk `chunk` of the parent's table, at `at`.
    Parent {
        chunk: u32,
        at: u32,
    },
    /// Not stored yet: to be packed into a new chunk.
    ToPack,
    /// Packed: chunk `chunk` of this push's packing, at `at`.
    New {
        chunk: u32,
        at: u32,
    },
}

/// Bytes read at once while hashing the pages.
const SCAN_BLOCK: u64 = 4 << 20;

/// Pushes memory file `file` to `location`: every page is hashed; zero
/// pages are not stored; with a parent, pages it holds unchanged are
/// referenced in its chunks; the other pages are packed (the working set's
/// first, in its order, then the rest in image order) into chunks of up to
/// `chunk_size`, each stored once under its blake3 hash in the folder's
/// `.chunks/` (a chunk the store holds already is not uploaded again).
/// Then the page index and, last, the manifest are written, so a snapshot
/// is visible only complete.
pub async fn push(
    file: &FsPath,
    location: &Location,
    options: &PushOptions<'_>,
    progress: Progress<'_>,
) -> Result<PushReport, SnapshotError> {
    location.name()?;
    let chunk_size = options.chunk_size;
    let io = |what: String| move |source| SnapshotError::Io { what, source };
    let f = Arc::new(std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?);
    let image_len = f
        .metadata()
        .map_err(io(format!("reading {}", file.display())))?
        .len();
    check_header(chunk_size, image_len)
        .map_err(|e| SnapshotError::Invalid(format!("cannot push {}: {e}", file.display())))?;
    let mut downloaded_bytes = 0u64;
    let parent = match options.parent {
        Some(p) => {
            if p.folder_url() != location.folder_url() || p.name()? == location.name()? {
                return Err(SnapshotError::Invalid(format!(
                    "--parent {} must be another snapshot in the folder of {} (chunks are shared within a folder)",
                    p.url, location.url
                )));
            }
            let (m, m_len) = read_manifest_sized(p).await?;
            let (index, i_len) = read_index(p, &m).await?;
            downloaded_bytes = m_len + i_len;
            Some((m, index))
        }
        None => None,
    };

    // Hash every page, a block at a time, off the runtime's thread.
    let pages = image_len.div_ceil(PAGE_SIZE);
    let blocks = image_len.div_ceil(SCAN_BLOCK);
    let scanned = AtomicU64::new(0);
    let hashes: Vec<Vec<PageHash>> = stream::iter(0..blocks)
        .map(|b| {
            let f = Arc::clone(&f);
            let scanned = &scanned;
            async move {
                let offset = b * SCAN_BLOCK;
                let len = SCAN_BLOCK.min(image_len - offset);
                let hashed = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok::<_, std::io::Error>(
                        buf.chunks(PAGE_SIZE as usize)
                            .map(page_hash)
                            .collect::<Vec<_>>(),
                    )
                })
                .await
                .map_err(|e| SnapshotError::Invalid(format!("a push task failed: {e}")))?
                .map_err(io(format!("reading {} at {offset:#x}", file.display())))?;
                progress(scanned.fetch_add(len, Relaxed) + len, image_len);
                Ok::<_, SnapshotError>(hashed)
            }
        })
        .buffered(2)
        .try_collect()
        .await?;
    let hashes: Vec<PageHash> = hashes.into_iter().flatten().collect();
    debug_assert_eq!(hashes.len() as u64, pages);

    // Where each page comes from: zero, the parent, or new.
    let page_len = |i: u64| PAGE_SIZE.min(image_len - i * PAGE_SIZE);
    let mut places: Vec<Place> = Vec::with_capacity(hashes.len());
    for (i, h) in hashes.iter().enumerate() {
        let i = i as u64;
        let place = if *h == ZERO_PAGE {
            Place::Zero
        } else if let Some(p) = parent
            .as_ref()
            .and_then(|(m, index)| in_parent(m, index, i, h, page_len(i)))
        {
            p
        } else {
            Place::ToPack
        };
        places.push(place);
    }

    // The order new pages are packed in: the working set's first.
    let mut order: Vec<u64> = Vec::with_capacity(places.len());
    let mut taken = vec![false; places.len()];
    if let Some(ws) = options.working_set {
        let step = ws.page_size().max(PAGE_SIZE);
        for &offset in ws.pages() {
            let first = offset / PAGE_SIZE;
            let last = offset.saturating_add(step).div_ceil(PAGE_SIZE).min(pages);
            for i in first..last {
                if places[i as usize] == Place::ToPack && !taken[i as usize] {
                    taken[i as usize] = true;
                    order.push(i);
                }
            }
        }
    }
    let working_set_pages = order.len() as u64;
    for (i, p) in places.iter().enumerate() {
        if *p == Place::ToPack && !taken[i] {
            order.push(i as u64);
        }
    }
    drop(taken);
    let new_pages = order.len() as u64;

    let uploaded = Counts::default();
    // The chunk table: the parent's chunks still used, in its order (the
    // order it packed them in), then the new ones; each chunk once. The
    // parent's are checked first, before anything is uploaded.
    let mut table: Vec<ChunkRef> = Vec::new();
    let mut by_hash: HashMap<ChunkHash, u32> = HashMap::new();
    let mut add = |c: ChunkRef, table: &mut Vec<ChunkRef>| -> u32 {
        *by_hash.entry(c.hash).or_insert_with(|| {
            table.push(c);
            (table.len() - 1) as u32
        })
    };
    let mut parent_map: Vec<Option<u32>> = Vec::new();
    let mut parent_chunks = 0u64;
    if let Some((m, _)) = &parent {
        let mut used = vec![false; m.chunks().len()];
        for p in &places {
            if let Place::Parent { chunk, .. } = p {
                used[*chunk as usize] = true;
            }
        }
        parent_map = vec![None; m.chunks().len()];
        for (k, c) in m.chunks().iter().enumerate() {
            if used[k] {
                parent_map[k] = Some(add(*c, &mut table));
                parent_chunks += 1;
            }
        }
        // The parent's chunks are used, not uploaded: check they are there.
        let used_chunks: Vec<ChunkRef> = m
            .chunks()
            .iter()
            .zip(&used)
            .filter(|(_, u)| **u)
            .map(|(c, _)| *c)
            .collect();
        stream::iter(used_chunks)
            .map(|c| {
                let uploaded = &uploaded;
                async move { upload_once(location, &c, None, uploaded).await }
            })
            .buffer_unordered(TRANSFERS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
    }
    // Pack: consecutive runs of `order` of up to `chunk_size` bytes, the
    // working set's in chunks of their own (a prefetch of it then fetches
    // no page outside it but in its last, partly filled chunk).
    let per_chunk = (u64::from(chunk_size) / PAGE_SIZE) as usize;
    let (ws_order, rest_order) = order.split_at(working_set_pages as usize);
    let packs: Vec<&[u64]> = ws_order
        .chunks(per_chunk)
        .chain(rest_order.chunks(per_chunk))
        .collect();
    for (c, pack) in packs.iter().enumerate() {
        let mut at = 0u32;
        for &i in *pack {
            places[i as usize] = Place::New {
                chunk: c as u32,
                at,
            };
            at += page_len(i) as u32;
        }
    }
    let new_bytes: u64 = order.iter().map(|&i| page_len(i)).sum();
    let packed = AtomicU64::new(0);
    let scanned_hashes = &hashes;
    let new_chunks: Vec<ChunkRef> = stream::iter(packs)
        .map(|pack| {
            let f = Arc::clone(&f);
            let (packed, uploaded) = (&packed, &uploaded);
            async move {
                let runs = page_runs(pack);
                let len: u64 = pack.iter().map(|&i| page_len(i)).sum();
                let scanned: Vec<(PageHash, usize)> = pack
                    .iter()
                    .map(|&i| (scanned_hashes[i as usize], page_len(i) as usize))
                    .collect();
                let (hash, encoded) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    let mut at = 0usize;
                    for (first, count) in runs {
                        let offset = first * PAGE_SIZE;
                        let n = (count * PAGE_SIZE).min(image_len - offset) as usize;
                        f.read_exact_at(&mut buf[at..at + n], offset)?;
                        at += n;
                    }
                    // The page index will say these pages hold what the scan
                    // hashed; a file changed since would make it lie to
                    // every child pushed against this snapshot.
                    let mut at = 0usize;
                    for (want, n) in scanned {
                        if page_hash(&buf[at..at + n]) != want {
                            return Err(std::io::Error::other(
                                "the file changed while it was being pushed",
                            ));
                        }
                        at += n;
                    }
                    Ok::<_, std::io::Error>((ChunkHash::of(&buf), chunk::encode(&buf)))
                })
                .await
                .map_err(|e| SnapshotError::Invalid(format!("a push task failed: {e}")))?
                .map_err(io(format!("reading {}", file.display())))?;
                let chunk = ChunkRef {
                    hash,
                    len: len as u32,
                    stored_len: encoded.stored.len() as u32,
                    compression: encoded.compression,
                };
                upload_once(location, &chunk, Some(encoded), uploaded).await?;
                progress(packed.fetch_add(len, Relaxed) + len, new_bytes);
                Ok::<_, SnapshotError>(chunk)
            }
        })
        .buffered(TRANSFERS_IN_FLIGHT)
        .try_collect()
        .await?;

    let new_map: Vec<u32> = new_chunks.iter().map(|c| add(*c, &mut table)).collect();

    // Extents: runs of pages contiguous in the image and in one chunk.
    let mut extents: Vec<Extent> = Vec::new();
    for (i, p) in places.iter().enumerate() {
        let (chunk, at) = match *p {
            Place::Zero => continue,
            Place::Parent { chunk, at } => (
                parent_map[chunk as usize].expect("a used parent chunk is in the table"),
                at,
            ),
            Place::New { chunk, at } => (new_map[chunk as usize], at),
            Place::ToPack => unreachable!("every page to pack is in a pack"),
        };
        let offset = i as u64 * PAGE_SIZE;
        let len = page_len(i as u64) as u32;
        match extents.last_mut() {
            Some(e)
                if e.end() == offset
                    && e.chunk == chunk
                    && u64::from(e.chunk_offset) + u64::from(e.len) == u64::from(at) =>
            {
                e.len += len
            }
            _ => extents.push(Extent {
                offset,
                len,
                chunk,
                chunk_offset: at,
            }),
        }
    }
    let unique_chunks = table.len() as u64;
    let manifest = Manifest::new(chunk_size, image_len, table, extents)
        .map_err(|e| SnapshotError::Invalid(format!("building the manifest: {e}")))?;

    // The index first, the manifest last: a visible manifest has its index.
    let mut index_bytes = 0u64;
    if index_len(image_len).is_some() {
        let index = PageIndex::new(image_len, manifest.checksum(), hashes)
            .map_err(|e| SnapshotError::Invalid(format!("building the page index: {e}")))?
            .encode();
        index_bytes = index.len() as u64;
        location
            .store
            .put(
                &location.index_path()?,
                PutPayload::from_bytes(Bytes::from(index)),
            )
            .await
            .map_err(request(format!(
                "writing the page index of {}",
                location.url
            )))?;
    } else {
        tracing::warn!(url = %location.url, "the image is too large for a page index: it cannot be a --parent");
    }
    let encoded = manifest.encode();
    let manifest_bytes = encoded.len() as u64;
    location
        .store
        .put(&location.path, PutPayload::from_bytes(Bytes::from(encoded)))
        .await
        .map_err(request(format!("writing the manifest {}", location.url)))?;
    let count = |p: fn(&Place) -> bool| places.iter().filter(|x| p(x)).count() as u64;
    Ok(PushReport {
        url: location.url.clone(),
        parent: options.parent.map(|p| p.url.clone()),
        image_len,
        chunk_size,
        pages,
        zero_pages: count(|p| *p == Place::Zero),
        parent_pages: count(|p| matches!(p, Place::Parent { .. })),
        new_pages,
        working_set_pages,
        extents: manifest.extents().len() as u64,
        unique_chunks,
        parent_chunks,
        reused_chunks: uploaded.reused.load(Relaxed),
        uploaded_chunks: uploaded.chunks.load(Relaxed),
        compressed_chunks: uploaded.compressed.load(Relaxed),
        uploaded_bytes: uploaded.bytes.load(Relaxed) + index_bytes + manifest_bytes,
        manifest_bytes,
        index_bytes,
        downloaded_bytes,
    })
}

/// Page `i` (hash `h`, `len` bytes) in the parent: where its bytes are,
/// when the parent's index has the same hash and its manifest holds the
/// whole page in one extent. (An index that disagrees with its manifest
/// is not trusted for that page: it is packed anew.)
fn in_parent(m: &Manifest, index: &PageIndex, i: u64, h: &PageHash, len: u64) -> Option<Place> {
    if index.hashes().get(i as usize) != Some(h) {
        return None;
    }
    let offset = i * PAGE_SIZE;
    let e = m.extent_at(offset)?;
    let into = offset - e.offset;
    if into + len > u64::from(e.len) {
        return None;
    }
    Some(Place::Parent {
        chunk: e.chunk,
        at: e.chunk_offset + into as u32,
    })
}

/// `pages` (page numbers) as runs of consecutive pages: (first, count).
fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

#[derive(Debug, Default)]
struct Counts {
    /// Chunk hashes already looked up or uploaded by this push.
    seen: std::sync::Mutex<HashSet<ChunkHash>>,
    reused: AtomicU64,
    chunks: AtomicU64,
    compressed: AtomicU64,
    bytes: AtomicU64,
}

/// Makes sure the store holds `chunk`, once per push: if it does (of the
/// right size), it is counted reused; if not, `encoded` is uploaded, or,
/// for a chunk only referenced (`None`: a parent's), the push fails.
async fn upload_once(
    location: &Location,
    chunk: &ChunkRef,
    encoded: Option<chunk::Encoded>,
    counts: &Counts,
) -> Result<(), SnapshotError> {
    if !counts.seen.lock().expect("seen lock").insert(chunk.hash) {
        return Ok(());
    }
    let path = location.chunk_path(&chunk.hash);
    match location.store.head(&path).await {
        Ok(meta) if meta.size == u64::from(chunk.stored_len) => {
            counts.reused.fetch_add(1, Relaxed);
            Ok(())
        }
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {
            let Some(encoded) = encoded else {
                return Err(SnapshotError::Invalid(format!(
                    "the parent's chunk {} is missing from the store (or of the wrong size): push without --parent",
                    chunk.hash
                )));
            };
            let n = encoded.stored.len() as u64;
            location
                .store
                .put(&path, PutPayload::from_bytes(encoded.stored))
                .await
                .map_err(request(format!("uploading chunk {}", chunk.hash)))?;
            counts.chunks.fetch_add(1, Relaxed);
            counts.bytes.fetch_add(n, Relaxed);
            if encoded.compression != Compression::None {
                counts.compressed.fetch_add(1, Relaxed);
            }
            Ok(())
        }
        Err(e) => Err(request(format!("looking up chunk {}", chunk.hash))(e)),
    }
}

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PullReport {
    /// The image's length (the file's).
    pub image_len: u64,
    /// Distinct chunks downloaded.
    pub downloaded_chunks: u64,
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
}

/// Downloads the snapshot at `location` into the memory file `to`: every
/// chunk checked against its hash, written wherever its extents say, zero
/// pages left as holes. Writes a temporary file next to `to` and renames
/// it, so `to` is never partial.
pub async fn pull(
    location: &Location,
    to: &FsPath,
    progress: Progress<'_>,
) -> Result<PullReport, SnapshotError> {
    let manifest = read_manifest(location).await?;
    let io = |what: String| move |source| SnapshotError::Io { what, source };
    let tmp = to.with_file_name(format!(
        ".{}.{}.part",
        to.file_name()
            .map_or("pull".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let file =
        Arc::new(std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?);
    let cleanup = TempFile(&tmp);
    file.set_len(manifest.image_len())
        .map_err(io(format!("sizing {}", tmp.display())))?;
    // Each chunk once, in the order it was packed, with the extents it
    // fills.
    let mut by_chunk: Vec<Vec<Extent>> = vec![Vec::new(); manifest.chunks().len()];
    for e in manifest.extents() {
        by_chunk[e.chunk as usize].push(*e);
    }
    let total = manifest.data_bytes();
    let done = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    stream::iter(manifest.chunks().iter().copied().zip(by_chunk))
        .map(|(chunk, places)| {
            let (file, done, downloaded) = (Arc::clone(&file), &done, &downloaded);
            async move {
                let path = location.chunk_path(&chunk.hash);
                let got = location
                    .store
                    .get(&path)
                    .await
                    .map_err(request(format!("downloading chunk {}", chunk.hash)))?;
                if got.meta.size != u64::from(chunk.stored_len) {
                    return Err(chunk::ChunkError::Length {
                        hash: chunk.hash,
                        got: got.meta.size,
                        want: chunk.stored_len,
                    }
                    .into());
                }
                let stored = got
                    .bytes()
                    .await
                    .map_err(request(format!("downloading chunk {}", chunk.hash)))?;
                downloaded.fetch_add(stored.len() as u64, Relaxed);
                let n: u64 = places.iter().map(|e| u64::from(e.len)).sum();
                tokio::task::spawn_blocking(move || {
                    let bytes = chunk::decode(&chunk, stored)?;
                    for e in &places {
                        // In range: the manifest was validated against the
                        // chunk's length, and decode checked that length.
                        let from = e.chunk_offset as usize;
                        let part = &bytes[from..from + e.len as usize];
                        file.write_all_at(part, e.offset)
                            .map_err(|source| SnapshotError::Io {
                                what: format!("writing at {:#x}", e.offset),
                                source,
                            })?;
                    }
                    Ok::<_, SnapshotError>(())
                })
                .await
                .map_err(|e| SnapshotError::Invalid(format!("a pull task failed: {e}")))??;
                progress(done.fetch_add(n, Relaxed) + n, total);
                Ok::<_, SnapshotError>(())
            }
        })
        .buffer_unordered(TRANSFERS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    file.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, to).map_err(io(format!("renaming to {}", to.display())))?;
    std::mem::forget(cleanup);
    Ok(PullReport {
        image_len: manifest.image_len(),
        downloaded_chunks: manifest.chunks().len() as u64,
        downloaded_bytes: downloaded.into_inner(),
    })
}

struct TempFile<'a>(&'a FsPath);

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// What `uffd snapshot info` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Info {
    /// The snapshot.
    pub url: String,
    /// Manifest layout version.
    pub version: u32,
    /// The image's length.
    pub image_len: u64,
    /// The size chunks were packed to.
    pub chunk_size: u32,
    /// Chunks the manifest names (each distinct).
    pub chunks: u64,
    /// Extents mapping the image onto them.
    pub extents: u64,
    /// 4 KiB pages in the image that are zero (in no extent; not stored).
    pub zero_pages: u64,
    /// The share of the image's bytes that are zero, 0 to 1.
    pub zero_share: f64,
    /// Distinct chunks (as `chunks`: kept for scripts of version 1).
    pub unique_chunks: u64,
    /// Bytes of those chunks, uncompressed.
    pub unique_bytes: u64,
    /// Bytes of those chunks as stored (compressed where it helped).
    pub stored_bytes: u64,
    /// Chunks stored compressed.
    pub compressed_chunks: u64,
    /// With `--shared`: the other snapshots in the folder.
    pub other_snapshots: Option<u64>,
    /// With `--shared`: of this snapshot's chunks, those another snapshot
    /// in the folder also names.
    pub shared_chunks: Option<u64>,
    /// With `--shared`: their bytes as stored (what deleting this snapshot
    /// would not free).
    pub shared_bytes: Option<u64>,
}

/// Describes the snapshot at `location` from its manifest; with `shared`,
/// also reads every other manifest in its folder to count the chunks it
/// shares with them (one small GET per snapshot).
pub async fn info(location: &Location, shared: bool) -> Result<Info, SnapshotError> {
    let m = read_manifest(location).await?;
    let mut i = describe(&location.url, &m);
    if shared {
        let folder = Location {
            path: location.folder(),
            url: location.folder_url().to_string(),
            store: Arc::clone(&location.store),
        };
        let me = location.name()?.to_string();
        let mut others: HashSet<ChunkHash> = HashSet::new();
        let mut n = 0u64;
        for l in list(&folder).await? {
            if l.name == me {
                continue;
            }
            let other = Location {
                path: folder.path.clone().join(l.name.as_str()),
                url: l.url.clone(),
                store: Arc::clone(&location.store),
            };
            // A snapshot that vanished or is unreadable meanwhile shares
            // nothing that can be counted on.
            match read_manifest(&other).await {
                Ok(om) => {
                    n += 1;
                    others.extend(om.chunks().iter().map(|c| c.hash));
                }
                Err(e) => tracing::warn!(url = %l.url, "skipped: {e}"),
            }
        }
        let common: Vec<&ChunkRef> = m
            .chunks()
            .iter()
            .filter(|c| others.contains(&c.hash))
            .collect();
        i.other_snapshots = Some(n);
        i.shared_chunks = Some(common.len() as u64);
        i.shared_bytes = Some(common.iter().map(|c| u64::from(c.stored_len)).sum());
    }
    Ok(i)
}

/// Describes manifest `m` of the snapshot at `url`.
pub fn describe(url: &str, m: &Manifest) -> Info {
    let unique_bytes = m.chunks().iter().map(|c| u64::from(c.len)).sum();
    let stored_bytes = m.chunks().iter().map(|c| u64::from(c.stored_len)).sum();
    let compressed = m
        .chunks()
        .iter()
        .filter(|c| c.compression != Compression::None)
        .count() as u64;
    let data = m.data_bytes();
    let data_pages: u64 = m
        .extents()
        .iter()
        .map(|e| u64::from(e.len).div_ceil(PAGE_SIZE))
        .sum();
    Info {
        url: url.to_string(),
        version: m.version(),
        image_len: m.image_len(),
        chunk_size: m.chunk_size(),
        chunks: m.chunks().len() as u64,
        extents: m.extents().len() as u64,
        zero_pages: m.image_len().div_ceil(PAGE_SIZE) - data_pages,
        zero_share: if m.image_len() == 0 {
            0.0
        } else {
            (m.image_len() - data) as f64 / m.image_len() as f64
        },
        unique_chunks: m.chunks().len() as u64,
        unique_bytes,
        stored_bytes,
        compressed_chunks: compressed,
        other_snapshots: None,
        shared_chunks: None,
        shared_bytes: None,
    }
}

/// One snapshot in a folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    /// Its image's length.
    pub image_len: u64,
    /// Its chunk size.
    pub chunk_size: u32,
    /// When the manifest was written (RFC 3339).
    pub modified: String,
}

/// The snapshots directly in the folder `location` names (objects whose
/// first bytes are a manifest header; others are skipped), by name.
pub async fn list(location: &Location) -> Result<Vec<Listed>, SnapshotError> {
    let prefix = (!location.path.as_ref().is_empty()).then_some(&location.path);
    let listing = location
        .store
        .list_with_delimiter(prefix)
        .await
        .map_err(request(format!("listing {}", location.url)))?;
    let base = location.url.trim_end_matches('/');
    let mut out = Vec::new();
    for meta in listing.objects {
        let Some(name) = meta.location.filename().map(str::to_string) else {
            continue;
        };
        if name == CHUNK_DIR || name == PAGES_DIR || meta.size < 32 {
            continue;
        }
        let head = location
            .store
            .get_range(&meta.location, 0..32)
            .await
            .map_err(request(format!("reading {}", meta.location)))?;
        let Some((chunk_size, image_len)) = header_fields(&head) else {
            continue;
        };
        out.push(Listed {
            url: format!("{base}/{name}"),
            name,
            image_len,
            chunk_size,
            modified: meta.last_modified.to_rfc3339(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn header_fields(head: &[u8]) -> Option<(u32, u64)> {
    if head.len() < 32 || &head[..8] != crate::manifest::MAGIC {
        return None;
    }
    let chunk_size = u32::from_le_bytes(head[12..16].try_into().ok()?);
    let image_len = u64::from_le_bytes(head[16..24].try_into().ok()?);
    Some((chunk_size, image_len))
}

/// The chunk objects a folder holds, for tests and `info`'s callers:
/// (hash, stored length).
pub async fn stored_chunks(
    store: &dyn ObjectStore,
    folder: &Path,
) -> Result<Vec<(String, u64)>, SnapshotError> {
    let prefix = folder.clone().join(CHUNK_DIR);
    let mut out: Vec<(String, u64)> = store
        .list(Some(&prefix))
        .map_ok(|m| (m.location.filename().unwrap_or("").to_string(), m.size))
        .try_collect()
        .await
        .map_err(request("listing chunks"))?;
    out.sort();
    Ok(out)
}
