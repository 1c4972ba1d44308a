//! The cases, and the fault handler most of them share.
//!
//! Memory types per case follow the kernel's `uffd_tests[]` table. Where
//! [`MemoryKind::ShmemPrivate`] (a real MAP_PRIVATE mapping of a memfd,
//! unlike the kernel's "shmem-private") behaves differently, the case
//! documents what it does:
//! - zeropage: the EEXIST retry goes to the same address (as for anon),
//!   not through the alias, which maps the still-empty file;
//! - minor and minor-wp also run on shmem-private: the kernel allows MINOR
//!   on any shmem VMA and CONTINUE maps the page-cache page read-only into
//!   the private mapping (a later write copies it), so the case is
//!   meaningful there;
//! - releasing pages drops the private copies (MADV_DONTNEED) and punches
//!   the file, since MADV_REMOVE is refused on private mappings;
//! - in the stress bounce, a write reported as a MISSING fault after the
//!   same thread read the page is counted, not failed: Linux 6.18 does
//!   that now and then on MAP_PRIVATE memfd mappings registered
//!   MISSING|WP (never on the other types); the counters, which catch any
//!   lost data, stay exact.
//!
//! The uffd-wp-mremap matrix (see [`mremap`]) maps its memory as the
//! kernel's test does: `anon` is private and `shmem` shared anonymous
//! memory, `hugetlb` and `hugetlb-private` anonymous MAP_HUGETLB mappings.
//!
//! Other differences from the kernel's tests:
//! - signal handlers only ever run in forked children; sigbus and poison
//!   read in a forked child served through EVENT_FORK, so poison also
//!   needs EVENT_FORK (CAP_SYS_PTRACE) here, and a SIGBUS that the kernel's
//!   tests skip with siglongjmp maps a zero page over the faulting page;
//! - every wait is bounded: a fault nobody resolves, a stuck child or a
//!   handler that does not stop FAILs the case after [`STUCK_AFTER`]
//!   instead of hanging the run.
//!
//! Areas are the kernel's 32 MiB for every memory type (`--mib` changes it).
//!
//! [`STUCK_AFTER`]: crate::harness::STUCK_AFTER

#![allow(unsafe_code)]

mod api;
mod basic;
mod fork;
mod minor;
pub mod mremap;
mod project;
mod wp;

use std::sync::atomic::Ordering;

use uffd::{ContinueMode, Event, FaultKind, MemoryKind, Outcome, Uffd};

use crate::harness::{copy_page, unprotect, Counters, Next};
use crate::Case;

use MemoryKind::{Anon, Hugetlb, HugetlbPrivate, Shmem, ShmemPrivate};

const EVERY: &[MemoryKind] = &MemoryKind::ALL;
const ANON: &[MemoryKind] = &[Anon];
const SHMEM: &[MemoryKind] = &[Shmem];
const MINOR: &[MemoryKind] = &[Shmem, ShmemPrivate, Hugetlb];
const SHARED_FILE: &[MemoryKind] = &[Shmem, Hugetlb];
const BASE_PAGES: &[MemoryKind] = &[Anon, Shmem, ShmemPrivate];
/// uffd-wp-mremap's private and shared anonymous memory.
const ANON_SHMEM: &[MemoryKind] = &[Anon, Shmem];
const HUGETLB: &[MemoryKind] = &[Hugetlb, HugetlbPrivate];

macro_rules! case {
    ($name:literal, $kinds:expr, $f:path, $about:literal) => {
        Case {
            name: $name,
            kinds: $kinds,
            run: $f,
            about: $about,
        }
    };
}

/// Every case, in run order.
pub const ALL: &[Case] = &[
    case!(
        "api-syscall",
        &[], api::via_syscall,
        "UFFDIO_API through userfaultfd(2): api 0xAB and feature bit 63 refused, handshake once"
    ),
    case!(
        "api-dev",
        &[], api::via_dev,
        "the same handshake through /dev/userfaultfd"
    ),
    case!(
        "register-ioctls",
        EVERY, basic::register_ioctls,
        "all 8 MISSING/WP/MINOR combinations: EINVAL where invalid, the right ioctls advertised"
    ),
    case!(
        "zeropage",
        EVERY, basic::zeropage,
        "ZEROPAGE maps zeros once (EEXIST after); EINVAL on hugetlb"
    ),
    case!(
        "move",
        ANON, basic::move_pages,
        "MOVE one page per fault; the source becomes a hole"
    ),
    case!(
        "move-pmd",
        ANON, basic::move_pmd,
        "MOVE a whole transparent huge page per fault"
    ),
    case!(
        "move-pmd-split",
        ANON, basic::move_pmd_split,
        "MOVE a THP into a no-THP destination (split)"
    ),
    case!(
        "wp-fork",
        EVERY, wp::fork,
        "the uffd-wp bit survives a zap and is dropped by fork without EVENT_FORK"
    ),
    case!(
        "wp-fork-with-event",
        EVERY, wp::fork_with_event,
        "with EVENT_FORK the child keeps the uffd-wp bit"
    ),
    case!(
        "wp-fork-pin",
        EVERY, wp::fork_pin,
        "wp-fork with the page long-term pinned (needs gup_test)"
    ),
    case!(
        "wp-fork-pin-with-event",
        EVERY, wp::fork_pin_with_event,
        "wp-fork-pin with EVENT_FORK (needs gup_test)"
    ),
    case!(
        "wp-unpopulated",
        ANON, wp::unpopulated,
        "WP_UNPOPULATED markers on empty anon pages"
    ),
    case!(
        "minor",
        MINOR, minor::minor,
        "minor faults fixed through the alias, then CONTINUE (a second one gives EEXIST)"
    ),
    case!(
        "minor-wp",
        MINOR, minor::minor_wp,
        "minor with CONTINUE_MODE_WP"
    ),
    case!(
        "minor-collapse",
        SHMEM, minor::minor_collapse,
        "minor, then MADV_COLLAPSE: huge pages mapped, contents intact"
    ),
    case!(
        "sigbus",
        EVERY, fork::sigbus,
        "UFFD_FEATURE_SIGBUS: the faulting thread resolves in its signal handler; a forked child gets SIGBUS"
    ),
    case!(
        "sigbus-wp",
        EVERY, fork::sigbus_wp,
        "sigbus with write-protect faults"
    ),
    case!(
        "events",
        EVERY, fork::events,
        "a forked child's faults across FORK, REMAP and REMOVE events"
    ),
    case!(
        "events-wp",
        EVERY, fork::events_wp,
        "events with write-protect faults"
    ),
    case!(
        "poison",
        EVERY, fork::poison,
        "POISON: poisoned pages raise SIGBUS, copied ones read zero"
    ),
    case!(
        "mmap-changing",
        SHMEM, fork::mmap_changing,
        "a pending REMOVE event: every resolving ioctl gets EAGAIN and -EAGAIN in its field"
    ),
    case!(
        "wp-mremap-4k",
        ANON_SHMEM, mremap::base,
        "uffd-wp-mremap: a protected base page, mremapped without EVENT_REMAP, keeps no uffd-wp bit"
    ),
    case!(
        "wp-mremap-4k-swapout",
        ANON_SHMEM, mremap::base_swapout,
        "uffd-wp-mremap: the same with the page swapped out (MADV_PAGEOUT) first"
    ),
    case!(
        "wp-mremap-thp-16k",
        ANON_SHMEM, mremap::thp_16k,
        "uffd-wp-mremap: a 16 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-16k-swapout",
        ANON_SHMEM, mremap::thp_16k_swapout,
        "uffd-wp-mremap: a 16 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-32k",
        ANON_SHMEM, mremap::thp_32k,
        "uffd-wp-mremap: a 32 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-32k-swapout",
        ANON_SHMEM, mremap::thp_32k_swapout,
        "uffd-wp-mremap: a 32 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-64k",
        ANON_SHMEM, mremap::thp_64k,
        "uffd-wp-mremap: a 64 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-64k-swapout",
        ANON_SHMEM, mremap::thp_64k_swapout,
        "uffd-wp-mremap: a 64 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-128k",
        ANON_SHMEM, mremap::thp_128k,
        "uffd-wp-mremap: a 128 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-128k-swapout",
        ANON_SHMEM, mremap::thp_128k_swapout,
        "uffd-wp-mremap: a 128 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-256k",
        ANON_SHMEM, mremap::thp_256k,
        "uffd-wp-mremap: a 256 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-256k-swapout",
        ANON_SHMEM, mremap::thp_256k_swapout,
        "uffd-wp-mremap: a 256 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-512k",
        ANON_SHMEM, mremap::thp_512k,
        "uffd-wp-mremap: a 512 KiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-512k-swapout",
        ANON_SHMEM, mremap::thp_512k_swapout,
        "uffd-wp-mremap: a 512 KiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-1m",
        ANON_SHMEM, mremap::thp_1m,
        "uffd-wp-mremap: a 1 MiB THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-1m-swapout",
        ANON_SHMEM, mremap::thp_1m_swapout,
        "uffd-wp-mremap: a 1 MiB THP, swapped out first"
    ),
    case!(
        "wp-mremap-thp-2m",
        ANON_SHMEM, mremap::thp_2m,
        "uffd-wp-mremap: a 2 MiB (PMD) THP (only that size enabled while it is allocated)"
    ),
    case!(
        "wp-mremap-thp-2m-swapout",
        ANON_SHMEM, mremap::thp_2m_swapout,
        "uffd-wp-mremap: a 2 MiB (PMD) THP, swapped out first"
    ),
    case!(
        "wp-mremap-hugetlb-2m",
        HUGETLB, mremap::hugetlb_2m,
        "uffd-wp-mremap: a 2 MiB hugetlb page"
    ),
    case!(
        "wp-mremap-hugetlb-1g",
        HUGETLB, mremap::hugetlb_1g,
        "uffd-wp-mremap: a 1 GiB hugetlb page (the pool is grown by one page for the case)"
    ),
    case!(
        "wp-async",
        EVERY, wp::wp_async,
        "WP_ASYNC: no messages; PAGEMAP_SCAN reports written pages and re-protects them"
    ),
    case!(
        "wake-after-copy-failure",
        BASE_PAGES,
        project::wake_after_copy_failure,
        "WP toggling races COPY so EEXIST happens; every faulting thread is woken"
    ),
    case!(
        "continue-eexist",
        SHARED_FILE, minor::continue_eexist,
        "CONTINUE on a mapped page gives -EEXIST (AlreadyPresent); the handler stays healthy"
    ),
    case!(
        "continue-fallocated",
        SHMEM, minor::continue_fallocated,
        "CONTINUE on a fallocated, never written page (6.18: zero page) and on a hole (EFAULT)"
    ),
    case!(
        "collapse-minor-contents",
        SHMEM, minor::collapse_contents,
        "MADV_COLLAPSE of a half-continued minor range keeps its contents"
    ),
    case!(
        "retry-after-events",
        SHMEM, fork::retry_after_events,
        "a pending REMOVE: COPY, ZEROPAGE, CONTINUE, POISON, MOVE all give RetryAfterEvents"
    ),
    case!(
        "stress",
        EVERY, project::stress,
        "uffd-stress: locking, handler and background threads per CPU, 16 bounce modes, counters verified"
    ),
];

/// The kernel tests' default fault handler (`uffd_handle_page_fault` plus
/// the poll loop's event handling): MISSING → COPY from the same offset of
/// src (write-protected when `apply_wp`), WP → unprotect, MINOR → flip
/// every byte through the alias then CONTINUE (and check that a second
/// CONTINUE reports the page present), FORK → follow the child's
/// userfaultfd, REMAP → rebase dst, REMOVE → unregister the range.
#[derive(Debug)]
pub struct DefaultHandler<'a> {
    /// Source area base (in this process).
    pub src: u64,
    /// Registered destination base; moved by REMAP events.
    pub dst: u64,
    /// Unregistered alias of dst, for MINOR faults.
    pub alias: Option<u64>,
    /// Page size.
    pub ps: u64,
    /// Install pages write-protected.
    pub apply_wp: bool,
    /// Fault counters.
    pub counters: &'a Counters,
}

impl DefaultHandler<'_> {
    /// Handles one event; see the type's documentation.
    pub fn handle(&mut self, uffd: &Uffd, event: Event) -> Result<Next, String> {
        match event {
            Event::Pagefault(fault) => {
                let page = fault.page(self.ps);
                match fault.kind() {
                    FaultKind::WriteProtect => {
                        unprotect(uffd, page, self.ps)?;
                        self.counters.wp.fetch_add(1, Ordering::Relaxed);
                    }
                    FaultKind::Minor => {
                        let alias = self
                            .alias
                            .ok_or_else(|| format!("minor fault at {page:#x} without an alias"))?;
                        let through = alias + (page - self.dst);
                        for b in 0..self.ps {
                            // SAFETY: the alias page is mapped and unregistered;
                            // the faulting thread waits until the CONTINUE.
                            unsafe {
                                let p = (through + b) as *mut u8;
                                p.write_volatile(!p.read_volatile());
                            }
                        }
                        let mode = if self.apply_wp {
                            ContinueMode::WP
                        } else {
                            ContinueMode::empty()
                        };
                        match uffd.continue_(page, self.ps, mode) {
                            Ok(Outcome::Complete { .. }) => {}
                            other => return Err(format!("CONTINUE of {page:#x}: {other:?}")),
                        }
                        match uffd.continue_(page, self.ps, mode) {
                            Ok(Outcome::AlreadyPresent) => {}
                            other => {
                                return Err(format!(
                                    "a second CONTINUE of {page:#x} gave {other:?}, not AlreadyPresent (-EEXIST)"
                                ))
                            }
                        }
                        self.counters.minor.fetch_add(1, Ordering::Relaxed);
                    }
                    FaultKind::Missing => {
                        if fault.is_write() {
                            return Err(format!(
                                "unexpected write fault at {:#x}: every first access is a read",
                                fault.address
                            ));
                        }
                        let off = page - self.dst;
                        if copy_page(uffd, page, self.src + off, self.ps, self.apply_wp)? {
                            self.counters.missing.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.counters.eexist.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Next::Continue)
            }
            Event::Fork { uffd } => Ok(Next::Switch(uffd)),
            Event::Remap { to, .. } => {
                self.dst = to;
                Ok(Next::Continue)
            }
            Event::Remove { start, end } => {
                uffd.unregister(start, end - start)
                    .map_err(|e| format!("unregistering a removed range: {e}"))?;
                Ok(Next::Continue)
            }
            Event::Unmap { start, end } => {
                Err(format!("unexpected UNMAP event {start:#x}..{end:#x}"))
            }
            Event::Unknown { code } => Err(format!("unknown event {code:#x}")),
        }
    }
}
