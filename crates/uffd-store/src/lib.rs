//! Memory snapshots in object storage.
//!
//! - [`snapshot::push`] stores a memory file as content-addressed chunks
//!   (blake3, LZ4 where it helps, identical chunks stored once across
//!   every snapshot of a folder), a versioned, checksummed
//!   [`manifest::Manifest`] of extents (image range -> bytes of a chunk;
//!   zero pages in none) and a [`pages::PageIndex`] of every page's hash.
//!   With a parent, only the pages that changed since it are stored (its
//!   index tells which); with a working set, its pages are packed first,
//!   into chunks of their own. [`snapshot::pull`], [`snapshot::info`] and
//!   [`snapshot::list`] read them back.
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
pub mod pages;
pub mod snapshot;
pub mod source;
pub mod store;

pub use manifest::{ChunkHash, ChunkRef, Compression, Extent, Manifest, ManifestError};
pub use pages::{PageIndex, PageIndexError};
pub use snapshot::{PushOptions, SnapshotError};
pub use source::{
    io_runtime, CacheConfig, FetchError, ObjectSource, SourceStats, ThenFill, FILL_IN_FLIGHT,
};
pub use store::{Location, StoreError, StoreOptions};

/// The chunk size `uffd snapshot push` packs to by default: 4 MiB, as E2B
/// found faster than block-sized reads from object storage; a fault
/// fetches one chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
