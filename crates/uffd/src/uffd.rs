//! The userfaultfd handle and every ioctl on it.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

use crate::error::{Errno, Error, Op, OpenPath};
use crate::event::{Event, EventBuffer};
use crate::features::{Features, Ioctls, RegisterMode};
use crate::outcome::{Outcome, Resolved};
use crate::sys;

bitflags::bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the faulting threads; wake the range later with [`Uffd::wake`].
        const DONTWAKE = sys::UFFDIO_COPY_MODE_DONTWAKE;
        /// Install the page write-protected, atomically (needs a WP registration).
        const WP = sys::UFFDIO_COPY_MODE_WP;
    }

    /// `UFFDIO_ZEROPAGE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ZeropageMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE;
    }

    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct WriteProtectMode: u64 {
        /// Protect; without it the range is unprotected (and woken).
        const WP = sys::UFFDIO_WRITEPROTECT_MODE_WP;
        /// When unprotecting, do not wake the faulting threads.
        const DONTWAKE = sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    }

    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map the page write-protected, atomically (Linux 6.4).
        const WP = sys::UFFDIO_CONTINUE_MODE_WP;
    }

    /// `UFFDIO_POISON_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PoisonMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = sys::UFFDIO_POISON_MODE_DONTWAKE;
    }

    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the faulting threads.
        const DONTWAKE = sys::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Holes in the source are skipped instead of failing with ENOENT.
        const ALLOW_SRC_HOLES = sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }
}

/// A userfaultfd after the `UFFDIO_API` handshake.
///
/// All methods take `&self`: the kernel serialises what needs serialising,
/// so one `Uffd` can be shared by many handler threads (it is `Send + Sync`).
/// Dropping it closes the fd, which unregisters every range: later faults
/// there are served by the kernel as if no handler existed.
///
/// With the non-cooperative events (EVENT_REMOVE, EVENT_UNMAP, EVENT_REMAP,
/// EVENT_FORK) the kernel makes `madvise`, `munmap`, `mremap` and `fork` of
/// registered memory wait until the event has been read. A thread that both
/// owns such a userfaultfd and unmaps registered memory (for example by
/// dropping a [`crate::Mapping`]) must drop the userfaultfd first, or have
/// another thread reading events, or it waits for itself forever.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    ioctls: Ioctls,
    path: Option<OpenPath>,
}

impl Uffd {
    /// A userfaultfd with default options and the given features.
    pub fn new(features: Features) -> Result<Uffd, Error> {
        crate::OpenOptions::new().features(features).open()
    }

    pub(crate) fn from_parts(
        fd: OwnedFd,
        features: Features,
        ioctls: Ioctls,
        path: Option<OpenPath>,
    ) -> Uffd {
        Uffd {
            fd,
            features,
            ioctls,
            path,
        }
    }

    /// Adopts a userfaultfd whose handshake another process did (for example
    /// one received over a Unix socket from a VMM). `features` are the
    /// features that process enabled, as far as the caller knows them.
    ///
    /// Fails with [`Error::Unsupported`] if `fd` is not a userfaultfd.
    pub fn from_fd(fd: OwnedFd, features: Features) -> Result<Uffd, Error> {
        if !is_userfaultfd(&fd) {
            return Err(Error::Unsupported {
                op: Op::Api,
                why: "the file descriptor is not a userfaultfd",
            });
        }
        Ok(Uffd::from_parts(
            fd,
            features,
            Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER,
            None,
        ))
    }

    /// The features enabled at the handshake.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The ioctls the handshake reported.
    pub fn api_ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// How this fd was opened (`None` for an adopted or forked fd).
    pub fn open_path(&self) -> Option<OpenPath> {
        self.path
    }

    /// `UFFDIO_REGISTER`: start reporting faults of `mode` in the range;
    /// returns the ioctls valid on it (hugetlb has no ZEROPAGE, CONTINUE
    /// needs MINOR, ...).
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<Ioctls, Error> {
        check_range(start, len)?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl_plain(Op::Register, sys::UFFDIO_REGISTER, &mut arg, start, len)?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// `UFFDIO_UNREGISTER`: stop reporting faults in the range. Threads
    /// already waiting there are woken and retry the fault without a handler.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Error> {
        check_range(start, len)?;
        let mut arg = sys::uffdio_range { start, len };
        self.ioctl_plain(Op::Unregister, sys::UFFDIO_UNREGISTER, &mut arg, start, len)
    }

    /// `UFFDIO_WAKE`: wake threads waiting on faults in the range (after
    /// resolves with DONTWAKE, or after EEXIST).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Error> {
        check_range(start, len)?;
        let mut arg = sys::uffdio_range { start, len };
        self.ioctl_plain(Op::Wake, sys::UFFDIO_WAKE, &mut arg, start, len)
    }

    /// `UFFDIO_COPY`: fills missing pages at `dst` with `len` bytes read from
    /// `src` in this process.
    ///
    /// # Safety
    /// - `src..src+len` must be readable memory of this process that is not
    ///   written concurrently (the kernel reads it; a bad pointer yields
    ///   EFAULT, but a concurrent write yields torn page contents).
    /// - `dst..dst+len` lies in a range registered on this userfaultfd. If
    ///   it is this process's own memory, no Rust reference may cover it,
    ///   since its contents change behind the compiler's back.
    pub unsafe fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: CopyMode,
    ) -> Result<Outcome, Error> {
        check_range(dst, len)?;
        let mut arg = sys::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: mode.bits(),
            copy: 0,
        };
        let result = self.ioctl(sys::UFFDIO_COPY, &mut arg);
        self.outcome(Op::Copy, result, arg.copy, dst, len)
    }

    /// `UFFDIO_ZEROPAGE`: maps zero pages at the missing pages of the range.
    /// Not valid on hugetlb (EINVAL); use COPY from a zeroed buffer there.
    pub fn zeropage(&self, start: u64, len: u64, mode: ZeropageMode) -> Result<Outcome, Error> {
        check_range(start, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            zeropage: 0,
        };
        let result = self.ioctl(sys::UFFDIO_ZEROPAGE, &mut arg);
        self.outcome(Op::Zeropage, result, arg.zeropage, start, len)
    }

    /// `UFFDIO_WRITEPROTECT`: with [`WriteProtectMode::WP`] protects the
    /// range, without it unprotects it and wakes the writers (unless DONTWAKE).
    ///
    /// Returns [`Outcome::Complete`], [`Outcome::RetryAfterEvents`] or
    /// [`Outcome::TargetGone`].
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        mode: WriteProtectMode,
    ) -> Result<Outcome, Error> {
        check_range(start, len)?;
        require_kernel(
            Op::Writeprotect,
            Features::PAGEFAULT_FLAG_WP,
            "the kernel has no userfaultfd write-protect (Linux 5.7)",
        )?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
        };
        let result = self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg);
        let field = if result.is_ok() { len as i64 } else { 0 };
        self.outcome(Op::Writeprotect, result, field, start, len)
    }

    /// `UFFDIO_CONTINUE`: maps pages that are already in the page cache
    /// (shmem, hugetlbfs) into a range registered with MINOR. Fill or fix the
    /// content through an unregistered alias mapping first.
    ///
    /// A page that is already mapped gives [`Outcome::AlreadyPresent`]; a
    /// page that is not in the page cache gives an EFAULT error.
    pub fn continue_(&self, start: u64, len: u64, mode: ContinueMode) -> Result<Outcome, Error> {
        check_range(start, len)?;
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            mapped: 0,
        };
        let result = self.ioctl(sys::UFFDIO_CONTINUE, &mut arg);
        self.outcome(Op::Continue, result, arg.mapped, start, len)
    }

    /// `UFFDIO_POISON`: marks the missing pages of the range so that any
    /// access raises SIGBUS; the answer when a page's content cannot be
    /// produced. Needs a kernel with [`Features::POISON`]; the fd itself
    /// need not have requested it.
    ///
    /// # Safety
    /// Any access to the range afterwards raises SIGBUS in the accessing
    /// thread: if the range is this process's own memory, the caller must
    /// make sure no code relies on reading it (a Rust reference to it would
    /// turn into a crash).
    pub unsafe fn poison(&self, start: u64, len: u64, mode: PoisonMode) -> Result<Outcome, Error> {
        check_range(start, len)?;
        require_kernel(
            Op::Poison,
            Features::POISON,
            "the kernel has no UFFDIO_POISON (Linux 6.6)",
        )?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            updated: 0,
        };
        let result = self.ioctl(sys::UFFDIO_POISON, &mut arg);
        self.outcome(Op::Poison, result, arg.updated, start, len)
    }

    /// `UFFDIO_MOVE`: moves the pages at `src` (anonymous, private,
    /// exclusive to this process) to the missing pages at `dst` without
    /// copying them. Needs a kernel with [`Features::MOVE`]; the fd itself
    /// need not have requested it.
    ///
    /// # Safety
    /// - After the call the source pages are gone: `src..src+len` reads as
    ///   unpopulated (a fault, or zero pages) and no Rust reference may
    ///   cover it while the move runs or expect its old contents afterwards.
    /// - `dst..dst+len` lies in a range registered on this userfaultfd, with
    ///   the same caveat as [`Uffd::copy`].
    pub unsafe fn move_(
        &self,
        dst: u64,
        src: *mut u8,
        len: u64,
        mode: MoveMode,
    ) -> Result<Outcome, Error> {
        check_range(dst, len)?;
        require_kernel(
            Op::Move,
            Features::MOVE,
            "the kernel has no UFFDIO_MOVE (Linux 6.8)",
        )?;
        let mut arg = sys::uffdio_move {
            dst,
            src: src as u64,
            len,
            mode: mode.bits(),
            move_: 0,
        };
        let result = self.ioctl(sys::UFFDIO_MOVE, &mut arg);
        self.outcome(Op::Move, result, arg.move_, dst, len)
    }

    /// Resolves `dst..dst+len` completely with COPY; see [`Uffd::resolve`].
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn copy_all(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        page_size: u64,
        mode: CopyMode,
    ) -> Result<Resolved, Error> {
        self.resolve(dst, len, page_size, |off, rest| {
            // SAFETY: `src + off .. src + off + rest` lies inside the range the
            // caller vouched for.
            unsafe { self.copy(dst + off, src.add(off as usize), rest, mode) }
        })
    }

    /// Resolves the range completely with ZEROPAGE; see [`Uffd::resolve`].
    pub fn zeropage_all(
        &self,
        start: u64,
        len: u64,
        page_size: u64,
        mode: ZeropageMode,
    ) -> Result<Resolved, Error> {
        self.resolve(start, len, page_size, |off, rest| {
            self.zeropage(start + off, rest, mode)
        })
    }

    /// Resolves the range completely with CONTINUE; see [`Uffd::resolve`].
    pub fn continue_all(
        &self,
        start: u64,
        len: u64,
        page_size: u64,
        mode: ContinueMode,
    ) -> Result<Resolved, Error> {
        self.resolve(start, len, page_size, |off, rest| {
            self.continue_(start + off, rest, mode)
        })
    }

    /// Resolves `dst..dst+len` completely with MOVE; see [`Uffd::resolve`].
    /// Source pages whose destination was already present stay in place.
    ///
    /// # Safety
    /// As for [`Uffd::move_`].
    pub unsafe fn move_all(
        &self,
        dst: u64,
        src: *mut u8,
        len: u64,
        page_size: u64,
        mode: MoveMode,
    ) -> Result<Resolved, Error> {
        self.resolve(dst, len, page_size, |off, rest| {
            // SAFETY: inside the range the caller vouched for.
            unsafe { self.move_(dst + off, src.add(off as usize), rest, mode) }
        })
    }

    /// Drives a resolving ioctl over a whole range: continues after partial
    /// progress; when a page is already present, wakes it (the kernel does
    /// not wake on failure, and a thread may sleep on it) and goes on with
    /// the next page; stops at the first pending event so the caller can
    /// drain events and call again from `start + done`.
    ///
    /// `step(offset, remaining)` performs one ioctl on
    /// `start + offset .. start + offset + remaining`.
    pub fn resolve(
        &self,
        start: u64,
        len: u64,
        page_size: u64,
        mut step: impl FnMut(u64, u64) -> Result<Outcome, Error>,
    ) -> Result<Resolved, Error> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Error::InvalidRange {
                start,
                len: page_size,
                why: "page size must be a power of two",
            });
        }
        let mut done = 0;
        let mut installed = 0;
        let mut existing = 0;
        while done < len {
            match step(done, len - done)? {
                Outcome::Complete { bytes } | Outcome::Partial { bytes } => {
                    done += bytes;
                    installed += bytes;
                }
                Outcome::AlreadyPresent => {
                    let skip = page_size.min(len - done);
                    self.wake(start + done, skip)?;
                    done += skip;
                    existing += skip;
                }
                Outcome::RetryAfterEvents => return Ok(Resolved::RetryAfterEvents { done }),
                Outcome::TargetGone => return Ok(Resolved::TargetGone),
            }
        }
        Ok(Resolved::Complete {
            installed,
            existing,
        })
    }

    /// Reads as many messages as are queued (up to the buffer's capacity)
    /// with one `read(2)` and returns them decoded. Retries EINTR. On a
    /// non-blocking fd, returns no events when none are queued; on a blocking
    /// fd, waits for at least one.
    pub fn read_events<'b>(&self, buf: &'b mut EventBuffer) -> Result<&'b mut Vec<Event>, Error> {
        buf.fill_from(self)
    }

    /// Waits until messages can be read or `timeout` passes; `Ok(false)` on
    /// timeout.
    ///
    /// The fd must be non-blocking: the kernel answers `poll(2)` on a
    /// blocking userfaultfd with POLLERR (a fault can be resolved between
    /// poll and read, so a blocking read could hang), which this reports as
    /// [`Error::PollNeedsNonBlocking`].
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        let timeout = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        loop {
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    let revents = fds[0].revents();
                    if revents.contains(PollFlags::ERR) {
                        let flags = rustix::fs::fcntl_getfl(&self.fd).map_err(Error::Read)?;
                        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
                            return Err(Error::PollNeedsNonBlocking);
                        }
                        return Err(Error::Read(Errno::BADF));
                    }
                    return Ok(true);
                }
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(Error::Read(errno)),
            }
        }
    }

    fn ioctl<T>(&self, opcode: rustix::ioctl::Opcode, arg: &mut T) -> Result<(), Errno> {
        let req = sys::RawIoctl::with_struct(opcode, arg);
        // SAFETY: every caller pairs the opcode with the uAPI struct it
        // expects; the kernel reads and writes only that struct here. Memory
        // the struct points to is the caller's responsibility (see the
        // `unsafe fn`s above).
        unsafe { rustix::ioctl::ioctl(&self.fd, req) }.map(drop)
    }

    fn ioctl_plain<T>(
        &self,
        op: Op,
        opcode: rustix::ioctl::Opcode,
        arg: &mut T,
        start: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.ioctl(opcode, arg).map_err(|errno| Error::Ioctl {
            op,
            start,
            len,
            errno,
        })
    }

    fn outcome(
        &self,
        op: Op,
        result: Result<(), Errno>,
        field: i64,
        start: u64,
        len: u64,
    ) -> Result<Outcome, Error> {
        Outcome::from_kernel(result, field, len).map_err(|errno| Error::Ioctl {
            op,
            start,
            len,
            errno,
        })
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(uffd: Uffd) -> OwnedFd {
        uffd.fd
    }
}

/// Fails with [`Error::Unsupported`] when the kernel lacks `feature`.
///
/// The kernel gates these ioctls on its own support, not on the features a
/// fd asked for at the handshake (6.18 accepts POISON and MOVE on a fd that
/// never requested them), so a fd adopted from a VMM that did not ask for
/// them can still use them. The probe runs once per process; if it cannot
/// run, the kernel is left to answer.
fn require_kernel(op: Op, feature: Features, why: &'static str) -> Result<(), Error> {
    match crate::open::kernel_features() {
        Some(kernel) if !kernel.contains(feature) => Err(Error::Unsupported { op, why }),
        _ => Ok(()),
    }
}

/// True if `fd` refers to a userfaultfd.
///
/// Asks `/proc/self/fd` for the anon inode's name; where `/proc` is not
/// mounted (some containers), asks the fd itself: `UFFDIO_WAKE` of an empty
/// range is EINVAL on a userfaultfd (initialised or not) and ENOTTY on files,
/// pipes, sockets and the other anon inodes.
pub fn is_userfaultfd(fd: impl AsFd) -> bool {
    let fd = fd.as_fd();
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match std::fs::read_link(link) {
        Ok(target) => target.as_os_str() == "anon_inode:[userfaultfd]",
        Err(_) => answers_like_userfaultfd(fd),
    }
}

/// The `/proc`-free test of [`is_userfaultfd`]: an empty `UFFDIO_WAKE`.
#[doc(hidden)]
pub fn answers_like_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    let mut empty = sys::uffdio_range { start: 0, len: 0 };
    let req = sys::RawIoctl::with_struct(sys::UFFDIO_WAKE, &mut empty);
    // SAFETY: UFFDIO_WAKE only reads a `struct uffdio_range`, which `empty`
    // is; an empty range wakes nothing even on a userfaultfd.
    let result = unsafe { rustix::ioctl::ioctl(fd, req) };
    result == Err(Errno::INVAL)
}

fn check_range(start: u64, len: u64) -> Result<(), Error> {
    const PAGE: u64 = 4096;
    let why = if len == 0 {
        "empty range"
    } else if !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        "start and length must be multiples of the page size"
    } else if start.checked_add(len).is_none() {
        "range wraps around the address space"
    } else {
        return Ok(());
    };
    Err(Error::InvalidRange { start, len, why })
}
