//! One error enum for the crate, each variant named for the step that
//! failed and saying what to do about it.

use std::ops::Range;
use std::path::PathBuf;

/// Why a snapshot, a dirty scan or a delta failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The userfaultfd library refused (opening, registering, an ioctl).
    #[error("{step}: {source}")]
    Uffd {
        /// What was being done.
        step: &'static str,
        /// The library's error (errno, range and remedy).
        source: uffd::Error,
    },
    /// The kernel lacks something this needs.
    #[error("{0}")]
    Unsupported(String),
    /// A region given to a snapshot or a tracker is not usable.
    #[error("region {addr:#x}+{len:#x}: {why}")]
    BadRegion {
        /// Its start.
        addr: u64,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        why: String,
    },
    /// Reading or writing a file (the image, a delta, /proc).
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Pages were discarded (`MADV_DONTNEED`/`MADV_REMOVE`) or unmapped while
    /// the snapshot ran and before they were saved: their contents at t0
    /// are gone, so no image was written. Retry, keep discards out of the
    /// snapshot window (QEMU disables balloon discards during a background
    /// snapshot for this reason), or choose [`crate::DiscardPolicy::Zero`]
    /// when discarded memory is garbage to the application (a balloon).
    #[error(
        "{} page range(s) ({} bytes) of the image were discarded or unmapped before they could be saved \
         (first at image offset {:#x}); no image was written: retry, keep madvise(MADV_DONTNEED)/munmap \
         out of the snapshot, or use DiscardPolicy::Zero if discarded memory is garbage",
        ranges.len(), ranges.iter().map(|r| r.end - r.start).sum::<u64>(), ranges.first().map_or(0, |r| r.start)
    )]
    Discarded {
        /// Image offsets of the lost pages.
        ranges: Vec<Range<u64>>,
    },
    /// A delta file is not one this version can read, or is damaged.
    #[error("delta file {}: {why}", path.display())]
    BadDelta {
        /// The file.
        path: PathBuf,
        /// What check failed.
        why: String,
    },
    /// Layers that do not fit together.
    #[error("{0}")]
    Mismatch(String),
    /// The saver could not make progress (or was abandoned); it stopped
    /// and closed its userfaultfd, so no writer stays blocked, and wrote
    /// no image.
    #[error("the live snapshot stopped: {0}")]
    Stuck(String),
    /// The saver thread died (a bug); the userfaultfd was closed with it,
    /// so no thread stays blocked.
    #[error("the snapshot's saver thread panicked: {0}")]
    SaverPanicked(String),
}

impl Error {
    pub(crate) fn uffd(step: &'static str) -> impl FnOnce(uffd::Error) -> Error {
        move |source| Error::Uffd { step, source }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    /// True when userfaultfd itself is denied to this process (sysctl,
    /// seccomp, permissions): the remedy is in `uffd probe`.
    pub fn is_denied(&self) -> bool {
        matches!(self, Error::Uffd { source, .. } if source.is_denied())
    }
}
