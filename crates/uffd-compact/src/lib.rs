//! Concurrent heap compaction with userfaultfd, the design Android's ART
//! runtime uses: mutators keep running while the heap is compacted in place,
//! and a mutator that touches a page not compacted yet has it compacted on
//! demand.
//!
//! The runtime owns the object model; this crate owns the memory tricks:
//!
//! 1. [`Compaction::prepare`] (mutators running): the runtime's
//!    [`Compactor`] says how many pages stay live and which from-space pages
//!    each to-space page reads; threads are started and wait.
//! 2. [`Prepared::start`] (mutators paused, roots already pointing at new
//!    addresses): one `mremap(MREMAP_DONTUNMAP)` moves every heap page to a
//!    from-space without copying, the heap's now empty range is registered
//!    with a user-mode-only userfaultfd, and the threads go. The pause is
//!    this flip only.
//! 3. Mutators resume. A background thread fills to-space pages in order
//!    ([`Compactor::fill`]: copy the page's objects from the from-space and
//!    fix their references); a mutator touching a page first faults, and
//!    the fault handler fills that page right away (or, on the SIGBUS path,
//!    [`Options::sigbus`], the mutator fills it itself in its signal
//!    handler, with no thread to wake). A per-page atomic state makes each
//!    page compacted exactly once, whoever gets there first.
//! 4. [`Running::finish`]: every page is installed, the heap unregistered,
//!    the from-space unmapped.
//!
//! The userfaultfd is user-mode-only, so the kernel's own accesses to a
//! page not compacted yet (a `read(2)` into the heap, a `write(2)` from
//! it) fail with EFAULT instead of waiting: a runtime does its I/O on
//! objects outside the heap, or after [`Running::finish`].
//!
//! Three ways to install a page ([`Mode`]): COPY from a per-thread buffer;
//! MOVE of a recycled from-space page (no page allocated or copied once
//! the pool fills: a from-space page joins it when every to-space page
//! reading it is done); MINOR + CONTINUE on a shmem heap, written through
//! an alias of the next memfd. [`Mode::StopTheWorld`] is the same work with
//! mutators paused, and needs no userfaultfd.
//!
//! A fill that fails (or panics) does not hang anyone: the page is
//! poisoned (SIGBUS on access, never a silent zero page), every other page
//! is installed, and `finish` returns [`CompactError::Pages`].
//!
//! ```
//! use std::ops::Range;
//! use std::sync::Arc;
//! use uffd_compact::{Compaction, Compactor, FromPages, Heap, HeapKind, Mode, Options};
//!
//! /// A toy runtime whose live objects are every other page: to-space page
//! /// `p` is from-space page `2p`.
//! struct EveryOther(usize);
//!
//! impl Compactor for EveryOther {
//!     type Error = std::convert::Infallible;
//!     fn live_pages(&self) -> usize {
//!         self.0 / 2
//!     }
//!     fn sources(&self, page: usize) -> Range<usize> {
//!         2 * page..2 * page + 1
//!     }
//!     fn fill(&self, page: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), Self::Error> {
//!         dst.copy_from_slice(from.bytes(2 * page * 4096, 4096));
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), uffd_compact::CompactError> {
//! let heap = Arc::new(Heap::new(HeapKind::Anon, 64 * 4096)?);
//! for page in 0..64 {
//!     heap.store(page * 4096, page as u64);
//! }
//! let prepared = match Compaction::prepare(&heap, Options::new(Mode::Move), Arc::new(EveryOther(64))) {
//!     Err(e) if e.is_denied() => return Ok(()), // no userfaultfd here: use Mode::StopTheWorld
//!     other => other?,
//! };
//! // ... pause mutators, point roots at new addresses ...
//! let running = prepared.start()?;
//! // ... resume mutators: their first touch of a page compacts it ...
//! assert_eq!(heap.load(5 * 4096), 10); // compacted on demand
//! let report = running.finish()?;
//! assert_eq!(heap.load(31 * 4096), 62);
//! assert_eq!(heap.load(40 * 4096), 0); // past the live end: zero
//! assert_eq!(report.moved + report.copied, 32); // on demand or in the background, once each
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod compaction;
mod error;
mod heap;
mod pool;
mod report;
mod sigbus;
mod state;

pub use compaction::{
    Compaction, Compactor, FromPages, Mode, Options, Prepared, Progress, Running,
};
pub use error::{CompactError, FillPanicked, Guard, InstallFailed, PageFailure};
pub use heap::{Heap, HeapKind, PAGE};
pub use report::Report;
