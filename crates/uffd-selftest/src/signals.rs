//! SIGBUS handling for forked children only (a signal handler is
//! process-wide, so it never goes into the runner's process).
//!
//! Two ways to answer a SIGBUS on registered memory:
//! - [`Answer::Resolve`]: the handler resolves the fault itself through the
//!   userfaultfd (the SIGBUS feature's point: lowest latency, same thread):
//!   COPY for a missing page, unprotect when the page is present (a
//!   write-protect fault), then the access is retried;
//! - [`Answer::Skip`]: the handler maps a fresh anonymous page over the
//!   faulting page, so the access is retried and reads zeros; the case only
//!   counts the signals (the kernel's tests skip with siglongjmp instead).

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use uffd::{CopyMode, Outcome, Uffd, WriteProtectMode};

/// How the handler answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Resolve through the userfaultfd and retry the access.
    Resolve,
    /// Map a zero page over the faulting page and retry.
    Skip,
}

static RESOLVE: AtomicBool = AtomicBool::new(false);
static PAGE_SIZE: AtomicU64 = AtomicU64::new(4096);
static UFFD: AtomicPtr<Uffd> = AtomicPtr::new(std::ptr::null_mut());
static SRC: AtomicU64 = AtomicU64::new(0);
static DST: AtomicU64 = AtomicU64::new(0);
static WP: AtomicBool = AtomicBool::new(false);

/// SIGBUS signals answered by a COPY (Resolve) or a skip (Skip).
pub static MISSING_SIGNALS: AtomicU64 = AtomicU64::new(0);
/// SIGBUS signals answered by unprotecting (Resolve only).
pub static WP_SIGNALS: AtomicU64 = AtomicU64::new(0);
/// Signals the handler could not answer (an ioctl failed).
pub static ERRORS: AtomicU64 = AtomicU64::new(0);
/// The page of the last signal.
pub static LAST_PAGE: AtomicU64 = AtomicU64::new(0);

/// Installs the SIGBUS handler in this (forked child) process. With
/// `Resolve`, `uffd` resolves faults at `dst + off` from `src + off`,
/// installing pages write-protected when `wp`.
///
/// # Safety
/// Only in a forked child that exits with `_exit` afterwards: the handler
/// stays installed, and the leaked `uffd` must outlive every signal.
pub unsafe fn install(
    answer: Answer,
    page_size: u64,
    uffd: Option<Uffd>,
    src: u64,
    dst: u64,
    wp: bool,
) {
    RESOLVE.store(answer == Answer::Resolve, Ordering::SeqCst);
    PAGE_SIZE.store(page_size, Ordering::SeqCst);
    if let Some(uffd) = uffd {
        UFFD.store(Box::into_raw(Box::new(uffd)), Ordering::SeqCst);
    }
    SRC.store(src, Ordering::SeqCst);
    DST.store(dst, Ordering::SeqCst);
    WP.store(wp, Ordering::SeqCst);
    MISSING_SIGNALS.store(0, Ordering::SeqCst);
    WP_SIGNALS.store(0, Ordering::SeqCst);
    ERRORS.store(0, Ordering::SeqCst);
    // SAFETY: a zeroed sigaction is valid; we fill the handler and flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
    // SAFETY: installs a handler that only does async-signal-safe work
    // (atomics, ioctl, mmap).
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let ps = PAGE_SIZE.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as u64;
    let page = addr & !(ps - 1);
    LAST_PAGE.store(page, Ordering::Relaxed);
    if !RESOLVE.load(Ordering::Relaxed) {
        MISSING_SIGNALS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: replaces the faulting page (inside a mapping the child
        // owns) with a fresh zero page so the access can complete.
        let p = unsafe {
            libc::mmap(
                page as *mut c_void,
                ps as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            ERRORS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: nothing else can make progress; leave the child.
            unsafe { libc::_exit(3) };
        }
        return;
    }
    let uffd_ptr = UFFD.load(Ordering::Relaxed);
    if uffd_ptr.is_null() {
        // SAFETY: a SIGBUS nobody can answer; leave the child.
        unsafe { libc::_exit(4) };
    }
    // SAFETY: leaked in `install` and never freed.
    let uffd = unsafe { &*uffd_ptr };
    let src = SRC.load(Ordering::Relaxed) + (page - DST.load(Ordering::Relaxed));
    let mode = if WP.load(Ordering::Relaxed) {
        CopyMode::WP
    } else {
        CopyMode::empty()
    };
    // SAFETY: src is the child's source area, dst registered memory.
    match unsafe { uffd.copy(page, src as *const u8, ps, mode) } {
        Ok(Outcome::Complete { .. }) => {
            MISSING_SIGNALS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Outcome::AlreadyPresent) => {
            WP_SIGNALS.fetch_add(1, Ordering::Relaxed);
            if uffd
                .write_protect(page, ps, WriteProtectMode::empty())
                .is_err()
            {
                ERRORS.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the access would fault forever; leave the child.
                unsafe { libc::_exit(5) };
            }
        }
        _ => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { libc::_exit(6) };
        }
    }
}
