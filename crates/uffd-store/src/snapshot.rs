//! Pushing a memory file as a snapshot, pulling it back, and describing
//! what a store holds.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::chunk;
use crate::manifest::{
    check_header, ChunkHash, ChunkRef, Manifest, ManifestError, MAX_MANIFEST_LEN,
};
use crate::store::{Location, StoreError, CHUNK_DIR};

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
    Manifest::decode(&bytes).map_err(invalid)
}

/// Called with (bytes done, bytes in all) as a transfer goes on.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    /// The snapshot's URL.
    pub url: String,
    /// The image's length.
    pub image_len: u64,
    /// The chunk size.
    pub chunk_size: u32,
    /// Chunks in the image.
    pub chunks: u64,
    /// Of them, all zero (not stored).
    pub zero_chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Distinct chunks the store already held (not uploaded).
    pub reused_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Bytes uploaded: chunk objects (compressed where that helped) and the
    /// manifest.
    pub uploaded_bytes: u64,
    /// Uploaded chunks stored compressed.
    pub compressed_chunks: u64,
}

/// Pushes memory file `file` to `location` in chunks of `chunk_size`:
/// zero chunks are omitted, each other chunk is stored once under its
/// blake3 hash in the folder's `.chunks/` (a chunk the store holds already,
/// from this or another snapshot, is not uploaded again), then the
/// manifest is written, last, so a snapshot is visible only complete.
pub async fn push(
    file: &FsPath,
    location: &Location,
    chunk_size: u32,
    progress: Progress<'_>,
) -> Result<PushReport, SnapshotError> {
    location.name()?;
    let io = |what: String| move |source| SnapshotError::Io { what, source };
    let f = Arc::new(std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?);
    let image_len = f
        .metadata()
        .map_err(io(format!("reading {}", file.display())))?
        .len();
    check_header(chunk_size, image_len)
        .map_err(|e| SnapshotError::Invalid(format!("cannot push {}: {e}", file.display())))?;
    let chunks = image_len.div_ceil(u64::from(chunk_size));
    let done = AtomicU64::new(0);
    let uploaded_bytes = AtomicU64::new(0);
    let seen = std::sync::Mutex::new(HashSet::<ChunkHash>::new());
    let reused = AtomicU64::new(0);
    let uploaded = AtomicU64::new(0);
    let compressed = AtomicU64::new(0);
    let results: Vec<Option<ChunkRef>> = stream::iter(0..chunks)
        .map(|i| {
            let f = Arc::clone(&f);
            let (done, seen, reused, uploaded, compressed, uploaded_bytes) = (
                &done,
                &seen,
                &reused,
                &uploaded,
                &compressed,
                &uploaded_bytes,
            );
            async move {
                let offset = i * u64::from(chunk_size);
                let len = u64::from(chunk_size).min(image_len - offset) as usize;
                // Reading, zero detection, hashing and compression are CPU
                // and disk work: off the runtime's thread.
                let prepared = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, offset)?;
                    if uffd_pager::source::is_zero(&buf) {
                        return Ok::<_, std::io::Error>(None);
                    }
                    let hash = ChunkHash::of(&buf);
                    Ok(Some((hash, chunk::encode(&buf))))
                })
                .await
                .map_err(|e| SnapshotError::Invalid(format!("a push task failed: {e}")))?
                .map_err(io(format!("reading {} at {offset:#x}", file.display())))?;
                let Some((hash, encoded)) = prepared else {
                    progress(done.fetch_add(len as u64, Relaxed) + len as u64, image_len);
                    return Ok(None);
                };
                let entry = ChunkRef {
                    offset,
                    len: len as u32,
                    stored_len: encoded.stored.len() as u32,
                    compression: encoded.compression,
                    hash,
                };
                let first = seen.lock().expect("seen lock").insert(hash);
                if first {
                    let path = location.chunk_path(&hash);
                    match location.store.head(&path).await {
                        Ok(meta) if meta.size == encoded.stored.len() as u64 => {
                            reused.fetch_add(1, Relaxed);
                        }
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                            let n = encoded.stored.len() as u64;
                            location
                                .store
                                .put(&path, PutPayload::from_bytes(encoded.stored))
                                .await
                                .map_err(request(format!("uploading chunk {hash}")))?;
                            uploaded.fetch_add(1, Relaxed);
                            uploaded_bytes.fetch_add(n, Relaxed);
                            if entry.compression != crate::manifest::Compression::None {
                                compressed.fetch_add(1, Relaxed);
                            }
                        }
                        Err(e) => return Err(request(format!("looking up chunk {hash}"))(e)),
                    }
                }
                progress(done.fetch_add(len as u64, Relaxed) + len as u64, image_len);
                Ok(Some(entry))
            }
        })
        .buffered(TRANSFERS_IN_FLIGHT)
        .try_collect()
        .await?;
    let entries: Vec<ChunkRef> = results.into_iter().flatten().collect();
    let manifest = Manifest::new(chunk_size, image_len, entries)
        .map_err(|e| SnapshotError::Invalid(format!("building the manifest: {e}")))?;
    let encoded = manifest.encode();
    let manifest_len = encoded.len() as u64;
    location
        .store
        .put(&location.path, PutPayload::from_bytes(Bytes::from(encoded)))
        .await
        .map_err(request(format!("writing the manifest {}", location.url)))?;
    let unique = seen.lock().expect("seen lock").len() as u64;
    Ok(PushReport {
        url: location.url.clone(),
        image_len,
        chunk_size,
        chunks,
        zero_chunks: chunks - manifest.entries().len() as u64,
        unique_chunks: unique,
        reused_chunks: reused.into_inner(),
        uploaded_chunks: uploaded.into_inner(),
        uploaded_bytes: uploaded_bytes.into_inner() + manifest_len,
        compressed_chunks: compressed.into_inner(),
    })
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
/// chunk checked against its hash, zero chunks left as holes. Writes a
/// temporary file next to `to` and renames it, so `to` is never partial.
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
    // Each distinct chunk once, written wherever the image holds it.
    let mut by_hash: std::collections::HashMap<ChunkHash, Vec<ChunkRef>> = Default::default();
    for e in manifest.entries() {
        by_hash.entry(e.hash).or_default().push(*e);
    }
    let total: u64 = manifest.entries().iter().map(|e| u64::from(e.len)).sum();
    let done = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    stream::iter(by_hash.into_values())
        .map(|places| {
            let (file, done, downloaded) = (Arc::clone(&file), &done, &downloaded);
            async move {
                let entry = places[0];
                let path = location.chunk_path(&entry.hash);
                let got = location
                    .store
                    .get(&path)
                    .await
                    .map_err(request(format!("downloading chunk {}", entry.hash)))?;
                if got.meta.size != u64::from(entry.stored_len) {
                    return Err(chunk::ChunkError::Length {
                        hash: entry.hash,
                        got: got.meta.size,
                        want: entry.stored_len,
                    }
                    .into());
                }
                let stored = got
                    .bytes()
                    .await
                    .map_err(request(format!("downloading chunk {}", entry.hash)))?;
                downloaded.fetch_add(stored.len() as u64, Relaxed);
                let n = places.len() as u64 * u64::from(entry.len);
                tokio::task::spawn_blocking(move || {
                    let bytes = chunk::decode(&entry, stored)?;
                    for p in &places {
                        file.write_all_at(&bytes, p.offset).map_err(|source| {
                            SnapshotError::Io {
                                what: format!("writing at {:#x}", p.offset),
                                source,
                            }
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
        downloaded_chunks: downloaded_count(&manifest),
        downloaded_bytes: downloaded.into_inner(),
    })
}

fn downloaded_count(m: &Manifest) -> u64 {
    m.entries()
        .iter()
        .map(|e| e.hash)
        .collect::<HashSet<_>>()
        .len() as u64
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
    /// The chunk size.
    pub chunk_size: u32,
    /// Chunks in the image.
    pub chunks: u64,
    /// Of them, all zero (no object).
    pub zero_chunks: u64,
    /// The share of the image's bytes in zero chunks, 0 to 1.
    pub zero_share: f64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Bytes of those distinct chunks, uncompressed.
    pub unique_bytes: u64,
    /// Bytes of those distinct chunks as stored (compressed where it helped).
    pub stored_bytes: u64,
    /// Distinct chunks stored compressed.
    pub compressed_chunks: u64,
}

/// Describes the snapshot at `location` from its manifest.
pub async fn info(location: &Location) -> Result<Info, SnapshotError> {
    let m = read_manifest(location).await?;
    Ok(describe(&location.url, &m))
}

/// Describes manifest `m` of the snapshot at `url`.
pub fn describe(url: &str, m: &Manifest) -> Info {
    let mut seen = HashSet::new();
    let (mut unique_bytes, mut stored_bytes, mut compressed) = (0u64, 0u64, 0u64);
    let mut data_bytes = 0u64;
    for e in m.entries() {
        data_bytes += u64::from(e.len);
        if seen.insert(e.hash) {
            unique_bytes += u64::from(e.len);
            stored_bytes += u64::from(e.stored_len);
            if e.compression != crate::manifest::Compression::None {
                compressed += 1;
            }
        }
    }
    Info {
        url: url.to_string(),
        version: crate::manifest::VERSION,
        image_len: m.image_len(),
        chunk_size: m.chunk_size(),
        chunks: m.chunk_count(),
        zero_chunks: m.chunk_count() - m.entries().len() as u64,
        zero_share: if m.image_len() == 0 {
            0.0
        } else {
            (m.image_len() - data_bytes) as f64 / m.image_len() as f64
        },
        unique_chunks: seen.len() as u64,
        unique_bytes,
        stored_bytes,
        compressed_chunks: compressed,
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
        if name == CHUNK_DIR || meta.size < 32 {
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
