//! Point-in-time images of this process's memory while its threads keep
//! writing, dirty tracking, and incremental snapshots as layers.
//!
//! - [`LiveSnapshot`]: userfaultfd write-protect at t0, a saver thread that
//!   copies each page before its first write (the writer waits only for its
//!   own page) and every other page in the background. The image is the
//!   raw layout `uffd serve --mem-file` restores.
//! - [`DirtyTracker`]: ranges written since the last call, with WP_ASYNC
//!   and PAGEMAP_SCAN (read and re-protected in one walk), or soft-dirty
//!   bits where WP_ASYNC is missing.
//! - Deltas ([`write_delta`], [`DeltaFile`]): the pages written since the
//!   previous snapshot, in a versioned, checksummed format; served as
//!   layers over the base by `uffd serve --mem-file BASE --layer D1
//!   --layer D2` ([`layered`]) or merged into one image ([`merge`]).
//!
//! ```no_run
//! use uffd::{Mapping, MemoryKind};
//! use uffd_snapshot::{LiveSnapshot, Region, SnapshotOptions};
//!
//! let memory = Mapping::new(MemoryKind::Anon, 64 << 20)?;
//! // ... threads write `memory` meanwhile ...
//! let report = LiveSnapshot::take(&[Region::of(&memory)], "vm.mem".as_ref(), SnapshotOptions::new())?;
//! println!("{} bytes of data, {} pages saved on a writer's fault", report.data_bytes, report.saved_on_fault);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Unsafe code is confined to the fork() baseline ([`ForkImage`]): the
//! snapshot reads memory through `/proc/self/mem` (a page unmapped under
//! the saver is an error, not a crash) and every ioctl goes through the
//! `uffd` crate.

#![deny(unsafe_code)]

mod baseline;
pub mod check;
pub mod delta;
mod dirty;
mod error;
mod image;
mod incremental;
mod live;
mod region;
mod staging;

pub use baseline::{copy_image, ForkImage};
pub use delta::{layered, merge, write_image, DeltaFile, DeltaIndex, DeltaStats};
pub use dirty::{to_image, DirtyTracker, TrackerMode};
pub use error::Error;
pub use incremental::write_delta;
pub use live::{
    Armed, DiscardPolicy, LiveSnapshot, Prepared, Report, Running, SnapshotOptions, Stopped,
};
pub use region::Region;
