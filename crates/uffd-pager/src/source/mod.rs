//! Page sources: where the bytes of a page come from.
//!
//! The engine asks a [`PageSource`] for ranges of bytes by *source offset*
//! (the offset a [`crate::Region`] maps to), and never cares whether they come
//! from a file, memory, a network or an object store. A new source is one
//! file implementing the trait.

use std::fmt;
use std::io;

mod file;
mod layered;
mod memory;
mod remote;
mod zero;

pub use file::{FileMode, FileSource};
pub use layered::LayeredSource;
pub use memory::MemorySource;
pub use remote::{
    drop_runtime, AsyncPageSource, AsyncSource, Fetched, ReadDone, ReadFuture, DEFAULT_IN_FLIGHT,
};
pub use zero::ZeroSource;

/// What a read produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Content {
    /// The buffer holds the bytes.
    Data,
    /// The whole range is zero; the buffer may have been left untouched.
    /// The engine maps zero pages without copying anything.
    Zero,
}

/// Why a source could not produce bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// A failure that may go away (a timeout, `EINTR`-like conditions, a
    /// dropped connection); the engine retries a bounded number of times.
    #[error("reading source bytes {offset:#x}+{len:#x} failed (will retry): {source}")]
    Transient {
        /// Source offset of the read.
        offset: u64,
        /// Its length.
        len: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// A failure that retrying will not fix (`EIO`, a missing object).
    #[error("reading source bytes {offset:#x}+{len:#x} failed: {source}")]
    Failed {
        /// Source offset of the read.
        offset: u64,
        /// Its length.
        len: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The range lies (partly) past the end of the source, e.g. a snapshot
    /// file that is shorter than the memory it should fill.
    #[error("source bytes {offset:#x}+{len:#x} lie past its end ({size:#x} bytes): the snapshot is short")]
    OutOfRange {
        /// Source offset of the read.
        offset: u64,
        /// Its length.
        len: u64,
        /// The source's size.
        size: u64,
    },
}

impl SourceError {
    /// True when retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient { .. })
    }

    /// Classifies an I/O error: interruptions and timeouts are transient.
    pub fn from_io(offset: u64, len: u64, source: io::Error) -> SourceError {
        match source.kind() {
            io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => SourceError::Transient {
                offset,
                len,
                source,
            },
            _ => SourceError::Failed {
                offset,
                len,
                source,
            },
        }
    }
}

/// Where page contents come from.
///
/// Offsets are source offsets (the `offset` of a [`crate::Region`] plus the
/// page's distance from the region start). Implementations must be
/// shareable between threads: one source typically serves many handler
/// threads and many VMs at once. Reads may block (a network source can
/// wait on its peer): the engine calls them from its own threads.
pub trait PageSource: Send + Sync + fmt::Debug {
    /// The number of bytes the source can provide.
    fn len(&self) -> u64;

    /// True when the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    ///
    /// Returns [`Content::Zero`] when the whole range is known to be zero
    /// (then `buf` may be left as it was). A range past the end fails with
    /// [`SourceError::OutOfRange`]; the engine then poisons those pages.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError>;

    /// The bytes at `offset..offset + len` if they are already mapped in
    /// this process (a memory buffer, an mmap of a file), so the engine can
    /// hand them to the kernel without an intermediate copy. `None` when
    /// not available; the engine then calls [`PageSource::read_at`].
    ///
    /// The engine never reads these bytes itself (see [`MappedBytes`]); it
    /// learns which of them are zero from [`PageSource::is_known_zero`].
    ///
    /// Every `Some` is followed by one [`PageSource::mapped_done`] with the
    /// same range once the kernel has copied from it, so that a source
    /// that reuses its memory (a network destination dropping a page once
    /// a VM has it) can keep these bytes until then.
    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        let _ = (offset, len);
        None
    }

    /// The engine is done with the bytes [`PageSource::mapped`] gave for
    /// `offset..offset + len`. The default does nothing.
    fn mapped_done(&self, offset: u64, len: usize) {
        let _ = (offset, len);
    }

    /// The bytes of `offset..offset + len` are installed in a target's
    /// memory, which now holds its own copy: a source that keeps pages
    /// only until they are installed (a network destination's landing
    /// area) may drop its copy. The default does nothing.
    fn installed(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// True when every byte of `offset..offset + len` is known to be zero
    /// without reading it (a file's hole, a zero page found when the source
    /// was opened). The engine maps zero pages for such ranges. The default
    /// knows nothing.
    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// [`crate::Strategy::Continue`]: puts the bytes of
    /// `offset..offset + page_cache.len()` into `page_cache`, the pager's
    /// alias of the regions' file at exactly those source offsets, so that
    /// `UFFDIO_CONTINUE` can map them. The default reads them in with
    /// [`PageSource::read_at`].
    ///
    /// A source that writes the same file's page cache itself (a network
    /// destination landing pushed pages through an alias of its own) leaves
    /// the pages that are there alone, since they *are* the bytes: a page
    /// that arrived costs no copy and no request. Such a source must write
    /// each page at most once and only before it returns it here, or a
    /// mapped page (which the workload may have written) would change under
    /// the workload.
    fn read_into_page_cache(
        &self,
        offset: u64,
        page_cache: &mut [u8],
    ) -> Result<Content, SourceError> {
        self.read_at(offset, page_cache)
    }

    /// A hint that `offset..offset + len` will probably be read soon; a
    /// remote source can start fetching it. The default does nothing.
    fn advise(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// The read size this source works best with; the engine's background
    /// work batches to it. The default is 2 MiB.
    fn io_size(&self) -> usize {
        2 << 20
    }

    /// The same source as an [`AsyncSource`], when its reads wait on
    /// something far away: the engine then keeps many of them in flight
    /// instead of blocking a handler thread on each.
    fn asynchronous(&self) -> Option<&AsyncSource> {
        None
    }

    /// A short description for logs and reports.
    fn describe(&self) -> String;
}

/// Bytes of a source mapped in this process, to be handed to the kernel
/// (`UFFDIO_COPY` reads them) and never read by this process's own code.
///
/// A file mapping loses its pages when the file shrinks: a read of them in
/// user space raises SIGBUS, which would kill the whole server, while the
/// kernel copying from them reports `EFAULT`, which the engine turns into a
/// re-read with `pread(2)` and, for bytes that are gone, a poisoned page.
/// So this type offers the address, not a slice.
#[derive(Debug, Clone, Copy)]
pub struct MappedBytes<'a> {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    _source: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> MappedBytes<'a> {
    /// Bytes of memory that stays mapped (not necessarily readable) for
    /// `'a`. Taking a slice's address is always fine.
    pub fn new(bytes: &'a [u8]) -> MappedBytes<'a> {
        MappedBytes {
            ptr: std::ptr::NonNull::from(bytes).cast(),
            len: bytes.len(),
            _source: std::marker::PhantomData,
        }
    }

    /// A mapping at `ptr` of `len` bytes that its owner keeps mapped for
    /// `'a`. Nothing is read here; the caller only promises the address
    /// range stays reserved, so a kernel copy from it faults cleanly.
    pub(crate) fn from_mapping(ptr: std::ptr::NonNull<u8>, len: usize) -> MappedBytes<'a> {
        MappedBytes {
            ptr,
            len,
            _source: std::marker::PhantomData,
        }
    }

    /// The first byte's address, for an ioctl.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Checks that `offset..offset + len` lies inside a source of `size` bytes.
pub(crate) fn check_bounds(offset: u64, len: u64, size: u64) -> Result<(), SourceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(SourceError::OutOfRange { offset, len, size }),
    }
}

/// True if every byte of `bytes` is zero. Reads eight words at a time and
/// stops at the first non-zero chunk, so data pages cost a few nanoseconds.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for word in chunk.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[17] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 7]));
        assert!(!is_zero(&[0, 0, 3]));
    }
}
