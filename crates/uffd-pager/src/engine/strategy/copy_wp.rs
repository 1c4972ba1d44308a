//! COPY with MODE_WP: pages arrive write-protected, so the first write to
//! each is seen (dirty tracking of restored memory).

use super::*;

/// [`Strategy::CopyWp`].
#[derive(Debug)]
pub(in crate::engine) struct CopyWp;

impl Resolver for CopyWp {
    fn install(&self, worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error> {
        // Zero pages are copied too: ZEROPAGE has no write-protect mode.
        let src = if run.zero {
            worker.zeros.as_ptr().cast_const()
        } else {
            run.data
        };
        // SAFETY: `src` holds `len` bytes (the zero buffer is 2 MiB and runs
        // never exceed it); `addr` is a claimed range of a registered region.
        unsafe { uffd.copy_all(run.addr, src, run.len, run.page_size, CopyMode::WP) }
    }

    fn check(&self, uffd: &Uffd, _regions: &[Region]) -> Result<(), ConfigError> {
        if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
            return Err(ConfigError::CopyWpNeedsWp);
        }
        Ok(())
    }

    fn tracks_writes(&self) -> bool {
        true
    }
}
