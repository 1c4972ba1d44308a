//! The heap: memory at a fixed address that objects point into, and the
//! memory steps of a compaction (moving the pages to a from-space in one
//! `mremap`, mapping the other memfd for MINOR mode, the alias).

#![allow(unsafe_code)]

use core::ffi::c_void;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
use rustix::mm::{Advice, MapFlags, MremapFlags, ProtFlags};

use crate::error::CompactError;

/// The page size compaction works in.
pub const PAGE: usize = 4096;

/// The memory a [`Heap`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeapKind {
    /// Private anonymous memory: COPY and MOVE compaction.
    Anon,
    /// A shared mapping of a memfd: MINOR + CONTINUE compaction (the
    /// compactor writes pages through a second mapping of the next file).
    Shmem,
}

/// A heap at a fixed address: what a runtime allocates its objects in and
/// what [`crate::Compaction`] compacts in place. Objects refer to each
/// other by address; after a compaction the heap is at the same address
/// with the compacted contents.
///
/// The memory is `MADV_DONTFORK`: a forked child would share its pages,
/// and UFFDIO_MOVE refuses shared pages (EBUSY).
///
/// Access goes through the word accessors (atomic, so mutator threads may
/// share the heap) or the byte copies; none hands out references, because
/// during a compaction the pages change behind the program's back and an
/// access to a page not compacted yet waits until it is.
#[derive(Debug)]
pub struct Heap {
    ptr: NonNull<u8>,
    len: usize,
    kind: HeapKind,
    /// Shmem: the file mapped now, and the one the next compaction fills.
    files: Mutex<Files>,
    pub(crate) busy: AtomicBool,
    /// The heap's SIGBUS routing, once a compaction used that path.
    sigbus: Mutex<Option<crate::sigbus::HeapSlot>>,
}

#[derive(Debug, Default)]
pub(crate) struct Files {
    pub(crate) current: Option<OwnedFd>,
    pub(crate) spare: Option<OwnedFd>,
}

// SAFETY: the heap is plain memory owned by this struct; every access is an
// atomic word access or a raw copy, like sharing a `[AtomicU64]`.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}

impl Heap {
    /// Maps a heap of `len` bytes (rounded up to 4 KiB) of `kind`.
    pub fn new(kind: HeapKind, len: usize) -> Result<Heap, CompactError> {
        let len = len.max(1).next_multiple_of(PAGE);
        let (ptr, files) = match kind {
            HeapKind::Anon => {
                let ptr = map_aligned(len, ProtFlags::READ | ProtFlags::WRITE)
                    .map_err(|e| CompactError::memory("mmap of the anonymous heap", e))?;
                (ptr, Files::default())
            }
            HeapKind::Shmem => {
                let file = memfd(len)?;
                let place = map_aligned(len, ProtFlags::empty())
                    .map_err(|e| CompactError::memory("mmap of the shmem heap's range", e))?;
                let ptr = map_shared(&file, len, Some(place))?;
                (
                    ptr,
                    Files {
                        current: Some(file),
                        spare: None,
                    },
                )
            }
        };
        let heap = Heap {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null"),
            len,
            kind,
            files: Mutex::new(files),
            busy: AtomicBool::new(false),
            sigbus: Mutex::new(None),
        };
        heap.dont_fork()?;
        Ok(heap)
    }

    /// The kind of memory.
    pub fn kind(&self) -> HeapKind {
        self.kind
    }

    /// The heap's start address (objects refer to `addr() + offset`).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The length in bytes (a multiple of 4 KiB).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: heaps are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The number of 4 KiB pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Loads the 8-byte word at `offset` (8-aligned). During a compaction
    /// this waits for the page to be compacted if it is not yet.
    pub fn load(&self, offset: usize) -> u64 {
        self.word(offset).load(Ordering::Acquire)
    }

    /// Stores the 8-byte word at `offset` (8-aligned).
    pub fn store(&self, offset: usize, value: u64) {
        self.word(offset).store(value, Ordering::Release)
    }

    /// Adds to the 8-byte word at `offset` (wrapping) and returns the old
    /// value; mutator threads use it to update shared objects.
    pub fn fetch_add(&self, offset: usize, value: u64) -> u64 {
        self.word(offset).fetch_add(value, Ordering::AcqRel)
    }

    /// Copies `data` into the heap at `offset` (not atomic: for building
    /// objects no other thread sees yet).
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: inside the mapping (checked); `data` is a separate Rust
        // slice, so they do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }

    /// Copies from the heap at `offset` into `buf` (not atomic).
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: as in `write`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8);
        assert!(
            offset.is_multiple_of(8),
            "heap word access at unaligned offset {offset:#x}"
        );
        // SAFETY: the word is inside the mapping (checked) and 8-aligned
        // (the mapping is page aligned); all accesses to heap words are
        // atomic, and the kernel replacing the page during a compaction
        // behaves like another thread storing to it.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "heap access {offset:#x}+{len:#x} outside a heap of {:#x} bytes",
            self.len
        );
    }

    fn dont_fork(&self) -> Result<(), CompactError> {
        // SAFETY: advice on our own mapping; DONTFORK changes only what a
        // child inherits.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().cast(), self.len, Advice::LinuxDontFork) }
            .map_err(|e| CompactError::memory("madvise(MADV_DONTFORK) of the heap", e))
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Runs `f` with the heap's SIGBUS slot, taking one first if needed.
    pub(crate) fn with_sigbus_slot<R>(
        &self,
        f: impl FnOnce(&crate::sigbus::HeapSlot) -> R,
    ) -> Result<R, &'static str> {
        let mut slot = self.sigbus.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(crate::sigbus::HeapSlot::new(self.addr(), self.len as u64)?);
        }
        Ok(f(slot.as_ref().expect("just set")))
    }

    pub(crate) fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure a spare memfd exists whose every page is allocated, so
    /// that writes through its alias allocate nothing and every mutator
    /// access to the new mapping is a minor fault (a hole would be a
    /// missing fault, which MINOR registration does not catch: the kernel
    /// would map a zero page). Runs before the pause.
    pub(crate) fn prepare_spare(&self) -> Result<(), CompactError> {
        let mut files = self.files();
        if files.spare.is_none() {
            files.spare = Some(memfd(self.len)?);
        }
        let spare = files.spare.as_ref().expect("just set");
        rustix::fs::fallocate(spare, FallocateFlags::empty(), 0, self.len as u64)
            .map_err(|e| CompactError::memory("fallocate of the next heap memfd", e))
    }

    /// Reports which heap pages are resident (`mincore`).
    pub(crate) fn resident(&self) -> Result<Vec<bool>, CompactError> {
        let mut vec = vec![0u8; self.pages()];
        // SAFETY: mincore reads page tables of our own mapping and writes
        // one byte per page into `vec`, which has exactly that many.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if rc != 0 {
            let errno = Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            );
            return Err(CompactError::memory("mincore of the heap", errno));
        }
        Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
    }

    /// The flip: moves every page of the heap to a new from-space mapping
    /// with one `mremap(MREMAP_DONTUNMAP)` (page tables move, no page is
    /// copied) and leaves the heap's address range mapped but empty; for
    /// shmem, maps the spare memfd there instead. The address range is
    /// never unmapped, so no other `mmap` in the process can take it.
    ///
    /// # Safety
    /// No Rust reference may cover the heap (the accessors never hand one
    /// out) and no thread may be accessing the heap: its contents vanish.
    pub(crate) unsafe fn flip(&self) -> Result<FromSpace, CompactError> {
        let reserve = Reservation::new(self.len)?;
        // SAFETY: both ranges are mappings we own (the heap, and the
        // reservation made just above, which the move replaces); the
        // caller promises no references or concurrent accesses.
        let from = unsafe {
            rustix::mm::mremap_fixed(
                self.ptr.as_ptr().cast(),
                self.len,
                self.len,
                MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP,
                reserve.ptr,
            )
        }
        .map_err(|e| {
            CompactError::memory("mremap(MREMAP_DONTUNMAP) of the heap to from-space", e)
        })?;
        let from = FromSpace {
            ptr: NonNull::new(from.cast()).expect("mremap never returns null"),
            len: self.len,
        };
        core::mem::forget(reserve);
        // Shmem too: mapping the old file afresh as the from-space and
        // replacing the heap's mapping with MAP_FIXED would drop the page
        // tables instead of moving them, and on 6.18 that is the slower
        // step (16-20 ms per 256 MiB against 1-3 ms for the move).
        if self.kind == HeapKind::Shmem {
            let files = self.files();
            let spare = files.spare.as_ref().expect("prepare_spare ran");
            map_shared(spare, self.len, Some(self.ptr.as_ptr().cast()))?;
            drop(files);
            self.dont_fork()?;
        }
        Ok(from)
    }

    /// After a MINOR compaction: the spare is the heap's file now, and the
    /// old file (whose pages the from-space mapped) is the next spare.
    pub(crate) fn swap_files(&self) {
        let mut files = self.files();
        let files = &mut *files;
        core::mem::swap(&mut files.current, &mut files.spare);
    }

    /// Punches pages out of the file the heap maps now (shmem): they read
    /// as zero afterwards.
    pub(crate) fn punch(&self, spare: bool, offset: usize, len: usize) -> Result<(), Errno> {
        let files = self.files();
        let file = if spare { &files.spare } else { &files.current };
        let file = file.as_ref().expect("shmem heaps have files");
        rustix::fs::fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset as u64,
            len as u64,
        )
    }

    /// Maps the spare file a second time (the alias MINOR mode writes
    /// through), with its first `populate` bytes mapped in already: a
    /// page filled on demand then takes no page fault of its own on the
    /// alias (about half of a minor-mode fault's service time here), and
    /// this runs before the pause, with mutators running.
    pub(crate) fn map_spare_alias(&self, populate: usize) -> Result<FromSpace, CompactError> {
        let files = self.files();
        let spare = files.spare.as_ref().expect("prepare_spare ran");
        let ptr = map_shared(spare, self.len, None)?;
        // SAFETY: advice on the mapping just made, which nothing else uses;
        // best effort (MADV_POPULATE_WRITE is Linux 5.14): without it the
        // first write to each page faults it in.
        let _ =
            unsafe { rustix::mm::madvise(ptr, populate.min(self.len), Advice::LinuxPopulateWrite) };
        Ok(FromSpace {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null"),
            len: self.len,
        })
    }
}

use uffd::Errno;

impl Drop for Heap {
    fn drop(&mut self) {
        // Stop routing SIGBUS here before the range can be mapped again.
        drop(
            self.sigbus
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        // SAFETY: the heap mapping is ours and no reference to it exists.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A mapping this crate owns (the from-space, or an alias), unmapped on drop.
#[derive(Debug)]
pub(crate) struct FromSpace {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; users synchronise through the page states.
unsafe impl Send for FromSpace {}
// SAFETY: as above.
unsafe impl Sync for FromSpace {}

impl FromSpace {
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for FromSpace {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; the compaction that used it is over.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Address space for the from-space, so the flip moves the pages into a
/// range this crate owns.
struct Reservation {
    ptr: *mut c_void,
    len: usize,
}

impl Reservation {
    fn new(len: usize) -> Result<Reservation, CompactError> {
        let ptr = map_aligned(len, ProtFlags::empty())
            .map_err(|e| CompactError::memory("mmap of the from-space reservation", e))?;
        Ok(Reservation { ptr, len })
    }
}

/// What one page-table page covers on x86-64 (and arm64 with 4 KiB pages).
const PMD: usize = 2 << 20;

/// Private anonymous memory (`prot`: none for a range only reserved)
/// starting on a 2 MiB boundary. The heap and the from-space both start on
/// one, so the flip's `mremap` moves whole page-table pages (one entry per
/// 2 MiB) instead of every PTE: 256 MiB flipped in about 0.14 ms here
/// against 2.3 ms when the two ranges' offsets within 2 MiB differed,
/// which every mutator waits for.
fn map_aligned(len: usize, prot: ProtFlags) -> Result<*mut c_void, Errno> {
    uffd::map_anonymous_aligned(len, PMD, prot, MapFlags::PRIVATE | MapFlags::NORESERVE)
        .map(|p| p.as_ptr().cast())
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own reservation, never accessed.
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

fn memfd(len: usize) -> Result<OwnedFd, CompactError> {
    let file = rustix::fs::memfd_create(
        "uffd-compact-heap",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| CompactError::memory("memfd_create of the shmem heap", e))?;
    rustix::fs::ftruncate(&file, len as u64)
        .map_err(|e| CompactError::memory("ftruncate of the shmem heap", e))?;
    // A fixed size keeps every mapping of the file covering the same pages.
    let _ = rustix::fs::fcntl_add_seals(&file, SealFlags::GROW | SealFlags::SHRINK);
    Ok(file)
}

fn map_shared(
    file: &OwnedFd,
    len: usize,
    fixed: Option<*mut c_void>,
) -> Result<*mut c_void, CompactError> {
    let (addr, flags) = match fixed {
        Some(addr) => (addr, MapFlags::SHARED | MapFlags::FIXED),
        None => (core::ptr::null_mut(), MapFlags::SHARED),
    };
    // SAFETY: either a fresh mapping at an address the kernel chooses, or
    // (FIXED) a replacement of the heap range this crate owns: reserved
    // for it just before, or emptied by the flip; no reference covers it.
    unsafe {
        rustix::mm::mmap(
            addr,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
            file.as_fd(),
            0,
        )
    }
    .map_err(|e| CompactError::memory("mmap of the shmem heap memfd", e))
}
