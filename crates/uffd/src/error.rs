//! Errors, each carrying the errno and, where one exists, what to do about it.

use core::fmt;

pub use rustix::io::Errno;

use crate::features::Features;

/// How a userfaultfd is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenPath {
    /// The `userfaultfd(2)` system call.
    Syscall,
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` (Linux 6.1).
    DevNode,
}

impl fmt::Display for OpenPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenPath::Syscall => "userfaultfd(2)",
            OpenPath::DevNode => "/dev/userfaultfd",
        })
    }
}

/// A failure to open a userfaultfd through one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFailure {
    /// The path that was tried.
    pub path: OpenPath,
    /// Whether `UFFD_USER_MODE_ONLY` was asked for.
    pub user_mode_only: bool,
    /// What the kernel said.
    pub errno: Errno,
}

impl OpenFailure {
    /// A sentence a person can act on.
    pub fn remedy(&self) -> &'static str {
        match (self.path, self.errno) {
            (_, Errno::NOSYS) => {
                "this kernel has no userfaultfd (CONFIG_USERFAULTFD=n), or a seccomp \
                 filter (containers' default profiles) blocks the userfaultfd syscall; \
                 allow userfaultfd in the seccomp profile or run on a kernel built with it"
            }
            (OpenPath::Syscall, Errno::PERM) if self.user_mode_only => {
                "user-mode-only userfaultfd was refused: a seccomp filter or LSM forbids \
                 userfaultfd for this process"
            }
            (OpenPath::Syscall, Errno::PERM) => {
                "catching kernel-mode faults needs CAP_SYS_PTRACE or \
                 `sysctl vm.unprivileged_userfaultfd=1`; alternatively grant read/write on \
                 /dev/userfaultfd, or open with user-mode-only if only this process's own \
                 accesses must be caught"
            }
            (OpenPath::DevNode, Errno::ACCESS | Errno::PERM) => {
                "/dev/userfaultfd is not readable and writable by this user; grant access \
                 (e.g. a group with rw on the device node) or use the syscall path"
            }
            (OpenPath::DevNode, Errno::NOENT | Errno::NODEV | Errno::NXIO) => {
                "/dev/userfaultfd does not exist here (kernels before 6.1, or a container \
                 without the device); use the syscall path or pass the device into the container"
            }
            (OpenPath::DevNode, Errno::NOTTY | Errno::INVAL) => {
                "/dev/userfaultfd does not understand USERFAULTFD_IOC_NEW: the kernel is too old"
            }
            (_, Errno::MFILE | Errno::NFILE) => "too many open files: raise `ulimit -n`",
            (_, Errno::NOMEM) => "the kernel is out of memory",
            _ => "unexpected error from the kernel",
        }
    }
}

impl fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}: {} ({})",
            self.path,
            if self.user_mode_only {
                " with user-mode-only"
            } else {
                ""
            },
            errno_text(self.errno),
            self.remedy()
        )
    }
}

/// The ioctls, named as the kernel names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Op {
    Api,
    Register,
    Unregister,
    Wake,
    Copy,
    Zeropage,
    Move,
    Writeprotect,
    Continue,
    Poison,
    PagemapScan,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Api => "UFFDIO_API",
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::Zeropage => "UFFDIO_ZEROPAGE",
            Op::Move => "UFFDIO_MOVE",
            Op::Writeprotect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::PagemapScan => "PAGEMAP_SCAN",
        })
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No way of opening a userfaultfd worked; each attempt is listed.
    #[error("cannot open a userfaultfd: {}", list(.0))]
    Open(Vec<OpenFailure>),
    /// The kernel lacks features that were asked for.
    #[error(
        "the kernel does not support userfaultfd feature(s) {missing} (it supports {supported})"
    )]
    MissingFeatures {
        /// The requested features the kernel lacks.
        missing: Features,
        /// What the kernel does support.
        supported: Features,
    },
    /// `UFFDIO_API` refused the handshake.
    #[error("UFFDIO_API with features {requested} failed: {}{}", errno_text(*.errno), api_hint(*.errno, *.requested))]
    Api {
        /// The features that were requested.
        requested: Features,
        /// What the kernel said.
        errno: Errno,
    },
    /// An ioctl failed in a way that is not a normal outcome.
    #[error("{op} on {start:#x}+{len:#x} failed: {}{}", errno_text(*.errno), ioctl_hint(*.op, *.errno))]
    Ioctl {
        /// Which ioctl.
        op: Op,
        /// The start of the range it acted on.
        start: u64,
        /// The length of the range.
        len: u64,
        /// What the kernel said.
        errno: Errno,
    },
    /// An operation needs an ioctl the kernel or the range does not offer.
    #[error("{op} is not available: {why}")]
    Unsupported {
        /// Which ioctl.
        op: Op,
        /// Why not.
        why: &'static str,
    },
    /// `read(2)` on the userfaultfd failed.
    #[error("reading userfaultfd messages failed: {}", errno_text(*.0))]
    Read(Errno),
    /// `poll(2)` was used on a blocking userfaultfd, which the kernel
    /// always answers with POLLERR.
    #[error("poll on a blocking userfaultfd always fails (POLLERR); open it with OpenOptions::non_blocking(true)")]
    PollNeedsNonBlocking,
    /// An interface that polls the userfaultfd was given a blocking one.
    #[error(
        "{what} needs a non-blocking userfaultfd; open it with OpenOptions::non_blocking(true)"
    )]
    NeedsNonBlocking {
        /// What needs it.
        what: &'static str,
    },
    /// The kernel sent a message this crate does not understand.
    #[error("unknown userfaultfd message type {0:#x}")]
    UnknownEvent(u8),
    /// An address or length is not aligned or is empty.
    #[error("invalid range {start:#x}+{len:#x}: {why}")]
    InvalidRange {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Creating or mapping memory failed.
    #[error("{what} failed: {}{}", errno_text(*.errno), memory_hint(.what, *.errno))]
    Memory {
        /// The step that failed (`mmap`, `memfd_create`, ...).
        what: &'static str,
        /// What the kernel said.
        errno: Errno,
    },
    /// Another I/O error (e.g. on a sysctl file).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// For callers whose errors are `std::io::Error`: the kind follows the
/// errno, the message stays ours.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        let kind = e.errno().map_or(std::io::ErrorKind::Other, |errno| {
            std::io::Error::from_raw_os_error(errno.raw_os_error()).kind()
        });
        std::io::Error::new(kind, e)
    }
}

impl Error {
    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Open(failures) => failures.last().map(|f| f.errno),
            Error::Api { errno, .. }
            | Error::Ioctl { errno, .. }
            | Error::Read(errno)
            | Error::Memory { errno, .. } => Some(*errno),
            Error::Io { source, .. } => source.raw_os_error().map(Errno::from_raw_os_error),
            _ => None,
        }
    }

    /// True when userfaultfd is denied to this process (EPERM, EACCES or
    /// ENOSYS on every path), as in unprivileged containers. Tests use this
    /// to skip with the reason instead of failing.
    pub fn is_denied(&self) -> bool {
        match self {
            Error::Open(failures) => failures.iter().all(|f| {
                matches!(
                    f.errno,
                    Errno::PERM | Errno::ACCESS | Errno::NOSYS | Errno::NOENT
                )
            }),
            Error::Api { errno, .. } => *errno == Errno::PERM,
            _ => false,
        }
    }
}

/// `EAGAIN (Resource temporarily unavailable)`.
pub(crate) fn errno_text(errno: Errno) -> String {
    let name = errno_name(errno);
    let io = std::io::Error::from_raw_os_error(errno.raw_os_error());
    let text = io.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    format!("{name} ({text})")
}

/// The symbolic name of the errnos userfaultfd returns.
pub fn errno_name(errno: Errno) -> String {
    let name = match errno {
        Errno::PERM => "EPERM",
        Errno::NOENT => "ENOENT",
        Errno::SRCH => "ESRCH",
        Errno::INTR => "EINTR",
        Errno::AGAIN => "EAGAIN",
        Errno::NOMEM => "ENOMEM",
        Errno::ACCESS => "EACCES",
        Errno::FAULT => "EFAULT",
        Errno::BUSY => "EBUSY",
        Errno::EXIST => "EEXIST",
        Errno::NODEV => "ENODEV",
        Errno::INVAL => "EINVAL",
        Errno::NOTTY => "ENOTTY",
        Errno::NOSPC => "ENOSPC",
        Errno::NOSYS => "ENOSYS",
        Errno::OPNOTSUPP => "EOPNOTSUPP",
        Errno::MFILE => "EMFILE",
        Errno::NFILE => "ENFILE",
        Errno::NXIO => "ENXIO",
        Errno::BADF => "EBADF",
        Errno::SPIPE => "ESPIPE",
        Errno::TXTBSY => "ETXTBSY",
        _ => return format!("errno {}", errno.raw_os_error()),
    };
    name.to_string()
}

fn list(failures: &[OpenFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn api_hint(errno: Errno, requested: Features) -> &'static str {
    match errno {
        Errno::PERM if requested.contains(Features::EVENT_FORK) => {
            "; EVENT_FORK needs CAP_SYS_PTRACE in the caller's user namespace"
        }
        Errno::INVAL => "; a requested feature is unknown to this kernel, or the handshake was already done on this fd",
        _ => "",
    }
}

fn ioctl_hint(op: Op, errno: Errno) -> &'static str {
    match (op, errno) {
        (Op::Register, Errno::INVAL) => {
            "; the range must be page aligned, inside mappings that support the mode \
             (MINOR needs shmem or hugetlbfs, WP on shmem/hugetlbfs needs WP_HUGETLBFS_SHMEM), \
             and the mode's feature must have been requested"
        }
        (Op::Register, Errno::BUSY) => "; the range is registered with another userfaultfd",
        (Op::Register | Op::Unregister, Errno::NOMEM) => "; part of the range is not mapped",
        (Op::Continue, Errno::FAULT) => {
            "; the page is not in the page cache: write it through the alias mapping first"
        }
        (Op::Move, Errno::BUSY) => {
            "; a source page is shared (forked or KSM); use MADV_DONTFORK on the source"
        }
        (Op::Move, Errno::NOENT) => {
            "; a source page is missing (use ALLOW_SRC_HOLES) or a VMA changed"
        }
        (_, Errno::NOENT) => "; the range is not registered, or its mapping changed",
        (_, Errno::NOTTY) => "; the kernel does not know this ioctl",
        _ => "",
    }
}

fn memory_hint(what: &str, errno: Errno) -> &'static str {
    match errno {
        Errno::NOMEM if what.contains("huge") => {
            "; no free huge pages: reserve some with `echo N > /proc/sys/vm/nr_hugepages`"
        }
        Errno::NOMEM => "; out of memory or address space",
        Errno::INVAL if what.contains("huge") => "; 2 MiB huge pages are not available",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_when_every_path_is_refused() {
        let e = Error::Open(vec![
            OpenFailure {
                path: OpenPath::Syscall,
                user_mode_only: false,
                errno: Errno::PERM,
            },
            OpenFailure {
                path: OpenPath::DevNode,
                user_mode_only: false,
                errno: Errno::ACCESS,
            },
        ]);
        assert!(e.is_denied());
        let text = e.to_string();
        assert!(text.contains("vm.unprivileged_userfaultfd"), "{text}");
        assert!(text.contains("EACCES"), "{text}");
        assert!(text.contains("/dev/userfaultfd is not readable"), "{text}");
    }

    #[test]
    fn enosys_mentions_seccomp() {
        let f = OpenFailure {
            path: OpenPath::Syscall,
            user_mode_only: true,
            errno: Errno::NOSYS,
        };
        assert!(f.to_string().contains("seccomp"));
        assert!(f.to_string().contains("ENOSYS"));
    }

    #[test]
    fn ioctl_errors_name_the_ioctl_and_errno() {
        let e = Error::Ioctl {
            op: Op::Continue,
            start: 0x1000,
            len: 0x1000,
            errno: Errno::FAULT,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("UFFDIO_CONTINUE on 0x1000+0x1000 failed: EFAULT"),
            "{text}"
        );
        assert!(text.contains("alias"), "{text}");
        assert_eq!(e.errno(), Some(Errno::FAULT));
    }
}
