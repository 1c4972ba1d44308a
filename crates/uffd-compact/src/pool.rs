//! MOVE's pool of recycled from-space pages: a bitmap, so the background
//! threads can take a run of consecutive pages and install a whole batch
//! with one UFFDIO_MOVE. The kernel flushes the moved source PTEs' TLB
//! entries once per call, and with mutators running on other CPUs that
//! flush is an IPI: one per page moved singly, one per batch here.
//!
//! Nothing here allocates after `new`: pages are given back from inside
//! the SIGBUS handler too.

use std::sync::Mutex;

/// Words scanned at most per `pop_run` (64 pages each), so the lock is
/// held briefly even when no run is free.
const SCAN_WORDS: usize = 1024;

#[derive(Debug)]
pub(crate) struct Pool {
    inner: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    count: usize,
    hint: usize,
}

impl Pool {
    pub(crate) fn new(pages: usize, free: impl Iterator<Item = usize>) -> Pool {
        let mut bits = Bits {
            words: vec![0; pages.div_ceil(64).max(1)],
            count: 0,
            hint: 0,
        };
        for q in free {
            bits.set(q);
        }
        Pool {
            inner: Mutex::new(bits),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives page `q` to the pool.
    pub(crate) fn push(&self, q: usize) {
        self.lock().set(q);
    }

    /// `k` consecutive free pages: the first of them.
    pub(crate) fn pop_run(&self, k: usize) -> Option<usize> {
        debug_assert!(k >= 1);
        let mut b = self.lock();
        if b.count < k {
            return None;
        }
        let n = b.words.len();
        let start_word = b.hint.min(n - 1);
        // From the hint to the end, then from the start: a run does not
        // continue across the wrap.
        let order = (start_word..n).chain(0..start_word).take(SCAN_WORDS);
        let (mut run_start, mut run_len) = (0usize, 0usize);
        let mut prev: Option<usize> = None;
        for w in order {
            if prev.is_some_and(|p| p + 1 != w) {
                run_len = 0;
            }
            prev = Some(w);
            let word = b.words[w];
            let mut bit = 0u32;
            while bit < 64 {
                let shifted = word >> bit;
                let ones = shifted.trailing_ones().min(64 - bit);
                if ones > 0 {
                    if run_len == 0 {
                        run_start = w * 64 + bit as usize;
                    }
                    run_len += ones as usize;
                    if run_len >= k {
                        b.clear(run_start, k);
                        b.hint = (run_start + k) / 64;
                        return Some(run_start);
                    }
                    bit += ones;
                } else {
                    run_len = 0;
                    bit += shifted.trailing_zeros().clamp(1, 64 - bit);
                }
            }
        }
        None
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().count
    }
}

impl Bits {
    fn set(&mut self, q: usize) {
        let (w, bit) = (q / 64, q % 64);
        if self.words[w] & (1 << bit) == 0 {
            self.words[w] |= 1 << bit;
            self.count += 1;
        }
    }

    fn clear(&mut self, q: usize, k: usize) {
        for i in q..q + k {
            let (w, bit) = (i / 64, i % 64);
            debug_assert!(self.words[w] & (1 << bit) != 0);
            self.words[w] &= !(1 << bit);
        }
        self.count -= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_single_pages_and_exhaustion() {
        let pool = Pool::new(300, [3, 5, 6, 7, 8, 100].into_iter().chain(130..200));
        assert_eq!(pool.len(), 76);
        assert_eq!(pool.pop_run(4), Some(5));
        assert_eq!(pool.pop_run(64), Some(130), "a run across a word boundary");
        assert_eq!(pool.pop_run(7), None, "only 6 left in a row");
        assert_eq!(pool.pop_run(6), Some(194));
        assert_eq!(pool.pop_run(1), Some(3));
        assert_eq!(pool.pop_run(1), Some(100));
        assert_eq!(pool.pop_run(1), None);
        pool.push(299);
        pool.push(299);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.pop_run(1), Some(299));
    }

    #[test]
    fn runs_longer_than_a_word() {
        let pool = Pool::new(2048, (10..20).chain(100..700).chain(1000..1600));
        assert_eq!(pool.pop_run(512), Some(100));
        assert_eq!(pool.pop_run(512), Some(1000));
        assert_eq!(pool.pop_run(512), None, "88 and 88 left, apart");
        assert_eq!(pool.pop_run(88), Some(1512), "from the hint on");
        assert_eq!(pool.pop_run(88), Some(612), "then from the start");
        assert_eq!(pool.len(), 10);
    }
}
