//! Per-page compaction state: the one place that decides who compacts a
//! page, so each page is compacted exactly once whether a faulting mutator
//! or a background thread gets there first.

use core::sync::atomic::{AtomicU8, Ordering};

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
/// Claimed, and a fault arrived meanwhile: whoever completes the page wakes it.
const CLAIMED_WAITED: u8 = 2;
/// Filled (into a staged page, or in MINOR mode the alias) and waiting
/// for its batch's install; a fault may take it and install it first.
const STAGED: u8 = 3;
const DONE: u8 = 4;
const FAILED: u8 = 5;

/// What a fault handler should do about a page it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// This caller owns the page now: compact and install it.
    Claimed,
    /// Another thread is compacting it and will wake the fault.
    InProgress,
    /// This caller owns the page now, and its contents are ready where
    /// its batch staged them: install them from there.
    Staged,
    /// It is installed (or poisoned) already: just wake the fault, which the
    /// kernel may have missed (it does not wake after a failed resolve).
    Settled,
}

/// One state byte per to-space page.
#[derive(Debug)]
pub(crate) struct PageStates {
    states: Box<[AtomicU8]>,
}

impl PageStates {
    pub(crate) fn new(pages: usize) -> PageStates {
        PageStates {
            states: (0..pages).map(|_| AtomicU8::new(PENDING)).collect(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    /// Claims a pending page for a background thread.
    pub(crate) fn claim(&self, page: usize) -> bool {
        self.states[page]
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Claims the page for a fault, or says why not.
    pub(crate) fn ask(&self, page: usize) -> Ask {
        let state = &self.states[page];
        let mut seen = state.load(Ordering::Acquire);
        loop {
            let (next, answer) = match seen {
                PENDING => (CLAIMED, Ask::Claimed),
                CLAIMED => (CLAIMED_WAITED, Ask::InProgress),
                CLAIMED_WAITED => return Ask::InProgress,
                STAGED => (CLAIMED, Ask::Staged),
                _ => return Ask::Settled,
            };
            match state.compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return answer,
                Err(now) => seen = now,
            }
        }
    }

    /// A claimed page's contents wait in a staged page: a fault may take it
    /// from now on. False when a fault waited meanwhile: the page stays
    /// claimed, and its claimant should install it without delay.
    pub(crate) fn stage(&self, page: usize) -> bool {
        self.states[page]
            .compare_exchange(CLAIMED, STAGED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes a staged page back for its batch; false when a fault took it.
    pub(crate) fn unstage(&self, page: usize) -> bool {
        self.states[page]
            .compare_exchange(STAGED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks a claimed page settled; true if a fault waited on it meanwhile.
    pub(crate) fn settle(&self, page: usize, ok: bool) -> bool {
        let old = self.states[page].swap(if ok { DONE } else { FAILED }, Ordering::AcqRel);
        debug_assert!(
            old == CLAIMED || old == CLAIMED_WAITED,
            "settled an unclaimed page"
        );
        old == CLAIMED_WAITED
    }

    /// True if the page failed (it is poisoned or protected).
    pub(crate) fn is_failed(&self, page: usize) -> bool {
        self.states[page].load(Ordering::Acquire) == FAILED
    }

    /// True once the page is installed (or failed): an access no longer
    /// waits for compaction.
    pub(crate) fn is_settled(&self, page: usize) -> bool {
        self.states[page].load(Ordering::Acquire) >= DONE
    }

    /// Waits, yielding the CPU, until another thread settles the page (a
    /// few microseconds: one fill or one install). Async-signal-safe.
    pub(crate) fn wait_settled(&self, page: usize) {
        while !self.is_settled(page) {
            core::hint::spin_loop();
            // sched_yield is async-signal-safe.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_claimant() {
        let s = PageStates::new(2);
        assert!(s.claim(0));
        assert!(!s.claim(0));
        assert_eq!(s.ask(0), Ask::InProgress);
        assert_eq!(s.ask(0), Ask::InProgress);
        assert!(s.settle(0, true), "the waiting fault must be woken");
        assert_eq!(s.ask(0), Ask::Settled);
        assert!(!s.claim(0));
        assert_eq!(s.ask(1), Ask::Claimed);
        assert!(!s.claim(1));
        assert!(!s.settle(1, false));
        assert!(s.is_settled(1));
        assert_eq!(s.ask(1), Ask::Settled);
    }

    #[test]
    fn a_staged_page_goes_to_its_batch_or_to_one_fault() {
        let s = PageStates::new(3);
        assert!(s.claim(0));
        assert!(s.stage(0));
        assert!(!s.is_settled(0), "staged is not installed");
        assert_eq!(s.ask(0), Ask::Staged, "a fault takes it");
        assert!(!s.unstage(0), "the batch no longer may");
        assert_eq!(s.ask(0), Ask::InProgress);
        assert!(s.settle(0, true));

        assert!(s.claim(1));
        assert!(s.stage(1));
        assert!(s.unstage(1), "the batch takes it back");
        assert_eq!(s.ask(1), Ask::InProgress, "and a fault now waits");
        assert!(s.settle(1, true), "the wait is woken");

        assert!(s.claim(2));
        assert_eq!(s.ask(2), Ask::InProgress);
        assert!(!s.stage(2), "a waited page is not staged");
        assert!(s.settle(2, true));
    }

    #[test]
    fn racing_claimants_get_each_page_once() {
        let s = PageStates::new(10_000);
        let won: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let s = &s;
                    scope.spawn(move || {
                        (0..s.len())
                            .filter(|&p| {
                                if t % 2 == 0 {
                                    s.claim(p)
                                } else {
                                    s.ask(p) == Ask::Claimed
                                }
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(won.iter().sum::<usize>(), 10_000);
    }
}
