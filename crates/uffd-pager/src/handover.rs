//! Handing a running pager's memory to another pager, possibly in another
//! process (a server restarting without downtime): which pages are
//! present, removed (a balloon: they must keep reading as zero) or
//! poisoned, laid out as the target's memory is mapped now, and the pages
//! recorded so far.
//!
//! [`crate::Pager::hand_over`] stops a pager without closing anything the
//! target needs and returns its userfaultfd with a [`PagerState`];
//! [`crate::PagerBuilder::resume`] starts a pager from them. Faults that
//! arrive in between wait in the kernel's queue for the new pager.

use serde::{Deserialize, Serialize};

use crate::region::{state, PageStates, Region};

/// What one page is, for a pager that carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageKind {
    /// Not present: the next fault installs it from the source.
    Missing,
    /// Removed (`MADV_DONTNEED`, a balloon): it reads as zero.
    Removed,
    /// Present in the target: never installed again.
    Present,
    /// Poisoned: the source could not produce it; access raises SIGBUS.
    Poisoned,
}

/// A piece of the target's memory as it is mapped now, with its pages as
/// runs of `(kind, count)` in address order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanState {
    /// Start address in the target.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Source offset of `start`.
    pub offset: u64,
    /// Page size of the span.
    pub page_size: u64,
    /// Page kinds, run-length encoded.
    pub runs: Vec<(PageKind, u64)>,
}

/// Everything a pager knows about its target's memory that the kernel
/// does not: see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerState {
    /// The target's memory, piece by piece.
    pub spans: Vec<SpanState>,
    /// Source offsets of first-touched pages so far, in order (empty when
    /// not recording).
    pub recorded: Vec<u64>,
}

/// Why a [`PagerState`] cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pager state cannot be resumed: span {span} (at {start:#x}): {problem}")]
pub struct StateError {
    /// Index of the span.
    pub span: usize,
    /// Its start address.
    pub start: u64,
    /// What is wrong.
    pub problem: &'static str,
}

impl SpanState {
    pub(crate) fn capture(region: Region, states: &PageStates, first: usize) -> SpanState {
        let pages = (region.len / region.page_size) as usize;
        let mut runs: Vec<(PageKind, u64)> = Vec::new();
        for i in first..first + pages {
            let kind = match states.get(i) {
                state::PRESENT | state::PREFETCHED => PageKind::Present,
                state::REMOVED | state::CLAIMED_ZERO => PageKind::Removed,
                state::POISONED => PageKind::Poisoned,
                // A claim never installed is missing again.
                _ => PageKind::Missing,
            };
            match runs.last_mut() {
                Some((k, n)) if *k == kind => *n += 1,
                _ => runs.push((kind, 1)),
            }
        }
        SpanState {
            start: region.start,
            len: region.len,
            offset: region.offset,
            page_size: region.page_size,
            runs,
        }
    }

    /// The span as a region, after checking it describes whole pages that
    /// its runs cover exactly.
    pub(crate) fn region(&self, index: usize) -> Result<Region, StateError> {
        let bad = |problem| StateError {
            span: index,
            start: self.start,
            problem,
        };
        let region = Region::new(self.start, self.len, self.offset, self.page_size);
        region.validate().map_err(bad)?;
        let mut pages = 0u64;
        for &(_, n) in &self.runs {
            pages = pages.checked_add(n).ok_or(bad("page runs overflow"))?;
        }
        if pages != self.len / self.page_size {
            return Err(bad("page runs do not cover the span exactly"));
        }
        Ok(region)
    }

    /// Sets `states` (fresh, one per page of the span) from the runs.
    pub(crate) fn apply(&self, states: &PageStates) {
        let mut i = 0;
        for &(kind, n) in &self.runs {
            let s = match kind {
                PageKind::Missing => state::MISSING,
                PageKind::Removed => state::REMOVED,
                PageKind::Present => state::PRESENT,
                PageKind::Poisoned => state::POISONED,
            };
            for _ in 0..n {
                states.set(i, s);
                i += 1;
            }
        }
    }

    /// Pages of this kind in the span.
    pub fn count(&self, kind: PageKind) -> u64 {
        self.runs
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }
}

impl PagerState {
    /// Pages of this kind over every span.
    pub fn count(&self, kind: PageKind) -> u64 {
        self.spans.iter().map(|s| s.count(kind)).sum()
    }
}
