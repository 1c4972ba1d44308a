//! Regions (what the target's addresses map to in the source) and the
//! engine's per-page state.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

/// A range of the target's memory and where its bytes come from, as
/// Firecracker describes guest memory: host virtual address in the target
/// process, size, offset in the memory file, page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Region {
    /// Start address in the target process (page aligned).
    pub start: u64,
    /// Length in bytes (a multiple of `page_size`).
    pub len: u64,
    /// Source offset of `start`.
    pub offset: u64,
    /// 4096, or 2 MiB for hugetlb memory.
    pub page_size: u64,
    #[serde(skip)]
    alias: Option<usize>,
}

impl Region {
    /// A region of `len` bytes at `start` in the target, filled from source
    /// offset `offset` in pages of `page_size`.
    pub fn new(start: u64, len: u64, offset: u64, page_size: u64) -> Region {
        Region {
            start,
            len,
            offset,
            page_size,
            alias: None,
        }
    }

    /// Gives the region an alias: `ptr` maps, in this process and without
    /// userfaultfd registration, the same file pages as the region (shmem or
    /// hugetlbfs). [`crate::Strategy::Continue`] writes page contents there
    /// and then maps them with `UFFDIO_CONTINUE`.
    ///
    /// # Safety
    /// - `ptr..ptr + len` must stay mapped, shared and writable for as long
    ///   as any pager serves the region.
    /// - No Rust reference may cover that memory while the pager runs: the
    ///   engine writes to it.
    // The contract is the caller's to keep: stated as an unsafe fn.
    #[allow(unsafe_code)]
    pub unsafe fn with_alias(mut self, ptr: *mut u8) -> Region {
        self.alias = Some(ptr as usize);
        self
    }

    /// The alias address, if one was given.
    pub fn alias(&self) -> Option<*mut u8> {
        self.alias.map(|a| a as *mut u8)
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }

    /// The source offset holding the byte at `addr` (which must be inside).
    pub fn source_offset(&self, addr: u64) -> u64 {
        debug_assert!(self.contains(addr));
        self.offset + (addr - self.start)
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.page_size != 4096 && self.page_size != 2 << 20 {
            return Err("page size must be 4096 or 2 MiB");
        }
        if self.len == 0 || !self.len.is_multiple_of(self.page_size) {
            return Err("length must be a non-zero multiple of the page size");
        }
        if !self.start.is_multiple_of(self.page_size) || !self.offset.is_multiple_of(4096) {
            return Err("start must be page aligned and offset 4 KiB aligned");
        }
        if self.start.checked_add(self.len).is_none() {
            return Err("region wraps around the address space");
        }
        Ok(())
    }
}

/// Page states. Transitions: MISSING/REMOVED -> CLAIMED/CLAIMED_ZERO (one
/// thread wins the CAS and fetches) -> PRESENT/PREFETCHED (after the
/// ioctl, under the table's read lock) and REMOVE events -> REMOVED (under
/// the write lock). Background work (fill, replay) claims MISSING ->
/// CLAIMED_BG, which a demand fault may steal (-> CLAIMED) so that it
/// never waits behind a whole background batch.
pub(crate) mod state {
    pub const MISSING: u8 = 0;
    pub const REMOVED: u8 = 1;
    pub const CLAIMED: u8 = 2;
    pub const CLAIMED_ZERO: u8 = 3;
    pub const PRESENT: u8 = 4;
    pub const PREFETCHED: u8 = 5;
    pub const POISONED: u8 = 6;
    pub const CLAIMED_BG: u8 = 7;
}

/// The state of every page of one original region, shared by the pieces
/// UNMAP and REMAP split it into.
#[derive(Debug)]
pub(crate) struct PageStates {
    states: Box<[AtomicU8]>,
    dirty: Box<[AtomicBool]>,
}

impl PageStates {
    pub(crate) fn new(pages: usize, track_dirty: bool) -> PageStates {
        PageStates {
            states: (0..pages).map(|_| AtomicU8::new(state::MISSING)).collect(),
            dirty: (0..if track_dirty { pages } else { 0 })
                .map(|_| AtomicBool::new(false))
                .collect(),
        }
    }

    pub(crate) fn get(&self, i: usize) -> u8 {
        self.states[i].load(Ordering::Acquire)
    }

    pub(crate) fn set(&self, i: usize, s: u8) {
        self.states[i].store(s, Ordering::Release);
    }

    pub(crate) fn cas(&self, i: usize, from: u8, to: u8) -> bool {
        self.states[i]
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Claims page `i` for fetching: MISSING -> CLAIMED, REMOVED ->
    /// CLAIMED_ZERO. Returns the claim state, or `None` if someone else owns
    /// the page or it is present.
    pub(crate) fn claim(&self, i: usize) -> Option<u8> {
        let current = self.get(i);
        let to = match current {
            state::MISSING => state::CLAIMED,
            state::REMOVED => state::CLAIMED_ZERO,
            _ => return None,
        };
        self.cas(i, current, to).then_some(to)
    }

    /// Claims a missing page `i` for background work (MISSING ->
    /// CLAIMED_BG); a demand fault may take it over with [`Self::steal`].
    pub(crate) fn claim_background(&self, i: usize) -> Option<u8> {
        self.cas(i, state::MISSING, state::CLAIMED_BG)
            .then_some(state::CLAIMED_BG)
    }

    /// Takes a background claim over for a demand fault (CLAIMED_BG ->
    /// CLAIMED): the background batch then skips the page.
    pub(crate) fn steal(&self, i: usize) -> bool {
        self.cas(i, state::CLAIMED_BG, state::CLAIMED)
    }

    /// Undoes claim `claimed` of page `i` that was not installed; a claim
    /// someone else holds now (a stolen background claim) stays theirs.
    pub(crate) fn release(&self, i: usize, claimed: u8) {
        let back = match claimed {
            state::CLAIMED_ZERO => state::REMOVED,
            _ => state::MISSING,
        };
        let _ = self.cas(i, claimed, back);
    }

    pub(crate) fn mark_dirty(&self, i: usize) -> bool {
        self.dirty
            .get(i)
            .is_some_and(|d| !d.swap(true, Ordering::Relaxed))
    }

    pub(crate) fn is_dirty(&self, i: usize) -> bool {
        self.dirty.get(i).is_some_and(|d| d.load(Ordering::Relaxed))
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }
}

/// A contiguous piece of a region as it is mapped now.
#[derive(Debug, Clone)]
pub(crate) struct Span {
    pub start: u64,
    pub len: u64,
    pub offset: u64,
    pub page_size: u64,
    pub alias: Option<usize>,
    pub states: Arc<PageStates>,
    /// Index in `states` of the page at `start`.
    pub first: usize,
}

impl Span {
    pub(crate) fn end(&self) -> u64 {
        self.start + self.len
    }

    pub(crate) fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }

    /// The state index of the page holding `addr`.
    pub(crate) fn index(&self, addr: u64) -> usize {
        self.first + ((addr - self.start) / self.page_size) as usize
    }

    /// One past the last state index.
    pub(crate) fn index_end(&self) -> usize {
        self.first + (self.len / self.page_size) as usize
    }

    pub(crate) fn addr_of(&self, i: usize) -> u64 {
        self.start + (i - self.first) as u64 * self.page_size
    }

    pub(crate) fn source_of(&self, i: usize) -> u64 {
        self.offset + (i - self.first) as u64 * self.page_size
    }

    pub(crate) fn alias_of(&self, i: usize) -> Option<*mut u8> {
        self.alias
            .map(|a| (a + (i - self.first) * self.page_size as usize) as *mut u8)
    }

    /// The part of the span in `[from, to)` (clipped to whole pages).
    fn slice(&self, from: u64, to: u64) -> Option<Span> {
        let from = from.max(self.start);
        let to = to.min(self.end());
        if from >= to {
            return None;
        }
        let skip = from - self.start;
        Some(Span {
            start: from,
            len: to - from,
            offset: self.offset + skip,
            page_size: self.page_size,
            alias: self.alias.map(|a| a + skip as usize),
            states: Arc::clone(&self.states),
            first: self.first + (skip / self.page_size) as usize,
        })
    }
}

/// The target's regions as they are mapped now, sorted by address. The
/// generation changes whenever UNMAP or REMAP reshape the table.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub spans: Vec<Span>,
    pub generation: u64,
}

impl Table {
    pub(crate) fn new(regions: &[Region], track_dirty: bool) -> Table {
        let mut spans: Vec<Span> = regions
            .iter()
            .map(|r| Span {
                start: r.start,
                len: r.len,
                offset: r.offset,
                page_size: r.page_size,
                alias: r.alias,
                states: Arc::new(PageStates::new((r.len / r.page_size) as usize, track_dirty)),
                first: 0,
            })
            .collect();
        spans.sort_by_key(|s| s.start);
        Table {
            spans,
            generation: 0,
        }
    }

    pub(crate) fn lookup(&self, addr: u64) -> Option<&Span> {
        let i = self.spans.partition_point(|s| s.end() <= addr);
        self.spans.get(i).filter(|s| s.contains(addr))
    }

    /// Drops `[start, end)` from the table; returns the pieces removed.
    pub(crate) fn cut(&mut self, start: u64, end: u64) -> Vec<Span> {
        let mut kept = Vec::with_capacity(self.spans.len() + 1);
        let mut removed = Vec::new();
        for span in self.spans.drain(..) {
            if span.end() <= start || span.start >= end {
                kept.push(span);
                continue;
            }
            kept.extend(span.slice(span.start, start));
            removed.extend(span.slice(start, end));
            kept.extend(span.slice(end, span.end()));
        }
        self.spans = kept;
        self.generation += 1;
        removed
    }

    /// `mremap` moved `[from, from + len)` to `to`.
    pub(crate) fn remap(&mut self, from: u64, to: u64, len: u64) {
        // The destination's old mappings (if any) are gone.
        let _ = self.cut(to, to + len);
        for mut piece in self.cut(from, from + len) {
            piece.start = piece.start - from + to;
            self.spans.push(piece);
        }
        self.spans.sort_by_key(|s| s.start);
    }

    /// Sets every page in `[start, end)` to `s`.
    pub(crate) fn set_range(&self, start: u64, end: u64, s: u8) {
        for span in &self.spans {
            if let Some(part) = span.slice(start, end) {
                for i in part.first..part.index_end() {
                    part.states.set(i, s);
                }
            }
        }
    }

    /// Where state `i` of `states` is mapped now.
    pub(crate) fn address_of(&self, states: &Arc<PageStates>, i: usize) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| Arc::ptr_eq(&s.states, states) && i >= s.first && i < s.index_end())
            .map(|s| s.addr_of(i))
    }

    /// The span and state index serving source offset `offset`.
    pub(crate) fn by_source(&self, offset: u64) -> Option<(&Span, usize)> {
        self.spans
            .iter()
            .find(|s| offset >= s.offset && offset < s.offset + s.len)
            .map(|s| (s, s.first + ((offset - s.offset) / s.page_size) as usize))
    }

    /// A copy for a forked child: same layout, fresh states in which only
    /// removed pages stay removed (what the child lacks, it faults for).
    pub(crate) fn for_child(&self) -> Table {
        let mut spans = Vec::with_capacity(self.spans.len());
        let mut copies: Vec<(Arc<PageStates>, Arc<PageStates>)> = Vec::new();
        for span in &self.spans {
            let fresh = match copies
                .iter()
                .find(|(old, _)| Arc::ptr_eq(old, &span.states))
            {
                Some((_, fresh)) => Arc::clone(fresh),
                None => {
                    let old = &span.states;
                    let fresh = Arc::new(PageStates::new(old.len(), !old.dirty.is_empty()));
                    for i in 0..old.len() {
                        if old.get(i) == state::REMOVED {
                            fresh.set(i, state::REMOVED);
                        }
                    }
                    copies.push((Arc::clone(old), Arc::clone(&fresh)));
                    fresh
                }
            };
            spans.push(Span {
                states: fresh,
                ..span.clone()
            });
        }
        Table {
            spans,
            generation: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::new(&[Region::new(0x10000, 0x8000, 0x100000, 4096)], false)
    }

    #[test]
    fn unmap_splits() {
        let mut t = table();
        let removed = t.cut(0x12000, 0x13000);
        assert_eq!(removed.len(), 1);
        assert_eq!(t.spans.len(), 2);
        assert!(t.lookup(0x12000).is_none());
        let right = t.lookup(0x13000).unwrap();
        assert_eq!(right.source_of(right.index(0x13000)), 0x103000);
        assert_eq!(right.index(0x13000), 3);
    }

    #[test]
    fn remap_translates() {
        let mut t = table();
        t.remap(0x10000, 0x40000, 0x8000);
        assert!(t.lookup(0x10000).is_none());
        let s = t.lookup(0x41000).unwrap();
        assert_eq!(s.source_of(s.index(0x41000)), 0x101000);
        let (s, i) = t.by_source(0x105000).unwrap();
        assert_eq!(s.addr_of(i), 0x45000);
        assert_eq!(t.address_of(&s.states.clone(), 5), Some(0x45000));
    }

    #[test]
    fn claims() {
        let s = PageStates::new(2, false);
        assert_eq!(s.claim(0), Some(state::CLAIMED));
        assert_eq!(s.claim(0), None);
        s.release(0, state::CLAIMED);
        assert_eq!(s.get(0), state::MISSING);
        s.set(1, state::REMOVED);
        assert_eq!(s.claim(1), Some(state::CLAIMED_ZERO));
        s.release(1, state::CLAIMED_ZERO);
        assert_eq!(s.get(1), state::REMOVED);
        // Background claims: not for removed pages; stolen by a fault.
        assert_eq!(s.claim_background(1), None);
        assert_eq!(s.claim_background(0), Some(state::CLAIMED_BG));
        assert_eq!(s.claim(0), None);
        assert!(s.steal(0));
        assert_eq!(s.get(0), state::CLAIMED);
        assert!(!s.steal(0));
        // The background batch gives its claim back: the thief keeps it.
        s.release(0, state::CLAIMED_BG);
        assert_eq!(s.get(0), state::CLAIMED);
        s.release(0, state::CLAIMED);
        assert_eq!(s.claim_background(0), Some(state::CLAIMED_BG));
        s.release(0, state::CLAIMED_BG);
        assert_eq!(s.get(0), state::MISSING);
    }
}
