//! How a runtime uses uffd-compact: a heap of 16-byte cells (`next`,
//! `value`), every other one garbage, compacted while a mutator thread
//! keeps walking the list.
//!
//! `cargo run --release -p uffd-compact --example runtime [copy|move|minor|stw]`

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use uffd_compact::{Compaction, Compactor, FromPages, Heap, Mode, Options, PAGE};

const CELL: usize = 16;
const PER_PAGE: usize = PAGE / CELL;

/// The runtime's knowledge after marking: live cells are the even ones,
/// so cell `i` moves to `i / 2` (a real runtime computes this from its
/// mark bitmap).
struct EvenCells {
    base: u64,
    cells: usize,
}

impl EvenCells {
    fn forward(&self, r: u64) -> u64 {
        if r == 0 {
            return 0;
        }
        let old = (r - self.base) as usize / CELL;
        self.base + (old / 2 * CELL) as u64
    }
}

impl Compactor for EvenCells {
    type Error = std::convert::Infallible;

    fn live_pages(&self) -> usize {
        (self.cells / 2).div_ceil(PER_PAGE)
    }

    // New cells 256p..256p+256 were old cells 512p..512p+512: pages 2p, 2p+1.
    fn sources(&self, page: usize) -> Range<usize> {
        2 * page..2 * page + 2
    }

    // Copy each object and fix its reference: the runtime's own work.
    fn fill(&self, page: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), Self::Error> {
        for (k, out) in dst.chunks_exact_mut(CELL).enumerate() {
            let old = 2 * (page * PER_PAGE + k) * CELL;
            let next = self.forward(from.load(old));
            out[..8].copy_from_slice(&next.to_ne_bytes());
            out[8..].copy_from_slice(&from.load(old + 8).to_ne_bytes());
        }
        Ok(())
    }
}

/// Sums the list from `root` (each load may wait for its page).
fn walk(heap: &Heap, root: u64) -> u64 {
    let (mut cell, mut sum) = (root, 0u64);
    while cell != 0 {
        let off = (cell - heap.addr()) as usize;
        sum = sum.wrapping_add(heap.load(off + 8));
        cell = heap.load(off);
    }
    sum
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode: Mode = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("move")
        .parse()?;
    let heap = Arc::new(Heap::new(mode.heap_kind(), 32 << 20)?);
    let cells = heap.len() / CELL;
    // The live list links the even cells in address order.
    for i in 0..cells {
        let next = if i % 2 == 0 && i + 2 < cells {
            heap.addr() + ((i + 2) * CELL) as u64
        } else {
            0
        };
        heap.store(i * CELL, next);
        heap.store(i * CELL + 8, i as u64);
    }
    let root = AtomicU64::new(heap.addr());
    let expected = walk(&heap, root.load(Ordering::Acquire));

    let compactor = Arc::new(EvenCells {
        base: heap.addr(),
        cells,
    });
    // Outside the pause: userfaultfd, sources, threads.
    let prepared = match Compaction::prepare(&heap, Options::new(mode), Arc::clone(&compactor)) {
        Err(e) if e.is_denied() => {
            eprintln!("userfaultfd is denied here ({e}); run with `stw`");
            return Ok(());
        }
        other => other?,
    };
    // The pause (here the mutator has not started yet): roots to their new
    // addresses, then the flip.
    root.store(
        compactor.forward(root.load(Ordering::Acquire)),
        Ordering::Release,
    );
    let running = prepared.start()?;

    // Mutators resume during compaction (not in stop-the-world mode): the
    // pages they touch first are compacted for them.
    let stop = AtomicBool::new(false);
    let (walks, report) = if mode.is_concurrent() {
        std::thread::scope(|s| {
            let mutator = s.spawn(|| {
                let mut walks = 0;
                while !stop.load(Ordering::Acquire) || walks == 0 {
                    assert_eq!(walk(&heap, root.load(Ordering::Acquire)), expected);
                    walks += 1;
                }
                walks
            });
            let report = running.finish();
            stop.store(true, Ordering::Release);
            (mutator.join().expect("mutator"), report)
        })
    } else {
        (0, running.finish())
    };
    let report = report?;
    assert_eq!(walk(&heap, root.load(Ordering::Acquire)), expected);
    println!(
        "{mode}: {} live pages in {:?} (pause {:?}); {} on demand; the mutator walked the list {walks} time(s), same sum each time",
        report.live_pages, report.wall, report.flip, report.on_demand
    );
    Ok(())
}
