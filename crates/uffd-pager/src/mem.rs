//! Anonymous memory aligned to 2 MiB: staging buffers for MOVE (whole
//! transparent huge pages move with one PMD update) and targets that can
//! receive them.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::NonNull;

use rustix::mm::{Advice, MapFlags, ProtFlags};

const ALIGN: usize = 2 << 20;

/// Private anonymous memory whose start is 2 MiB aligned; unmapped on drop.
#[derive(Debug)]
pub struct AlignedAnon {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this struct; access goes through raw
// pointers handed out by `as_ptr`, whose users synchronise.
unsafe impl Send for AlignedAnon {}
// SAFETY: as above.
unsafe impl Sync for AlignedAnon {}

impl AlignedAnon {
    /// Maps `len` bytes (rounded up to 4 KiB) at a 2 MiB aligned address.
    pub fn new(len: usize) -> std::io::Result<AlignedAnon> {
        let len = len.max(1).next_multiple_of(4096);
        let padded = len + ALIGN;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                padded,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let base = raw as usize;
        let start = base.next_multiple_of(ALIGN);
        let head = start - base;
        let tail = padded - head - len;
        // SAFETY: trimming the unaligned head and the tail of the mapping
        // just made; nothing refers to them.
        unsafe {
            if head > 0 {
                rustix::mm::munmap(raw, head)?;
            }
            if tail > 0 {
                rustix::mm::munmap((start + len) as *mut c_void, tail)?;
            }
        }
        Ok(AlignedAnon {
            ptr: NonNull::new(start as *mut u8).expect("mmap never returns null"),
            len,
        })
    }

    /// The start (2 MiB aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start as an address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `madvise(2)` on the whole mapping.
    pub fn advise(&self, advice: Advice) -> std::io::Result<()> {
        // SAFETY: advice on our own mapping; none of the advices callers use
        // here changes contents a Rust reference could observe (there are
        // no references into it).
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().cast(), self.len, advice) }?;
        Ok(())
    }
}

impl Drop for AlignedAnon {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
