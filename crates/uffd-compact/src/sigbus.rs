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
//!
//! A SIGBUS is raised in the fault but handled when the thread next runs,
//! which on a busy machine can be after the compaction has ended. So each
//! heap keeps its slot for its whole life, and between compactions a signal
//! for one of its pages is answered from the last compaction's page states:
//! installed means retry the access, failed (poisoned) means a real bus
//! error, passed to the previous handler.

#![allow(unsafe_code)]

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::state::PageStates;

/// A compaction that can serve a SIGBUS at `addr`.
pub(crate) trait SigbusTarget: Send + Sync {
    /// Compacts (or waits for) the page at `addr`; false when its page
    /// failed (then the signal is a real bus error).
    fn on_sigbus(&self, addr: u64) -> bool;
}

struct Active {
    target: *const (dyn SigbusTarget + 'static),
}

struct Entry {
    base: u64,
    len: u64,
    /// The running compaction, or null between compactions.
    active: AtomicPtr<Active>,
    /// The page states of the last compaction that ended (from
    /// `Arc::into_raw`), or null.
    last: AtomicPtr<PageStates>,
}

const SLOTS: usize = 64;

// One entry per heap that has used the SIGBUS path; null when free. Freed
// only once no handler can be looking (IN_FLIGHT is zero after unpublishing).
static ENTRIES: [AtomicPtr<Entry>; SLOTS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; SLOTS];
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

fn quiesce() {
    while IN_FLIGHT.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
}

/// A heap's slot; held by the heap for its life.
#[derive(Debug)]
pub(crate) struct HeapSlot {
    slot: usize,
}

impl HeapSlot {
    /// Installs the handler (once per process) and takes a slot for the
    /// heap at `base..base+len`.
    pub(crate) fn new(base: u64, len: u64) -> Result<HeapSlot, &'static str> {
        let installed = PREVIOUS.get_or_init(|| {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
            // value that sigaction fills in; our handler is an extern "C"
            // fn with the SA_SIGINFO signature.
            unsafe {
                let mut new: libc::sigaction = core::mem::zeroed();
                new.sa_sigaction = handler as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO;
                // Block every other signal while serving: a signal handler
                // that touched the heap meanwhile would fault with SIGBUS
                // blocked, which the kernel turns into a kill.
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
        let entry = Box::into_raw(Box::new(Entry {
            base,
            len,
            active: AtomicPtr::new(core::ptr::null_mut()),
            last: AtomicPtr::new(core::ptr::null_mut()),
        }));
        for (slot, e) in ENTRIES.iter().enumerate() {
            if e.compare_exchange(
                core::ptr::null_mut(),
                entry,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
            {
                return Ok(HeapSlot { slot });
            }
        }
        // SAFETY: never published, so ours to free.
        drop(unsafe { Box::from_raw(entry) });
        Err("too many heaps on the SIGBUS path at once (64)")
    }

    fn entry(&self) -> &Entry {
        // SAFETY: the entry stays published (and allocated) while this
        // slot lives; only Drop unpublishes it.
        unsafe { &*ENTRIES[self.slot].load(Ordering::Acquire) }
    }

    /// Routes the heap's SIGBUS to `target`.
    ///
    /// # Safety
    /// `target` must stay valid until [`HeapSlot::retire`] (or drop).
    pub(crate) unsafe fn activate(&self, target: *const (dyn SigbusTarget + 'static)) {
        let active = Box::into_raw(Box::new(Active { target }));
        let old = self.entry().active.swap(active, Ordering::AcqRel);
        if !old.is_null() {
            quiesce();
            // SAFETY: unpublished, and no handler is looking at it.
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// The compaction ended: later signals for the heap (raised while it
    /// ran) are answered from `states`. Returns when no handler uses the
    /// old target any more.
    pub(crate) fn retire(&self, states: &Arc<PageStates>) {
        let e = self.entry();
        let old_last = e.last.swap(
            Arc::into_raw(Arc::clone(states)).cast_mut(),
            Ordering::AcqRel,
        );
        let old_active = e.active.swap(core::ptr::null_mut(), Ordering::AcqRel);
        quiesce();
        // SAFETY: both are unpublished and no handler is looking at them.
        unsafe {
            if !old_active.is_null() {
                drop(Box::from_raw(old_active));
            }
            if !old_last.is_null() {
                drop(Arc::from_raw(old_last));
            }
        }
    }
}

impl Drop for HeapSlot {
    fn drop(&mut self) {
        let entry = ENTRIES[self.slot].swap(core::ptr::null_mut(), Ordering::AcqRel);
        quiesce();
        if entry.is_null() {
            return;
        }
        // SAFETY: unpublished and no handler is looking at it (or at what
        // it points to).
        unsafe {
            let entry = Box::from_raw(entry);
            let active = entry.active.load(Ordering::Acquire);
            if !active.is_null() {
                drop(Box::from_raw(active));
            }
            let last = entry.last.load(Ordering::Acquire);
            if !last.is_null() {
                drop(Arc::from_raw(last));
            }
        }
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // for SIGBUS si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as u64;
    let mut handled = false;
    for e in &ENTRIES {
        let entry = e.load(Ordering::Acquire);
        if entry.is_null() {
            continue;
        }
        // SAFETY: published entries, and what they point to, stay valid
        // while IN_FLIGHT counts this handler (every unpublisher waits for
        // zero before freeing).
        let entry = unsafe { &*entry };
        if addr < entry.base || addr - entry.base >= entry.len {
            continue;
        }
        let active = entry.active.load(Ordering::Acquire);
        handled = if !active.is_null() {
            // SAFETY: as above; the target outlives its activation.
            unsafe { (*(*active).target).on_sigbus(addr) }
        } else {
            let last = entry.last.load(Ordering::Acquire);
            // SAFETY: as above.
            !last.is_null() && unsafe { !(*last).is_failed(((addr - entry.base) / 4096) as usize) }
        };
        break;
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
