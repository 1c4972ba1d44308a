//! One implementation per resolving strategy: where a claimed run's bytes
//! are put for the ioctl, which ioctl installs them, what a fault on a page
//! already filled or being filled needs, and what REMOVE means for the
//! memory. The rest of the engine (claims, windows, events, fill) is the
//! same for every strategy and asks its [`Resolver`].
//!
//! | file | strategy | bytes from | ioctl |
//! |---|---|---|---|
//! | `copy.rs` | [`Strategy::Copy`] | the source's mapping, or a staging buffer | COPY, ZEROPAGE |
//! | `copy_wp.rs` | [`Strategy::CopyWp`] | as COPY | COPY with MODE_WP |
//! | `move.rs` | [`Strategy::Move`] | a staging buffer whose pages move | MOVE, ZEROPAGE |
//! | `continue.rs` | [`Strategy::Continue`] | written through the alias (page cache) | CONTINUE |

use super::*;

mod r#continue;
mod copy;
mod copy_wp;
mod r#move;

/// Where the bytes of a claimed run are for the ioctl.
pub(super) struct Staged {
    pub(super) content: Content,
    /// The first byte (null for [`Content::Zero`]).
    pub(super) src: *const u8,
    /// `src` is the source's own mapping, which only the kernel may read
    /// (see [`crate::MappedBytes`]).
    pub(super) from_mapping: bool,
}

/// A run of claimed pages of one kind, ready for its ioctl.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) page_size: u64,
    /// Zero pages: `data` is not read.
    pub(super) zero: bool,
    pub(super) data: *const u8,
    /// Map the pages now (a demand fault or its readahead), not only fill
    /// them (background work of a strategy whose content lives in the
    /// page cache).
    pub(super) map: bool,
}

/// What differs between strategies. The defaults are those of strategies
/// that map what they install (all but CONTINUE).
pub(super) trait Resolver: Sync + std::fmt::Debug {
    /// Puts the bytes of `len` bytes of claimed pages, from page `from` of
    /// `span`, where this strategy's ioctl takes them from: by default the
    /// source's mapping when it has one, else a read into the worker's
    /// staging buffer.
    fn stage(
        &self,
        worker: &Worker<'_>,
        span: &Span,
        from: usize,
        len: u64,
    ) -> Result<Staged, SourceError> {
        let offset = span.source_of(from);
        if let Some(bytes) = worker.shared.source.mapped(offset, len as usize) {
            return Ok(Staged {
                content: Content::Data,
                src: bytes.as_ptr(),
                from_mapping: true,
            });
        }
        staged(worker, offset, len)
    }

    /// Called once the pages of a staged run are sorted into `kinds` (0
    /// unclaimed, 1 zero, 2 data), before any is installed.
    fn prepare(&self, worker: &Worker<'_>, span: &Span, from: usize, kinds: &[u8]) {
        let _ = (worker, span, from, kinds);
    }

    /// What this strategy needs of the userfaultfd, the kernel and the
    /// regions.
    fn check(&self, uffd: &Uffd, regions: &[Region]) -> Result<(), ConfigError> {
        let _ = (uffd, regions);
        Ok(())
    }

    /// Installed pages are write-protected and their first writes tracked.
    fn tracks_writes(&self) -> bool {
        false
    }

    /// Installs one run.
    fn install(&self, worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error>;

    /// The counter of data pages this strategy installed, when a run
    /// installed with `mapped` counts at all (by default: copied pages).
    fn installed<'c>(&self, counters: &'c Counters, mapped: bool) -> Option<&'c AtomicU64> {
        let _ = mapped;
        Some(&counters.pages_copied)
    }

    /// Whole aligned huge pages of data are installed in one piece (their
    /// zero pages are not split off).
    fn keeps_huge_pages_whole(&self) -> bool {
        false
    }

    /// Reads of an asynchronous source may complete into a buffer of
    /// their own and be installed from it later.
    fn installs_from_any_buffer(&self) -> bool {
        true
    }

    /// A fault on a page another thread claimed: that thread's ioctl
    /// wakes it.
    fn on_claimed(&self) -> Step {
        Step::Done
    }

    /// A fault on a page already filled: `Some` when this strategy still
    /// has to map it (called under the table's read lock).
    fn map_filled(
        &self,
        worker: &Worker<'_>,
        target: &Target,
        addr: u64,
        page_size: u64,
        counts_latency: bool,
        started: Instant,
    ) -> Option<Step> {
        let _ = (worker, target, addr, page_size, counts_latency, started);
        None
    }

    /// A demand fault may take over a page the background work claimed.
    fn may_steal_background(&self) -> bool {
        true
    }

    /// After REMOVE the pages read as zero, so they are missing again
    /// (private memory); false when the page cache keeps their content.
    fn remove_makes_missing(&self) -> bool {
        true
    }
}

/// The implementation of `strategy`.
pub(super) fn resolver(strategy: Strategy) -> &'static dyn Resolver {
    match strategy {
        Strategy::Copy => &copy::Copy,
        Strategy::CopyWp => &copy_wp::CopyWp,
        Strategy::Move => &r#move::Move,
        Strategy::Continue => &r#continue::Continue,
    }
}

/// A read into the worker's staging buffer.
fn staged(worker: &Worker<'_>, offset: u64, len: u64) -> Result<Staged, SourceError> {
    let buf = worker.staging_for(len);
    let content = worker.read_source(offset, buf)?;
    Ok(Staged {
        content,
        src: worker.staging.as_ptr().cast_const(),
        from_mapping: false,
    })
}

/// Zero pages for strategies that map private copies: ZEROPAGE, or on
/// hugetlb (which has none) a COPY from the never-written zero buffer.
fn install_zeros(worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error> {
    if run.page_size == 4096 {
        return uffd.zeropage_all(run.addr, run.len, run.page_size, ZeropageMode::empty());
    }
    // SAFETY: the zero buffer is 2 MiB and a run never exceeds it; `addr`
    // is a claimed range of a registered region.
    unsafe {
        uffd.copy_all(
            run.addr,
            worker.zeros.as_ptr(),
            run.len,
            run.page_size,
            CopyMode::empty(),
        )
    }
}
