//! uffd-wp-mremap.c: one folio, write-protected through a userfaultfd
//! without EVENT_REMAP (optionally paged out to swap first), is moved by
//! mremap. Every PTE's uffd-wp bit must be set before the move and clear
//! after it: without EVENT_REMAP nobody tracks the new range, so a bit
//! left there would be stale protection.
//!
//! The matrix is the kernel's: base pages and every mTHP size on private
//! anonymous memory (`anon`) and on shared anonymous memory (`shmem`,
//! MAP_SHARED|MAP_ANONYMOUS, the mapping whose huge pages the per-size
//! `shmem_enabled` knobs govern), each with and without MADV_PAGEOUT, and
//! every hugetlb size shared (`hugetlb`) and private (`hugetlb-private`),
//! without swap-out. As in the kernel's test, a THP case enables only its
//! own size (for its kind of memory) while the folio is allocated, and
//! restores the knobs right after; swap-out cases use the system's swap or
//! a swap file they add and remove. One deliberate difference: the THP
//! area is advised MADV_HUGEPAGE so that, with `defrag` at its default
//! `madvise`, the allocation may compact memory instead of falling back to
//! base pages on a fragmented machine.

#![allow(unsafe_code)]

use uffd::{HugepageReservation, MemoryKind, RegisterMode, HUGE_PAGE_SIZE, PAGE_SIZE};

use crate::cases::wp::protect;
use crate::harness::{
    os_error, pagemap_entries, smaps_kb, CaseResult, Env, Reserved, Stop, PM_PRESENT, PM_SWAP,
    PM_UFFD_WP,
};
use crate::system::{Swap, ThpSettings};
use crate::{fail, skip};

/// `MAP_HUGE_SHIFT`: the huge page size's log2 goes in these bits of the
/// mmap flags.
const MAP_HUGE_SHIFT: u32 = 26;

/// The kind of folio a case moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Folio {
    /// One base page.
    Base,
    /// One transparent huge page of this many bytes.
    Thp(usize),
    /// One hugetlb page of this many bytes.
    Hugetlb(usize),
}

impl Folio {
    fn size(self) -> usize {
        match self {
            Folio::Base => PAGE_SIZE,
            Folio::Thp(s) | Folio::Hugetlb(s) => s,
        }
    }
}

/// `16 KiB`, `2 MiB`, `1 GiB`.
fn human(size: usize) -> String {
    if size >= 1 << 30 {
        format!("{} GiB", size >> 30)
    } else if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

macro_rules! folio_cases {
    ($($(#[$doc:meta])* $name:ident = $folio:expr, $swapout:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(env: &Env) -> CaseResult {
                one_folio(env, $folio, $swapout)
            }
        )*
    };
}

folio_cases! {
    /// A base page.
    base = Folio::Base, false;
    /// A base page, paged out first.
    base_swapout = Folio::Base, true;
    /// A 16 KiB mTHP.
    thp_16k = Folio::Thp(16 << 10), false;
    /// A 16 KiB mTHP, paged out first.
    thp_16k_swapout = Folio::Thp(16 << 10), true;
    /// A 32 KiB mTHP.
    thp_32k = Folio::Thp(32 << 10), false;
    /// A 32 KiB mTHP, paged out first.
    thp_32k_swapout = Folio::Thp(32 << 10), true;
    /// A 64 KiB mTHP.
    thp_64k = Folio::Thp(64 << 10), false;
    /// A 64 KiB mTHP, paged out first.
    thp_64k_swapout = Folio::Thp(64 << 10), true;
    /// A 128 KiB mTHP.
    thp_128k = Folio::Thp(128 << 10), false;
    /// A 128 KiB mTHP, paged out first.
    thp_128k_swapout = Folio::Thp(128 << 10), true;
    /// A 256 KiB mTHP.
    thp_256k = Folio::Thp(256 << 10), false;
    /// A 256 KiB mTHP, paged out first.
    thp_256k_swapout = Folio::Thp(256 << 10), true;
    /// A 512 KiB mTHP.
    thp_512k = Folio::Thp(512 << 10), false;
    /// A 512 KiB mTHP, paged out first.
    thp_512k_swapout = Folio::Thp(512 << 10), true;
    /// A 1 MiB mTHP.
    thp_1m = Folio::Thp(1 << 20), false;
    /// A 1 MiB mTHP, paged out first.
    thp_1m_swapout = Folio::Thp(1 << 20), true;
    /// A PMD-sized (2 MiB) THP.
    thp_2m = Folio::Thp(2 << 20), false;
    /// A PMD-sized (2 MiB) THP, paged out first.
    thp_2m_swapout = Folio::Thp(2 << 20), true;
    /// A 2 MiB hugetlb page.
    hugetlb_2m = Folio::Hugetlb(2 << 20), false;
    /// A 1 GiB hugetlb page.
    hugetlb_1g = Folio::Hugetlb(1 << 30), false;
}

/// The mTHP sizes the matrix has cases for: orders 2 to 9 of 4 KiB pages,
/// every size x86-64 offers for anonymous memory.
pub const THP_SIZES: [usize; 8] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
];

/// The hugetlb sizes the matrix has cases for.
pub const HUGETLB_SIZES: [usize; 2] = [2 << 20, 1 << 30];

/// The kernel's `test_one_folio()`.
fn one_folio(env: &Env, folio: Folio, swapout: bool) -> CaseResult {
    let size = folio.size();
    let shared = matches!(env.kind, MemoryKind::Shmem | MemoryKind::Hugetlb);
    let uffd = env.open(env.kind.wp_features())?;
    // Declared before the folio so that it drops after it: swapoff then
    // has nothing of ours to read back into memory.
    let swap = if swapout { Some(Swap::enable()?) } else { None };
    let _pool = match folio {
        Folio::Hugetlb(s) => hugetlb_pool(s)?,
        _ => None,
    };
    let mem = alloc_one_folio(folio, shared)?;
    let addr = mem.addr;
    let pages = size / PAGE_SIZE;

    uffd.register(addr, size as u64, RegisterMode::WP)?;
    protect(&uffd, addr, size as u64, true)?;

    let mut paged_out = String::new();
    if swapout {
        // SAFETY: our own mapping; paging it out changes where its
        // contents live, not what they are.
        unsafe { libc::madvise(addr as *mut libc::c_void, size, libc::MADV_PAGEOUT) };
        let entries = pagemap_entries(addr, pages).map_err(Stop::Fail)?;
        let swapped = entries.iter().filter(|&&e| e & PM_SWAP != 0).count();
        if swapped != pages {
            skip!(
                "MADV_PAGEOUT did not work, is swap enabled? {swapped} of {pages} pages \
                 swapped out, with {}",
                swap.as_ref().map_or("no swap", |s| s.what())
            );
        }
        // pagemap reports a shared page as swapped once reclaim replaced
        // its PTE by a uffd-wp marker, whether or not its data reached swap
        // (with no swap at all, too): the PTEs this case moves are the same
        // either way, so the case goes on, and says how much smaps counts.
        let in_swap_kib = smaps_kb(addr, "Swap").map_err(Stop::Fail)?;
        let what = swap.as_ref().map_or("swap", |s| s.what());
        paged_out = if shared {
            format!(
                ", paged out (uffd-wp markers; {in_swap_kib} of {} KiB written to {what})",
                size >> 10
            )
        } else {
            format!(", swapped out to {what}")
        };
    }

    check_uffd_wp(addr, pages, true, "before mremap")?;
    let target = Reserved::new(size, size)?;
    // SAFETY: moves our folio onto a reservation of our own; no reference
    // covers either range.
    let moved = unsafe {
        libc::mremap(
            addr as *mut libc::c_void,
            size,
            size,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.addr as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        fail!("mremap of {size:#x} bytes: {}", os_error());
    }
    // The target reservation now holds the folio and unmaps it on drop.
    mem.moved();
    check_uffd_wp(
        moved as u64,
        pages,
        false,
        "after mremap without EVENT_REMAP",
    )?;
    Ok(format!(
        "{} {} {}{paged_out}: uffd-wp set on all {pages} PTEs before mremap, clear on all after",
        human(size),
        match folio {
            Folio::Base => "page",
            Folio::Thp(_) => "THP",
            Folio::Hugetlb(_) => "hugetlb page",
        },
        if shared { "shared" } else { "private" },
    ))
}

/// The kernel's `check_uffd_wp_state()`: FAILs naming the first of
/// `pages` base pages from `addr` whose uffd-wp bit is not `expect`.
pub fn check_uffd_wp(addr: u64, pages: usize, expect: bool, when: &str) -> Result<(), Stop> {
    let entries = pagemap_entries(addr, pages).map_err(Stop::Fail)?;
    if let Some(pte) = entries
        .iter()
        .position(|&e| (e & PM_UFFD_WP != 0) != expect)
    {
        fail!(
            "uffd-wp not {} for pte {pte} of {pages} {when}",
            if expect { "set" } else { "clear" }
        );
    }
    Ok(())
}

/// One free huge page of `size`. A 2 MiB page comes from the run's
/// reservation (taking the 2 MiB pool's lock again here would wait on this
/// very process); other sizes are reserved here and given back on drop.
fn hugetlb_pool(size: usize) -> Result<Option<HugepageReservation>, Stop> {
    if !uffd::hugepage_size_supported(size) {
        skip!("the kernel has no {} hugetlb pages", human(size));
    }
    if size == HUGE_PAGE_SIZE {
        if uffd::free_hugepages() == 0 {
            skip!("no free 2 MiB huge page");
        }
        return Ok(None);
    }
    match HugepageReservation::reserve_sized(size, 1) {
        Ok(r) => Ok(Some(r)),
        Err(e) => skip!("cannot reserve one {} huge page: {e}", human(size)),
    }
}

/// One folio's mapping, unmapped on drop unless it was moved away.
struct FolioMap {
    addr: u64,
    len: usize,
}

impl FolioMap {
    /// The mapping now lives elsewhere (its new owner unmaps it); nothing
    /// is left here to unmap.
    fn moved(self) {
        std::mem::forget(self);
    }
}

impl Drop for FolioMap {
    fn drop(&mut self) {
        // SAFETY: the folio mapped in `alloc_one_folio`, still here.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The kernel's `mmap_aligned()`, with the mapping itself placed by
/// MAP_FIXED inside an inaccessible reservation of twice the size, whose
/// head and tail are then given back: only the folio stays mapped, so
/// nothing else of ours is left at the old place once it moves (and a
/// shared mapping starts at file offset 0, aligned like its address).
fn map_aligned(size: usize, flags: libc::c_int) -> Result<FolioMap, Stop> {
    let total = 2 * size;
    // SAFETY: a fresh inaccessible reservation aliases nothing.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        fail!("reserving {total:#x} bytes: {}", os_error());
    }
    let base = base as u64;
    let addr = base.next_multiple_of(size as u64);
    // SAFETY: replaces part of the reservation just made.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    let mapped = p != libc::MAP_FAILED;
    let err = os_error();
    // SAFETY: the reservation's head and tail (or all of it if the mmap
    // failed), which only this function knows of.
    unsafe {
        if mapped {
            libc::munmap(base as *mut libc::c_void, (addr - base) as usize);
            let end = addr + size as u64;
            libc::munmap(
                end as *mut libc::c_void,
                (base + total as u64 - end) as usize,
            );
        } else {
            libc::munmap(base as *mut libc::c_void, total);
        }
    }
    if !mapped {
        fail!("mmap of {}: {err}", human(size));
    }
    Ok(FolioMap { addr, len: size })
}

/// The kernel's `alloc_one_folio()`: maps one folio's worth of memory
/// aligned to its size, populates it by writing its first byte, checks
/// that this populated every page (one folio, not base pages), then fills
/// it with ones so that it cannot be mapped back to the zero page.
fn alloc_one_folio(folio: Folio, shared: bool) -> Result<FolioMap, Stop> {
    let size = folio.size();
    let mut flags = libc::MAP_ANONYMOUS;
    flags |= if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let (mem, thp) = match folio {
        Folio::Thp(s) => {
            let mut settings = ThpSettings::lock()?;
            settings.only(s, shared)?;
            let mem = map_aligned(size, flags)?;
            // SAFETY: advice on our own fresh mapping.
            unsafe { libc::madvise(mem.addr as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
            (mem, Some(settings))
        }
        Folio::Hugetlb(s) => {
            flags |= libc::MAP_HUGETLB | ((s.trailing_zeros() as libc::c_int) << MAP_HUGE_SHIFT);
            // SAFETY: a fresh mapping at an address the kernel chooses
            // (aligned to the huge page size) aliases nothing.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                skip!("mmap of one {} hugetlb page: {}", human(size), os_error());
            }
            (
                FolioMap {
                    addr: p as u64,
                    len: size,
                },
                None,
            )
        }
        Folio::Base => (map_aligned(size, flags)?, None),
    };
    if mem.addr % size as u64 != 0 {
        fail!(
            "the kernel mapped {} at {:#x}, not aligned",
            human(size),
            mem.addr
        );
    }
    let p = mem.addr as *mut u8;
    // SAFETY: inside the mapping just made, which nothing else references.
    unsafe { p.write_volatile(1) };
    let entries = pagemap_entries(mem.addr, size / PAGE_SIZE).map_err(Stop::Fail)?;
    let populated = entries
        .iter()
        .filter(|&&e| e & (PM_PRESENT | PM_SWAP) != 0)
        .count();
    // Back to the knobs as they were: the folio exists now (or not).
    drop(thp);
    if populated != entries.len() {
        let why = format!(
            "writing the first byte populated {populated} of {} pages",
            entries.len()
        );
        match folio {
            Folio::Thp(_) => skip!(
                "the kernel did not allocate a {} folio ({why}; it fell back to smaller \
                 pages, e.g. for lack of contiguous memory)",
                human(size)
            ),
            _ => fail!("{why}"),
        }
    }
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(p, 1, size) };
    Ok(mem)
}
