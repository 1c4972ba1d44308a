//! What can go wrong in a compaction, with the step and a remedy.

use core::fmt;

use uffd::Errno;

use crate::report::Report;
use crate::Mode;

/// An error from preparing, starting or finishing a compaction.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The userfaultfd could not be opened or set up. When
    /// [`CompactError::is_denied`] holds, this process may not use
    /// userfaultfd at all; the inner error names the remedies (compaction
    /// itself only needs a user-mode-only userfaultfd, which an ordinary
    /// user gets unless seccomp or a container blocks the syscall).
    #[error("compaction needs a userfaultfd: {0}{hint}", hint = denied_hint(.0))]
    Uffd(#[source] uffd::Error),
    /// The mode cannot run on this heap or kernel.
    #[error("{mode} compaction is not possible here: {why}")]
    Unsupported {
        /// The mode asked for.
        mode: Mode,
        /// Why not, and what to use instead.
        why: &'static str,
    },
    /// A memory operation (mmap, mremap, fallocate, madvise) failed.
    #[error("{what} failed: {}{}", uffd::errno_name(*.errno), memory_hint(*.errno))]
    Memory {
        /// The step that failed.
        what: &'static str,
        /// What the kernel said.
        errno: Errno,
    },
    /// The compactor's `sources` answered a range outside the heap.
    #[error(
        "Compactor::sources({page}) returned from-space pages {start}..{end}, outside the heap's \
         {pages} pages"
    )]
    BadSources {
        /// The to-space page asked about.
        page: usize,
        /// Start of the answered range.
        start: usize,
        /// End of the answered range.
        end: usize,
        /// Pages in the heap.
        pages: usize,
    },
    /// `live_pages` is larger than the heap.
    #[error("Compactor::live_pages() is {live} but the heap has only {pages} pages")]
    TooManyLivePages {
        /// What the compactor said.
        live: usize,
        /// Pages in the heap.
        pages: usize,
    },
    /// Another compaction of this heap is prepared or running.
    #[error("this heap is already being compacted; finish (or drop) that compaction first")]
    Busy,
    /// Some pages could not be compacted. Every other page was installed
    /// and the heap was unregistered; the failed pages were made to fault
    /// loudly (POISON: SIGBUS on access; without POISON support they are
    /// mapped PROT_NONE: SIGSEGV), never left as silent zero pages.
    #[error("{}", pages_text(.failures))]
    Pages {
        /// Each failed page, in page order.
        failures: Vec<PageFailure>,
        /// What the compaction did otherwise.
        report: Box<Report>,
    },
}

impl CompactError {
    /// True when userfaultfd is denied to this process (see
    /// [`uffd::Error::is_denied`]); callers and tests skip or fall back to a
    /// stop-the-world compaction.
    pub fn is_denied(&self) -> bool {
        matches!(self, CompactError::Uffd(e) if e.is_denied())
    }

    pub(crate) fn memory(what: &'static str, errno: Errno) -> CompactError {
        CompactError::Memory { what, errno }
    }
}

/// One to-space page that could not be compacted.
#[derive(Debug)]
pub struct PageFailure {
    /// The to-space page index.
    pub page: usize,
    /// Why: the compactor's error, a panic in it, or a failed ioctl.
    pub error: Box<dyn std::error::Error + Send + Sync>,
    /// How the page was made to fail loudly.
    pub guard: Guard,
}

/// How a failed page was made to fail loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// `UFFDIO_POISON`: an access raises SIGBUS (the marker survives
    /// unregistering).
    Poisoned,
    /// `mprotect(PROT_NONE)`: an access raises SIGSEGV (stop-the-world mode,
    /// or a kernel without POISON).
    Protected,
    /// Neither worked; the page holds whatever was there. The error says why.
    Unguarded,
}

impl fmt::Display for PageFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let guard = match self.guard {
            Guard::Poisoned => "poisoned: access raises SIGBUS",
            Guard::Protected => "protected: access raises SIGSEGV",
            Guard::Unguarded => "NOT guarded: its content is stale",
        };
        write!(f, "page {}: {} ({guard})", self.page, self.error)
    }
}

/// A panic inside the compactor's `fill`, turned into an error so the page
/// fails loudly and no thread is left waiting.
#[derive(Debug, thiserror::Error)]
#[error("Compactor::fill panicked: {0}")]
pub struct FillPanicked(pub String);

/// An ioctl or memory step that failed while installing a page.
#[derive(Debug, thiserror::Error)]
#[error("installing the page failed: {0}")]
pub struct InstallFailed(#[source] pub uffd::Error);

fn pages_text(failures: &[PageFailure]) -> String {
    match failures.first() {
        Some(first) => format!(
            "{} page(s) could not be compacted; first {first}. Every other page was installed; \
             the runtime must not use the failed pages (abort or restore them)",
            failures.len()
        ),
        None => "no page failed".to_string(),
    }
}

fn denied_hint(e: &uffd::Error) -> &'static str {
    if e.is_denied() {
        "; or compact with Mode::StopTheWorld, which needs no userfaultfd"
    } else {
        ""
    }
}

fn memory_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::NOMEM => {
            "; out of memory or address space (compaction maps a from-space as large as the heap)"
        }
        Errno::INVAL => "; mremap(MREMAP_DONTUNMAP) needs Linux 5.7 (anonymous) or 5.13 (shmem)",
        Errno::NOSPC => "; the memfd could not be grown (tmpfs size limit?)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_userfaultfd_says_why_and_what_to_do() {
        let denied = CompactError::Uffd(uffd::Error::Open(vec![uffd::OpenFailure {
            path: uffd::OpenPath::Syscall,
            user_mode_only: true,
            errno: Errno::NOSYS,
        }]));
        assert!(denied.is_denied());
        let text = denied.to_string();
        assert!(text.contains("seccomp"), "{text}");
        assert!(text.contains("Mode::StopTheWorld"), "{text}");
        let other = CompactError::memory("mmap of the anonymous heap", Errno::NOMEM);
        assert!(!other.is_denied());
        assert!(other.to_string().contains("ENOMEM"), "{other}");
    }
}
