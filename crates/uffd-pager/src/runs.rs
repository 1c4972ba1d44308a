//! Runs of pages of one kind: every resolving path (the engine's installs,
//! the SIGBUS handler's) issues one ioctl per run of equal pages (zero or
//! data), never one per page.

use std::ops::Range;

/// Splits `0..n` into maximal runs of indices whose `kind` is equal,
/// calling `kind` once per index. Allocates nothing, so the SIGBUS handler
/// may use it.
pub(crate) fn runs<K: Copy + PartialEq>(
    n: usize,
    kind: impl FnMut(usize) -> K,
) -> impl Iterator<Item = (Range<usize>, K)> {
    Runs {
        n,
        at: 0,
        next: None,
        kind,
    }
}

struct Runs<K, F> {
    n: usize,
    at: usize,
    /// The kind of index `at`, when already asked.
    next: Option<K>,
    kind: F,
}

impl<K: Copy + PartialEq, F: FnMut(usize) -> K> Iterator for Runs<K, F> {
    type Item = (Range<usize>, K);

    fn next(&mut self) -> Option<(Range<usize>, K)> {
        if self.at >= self.n {
            return None;
        }
        let start = self.at;
        let kind = match self.next.take() {
            Some(k) => k,
            None => (self.kind)(start),
        };
        let mut end = start + 1;
        while end < self.n {
            let k = (self.kind)(end);
            if k != kind {
                self.next = Some(k);
                break;
            }
            end += 1;
        }
        self.at = end;
        Some((start..end, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maximal_runs_each_index_asked_once() {
        let kinds = [1, 1, 0, 2, 2, 2, 1];
        let mut asked = Vec::new();
        let got: Vec<_> = runs(kinds.len(), |i| {
            asked.push(i);
            kinds[i]
        })
        .collect();
        assert_eq!(got, vec![(0..2, 1), (2..3, 0), (3..6, 2), (6..7, 1)]);
        assert_eq!(asked, (0..kinds.len()).collect::<Vec<_>>());
        assert_eq!(runs(0, |_| 0).count(), 0);
        assert_eq!(runs(3, |_| true).collect::<Vec<_>>(), vec![(0..3, true)]);
    }
}
