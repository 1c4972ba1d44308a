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
//! Where things live:
//!
//! | file | what |
//! |---|---|
//! | `source/` | one file per [`PageSource`]: `file`, `memory`, `zero`, `layered`, `remote` ([`AsyncPageSource`]: many reads in flight) |
//! | `engine/mod.rs` | [`Pager`], its builder, configuration checks, shared state |
//! | `engine/events.rs` | handler threads: epoll wait, batched reads, REMOVE/UNMAP/REMAP/FORK |
//! | `engine/resolve.rs` | one fault: page state, claims, readahead window, asynchronous reads |
//! | `engine/install.rs` | fetching claimed pages, runs of zero and data pages, POISON, the panic guard |
//! | `engine/strategy/` | one file per [`Strategy`] (`copy`, `copy_wp`, `move`, `continue`): where the bytes go, the ioctl, what a fault on a filled page needs, what REMOVE means |
//! | `engine/fill.rs`, `workingset.rs` | replay of a recorded working set, background fill |
//! | `engine/lifecycle.rs`, `handover.rs` | shutdown, detach (drain), hand-over to another pager |
//! | `wait.rs` | the epoll set and adaptive spinning |
//! | `region.rs` | regions, the table of spans, per-page states |
//! | `sigbus/` | [`SigbusPager`]: the faulting thread serves itself (`mod.rs`); the process-wide handler and its table (`handler.rs`) |
//! | `runs.rs`, `stop.rs` | runs of equal pages (one ioctl per run, engine and SIGBUS handler alike); the stop signal |
//!
//! ```
//! use std::sync::Arc;
//! use uffd::{Mapping, MemoryKind, OpenOptions, RegisterMode};
//! use uffd_pager::{MemorySource, Pager, Prefetch, Region, Strategy};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # if let Err(e) = uffd::probe() { if e.is_denied() && std::env::var("UFFD_REQUIRE").as_deref() != Ok("1") { return Ok(()); } }
//! // A 1 MiB "snapshot" served lazily into fresh memory of this process.
//! // (A server would get `uffd` and the regions from a VMM instead.)
//! let snapshot: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
//! let memory = Mapping::new(MemoryKind::Anon, snapshot.len())?;
//! let uffd = OpenOptions::new().user_mode_only(true).open()?;
//! let regions = vec![Region::new(memory.addr(), memory.len() as u64, 0, 4096)];
//! uffd_pager::register(&uffd, &regions, RegisterMode::MISSING)?;
//! let builder = Pager::builder(Arc::new(MemorySource::new(snapshot.clone())))
//!     .strategy(Strategy::Copy)
//!     .prefetch(Prefetch::Readahead { max_bytes: 2 << 20 });
//! // SAFETY: `memory` is touched only through raw copies (Mapping hands out
//! // no references), so nothing relies on what its missing pages hold.
//! let pager = unsafe { builder.start(uffd, regions) }?;
//! let mut restored = vec![0u8; snapshot.len()];
//! memory.read(0, &mut restored); // faults, served by the pager
//! assert_eq!(restored, snapshot);
//! println!("{:?}", pager.shutdown());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod config;
mod engine;
mod handover;
mod region;
mod runs;
mod sigbus;
pub mod source;
mod stats;
mod stop;
mod wait;
mod workingset;

pub use config::{Prefetch, Strategy, WaitMode, BATCH_BYTES};
pub use engine::{
    register, ConfigError, Detached, HandedOver, Pager, PagerBuilder, PagerError, PoisonedPage,
    Progress, RegisteredRange, ShutdownHandle, StillRegistered, MAX_HANDLERS_PER_CPU,
};
pub use handover::{PageKind, PagerState, SpanState, StateError};
pub use region::Region;
pub use sigbus::{
    sigbus_handler_installed, SigbusError, SigbusPager, SigbusPagerBuilder, SigbusStats,
    SignalSafeSource, MAX_SIGBUS_GRANULE,
};
pub use source::{
    drop_runtime, AsyncPageSource, AsyncSource, Content, Fetched, FileMode, FileSource,
    LayeredSource, MappedBytes, MemorySource, PageSource, ReadDone, ReadFuture, SourceError,
    ZeroSource,
};
pub use stats::{panic_message, Bucket, Histogram, LatencySummary, Stats};
pub use stop::StopSignal;
pub use workingset::{WorkingSet, WorkingSetError};
