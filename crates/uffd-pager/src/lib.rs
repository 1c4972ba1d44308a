//! A userfaultfd pager: serves page faults from any [`PageSource`] —
//! a memory snapshot file, a buffer, a layered diff, later a network — fast
//! and never wrong.
//!
//! Three parts, kept apart:
//! - **Sources** ([`source`]): where a page's bytes come from.
//! - **The engine** ([`Pager`]): handler threads that read messages in
//!   batches, apply non-cooperative events (REMOVE, UNMAP, REMAP, FORK),
//!   de-duplicate faults on one page, defer on EAGAIN, wake after EEXIST,
//!   and resolve with a [`Strategy`] (COPY, MOVE, CONTINUE, COPY with WP).
//! - **Policies**: readahead ([`Prefetch`]), working-set replay
//!   ([`WorkingSet`]) and background fill.
//!
//! When the source cannot produce a page, the page is poisoned: access
//! raises SIGBUS, never a silent zero page and never a hang.
//!
//! ```no_run
//! use std::sync::Arc;
//! use uffd_pager::{FileMode, FileSource, Pager, Prefetch, Region, Strategy};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (uffd, guest_addr, guest_len): (uffd::Uffd, u64, u64) = unimplemented!();
//! // The VMM sent `uffd` and said guest memory at `guest_addr` comes from
//! // offset 0 of the snapshot.
//! let source = Arc::new(FileSource::open("mem.snap", FileMode::Mmap)?);
//! let pager = Pager::builder(source)
//!     .strategy(Strategy::Copy)
//!     .prefetch(Prefetch::Readahead { max_bytes: 2 << 20 })
//!     .background_fill(true)
//!     .start(uffd, vec![Region::new(guest_addr, guest_len, 0, 4096)])?;
//! pager.wait_finished(std::time::Duration::from_secs(3600));
//! println!("{:?}", pager.shutdown());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod engine;
mod mem;
mod region;
mod sigbus;
pub mod source;
mod stats;
mod workingset;

pub use config::{Prefetch, Strategy, WaitMode, BATCH_BYTES};
pub use engine::{
    register, Detached, Pager, PagerBuilder, PagerError, PoisonedPage, Progress, RegisteredRange,
    ShutdownHandle, StillRegistered,
};
pub use mem::AlignedAnon;
pub use region::Region;
pub use sigbus::{
    sigbus_handler_installed, SigbusError, SigbusPager, SigbusPagerBuilder, SigbusStats,
    SignalSafeSource, MAX_SIGBUS_GRANULE,
};
pub use source::{
    Content, FileMode, FileSource, LayeredSource, MemorySource, PageSource, SourceError, ZeroSource,
};
pub use stats::{Histogram, LatencySummary, Stats};
pub use workingset::{WorkingSet, WorkingSetError};
