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
//!   the file, since MADV_REMOVE is refused on private mappings.

#![allow(unsafe_code)]

mod api;
mod basic;
mod fork;
mod minor;
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
#[allow(dead_code)]
const HUGE: &[MemoryKind] = &[Hugetlb, HugetlbPrivate];

macro_rules! case {
    ($name:literal, $kinds:expr, $f:path) => {
        Case {
            name: $name,
            kinds: $kinds,
            run: $f,
        }
    };
}

/// Every case, in run order.
pub const ALL: &[Case] = &[
    case!("api-syscall", &[], api::via_syscall),
    case!("api-dev", &[], api::via_dev),
    case!("register-ioctls", EVERY, basic::register_ioctls),
    case!("zeropage", EVERY, basic::zeropage),
    case!("move", ANON, basic::move_pages),
    case!("move-pmd", ANON, basic::move_pmd),
    case!("move-pmd-split", ANON, basic::move_pmd_split),
    case!("wp-fork", EVERY, wp::fork),
    case!("wp-fork-with-event", EVERY, wp::fork_with_event),
    case!("wp-fork-pin", EVERY, wp::fork_pin),
    case!("wp-fork-pin-with-event", EVERY, wp::fork_pin_with_event),
    case!("wp-unpopulated", ANON, wp::unpopulated),
    case!("minor", MINOR, minor::minor),
    case!("minor-wp", MINOR, minor::minor_wp),
    case!("minor-collapse", SHMEM, minor::minor_collapse),
    case!("sigbus", EVERY, fork::sigbus),
    case!("sigbus-wp", EVERY, fork::sigbus_wp),
    case!("events", EVERY, fork::events),
    case!("events-wp", EVERY, fork::events_wp),
    case!("poison", EVERY, fork::poison),
    case!("mmap-changing", SHMEM, fork::mmap_changing),
    case!("wp-mremap", EVERY, wp::mremap),
    case!("wp-async", EVERY, wp::wp_async),
    case!(
        "wake-after-copy-failure",
        BASE_PAGES,
        project::wake_after_copy_failure
    ),
    case!("continue-eexist", SHARED_FILE, minor::continue_eexist),
    case!("continue-fallocated", SHMEM, minor::continue_fallocated),
    case!("collapse-minor-contents", SHMEM, minor::collapse_contents),
    case!("retry-after-events", SHMEM, fork::retry_after_events),
    case!("stress", EVERY, project::stress),
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
        }
    }
}
