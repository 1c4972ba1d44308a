//! COPY: the kernel copies the bytes into fresh pages of the target.

use super::*;

/// [`Strategy::Copy`].
#[derive(Debug)]
pub(in crate::engine) struct Copy;

impl Resolver for Copy {
    fn install(&self, worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error> {
        if run.zero {
            return install_zeros(worker, uffd, run);
        }
        // SAFETY: `data` holds `len` readable bytes that nobody writes
        // meanwhile (the source's mapping or our staging buffer); `addr` is
        // a claimed range of a registered region.
        unsafe {
            uffd.copy_all(
                run.addr,
                run.data,
                run.len,
                run.page_size,
                CopyMode::empty(),
            )
        }
    }
}
