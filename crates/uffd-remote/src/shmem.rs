//! A process restoring its own memory post-copy into shmem, the design of
//! the 2021 minor-fault series: the workload's memory is a memfd
//! registered MISSING|MINOR; pages the page server pushes are written into
//! the page cache through an alias mapping with no ioctl at all; the first
//! touch of a page already there costs one `UFFDIO_CONTINUE`; only pages
//! that have not arrived go over the demand channel.
//!
//! ```no_run
//! use uffd_remote::{ShmemDestination, ShmemOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dest = ShmemDestination::start("10.0.0.1:7000", ShmemOptions::default())?;
//! let mut page = vec![0u8; 4096];
//! dest.memory().read(0, &mut page); // there already, or fetched now
//! println!("{:?}", dest.shutdown());
//! # Ok(())
//! # }
//! ```
//!
//! # How a page pushed and demanded at once is installed once
//!
//! Two writers may want the same page: the bulk channel's push and the
//! answer to a fault's demand read. The kernel decides which fault the
//! workload sees (MISSING while the page cache has no page, MINOR once a
//! write through the alias allocated one) but not whether the page's bytes
//! are all there: a page being copied through the alias is in the page
//! cache, half written, from its first byte. So neither the fault's kind
//! nor CONTINUE's success can say "complete"; the landing's per-page state
//! does (see `client::page`):
//!
//! - a writer claims a page (`EMPTY`/`DEMANDED` to `WRITING`, one
//!   compare-and-swap) before its first byte and publishes it (`ARRIVED`)
//!   after its last; a page that is claimed or published is never written
//!   again, so the loser of a push/demand race drops its copy and the
//!   page is written once;
//! - a pushed frame is read from the socket straight into the page cache,
//!   so its pages are held from before its first byte until the whole
//!   frame passed its checksum; one that fails (or is cut short) is zeroed
//!   back and released, never published, and a touch then asks for it;
//! - the pager maps a page (CONTINUE) only after
//!   [`PageSource::read_into_page_cache`] returned for it, which waits for
//!   `ARRIVED`: a fault on a half-written page (MINOR) waits for the
//!   writer, a fault on a page nobody claimed (MISSING, or MINOR on a page
//!   a failed write left behind) claims `DEMANDED` and asks for it;
//! - the pager's own per-page claims make one handler thread resolve each
//!   page, so each page is mapped by exactly one CONTINUE, and fault-around
//!   (which could map page-cache pages behind our back) is off in
//!   MINOR-registered ranges.
//!
//! A published page is never written through the alias again, so a page
//! the workload has mapped and written keeps the workload's bytes however
//! late a pushed copy of it comes.

#![allow(unsafe_code)]

use std::sync::Arc;

use uffd::{Features, Mapping, OpenOptions, RegisterMode};
use uffd_pager::{Content, PageSource, Pager, PagerError, Region, SourceError, Stats, Strategy};

use crate::client::{ConnectError, RemoteConfig, RemoteSource, RemoteStats};

/// How a [`ShmemDestination`] runs.
#[derive(Debug, Clone)]
pub struct ShmemOptions {
    /// The link to the page server.
    pub remote: RemoteConfig,
    /// Handler threads. A fault on a page that has not arrived holds its
    /// thread for a round trip, so more threads serve more such faults at
    /// once (default 2).
    pub threads: usize,
    /// Catch only the workload's user-mode accesses (allowed without
    /// privilege); a system call reading a page that has not arrived then
    /// fails with EFAULT instead of waiting for it (default on).
    pub user_mode_only: bool,
}

impl Default for ShmemOptions {
    fn default() -> Self {
        ShmemOptions {
            remote: RemoteConfig::default(),
            threads: 2,
            user_mode_only: true,
        }
    }
}

/// Why a [`ShmemDestination`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShmemError {
    /// The page server could not be reached, or its image cannot be shmem
    /// memory.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The userfaultfd could not be opened with MISSING and MINOR faults on
    /// shmem, or the memory not registered for them.
    #[error(
        "userfaultfd with MISSING|MINOR faults on shmem (Linux 5.14; vm.unprivileged_userfaultfd \
         or user-mode-only faults for an unprivileged process): {0}"
    )]
    Uffd(#[from] uffd::Error),
    /// The pager did not start.
    #[error(transparent)]
    Pager(#[from] PagerError),
}

/// Memory of this process restored post-copy from a page server into a
/// shmem memfd (see the [module docs](self) for the design).
///
/// Dropping it stops the pager like [`ShmemDestination::shutdown`].
#[derive(Debug)]
pub struct ShmemDestination {
    // Fields drop in order: the pager's threads stop before the link that
    // feeds them, and the memory outlives both (they hold it as well).
    pager: Pager,
    remote: Arc<RemoteSource>,
    memory: Arc<Mapping>,
}

impl ShmemDestination {
    /// Connects to the page server at `addr` (HOST:PORT), makes shmem memory
    /// as long as its image, registers it MISSING|MINOR on a userfaultfd of
    /// this process and serves it. The push (if the server runs with
    /// `--push`) starts landing pages in the page cache at once.
    pub fn start(addr: &str, options: ShmemOptions) -> Result<ShmemDestination, ShmemError> {
        let (remote, memory) = RemoteSource::connect_page_cache(addr, options.remote)?;
        let remote = Arc::new(remote);
        let uffd = OpenOptions::new()
            .user_mode_only(options.user_mode_only)
            .features(Features::MISSING_SHMEM | Features::MINOR_SHMEM)
            .open()?;
        let alias = memory.alias_ptr().expect("shmem memory has an alias");
        // SAFETY: the alias is `memory`'s, which this destination (and the
        // source) keeps mapped until after the pager stopped; `Mapping`
        // hands out no references to it.
        let region =
            unsafe { Region::new(memory.addr(), memory.len() as u64, 0, 4096).with_alias(alias) };
        let regions = vec![region];
        uffd_pager::register(&uffd, &regions, RegisterMode::MISSING | RegisterMode::MINOR)?;
        let source = Arc::new(PageCache {
            remote: Arc::clone(&remote),
        });
        let builder = Pager::builder(source)
            .strategy(Strategy::Continue)
            .threads(options.threads)
            .name("uffd-shmem");
        // SAFETY: `memory` is new and ours; `Mapping` gives out no
        // references to it, so nothing relies on what its missing pages
        // hold.
        let pager = unsafe { builder.start(uffd, regions) }?;
        Ok(ShmemDestination {
            pager,
            remote,
            memory,
        })
    }

    /// The restored memory: read and write it like any memory (every
    /// access to a page not yet mapped waits for it). It may be shared with
    /// other threads; once this destination is shut down, nothing serves
    /// its faults any more and pages that had not arrived read as zero, as
    /// after any pager's shutdown.
    pub fn memory(&self) -> &Arc<Mapping> {
        &self.memory
    }

    /// What the link saw: pages landed from the push and from demand
    /// reads, demand requests.
    pub fn remote_stats(&self) -> &RemoteStats {
        self.remote.stats()
    }

    /// Pages whose bytes are in the page cache (mapped or not).
    pub fn landed_pages(&self) -> u64 {
        self.remote.landed_pages()
    }

    /// The pager's counters (`pages_continued`: pages mapped; `eexist`).
    pub fn pager_stats(&self) -> Stats {
        self.pager.stats()
    }

    /// Stops the pager and the link; returns the pager's final counters.
    /// The memory stays readable to the end of this call only.
    pub fn shutdown(self) -> Stats {
        self.pager.shutdown()
    }
}

/// The pager's source: the remote link landing pages in the very page
/// cache the pager maps with CONTINUE.
#[derive(Debug)]
struct PageCache {
    remote: Arc<RemoteSource>,
}

impl PageSource for PageCache {
    fn len(&self) -> u64 {
        uffd_pager::AsyncPageSource::len(&*self.remote)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        self.remote.ensure_landed(offset, buf.len() as u64)?;
        self.remote.read_landed(offset, buf);
        Ok(Content::Data)
    }

    fn read_into_page_cache(
        &self,
        offset: u64,
        page_cache: &mut [u8],
    ) -> Result<Content, SourceError> {
        // `page_cache` maps the same file pages the link writes through
        // its alias: once they landed, they are in it, and nothing is
        // copied here.
        self.remote.ensure_landed(offset, page_cache.len() as u64)?;
        Ok(Content::Data)
    }

    fn describe(&self) -> String {
        format!(
            "{} into shmem page cache",
            uffd_pager::AsyncPageSource::describe(&*self.remote)
        )
    }
}
