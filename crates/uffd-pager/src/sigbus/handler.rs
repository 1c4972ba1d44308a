//! The process-wide part of SIGBUS mode: the table of published pagers the
//! signal handler reads without locks, the handler's installation and
//! removal, and the handler itself, which finds the pager covering the
//! faulting address and passes every other SIGBUS on.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Shared, SigbusError};

/// How many SIGBUS pagers may run at once in one process.
const MAX_PAGERS: usize = 32;

/// One pager the handler may serve: a pointer to its `Shared` (kept alive
/// by the `SigbusPager`) and how many handlers are using it right now.
struct Slot {
    pager: AtomicPtr<Shared>,
    users: AtomicUsize,
}

static SLOTS: [Slot; MAX_PAGERS] = [const {
    Slot {
        pager: AtomicPtr::new(std::ptr::null_mut()),
        users: AtomicUsize::new(0),
    }
}; MAX_PAGERS];
/// Slots below this index may be in use (the handler scans no further).
static SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
/// Serialises publishing, installing and uninstalling (never taken by the
/// handler).
static INSTALL: Mutex<Install> = Mutex::new(Install {
    pagers: 0,
    previous: None,
});

struct Install {
    pagers: usize,
    previous: Option<libc::sigaction>,
}

// SAFETY: `libc::sigaction` is plain data (a handler address, a mask and
// flags); it is only moved between threads under the mutex.
unsafe impl Send for Install {}

/// The previous SIGBUS disposition, for passing signals on. Atomics rather
/// than a `sigaction` so the handler reads them without a lock.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);

pub(super) fn publish(shared: &Arc<Shared>) -> Result<usize, SigbusError> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let ptr = Arc::as_ptr(shared).cast_mut();
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot
            .pager
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            SLOTS_USED.fetch_max(i + 1, Ordering::SeqCst);
            return Ok(i);
        }
    }
    Err(SigbusError::Invalid(format!(
        "at most {MAX_PAGERS} SIGBUS pagers can run in one process"
    )))
}

pub(super) fn install_handler() -> std::io::Result<()> {
    let mut install = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if install.pagers == 0 {
        // SAFETY: a zeroed sigaction is a valid value to fill in; sigfillset
        // and sigaction get pointers to live locals. The handler we install
        // only does async-signal-safe work (see `on_sigbus`).
        let previous = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler_address();
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigfillset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            previous
        };
        if previous.sa_sigaction != handler_address() {
            PREVIOUS_FLAGS.store(previous.sa_flags as usize, Ordering::SeqCst);
            PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::SeqCst);
        }
        install.previous = Some(previous);
    }
    install.pagers += 1;
    Ok(())
}

pub(super) fn uninstall_handler() {
    let mut install = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    install.pagers = install.pagers.saturating_sub(1);
    if install.pagers > 0 {
        return;
    }
    let Some(previous) = install.previous.take() else {
        return;
    };
    // SAFETY: querying and restoring the SIGBUS disposition with pointers
    // to live locals. We restore only if ours is still installed, so a
    // handler somebody installed after us stays.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == handler_address()
        {
            libc::sigaction(libc::SIGBUS, &previous, std::ptr::null_mut());
        }
    }
}

/// True while SIGBUS is handled by a [`SigbusPager`](super::SigbusPager) of this process.
pub fn sigbus_handler_installed() -> bool {
    // SAFETY: querying the disposition into a live local.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == handler_address()
    }
}

/// The address of [`on_sigbus`] as `sigaction` stores it.
fn handler_address() -> usize {
    on_sigbus as *const () as usize
}

/// The SIGBUS handler. Async-signal-safe: atomics, arithmetic, reads of
/// immutable data owned by a published pager, `pread(2)`, `ioctl(2)`,
/// `clock_gettime` (vDSO) and `sigaction(2)`. errno is saved and restored.
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: errno is thread-local; saving it so the interrupted code sees
    // its own value afterwards.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let served = code == libc::BUS_ADRERR && serve(address);
    if !served {
        pass_on(signal, info, context);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Hands a SIGBUS we do not serve to the previous disposition. For the
/// default (or ignore, which the kernel overrides for a fault), restores
/// the default and returns: the access faults again and the kernel kills
/// the process with SIGBUS, as it would have without us.
fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let handler = PREVIOUS_HANDLER.load(Ordering::SeqCst);
    let flags = PREVIOUS_FLAGS.load(Ordering::SeqCst) as libc::c_int;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: sigaction is async-signal-safe; a zeroed action with
        // SIG_DFL is the default disposition.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    } else if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so
        // it has this signature; we pass the arguments we were given.
        unsafe {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                std::mem::transmute(handler);
            f(signal, info, context);
        }
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes the signal
        // number only.
        unsafe {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(signal);
        }
    }
}

/// Serves a fault at `address` if a published pager covers it. Returns
/// false when none does or the page could not be produced.
fn serve(address: u64) -> bool {
    let used = SLOTS_USED.load(Ordering::SeqCst);
    for slot in &SLOTS[..used] {
        slot.users.fetch_add(1, Ordering::SeqCst);
        let ptr = slot.pager.load(Ordering::SeqCst);
        // SAFETY: a published pointer stays valid while `users` is raised:
        // `withdraw` clears it and then waits for `users` to drop to zero
        // before the `SigbusPager` (which holds the Arc) lets it go.
        let found = unsafe { ptr.as_ref() }.and_then(|shared| {
            let region = shared
                .regions
                .iter()
                .find(|r| r.start <= address && address < r.end())?;
            Some(shared.serve(region, address))
        });
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if let Some(served) = found {
            return served;
        }
    }
    false
}

/// Removes the pager in `slot` from the handler's table and waits until no
/// handler uses it.
pub(super) fn withdraw(slot: usize) {
    let slot = &SLOTS[slot];
    slot.pager.store(std::ptr::null_mut(), Ordering::SeqCst);
    while slot.users.load(Ordering::SeqCst) != 0 {
        std::thread::sleep(Duration::from_micros(50));
    }
}
