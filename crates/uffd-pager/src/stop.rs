//! The one stop signal of the runtime: a flag for threads that check and an
//! eventfd for threads that wait in `poll(2)` or epoll.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::EventfdFlags;

/// A request to stop, seen at once both by threads that test a flag and by
/// threads blocked in `poll(2)` or epoll on [`StopSignal::as_fd`]: once
/// requested, the eventfd stays readable (nobody reads it), so every
/// waiter, now or later, wakes.
#[derive(Debug)]
pub struct StopSignal {
    flag: AtomicBool,
    fd: OwnedFd,
}

impl StopSignal {
    /// A signal not yet requested.
    pub fn new() -> Result<StopSignal, rustix::io::Errno> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(StopSignal {
            flag: AtomicBool::new(false),
            fd,
        })
    }

    /// Requests the stop. Only an atomic store and an eventfd `write(2)`,
    /// so it is async-signal-safe.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// True once the stop was requested.
    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl AsFd for StopSignal {
    /// Readable once the stop was requested.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_readable_for_every_waiter() {
        let stop = StopSignal::new().unwrap();
        assert!(!stop.is_requested());
        let ready = |s: &StopSignal| {
            let mut fds = [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)];
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut fds, Some(&zero)).unwrap() == 1
        };
        assert!(!ready(&stop));
        stop.request();
        assert!(stop.is_requested());
        assert!(ready(&stop) && ready(&stop));
    }
}
