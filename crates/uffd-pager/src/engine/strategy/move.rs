//! MOVE: the staging buffer's own pages are moved into the target, no
//! copy; whole aligned 2 MiB runs move as one huge page.

use super::*;

/// [`Strategy::Move`].
#[derive(Debug)]
pub(in crate::engine) struct Move;

impl Resolver for Move {
    fn stage(
        &self,
        worker: &Worker<'_>,
        span: &Span,
        from: usize,
        len: u64,
    ) -> Result<Staged, SourceError> {
        // Never the source's mapping: its pages are not ours to move.
        staged(worker, span.source_of(from), len)
    }

    fn install(&self, worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error> {
        if run.zero {
            return install_zeros(worker, uffd, run);
        }
        let Run {
            addr,
            len,
            page_size,
            data,
            ..
        } = run;
        // SAFETY: `data` is this worker's staging buffer, filled just now;
        // after the move those pages are gone from it and the next read
        // refills them. `addr` is claimed, registered.
        let moved =
            unsafe { uffd.move_all(addr, data.cast_mut(), len, page_size, MoveMode::empty()) };
        match moved {
            Err(e) if e.errno() == Some(rustix::io::Errno::BUSY) => {
                // A shared source page (a fork raced the read): copy.
                // SAFETY: `data` holds `len` bytes of the staging buffer
                // that nobody writes meanwhile; `addr` as above.
                unsafe { uffd.copy_all(addr, data, len, page_size, CopyMode::empty()) }
            }
            r => r,
        }
    }

    fn installed<'c>(&self, counters: &'c Counters, _mapped: bool) -> Option<&'c AtomicU64> {
        Some(&counters.pages_moved)
    }

    fn check(&self, _uffd: &Uffd, regions: &[Region]) -> Result<(), ConfigError> {
        if regions.iter().any(|r| r.page_size != 4096) {
            return Err(ConfigError::MoveNeedsBasePages);
        }
        // The kernel gates MOVE on its own support, not on the fd's
        // handshake.
        let kernel_has_move =
            uffd::probe().map_or(true, |info| info.features.contains(Features::MOVE));
        if !kernel_has_move {
            return Err(ConfigError::MoveUnsupported);
        }
        Ok(())
    }

    fn keeps_huge_pages_whole(&self) -> bool {
        true
    }

    fn installs_from_any_buffer(&self) -> bool {
        // Only the staging buffer's pages are ours to move.
        false
    }
}
