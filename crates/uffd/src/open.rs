//! Opening a userfaultfd (syscall or `/dev/userfaultfd`) and the `UFFDIO_API`
//! handshake, including probing what the kernel supports.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags};
use rustix::mm::UserfaultfdFlags;

use crate::error::{Errno, Error, OpenFailure, OpenPath};
use crate::features::{Features, Ioctls};
use crate::sys;
use crate::uffd::Uffd;

/// Which way to open a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OpenMethod {
    /// The syscall first, then `/dev/userfaultfd` if the syscall is refused.
    #[default]
    Auto,
    /// Only the `userfaultfd(2)` syscall.
    Syscall,
    /// Only `/dev/userfaultfd`.
    DevNode,
}

/// What the kernel offers, as `UFFDIO_API` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiInfo {
    /// Features the kernel supports.
    pub features: Features,
    /// Ioctls valid on a userfaultfd (API, REGISTER, UNREGISTER).
    pub ioctls: Ioctls,
}

/// Options for opening a userfaultfd, builder style.
///
/// ```no_run
/// use uffd::{Features, OpenOptions};
/// let uffd = OpenOptions::new()
///     .non_blocking(true)
///     .features(Features::EVENT_REMOVE | Features::THREAD_ID)
///     .open()?;
/// # Ok::<(), uffd::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpenOptions {
    method: OpenMethod,
    close_on_exec: bool,
    non_blocking: bool,
    user_mode_only: bool,
    features: Features,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// Close-on-exec, blocking, catching kernel-mode faults too, no
    /// features, opened by whichever method works.
    pub fn new() -> Self {
        Self {
            method: OpenMethod::Auto,
            close_on_exec: true,
            non_blocking: false,
            user_mode_only: false,
            features: Features::empty(),
        }
    }

    /// How to open (default [`OpenMethod::Auto`]).
    pub fn method(mut self, method: OpenMethod) -> Self {
        self.method = method;
        self
    }

    /// `O_CLOEXEC` (default on).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }

    /// `O_NONBLOCK`: `read(2)` returns no events instead of waiting (default off).
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }

    /// `UFFD_USER_MODE_ONLY`: only faults from user space are caught; a
    /// kernel access to a missing page (e.g. `read(2)` into the range, KVM)
    /// fails with EFAULT instead. Allowed without privilege (default off).
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }

    /// The features to enable. Unsupported ones are reported by name before
    /// anything is opened for real.
    pub fn features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }

    /// Opens the userfaultfd and performs the `UFFDIO_API` handshake.
    ///
    /// The kernel accepts the handshake once per fd and fails it for any
    /// unsupported feature, so when features are requested the supported set
    /// is first learned on a throwaway fd (once per process, see
    /// [`probe`]) and a missing feature is reported as
    /// [`Error::MissingFeatures`].
    pub fn open(&self) -> Result<Uffd, Error> {
        if !self.features.is_empty() {
            let supported = probe()?.features;
            let missing = self.features - supported;
            if !missing.is_empty() {
                return Err(Error::MissingFeatures { missing, supported });
            }
        }
        let (fd, path) = self.open_raw()?;
        let info = api(&fd, self.features)?;
        Ok(Uffd::from_parts(fd, self.features, info.ioctls, Some(path)))
    }

    /// Opens a userfaultfd without the handshake, trying the methods in order.
    pub(crate) fn open_raw(&self) -> Result<(OwnedFd, OpenPath), Error> {
        let paths: &[OpenPath] = match self.method {
            OpenMethod::Auto => &[OpenPath::Syscall, OpenPath::DevNode],
            OpenMethod::Syscall => &[OpenPath::Syscall],
            OpenMethod::DevNode => &[OpenPath::DevNode],
        };
        let mut failures = Vec::new();
        for &path in paths {
            match open_with(path, self.flags()) {
                Ok(fd) => return Ok((fd, path)),
                Err(errno) => failures.push(OpenFailure {
                    path,
                    user_mode_only: self.user_mode_only,
                    errno,
                }),
            }
        }
        Err(Error::Open(failures))
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.close_on_exec {
            flags |= OFlags::CLOEXEC.bits();
        }
        if self.non_blocking {
            flags |= OFlags::NONBLOCK.bits();
        }
        if self.user_mode_only {
            flags |= sys::UFFD_USER_MODE_ONLY;
        }
        flags
    }
}

/// Opens through one path with the syscall's flags.
pub fn open_with(path: OpenPath, flags: u32) -> Result<OwnedFd, Errno> {
    match path {
        OpenPath::Syscall => {
            // SAFETY: creating the fd is harmless; what it can do to memory is
            // exposed only through this crate's ioctl wrappers.
            unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::from_bits_retain(flags)) }
        }
        OpenPath::DevNode => {
            let dev = rustix::fs::open(
                "/dev/userfaultfd",
                OFlags::RDWR | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let req = sys::RawIoctl::with_int(sys::USERFAULTFD_IOC_NEW, flags as usize);
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags as an integer
            // argument and returns a new fd, which nothing else owns.
            let raw = unsafe { rustix::ioctl::ioctl(&dev, req) }?;
            // SAFETY: a successful USERFAULTFD_IOC_NEW returns a fresh fd.
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
        }
    }
}

/// Performs the `UFFDIO_API` handshake on a fresh fd.
pub fn api(fd: impl AsFd, features: Features) -> Result<ApiInfo, Error> {
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    raw_api(fd, &mut arg).map_err(|errno| Error::Api {
        requested: features,
        errno,
    })?;
    Ok(ApiInfo {
        features: Features::from_bits_retain(arg.features),
        ioctls: Ioctls::from_bits_retain(arg.ioctls),
    })
}

/// `UFFDIO_API` with a caller-built argument, for tests of the handshake
/// itself (bad API numbers, unknown bits, a second call).
pub fn raw_api(fd: impl AsFd, arg: &mut sys::uffdio_api) -> Result<(), Errno> {
    let req = sys::RawIoctl::with_struct(sys::UFFDIO_API, arg);
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `arg` is.
    unsafe { rustix::ioctl::ioctl(fd, req) }.map(drop)
}

static PROBED: OnceLock<ApiInfo> = OnceLock::new();

/// What the kernel supports, learned once per process on a throwaway
/// userfaultfd (user-mode-only, so that it works without privilege).
pub fn probe() -> Result<ApiInfo, Error> {
    if let Some(info) = PROBED.get() {
        return Ok(*info);
    }
    let info = probe_with(OpenOptions::new().user_mode_only(true))?;
    Ok(*PROBED.get_or_init(|| info))
}

static KERNEL_FEATURES: OnceLock<Option<Features>> = OnceLock::new();

/// The kernel's features for per-ioctl checks: probed once, and `None` for
/// good when the probe cannot run here, so a hot path never retries it.
pub(crate) fn kernel_features() -> Option<Features> {
    *KERNEL_FEATURES.get_or_init(|| probe().ok().map(|info| info.features))
}

/// What the kernel supports, probed through a throwaway fd opened with
/// `options` (its features are ignored), without caching.
pub fn probe_with(options: OpenOptions) -> Result<ApiInfo, Error> {
    let (fd, _) = options.features(Features::empty()).open_raw()?;
    api(&fd, Features::empty())
}
