//! How a handler thread waits for work: one epoll set per thread, built
//! once, and the adaptive spin that decides whether to sleep at all.
//!
//! Each handler thread has its own epoll instance holding the
//! userfaultfd (`EPOLLEXCLUSIVE`: one fault wakes one handler, not all of
//! them), the stop eventfd, the completion eventfd of asynchronous reads
//! and the target's pidfd. A `poll(2)` over the same descriptors would set
//! up and tear down four wait-queue entries on every call and wake every
//! handler for each fault.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};

/// What woke a handler thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Woken {
    /// The userfaultfd may have messages.
    pub messages: bool,
    /// Asynchronous reads finished.
    pub completions: bool,
    /// Shutdown was requested.
    pub stop: bool,
    /// The target process exited.
    pub target_gone: bool,
    /// The userfaultfd reports an error (or hang-up): it cannot be served.
    pub broken: bool,
}

const UFFD: u64 = 0;
const STOP: u64 = 1;
const COMPLETIONS: u64 = 2;
const PIDFD: u64 = 3;

/// One handler thread's epoll set.
#[derive(Debug)]
pub(crate) struct Waiter {
    epoll: OwnedFd,
}

impl Waiter {
    pub(crate) fn new(
        uffd: impl AsFd,
        stop: impl AsFd,
        completions: impl AsFd,
        pidfd: Option<impl AsFd>,
        exclusive: bool,
    ) -> std::io::Result<Waiter> {
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        let mut flags = EventFlags::IN;
        if exclusive {
            flags |= EventFlags::EXCLUSIVE;
        }
        epoll::add(&epoll, uffd, EventData::new_u64(UFFD), flags)?;
        epoll::add(&epoll, stop, EventData::new_u64(STOP), EventFlags::IN)?;
        epoll::add(
            &epoll,
            completions,
            EventData::new_u64(COMPLETIONS),
            EventFlags::IN,
        )?;
        if let Some(pidfd) = pidfd {
            epoll::add(&epoll, pidfd, EventData::new_u64(PIDFD), EventFlags::IN)?;
        }
        Ok(Waiter { epoll })
    }

    /// Sleeps until something happens or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) -> std::io::Result<Woken> {
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos().into(),
        };
        let empty = Event {
            flags: EventFlags::empty(),
            data: EventData::new_u64(0),
        };
        let mut events = [empty; 4];
        let n = match epoll::wait(&self.epoll, &mut events[..], Some(&ts)) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut woken = Woken::default();
        for event in &events[..n] {
            let flags = event.flags;
            match event.data.u64() {
                UFFD if flags.intersects(EventFlags::ERR | EventFlags::HUP) => woken.broken = true,
                UFFD => woken.messages = true,
                STOP => woken.stop = true,
                COMPLETIONS => woken.completions = true,
                PIDFD => woken.target_gone = true,
                _ => {}
            }
        }
        Ok(woken)
    }
}

/// Involuntary context switches of the calling thread so far: the
/// scheduler took the CPU away from it for someone else.
fn preemptions() -> i64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed local it is
    // given; RUSAGE_THREAD is supported since Linux 2.6.26.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) != 0 {
            return 0;
        }
        usage.ru_nivcsw
    }
}

/// Whether a handler spins on the non-blocking read instead of sleeping,
/// and for how long.
///
/// Spinning saves the wake-up of the handler on the next fault (about half
/// of a fault's cost on a VM), but it costs a core. Adaptive spinning
/// spins only while faults come faster than the budget and nobody else
/// wants the CPU: when the scheduler preempts the spinning thread (its
/// involuntary context switches grow), other threads — the vCPUs this
/// serves, on a machine with fewer cores than vCPUs — need the core, and
/// spinning stops for a while, longer each time it happens again.
#[derive(Debug)]
pub(crate) struct SpinPolicy {
    budget: Duration,
    adaptive: bool,
    /// When the current idle spell began (no messages since).
    idle_since: Option<Instant>,
    /// Adaptive: no spinning before this.
    paused_until: Option<Instant>,
    pause: Duration,
    preempted_at_start: i64,
    checked_at: Option<Instant>,
}

/// How often a spinning thread asks whether it was preempted.
const CHECK_EVERY: Duration = Duration::from_micros(200);
/// First pause after a preemption; doubles up to `MAX_PAUSE`.
const MIN_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(500);

impl SpinPolicy {
    /// Never spin.
    pub(crate) fn block() -> SpinPolicy {
        SpinPolicy::new(Duration::ZERO, false)
    }

    /// Always spin up to `budget` after the last message.
    pub(crate) fn fixed(budget: Duration) -> SpinPolicy {
        SpinPolicy::new(budget, false)
    }

    /// Spin up to `budget`, backing off while other threads want the CPU.
    pub(crate) fn adaptive(budget: Duration) -> SpinPolicy {
        SpinPolicy::new(budget, true)
    }

    fn new(budget: Duration, adaptive: bool) -> SpinPolicy {
        SpinPolicy {
            budget,
            adaptive,
            idle_since: None,
            paused_until: None,
            pause: MIN_PAUSE,
            preempted_at_start: 0,
            checked_at: None,
        }
    }

    /// Messages (or completions) were just handled.
    pub(crate) fn busy(&mut self) {
        self.idle_since = None;
    }

    /// A read found nothing: spin again (true) or sleep (false)?
    pub(crate) fn keep_spinning(&mut self) -> bool {
        if self.budget.is_zero() {
            return false;
        }
        let now = Instant::now();
        if self.paused_until.is_some_and(|until| now < until) {
            return false;
        }
        let since = *self.idle_since.get_or_insert_with(|| {
            self.checked_at = None;
            now
        });
        if now.duration_since(since) >= self.budget {
            self.idle_since = None;
            // A whole budget without preemption: contention is over.
            self.pause = (self.pause / 2).max(MIN_PAUSE);
            return false;
        }
        if self.adaptive
            && self
                .checked_at
                .is_none_or(|t| now.duration_since(t) >= CHECK_EVERY)
        {
            let preempted = preemptions();
            if self.checked_at.is_some() && preempted > self.preempted_at_start {
                // Someone runnable needed this core: stop, and stay off
                // longer if it keeps happening.
                self.paused_until = Some(now + self.pause);
                self.pause = (self.pause * 2).min(MAX_PAUSE);
                self.idle_since = None;
                return false;
            }
            self.preempted_at_start = preempted;
            self.checked_at = Some(now);
        }
        true
    }

    /// True while the policy spins at all (for statistics).
    pub(crate) fn spins(&self) -> bool {
        !self.budget.is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_never_spins_and_a_fixed_budget_runs_out() {
        let mut block = SpinPolicy::block();
        assert!(!block.keep_spinning());
        let mut fixed = SpinPolicy::fixed(Duration::from_millis(2));
        assert!(fixed.keep_spinning());
        std::thread::sleep(Duration::from_millis(3));
        assert!(!fixed.keep_spinning(), "the budget ran out");
        fixed.busy();
        assert!(fixed.keep_spinning(), "a new idle spell spins again");
    }

    #[test]
    fn preemption_pauses_adaptive_spinning() {
        let mut policy = SpinPolicy::adaptive(Duration::from_secs(5));
        assert!(policy.keep_spinning());
        // Force this thread off the CPU: other busy threads on every core.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hogs: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut paused = false;
        while Instant::now() < deadline {
            if !policy.keep_spinning() {
                paused = true;
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in hogs {
            h.join().unwrap();
        }
        assert!(
            paused,
            "spinning went on while other threads wanted the CPU"
        );
        assert!(policy.paused_until.is_some(), "a pause was set");
        assert!(policy.pause > MIN_PAUSE, "the next pause is longer");
    }
}
