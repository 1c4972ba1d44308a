//! Memory snapshots in object storage.
//!
//! - [`snapshot::push`] stores a memory file as content-addressed chunks
//!   (blake3, LZ4 where it helps, zero chunks omitted, identical chunks
//!   stored once across every snapshot of a folder) and a versioned,
//!   checksummed [`manifest::Manifest`]; [`snapshot::pull`],
//!   [`snapshot::info`] and [`snapshot::list`] read them back.
//! - [`ObjectSource`] serves a snapshot to the pager: the chunk holding a
//!   faulting page is fetched once however many faults and VMs want it,
//!   into a bounded host-wide cache in memory and, optionally, on disk.
//! - Stores are opened by URL with `object_store` ([`Location::open`]):
//!   `s3://`, `gs://`, `az://`, `file://`, configured by each cloud's
//!   standard environment variables.

#![deny(unsafe_code)]

mod cache;
pub mod chunk;
pub mod manifest;
pub mod snapshot;
pub mod source;
pub mod store;

pub use manifest::{ChunkHash, ChunkRef, Compression, Manifest, ManifestError};
pub use snapshot::SnapshotError;
pub use source::{io_runtime, CacheConfig, FetchError, ObjectSource, SourceStats};
pub use store::{Location, StoreError, StoreOptions};

/// The chunk size `uffd snapshot push` uses by default: 4 MiB, as E2B
/// found faster than block-sized reads from object storage; a fault
/// fetches one chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
