//! The raw userfaultfd uAPI: structs from `linux-raw-sys`, plus the few
//! request codes and mode flags it does not carry yet.
//!
//! This is the only file that knows numeric values of the kernel interface.
//! Request codes are computed from the struct sizes the way the kernel's
//! `_IO`/`_IOR`/`_IOWR` macros do, so a layout mismatch shows up as `ENOTTY`
//! rather than as silent memory corruption, and the unit tests pin them to the
//! values `linux-raw-sys` publishes where it publishes them.

#![allow(unsafe_code)]

use core::ffi::c_void;
use core::mem::size_of;

pub use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffd_msg, uffdio_api, uffdio_continue, uffdio_copy, uffdio_move,
    uffdio_poison, uffdio_range, uffdio_register, uffdio_writeprotect, uffdio_zeropage,
};
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};

/// The ioctl type byte of userfaultfd (`UFFDIO`).
pub const UFFDIO: u8 = 0xAA;
/// `UFFD_API`: the only API version the kernel knows.
pub const UFFD_API: u64 = 0xAA;

/// The request number of `UFFDIO_REGISTER`.
pub const NR_REGISTER: u8 = 0x00;
/// The request number of `UFFDIO_UNREGISTER`.
pub const NR_UNREGISTER: u8 = 0x01;
/// The request number of `UFFDIO_WAKE`.
pub const NR_WAKE: u8 = 0x02;
/// The request number of `UFFDIO_COPY`.
pub const NR_COPY: u8 = 0x03;
/// The request number of `UFFDIO_ZEROPAGE`.
pub const NR_ZEROPAGE: u8 = 0x04;
/// The request number of `UFFDIO_MOVE`.
pub const NR_MOVE: u8 = 0x05;
/// The request number of `UFFDIO_WRITEPROTECT`.
pub const NR_WRITEPROTECT: u8 = 0x06;
/// The request number of `UFFDIO_CONTINUE`.
pub const NR_CONTINUE: u8 = 0x07;
/// The request number of `UFFDIO_POISON`.
pub const NR_POISON: u8 = 0x08;
/// The request number of `UFFDIO_API`.
pub const NR_API: u8 = 0x3F;

/// The kernel's `UFFDIO_API`.
pub const UFFDIO_API: Opcode = opcode::read_write::<uffdio_api>(UFFDIO, NR_API);
/// The kernel's `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: Opcode = opcode::read_write::<uffdio_register>(UFFDIO, NR_REGISTER);
/// The kernel's `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: Opcode = opcode::read::<uffdio_range>(UFFDIO, NR_UNREGISTER);
/// The kernel's `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: Opcode = opcode::read::<uffdio_range>(UFFDIO, NR_WAKE);
/// The kernel's `UFFDIO_COPY`.
pub const UFFDIO_COPY: Opcode = opcode::read_write::<uffdio_copy>(UFFDIO, NR_COPY);
/// The kernel's `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: Opcode = opcode::read_write::<uffdio_zeropage>(UFFDIO, NR_ZEROPAGE);
/// The kernel's `UFFDIO_MOVE`.
pub const UFFDIO_MOVE: Opcode = opcode::read_write::<uffdio_move>(UFFDIO, NR_MOVE);
/// The kernel's `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: Opcode =
    opcode::read_write::<uffdio_writeprotect>(UFFDIO, NR_WRITEPROTECT);
/// The kernel's `UFFDIO_CONTINUE`.
pub const UFFDIO_CONTINUE: Opcode = opcode::read_write::<uffdio_continue>(UFFDIO, NR_CONTINUE);
/// The kernel's `UFFDIO_POISON`.
pub const UFFDIO_POISON: Opcode = opcode::read_write::<uffdio_poison>(UFFDIO, NR_POISON);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1).
pub const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);
/// `PAGEMAP_SCAN` on `/proc/<pid>/pagemap` (Linux 6.7).
pub const PAGEMAP_SCAN: Opcode = opcode::read_write::<pm_scan_arg>(b'f', 16);

/// The kernel's `UFFD_USER_MODE_ONLY`.
pub const UFFD_USER_MODE_ONLY: u32 = 1;

/// The kernel's `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// The kernel's `UFFD_EVENT_FORK`.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// The kernel's `UFFD_EVENT_REMAP`.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// The kernel's `UFFD_EVENT_REMOVE`.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// The kernel's `UFFD_EVENT_UNMAP`.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// The kernel's `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// The kernel's `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 2;
/// The kernel's `UFFDIO_REGISTER_MODE_MINOR`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 4;
/// The kernel's `UFFDIO_COPY_MODE_DONTWAKE`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
/// The kernel's `UFFDIO_COPY_MODE_WP`.
pub const UFFDIO_COPY_MODE_WP: u64 = 2;
/// The kernel's `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;
/// The kernel's `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// The kernel's `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 2;
/// The kernel's `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1;
/// The kernel's `UFFDIO_CONTINUE_MODE_WP`.
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 2;
/// The kernel's `UFFDIO_POISON_MODE_DONTWAKE`.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1;
/// The kernel's `UFFDIO_MOVE_MODE_DONTWAKE`.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1;
/// The kernel's `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 2;

/// A userfaultfd message is exactly 32 bytes on every architecture.
pub const MSG_SIZE: usize = size_of::<uffd_msg>();
const _: () = assert!(MSG_SIZE == 32);

/// An ioctl whose argument is a pointer (or an integer passed as one) and
/// whose result is the ioctl's return value.
pub(crate) struct RawIoctl {
    opcode: Opcode,
    arg: *mut c_void,
}

impl RawIoctl {
    /// An ioctl that reads and/or writes `*arg`.
    pub(crate) fn with_struct<T>(opcode: Opcode, arg: &mut T) -> Self {
        Self {
            opcode,
            arg: (arg as *mut T).cast(),
        }
    }

    /// An ioctl whose argument is a plain integer, not a pointer.
    pub(crate) fn with_int(opcode: Opcode, arg: usize) -> Self {
        Self {
            opcode,
            arg: arg as *mut c_void,
        }
    }
}

// SAFETY: the opcode and argument are the ones given by the caller of
// `with_struct`/`with_int`, whose unsafe `ioctl` call site promises they
// match; the kernel may write through `arg`, so the ioctl is mutating.
unsafe impl Ioctl for RawIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _extract_output: *mut c_void,
    ) -> rustix::io::Result<Self::Output> {
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl as published;

    #[test]
    fn request_codes_match_the_published_ones() {
        assert_eq!(UFFDIO_API, published::UFFDIO_API as Opcode);
        assert_eq!(UFFDIO_REGISTER, published::UFFDIO_REGISTER as Opcode);
        assert_eq!(UFFDIO_UNREGISTER, published::UFFDIO_UNREGISTER as Opcode);
        assert_eq!(UFFDIO_WAKE, published::UFFDIO_WAKE as Opcode);
        assert_eq!(UFFDIO_COPY, published::UFFDIO_COPY as Opcode);
        assert_eq!(UFFDIO_ZEROPAGE, published::UFFDIO_ZEROPAGE as Opcode);
        assert_eq!(
            UFFDIO_WRITEPROTECT,
            published::UFFDIO_WRITEPROTECT as Opcode
        );
        assert_eq!(UFFDIO_CONTINUE, published::UFFDIO_CONTINUE as Opcode);
    }

    #[test]
    fn request_codes_not_published_follow_the_kernel_macros() {
        // _IOWR(0xAA, 0x05, struct uffdio_move) and _IOWR(0xAA, 0x08, struct uffdio_poison)
        assert_eq!(UFFDIO_MOVE as u64, 0xC028_AA05);
        assert_eq!(UFFDIO_POISON as u64, 0xC020_AA08);
        assert_eq!(USERFAULTFD_IOC_NEW as u64, 0xAA00);
        assert_eq!(PAGEMAP_SCAN as u64, 0xC060_6610);
    }

    #[test]
    fn constants_agree_with_linux_raw_sys() {
        use linux_raw_sys::general as g;
        assert_eq!(u32::from(UFFD_EVENT_PAGEFAULT), g::UFFD_EVENT_PAGEFAULT);
        assert_eq!(u32::from(UFFD_EVENT_FORK), g::UFFD_EVENT_FORK);
        assert_eq!(u32::from(UFFD_EVENT_REMAP), g::UFFD_EVENT_REMAP);
        assert_eq!(u32::from(UFFD_EVENT_REMOVE), g::UFFD_EVENT_REMOVE);
        assert_eq!(u32::from(UFFD_EVENT_UNMAP), g::UFFD_EVENT_UNMAP);
        assert_eq!(
            UFFDIO_REGISTER_MODE_MINOR,
            u64::from(g::UFFDIO_REGISTER_MODE_MINOR)
        );
        assert_eq!(UFFDIO_COPY_MODE_WP, u64::from(g::UFFDIO_COPY_MODE_WP));
        assert_eq!(UFFD_USER_MODE_ONLY, g::UFFD_USER_MODE_ONLY);
    }
}
