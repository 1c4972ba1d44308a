//! The SIGBUS path (ART's): with `UFFD_FEATURE_SIGBUS` a mutator touching a
//! page not compacted yet gets SIGBUS instead of sleeping on a fault
//! message; the process-wide handler below compacts the page in that very
//! thread and returns, so the access restarts and finds it. No handler
//! thread, no wake-up, no sleep.
//!
//! What runs in the handler must be async-signal-safe with respect to the
//! code it interrupted. The interrupted code is a heap access of a mutator,
//! so it holds none of this crate's locks (they are taken only inside page
//! compaction, which never touches the heap), and the fill path allocates
//! nothing on success (the MOVE pool has room for every page). The
//! runtime's `fill` runs there too: it must not take a lock a mutator may
//! hold while it accesses the heap.

#![allow(unsafe_code)]

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A compaction that can serve a SIGBUS at `addr`.
pub(crate) trait SigbusTarget: Send + Sync {
    /// Compacts (or waits for) the page at `addr`; false when the address
    /// is not this compaction's or its page failed (then the signal is a
    /// real bus error and goes on to the previous handler).
    fn on_sigbus(&self, addr: u64) -> bool;
}

struct Entry {
    target: *const (dyn SigbusTarget + 'static),
}

const SLOTS: usize = 16;

// Registered compactions; null when free. Entries are leaked boxes owned by
// the registration, freed only once no handler can be looking at them.
static TARGETS: [AtomicPtr<Entry>; SLOTS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; SLOTS];
// Handlers currently running (any slot): unregistering waits for zero.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// A registration; unregisters (and waits for running handlers) on drop.
pub(crate) struct Registration {
    slot: usize,
}

/// Installs the handler (once per process) and registers `target`.
///
/// # Safety
/// `target` must stay valid until the returned registration is dropped.
pub(crate) unsafe fn register(
    target: *const (dyn SigbusTarget + 'static),
) -> Result<Registration, &'static str> {
    let installed = PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value
        // that sigaction fills in; our handler is an extern "C" fn with the
        // SA_SIGINFO signature.
        unsafe {
            let mut new: libc::sigaction = core::mem::zeroed();
            new.sa_sigaction = handler as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO;
            // Block every other signal while serving: a signal handler that
            // touched the heap meanwhile would fault with SIGBUS blocked,
            // which the kernel turns into a kill.
            libc::sigfillset(&mut new.sa_mask);
            let mut old: libc::sigaction = core::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                Ok(old)
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        }
    });
    if installed.is_err() {
        return Err("installing the SIGBUS handler failed");
    }
    let entry = Box::into_raw(Box::new(Entry { target }));
    for (slot, t) in TARGETS.iter().enumerate() {
        if t.compare_exchange(
            core::ptr::null_mut(),
            entry,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
        {
            return Ok(Registration { slot });
        }
    }
    // SAFETY: never published, so ours to free.
    drop(unsafe { Box::from_raw(entry) });
    Err("too many SIGBUS compactions at once (16)")
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry = TARGETS[self.slot].swap(core::ptr::null_mut(), Ordering::AcqRel);
        // A handler that loaded the entry before the swap is counted in
        // IN_FLIGHT; it finishes in bounded time (its page is settled or
        // being settled).
        while IN_FLIGHT.load(Ordering::Acquire) != 0 {
            std::thread::yield_now();
        }
        if !entry.is_null() {
            // SAFETY: unpublished and no handler is looking at it.
            drop(unsafe { Box::from_raw(entry) });
        }
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // for SIGBUS si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as u64;
    let mut handled = false;
    for t in &TARGETS {
        let entry = t.load(Ordering::Acquire);
        if entry.is_null() {
            continue;
        }
        // SAFETY: published entries stay valid while IN_FLIGHT counts us
        // (see Registration::drop), and so do their targets (register's
        // contract).
        if unsafe { (*(*entry).target).on_sigbus(addr) } {
            handled = true;
            break;
        }
    }
    IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    if !handled {
        pass_on(sig, info, ctx);
    }
}

/// Hands a SIGBUS that is not ours to whoever had it before; with the
/// default action, restores it so the retried access kills the process.
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(Ok(prev)) = PREVIOUS.get() else {
        return;
    };
    let action = prev.sa_sigaction;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: restoring the previous disposition; the faulting access
        // restarts and raises SIGBUS again, now fatal (a poisoned page).
        unsafe {
            libc::sigaction(libc::SIGBUS, prev, core::ptr::null_mut());
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(action) };
        f(sig);
    }
}
