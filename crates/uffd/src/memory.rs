//! The memory users register, as RAII mappings that know their page size.

#![allow(unsafe_code)]

use core::fmt;
use core::ptr::NonNull;
use core::str::FromStr;
use std::ffi::c_void;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{Errno, Error};
use crate::features::Features;

/// The base page size.
pub const PAGE_SIZE: usize = 4096;
/// The huge page size used for hugetlb mappings.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// The kinds of memory userfaultfd serves, as the kernel's tests name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryKind {
    /// Private anonymous memory.
    Anon,
    /// A shared mapping of a memfd (tmpfs).
    Shmem,
    /// A private (copy-on-write) mapping of a memfd.
    ShmemPrivate,
    /// A shared mapping of a 2 MiB hugetlbfs memfd.
    Hugetlb,
    /// A private mapping of a 2 MiB hugetlbfs memfd.
    HugetlbPrivate,
}

impl MemoryKind {
    /// All kinds, in the order the kernel's tests use.
    pub const ALL: [MemoryKind; 5] = [
        MemoryKind::Anon,
        MemoryKind::Shmem,
        MemoryKind::ShmemPrivate,
        MemoryKind::Hugetlb,
        MemoryKind::HugetlbPrivate,
    ];

    /// The kernel's test name: `anon`, `shmem`, `shmem-private`, `hugetlb`,
    /// `hugetlb-private`.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Anon => "anon",
            MemoryKind::Shmem => "shmem",
            MemoryKind::ShmemPrivate => "shmem-private",
            MemoryKind::Hugetlb => "hugetlb",
            MemoryKind::HugetlbPrivate => "hugetlb-private",
        }
    }

    /// The page size faults are served in.
    pub fn page_size(self) -> usize {
        if self.is_hugetlb() {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }

    /// Backed by hugetlbfs.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, MemoryKind::Hugetlb | MemoryKind::HugetlbPrivate)
    }

    /// Backed by a file (memfd), so an alias mapping exists.
    pub fn is_file_backed(self) -> bool {
        self != MemoryKind::Anon
    }

    /// A shared mapping (writes reach the file).
    pub fn is_shared(self) -> bool {
        matches!(self, MemoryKind::Shmem | MemoryKind::Hugetlb)
    }

    /// The feature that lets MISSING faults be caught on this kind.
    pub fn missing_feature(self) -> Features {
        match self {
            MemoryKind::Anon => Features::empty(),
            MemoryKind::Shmem | MemoryKind::ShmemPrivate => Features::MISSING_SHMEM,
            MemoryKind::Hugetlb | MemoryKind::HugetlbPrivate => Features::MISSING_HUGETLBFS,
        }
    }

    /// The feature that lets MINOR faults be caught on this kind; `None` on
    /// anonymous memory, which has no page cache.
    pub fn minor_feature(self) -> Option<Features> {
        match self {
            MemoryKind::Anon => None,
            MemoryKind::Shmem | MemoryKind::ShmemPrivate => Some(Features::MINOR_SHMEM),
            MemoryKind::Hugetlb | MemoryKind::HugetlbPrivate => Some(Features::MINOR_HUGETLBFS),
        }
    }

    /// The features write-protect needs on this kind.
    pub fn wp_features(self) -> Features {
        match self {
            MemoryKind::Anon => Features::PAGEFAULT_FLAG_WP,
            _ => Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM,
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MemoryKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemoryKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown memory type {s:?}; expected one of anon, shmem, shmem-private, \
                     hugetlb, hugetlb-private"
                )
            })
    }
}

/// A mapping of one [`MemoryKind`], unmapped on drop.
///
/// File-backed kinds also have an *alias*: a second, shared mapping of the
/// same file that is never registered, through which a handler writes
/// page contents before `UFFDIO_CONTINUE`, or reads what the file holds.
///
/// The accessors copy through raw pointers and never hand out references:
/// the memory can change behind the program's back (that is the point of
/// userfaultfd), and touching a registered page may block until a handler
/// resolves it.
#[derive(Debug)]
pub struct Mapping {
    kind: MemoryKind,
    ptr: NonNull<u8>,
    len: usize,
    alias: Option<NonNull<u8>>,
    file: Option<OwnedFd>,
}

// SAFETY: the mapping is plain memory owned by this struct; all access goes
// through raw-pointer copies, so sharing between threads is like sharing a
// `&[AtomicU8]`-ish region whose races only tear bytes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (rounded up to the kind's page size) of `kind`.
    ///
    /// Hugetlb needs reserved huge pages (see
    /// [`crate::HugepageReservation`]); without them this fails with ENOMEM
    /// and says so.
    pub fn new(kind: MemoryKind, len: usize) -> Result<Mapping, Error> {
        let page = kind.page_size();
        let len = len.div_ceil(page).max(1) * page;
        if kind == MemoryKind::Anon {
            return Ok(Mapping {
                kind,
                ptr: map_anon_aligned(len)?,
                len,
                alias: None,
                file: None,
            });
        }
        let (what, flags) = if kind.is_hugetlb() {
            (
                "memfd_create of 2 MiB hugetlb memory",
                MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
            )
        } else {
            (
                "memfd_create of shmem",
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
        };
        let file = rustix::fs::memfd_create(format!("uffd-{}", kind.name()), flags)
            .map_err(|errno| Error::Memory { what, errno })?;
        rustix::fs::ftruncate(&file, len as u64).map_err(|errno| Error::Memory {
            what: if kind.is_hugetlb() {
                "ftruncate of hugetlb memfd"
            } else {
                "ftruncate of shmem memfd"
            },
            errno,
        })?;
        if !kind.is_hugetlb() {
            // A fixed size keeps the alias and the registered mapping covering
            // the same pages; growing or shrinking would SIGBUS one of them.
            let _ = rustix::fs::fcntl_add_seals(&file, SealFlags::GROW | SealFlags::SHRINK);
        }
        let shared = if kind.is_shared() {
            MapFlags::SHARED
        } else {
            MapFlags::PRIVATE
        };
        let map_what = if kind.is_hugetlb() {
            "mmap of 2 MiB hugetlb memory"
        } else {
            "mmap of shmem"
        };
        let ptr = map_file(&file, len, shared, map_what)?;
        let alias = match map_file(&file, len, MapFlags::SHARED, map_what) {
            Ok(alias) => alias,
            Err(e) => {
                // SAFETY: `ptr` is the mapping made just above, unused so far.
                let _ = unsafe { rustix::mm::munmap(ptr.as_ptr().cast(), len) };
                return Err(e);
            }
        };
        Ok(Mapping {
            kind,
            ptr,
            len,
            alias: Some(alias),
            file: Some(file),
        })
    }

    /// The kind of memory.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The page size faults are served in.
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }

    /// The mapping's start address, as the userfaultfd ioctls take it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The mapping's start.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page_size()
    }

    /// The unregistered shared alias of a file-backed mapping.
    pub fn alias_ptr(&self) -> Option<*mut u8> {
        self.alias.map(NonNull::as_ptr)
    }

    /// The backing memfd of a file-backed mapping.
    pub fn file(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(AsFd::as_fd)
    }

    /// Copies `data` into the mapping at `offset` (may fault, and so block
    /// until a handler resolves the pages).
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: the range is inside the mapping (checked) and `data` is a
        // separate Rust slice, so they do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        }
    }

    /// Copies from the mapping at `offset` into `buf` (may fault).
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: as in `write`.
        unsafe {
            core::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        }
    }

    /// Reads one byte at `offset` (may fault).
    pub fn read_byte(&self, offset: usize) -> u8 {
        self.check(offset, 1);
        // SAFETY: inside the mapping; volatile so the access really happens
        // (tests rely on it to trigger faults).
        unsafe { self.as_ptr().add(offset).read_volatile() }
    }

    /// Writes one byte at `offset` (may fault).
    pub fn write_byte(&self, offset: usize, value: u8) {
        self.check(offset, 1);
        // SAFETY: as in `read_byte`.
        unsafe { self.as_ptr().add(offset).write_volatile(value) }
    }

    /// Writes `data` through the alias (file-backed kinds only). The
    /// registered mapping sees it once the page is mapped there, without a
    /// fault being reported for the alias.
    ///
    /// # Panics
    /// On anonymous memory, which has no alias.
    pub fn write_alias(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        let alias = self.alias.expect("anonymous memory has no alias");
        // SAFETY: the alias has the same length as the mapping.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), alias.as_ptr().add(offset), data.len())
        }
    }

    /// Reads through the alias (file-backed kinds only).
    ///
    /// # Panics
    /// On anonymous memory, which has no alias.
    pub fn read_alias(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        let alias = self.alias.expect("anonymous memory has no alias");
        // SAFETY: the alias has the same length as the mapping.
        unsafe {
            core::ptr::copy_nonoverlapping(alias.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        }
    }

    /// `madvise(2)` on part of the mapping (e.g. `MADV_DONTNEED` to drop
    /// pages, which a REMOVE event reports).
    pub fn advise(
        &self,
        offset: usize,
        len: usize,
        advice: rustix::mm::Advice,
    ) -> Result<(), Error> {
        self.check(offset, len);
        // SAFETY: the range is inside our mapping; advice only changes how
        // the kernel backs it, and callers that drop pages know they read
        // back as missing.
        unsafe { rustix::mm::madvise(self.as_ptr().add(offset).cast::<c_void>(), len, advice) }
            .map_err(|errno| Error::Memory {
                what: "madvise",
                errno,
            })
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access {offset:#x}+{len:#x} outside a mapping of {:#x} bytes",
            self.len
        );
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: both mappings were made by `new` with this length and are
        // not referenced elsewhere (accessors never hand out references).
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len);
            if let Some(alias) = self.alias {
                let _ = rustix::mm::munmap(alias.as_ptr().cast(), self.len);
            }
        }
    }
}

/// Private anonymous memory of `len` bytes aligned to `len` rounded up to
/// a power of two, at most 2 MiB: whole transparent huge pages fit it (MOVE
/// moves one with a single PMD update; a 2 MiB buffer is one huge page),
/// and any granule up to its length starts on a granule boundary.
fn map_anon_aligned(len: usize) -> Result<NonNull<u8>, Error> {
    let align = len.next_power_of_two().clamp(PAGE_SIZE, HUGE_PAGE_SIZE);
    map_anonymous_aligned(
        len,
        align,
        ProtFlags::READ | ProtFlags::WRITE,
        MapFlags::PRIVATE,
    )
    .map_err(|errno| Error::Memory {
        what: "mmap of anonymous memory",
        errno,
    })
}

/// `mmap(2)` of `len` bytes of anonymous memory (`flags`, for example
/// `PRIVATE | NORESERVE`) starting on a multiple of `align`, a power of two
/// of at least a page: maps `align - PAGE_SIZE` bytes more and unmaps the
/// unaligned head and the tail. The kernel aligns large anonymous mappings
/// to 2 MiB only sometimes; memory that must move whole page tables
/// (mremap, UFFDIO_MOVE of a huge page) asks for it here.
pub fn map_anonymous_aligned(
    len: usize,
    align: usize,
    prot: ProtFlags,
    flags: MapFlags,
) -> Result<NonNull<u8>, Errno> {
    if !align.is_power_of_two() || align < PAGE_SIZE {
        return Err(Errno::INVAL);
    }
    let padded = len.checked_add(align - PAGE_SIZE).ok_or(Errno::NOMEM)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses
    // aliases nothing.
    let raw = unsafe { rustix::mm::mmap_anonymous(core::ptr::null_mut(), padded, prot, flags) }?;
    let base = raw as usize;
    let start = base.next_multiple_of(align);
    let (head, tail) = (start - base, padded - (start - base) - len);
    // SAFETY: trimming the unaligned head and the tail of the mapping just
    // made; nothing refers to them.
    unsafe {
        if head > 0 {
            let _ = rustix::mm::munmap(raw, head);
        }
        if tail > 0 {
            let _ = rustix::mm::munmap((start + len) as *mut c_void, tail);
        }
    }
    Ok(non_null(start as *mut c_void))
}

/// A read-only mapping of a file (a memory snapshot), unmapped on drop.
///
/// Its bytes are the file's: when the file shrinks, reading the lost part
/// raises SIGBUS in user space, while a kernel copy from it (`UFFDIO_COPY`)
/// fails with `EFAULT`. So it hands out an address, never a slice; who
/// reads it decides how.
#[derive(Debug)]
pub struct FileMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a read-only mapping owned by this struct; nothing is written
// through it.
unsafe impl Send for FileMapping {}
// SAFETY: as above.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps the first `len` bytes (non-zero) of `file` read-only: `shared`
    /// sees the page cache (and later writes to the file); private gives a
    /// copy-on-write view, which is what a process restoring a snapshot
    /// the kernel's way maps.
    pub fn read_only(file: impl AsFd, len: usize, shared: bool) -> Result<FileMapping, Error> {
        let flags = if shared {
            MapFlags::SHARED
        } else {
            MapFlags::PRIVATE
        };
        // SAFETY: a fresh read-only mapping of the caller's fd at an
        // address the kernel chooses; it aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                ProtFlags::READ,
                flags,
                file.as_fd(),
                0,
            )
        }
        .map_err(|errno| Error::Memory {
            what: "mmap of a file",
            errno,
        })?;
        Ok(FileMapping {
            ptr: non_null(ptr),
            len,
        })
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty (never: a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `madvise(2)` on the whole mapping (`MADV_POPULATE_READ` maps it all
    /// now, so serving from it later takes no fault here).
    pub fn advise(&self, advice: rustix::mm::Advice) -> Result<(), Error> {
        // SAFETY: advice on our own read-only file mapping; no advice can
        // change what it reads as, since its bytes are the file's.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().cast::<c_void>(), self.len, advice) }
            .map_err(|errno| Error::Memory {
                what: "madvise of a file mapping",
                errno,
            })
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `read_only`; nothing refers to it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn map_file(
    file: &OwnedFd,
    len: usize,
    flags: MapFlags,
    what: &'static str,
) -> Result<NonNull<u8>, Error> {
    // SAFETY: a fresh mapping of our own memfd at an address the kernel
    // chooses aliases no Rust object.
    let ptr = unsafe {
        rustix::mm::mmap(
            core::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
            file,
            0,
        )
    }
    .map_err(|errno| Error::Memory { what, errno })?;
    Ok(non_null(ptr))
}

fn non_null(ptr: *mut c_void) -> NonNull<u8> {
    NonNull::new(ptr.cast()).expect("mmap returned a null mapping")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for kind in MemoryKind::ALL {
            assert_eq!(kind.name().parse::<MemoryKind>(), Ok(kind));
        }
        assert!("nope"
            .parse::<MemoryKind>()
            .unwrap_err()
            .contains("shmem-private"));
        assert_eq!(MemoryKind::Hugetlb.page_size(), 2 << 20);
        assert_eq!(MemoryKind::ShmemPrivate.page_size(), 4096);
    }

    #[test]
    fn shmem_alias_sees_the_same_file() {
        let m = Mapping::new(MemoryKind::Shmem, 3 * PAGE_SIZE).unwrap();
        m.write_alias(PAGE_SIZE, b"through the alias");
        let mut buf = [0u8; 17];
        m.read(PAGE_SIZE, &mut buf);
        assert_eq!(&buf, b"through the alias");
        assert_eq!(m.pages(), 3);
    }

    #[test]
    fn private_shmem_copies_on_write() {
        let m = Mapping::new(MemoryKind::ShmemPrivate, PAGE_SIZE).unwrap();
        m.write_alias(0, b"file");
        m.write(0, b"mine");
        let mut buf = [0u8; 4];
        m.read_alias(0, &mut buf);
        assert_eq!(&buf, b"file");
    }

    #[test]
    fn anonymous_mappings_are_aligned_to_their_size_up_to_huge_pages() {
        for (len, align) in [
            (64 << 10, 64 << 10),
            (HUGE_PAGE_SIZE, HUGE_PAGE_SIZE),
            (3 * HUGE_PAGE_SIZE + PAGE_SIZE, HUGE_PAGE_SIZE),
        ] {
            let m = Mapping::new(MemoryKind::Anon, len).unwrap();
            assert_eq!(m.addr() % align as u64, 0);
            m.write_byte(len - 1, 7);
            assert_eq!(m.read_byte(len - 1), 7);
        }
    }

    #[test]
    fn aligned_anonymous_reservations_start_on_their_boundary() {
        for align in [PAGE_SIZE, 64 << 10, HUGE_PAGE_SIZE, 4 * HUGE_PAGE_SIZE] {
            let len = 3 * PAGE_SIZE;
            let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
            let p = map_anonymous_aligned(len, align, ProtFlags::empty(), flags).unwrap();
            assert_eq!(p.as_ptr() as usize % align, 0, "align {align}");
            // SAFETY: the mapping just made, which nothing else uses.
            unsafe { rustix::mm::munmap(p.as_ptr().cast(), len) }.unwrap();
        }
        for bad in [0, 3000, PAGE_SIZE + 1] {
            let r = map_anonymous_aligned(PAGE_SIZE, bad, ProtFlags::empty(), MapFlags::PRIVATE);
            assert_eq!(r.unwrap_err(), Errno::INVAL, "align {bad}");
        }
        assert_eq!(
            map_anonymous_aligned(
                usize::MAX,
                HUGE_PAGE_SIZE,
                ProtFlags::empty(),
                MapFlags::PRIVATE
            )
            .unwrap_err(),
            Errno::NOMEM
        );
    }

    #[test]
    fn file_mappings_show_the_file() {
        let file = rustix::fs::memfd_create("uffd-test", MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&file, b"snapshot").unwrap();
        let m = FileMapping::read_only(&file, 8, true).unwrap();
        // SAFETY: 8 bytes of a live read-only mapping of an 8-byte file.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert_eq!(bytes, b"snapshot");
    }

    #[test]
    fn lengths_round_up_to_pages() {
        let m = Mapping::new(MemoryKind::Anon, 1).unwrap();
        assert_eq!(m.len(), PAGE_SIZE);
        assert!(m.alias_ptr().is_none());
    }
}
