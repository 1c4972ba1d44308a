//! Safe, complete bindings to Linux userfaultfd.
//!
//! - Open a userfaultfd through the syscall or `/dev/userfaultfd`
//!   ([`OpenOptions`]), with errors that say how to get permission.
//! - Learn what the kernel supports without spending the fd you will use
//!   ([`probe`]); ask for [`Features`] by name.
//! - Register ranges in any [`RegisterMode`] and resolve faults with every
//!   ioctl: [`Uffd::copy`], [`Uffd::zeropage`], [`Uffd::write_protect`],
//!   [`Uffd::continue_`], [`Uffd::poison`], [`Uffd::move_`], [`Uffd::wake`].
//!   Each returns an [`Outcome`] that says what to do next and never loses
//!   partial progress; the `*_all` helpers resolve a range completely and
//!   wake after EEXIST.
//! - Read many [`Event`]s per `read(2)` into an [`EventBuffer`]; with the
//!   `tokio` feature, `AsyncUffd` streams them.
//! - Map the memory kinds userfaultfd serves as RAII [`Mapping`]s.
//!
//! A complete lazy-loading handler:
//!
//! ```
//! # fn main() -> Result<(), uffd::Error> {
//! use uffd::{CopyMode, Event, EventBuffer, Mapping, MemoryKind, RegisterMode, Resolved};
//!
//! # if let Err(e) = uffd::probe() { if e.is_denied() && std::env::var("UFFD_REQUIRE").as_deref() != Ok("1") { return Ok(()); } }
//! // User-mode-only: this process's own accesses are caught, no privilege needed.
//! let uffd = uffd::OpenOptions::new().user_mode_only(true).open()?;
//! let memory = Mapping::new(MemoryKind::Anon, 4 * 4096)?;
//! uffd.register(memory.addr(), memory.len() as u64, RegisterMode::MISSING)?;
//!
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         let page = [7u8; 4096];
//!         let mut buf = EventBuffer::new(16);
//!         let mut served = 0;
//!         while served < 4 {
//!             for event in uffd.read_events(&mut buf)?.drain(..) {
//!                 if let Event::Pagefault(fault) = event {
//!                     let dst = fault.page(4096);
//!                     // SAFETY: `page` is a live buffer; `dst` is registered
//!                     // memory that no reference covers.
//!                     let done = unsafe { uffd.copy_all(dst, page.as_ptr(), 4096, 4096, CopyMode::empty())? };
//!                     assert!(matches!(done, Resolved::Complete { .. }));
//!                     served += 1;
//!                 }
//!             }
//!         }
//!         Ok::<(), uffd::Error>(())
//!     });
//!     for i in 0..4 {
//!         assert_eq!(memory.read_byte(i * 4096 + 5), 7);
//!     }
//! });
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
mod asyncio;
mod error;
mod event;
mod features;
mod hugepages;
mod memory;
mod open;
mod outcome;
mod pagemap;
pub mod sys;
mod uffd;

#[cfg(feature = "tokio")]
pub use asyncio::{AsyncUffd, EventStream};
pub use error::{errno_name, Errno, Error, Op, OpenFailure, OpenPath};
pub use event::{Event, EventBuffer, FaultKind, Pagefault, PagefaultFlags};
pub use features::{Features, Ioctls, RegisterMode};
pub use hugepages::{
    free_hugepages, free_hugepages_of, hugepage_size_supported, nr_hugepages, nr_hugepages_of,
    HugepageReservation, SettingLock,
};
pub use memory::{
    map_anonymous_aligned, FileMapping, Mapping, MemoryKind, HUGE_PAGE_SIZE, PAGE_SIZE,
};
pub use open::{api, open_with, probe, probe_with, raw_api, ApiInfo, OpenMethod, OpenOptions};
pub use outcome::{Outcome, Resolved};
pub use pagemap::Pagemap;
pub use uffd::{
    answers_like_userfaultfd, is_userfaultfd, ContinueMode, CopyMode, MoveMode, PoisonMode, Uffd,
    WriteProtectMode, ZeropageMode,
};
