//! The demo heap: a graph of 64-byte nodes linked by address, with garbage,
//! its marking, its sliding-compaction forwarding, and its checksum.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use uffd_compact::{Compactor, FromPages, Heap, PAGE};

/// Bytes per node: id, value, touches, four edges, a constant tag.
pub const NODE: usize = 64;
/// Nodes per page (no node straddles a page).
pub const PER_PAGE: usize = PAGE / NODE;
/// Word offsets inside a node.
pub const ID: usize = 0;
/// The value mutators move between nodes (the sum is invariant).
pub const VALUE: usize = 8;
/// How often mutators touched the node.
pub const TOUCHES: usize = 16;
/// The first of four edges (absolute addresses, 0 = none).
pub const EDGES: usize = 24;
/// Edges per node.
pub const EDGE_COUNT: usize = 4;
const TAG: usize = 56;

/// splitmix64: small, fast, good enough to shape a graph.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n as u64) as usize
    }
}

/// A graph built in a heap, with the roots mutators start from.
#[derive(Debug)]
pub struct Graph {
    /// Root references (absolute addresses), updated at the flip.
    pub roots: Vec<AtomicU64>,
    /// Nodes allocated (live and garbage).
    pub nodes: usize,
    /// Live nodes, as built (marking must find exactly these).
    pub live: usize,
}

/// Fills every slot of `heap` with a node; in each page 30-70% of them are
/// garbage (unreachable). Live nodes form one chain through all of them in
/// random order (so every one is reachable from root 0) plus three random
/// edges each; garbage points anywhere.
pub fn build(heap: &Heap, seed: u64, roots: usize) -> Graph {
    let base = heap.addr();
    let slots = heap.pages() * PER_PAGE;
    let mut rng = Rng::new(seed);
    let mut live_slots = Vec::with_capacity(slots / 2);
    for page in 0..heap.pages() {
        let garbage_pct = 30 + rng.below(41);
        for i in 0..PER_PAGE {
            if rng.below(100) >= garbage_pct {
                live_slots.push((page * PER_PAGE + i) as u32);
            }
        }
    }
    if live_slots.is_empty() {
        live_slots.push(0);
    }
    let mut order = live_slots.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let addr = |slot: u32| base + slot as u64 * NODE as u64;
    let mut next_in_chain = vec![0u64; slots];
    for w in order.windows(2) {
        next_in_chain[w[0] as usize] = addr(w[1]);
    }
    let mut is_live = vec![false; slots];
    for &s in &live_slots {
        is_live[s as usize] = true;
    }
    let mut node = [0u64; NODE / 8];
    let mut bytes = vec![0u8; PAGE];
    for page in 0..heap.pages() {
        for i in 0..PER_PAGE {
            let slot = page * PER_PAGE + i;
            node[ID / 8] = slot as u64 + 1;
            node[VALUE / 8] = rng.next_u64() >> 8;
            node[TOUCHES / 8] = 0;
            for e in 0..EDGE_COUNT {
                node[EDGES / 8 + e] = if is_live[slot] {
                    if e == 0 {
                        next_in_chain[slot]
                    } else if rng.below(8) == 0 {
                        0
                    } else {
                        addr(live_slots[rng.below(live_slots.len())])
                    }
                } else {
                    addr(rng.below(slots) as u32)
                };
            }
            node[TAG / 8] = 0x6e6f_6465 ^ slot as u64;
            for (w, v) in node.iter().enumerate() {
                let o = i * NODE + w * 8;
                bytes[o..o + 8].copy_from_slice(&v.to_ne_bytes());
            }
        }
        heap.write(page * PAGE, &bytes);
    }
    let mut root_refs = vec![AtomicU64::new(addr(order[0]))];
    for _ in 1..roots.max(1) {
        root_refs.push(AtomicU64::new(addr(
            live_slots[rng.below(live_slots.len())],
        )));
    }
    Graph {
        roots: root_refs,
        nodes: slots,
        live: live_slots.len(),
    }
}

/// The mark bits of one page beside the live count before it, so that
/// forwarding a reference reads one cache line, not one in each of two
/// tables: forwarding is most of a page's fill, and a fill on demand is
/// most of a mutator's stall.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(16))]
pub struct MarkWord {
    /// Bit i: slot i of the page is live.
    pub bits: u64,
    /// Live nodes in the pages before this one.
    pub prefix: u64,
}

/// The mark bits, one word per heap page.
#[derive(Debug)]
pub struct Marks {
    /// One per heap page.
    pub words: Vec<MarkWord>,
    live: usize,
}

impl Marks {
    /// Live nodes.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The new slot of live old slot `slot` (sliding: live nodes keep their
    /// order and are packed from the start of the heap).
    pub fn forward(&self, slot: usize) -> usize {
        let (page, bit) = (slot / PER_PAGE, slot % PER_PAGE);
        let w = self.words[page];
        w.prefix as usize + (w.bits & ((1u64 << bit) - 1)).count_ones() as usize
    }

    /// The from-space page holding live node number `k` (in address order).
    pub fn page_of_live(&self, k: usize) -> usize {
        // The last page whose prefix is <= k.
        self.words.partition_point(|w| w.prefix as usize <= k) - 1
    }
}

/// Marks everything reachable from the roots (edges never change, so this
/// may run while mutators update values).
pub fn mark(heap: &Heap, roots: &[AtomicU64]) -> Marks {
    let base = heap.addr();
    let mut bits = vec![0u64; heap.pages()];
    let mut stack: Vec<u64> = roots.iter().map(|r| r.load(Ordering::Acquire)).collect();
    while let Some(a) = stack.pop() {
        if a == 0 {
            continue;
        }
        let slot = ((a - base) / NODE as u64) as usize;
        let (page, bit) = (slot / PER_PAGE, slot % PER_PAGE);
        if bits[page] & (1 << bit) != 0 {
            continue;
        }
        bits[page] |= 1 << bit;
        let off = slot * NODE;
        for e in 0..EDGE_COUNT {
            stack.push(heap.load(off + EDGES + e * 8));
        }
    }
    let mut sum = 0u64;
    let words = bits
        .into_iter()
        .map(|bits| {
            let w = MarkWord { bits, prefix: sum };
            sum += u64::from(bits.count_ones());
            w
        })
        .collect();
    Marks {
        words,
        live: sum as usize,
    }
}

/// The demo's [`Compactor`]: sliding compaction of marked nodes.
#[derive(Debug)]
pub struct GraphCompactor {
    /// The marks and forwarding.
    pub marks: Marks,
    /// The heap's address (node references are absolute).
    pub base: u64,
}

impl GraphCompactor {
    /// A reference's new value.
    pub fn forward_ref(&self, r: u64) -> u64 {
        if r == 0 {
            return 0;
        }
        let slot = ((r - self.base) / NODE as u64) as usize;
        self.base + (self.marks.forward(slot) * NODE) as u64
    }
}

impl Compactor for GraphCompactor {
    type Error = std::convert::Infallible;

    fn live_pages(&self) -> usize {
        self.marks.live().div_ceil(PER_PAGE)
    }

    fn sources(&self, page: usize) -> Range<usize> {
        let first = page * PER_PAGE;
        let last = (first + PER_PAGE).min(self.marks.live()) - 1;
        self.marks.page_of_live(first)..self.marks.page_of_live(last) + 1
    }

    fn fill(&self, page: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), Self::Error> {
        let first = page * PER_PAGE;
        let end = (first + PER_PAGE).min(self.marks.live());
        // The first page `sources` named: its binary search done once,
        // not again on every fill (a mutator's stall among them).
        let mut q = from.pages().start;
        let mut k = self.marks.words[q].prefix as usize;
        let mut out = 0;
        while k < end {
            let mut bits = self.marks.words[q].bits;
            while bits != 0 {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if k >= first && k < end {
                    let src = from.bytes(q * PAGE + i * NODE, NODE);
                    dst[out..out + NODE].copy_from_slice(src);
                    out += NODE;
                }
                k += 1;
            }
            q += 1;
        }
        // References are fixed in a second pass, over the page just
        // written: the copies above are independent of each other, so the
        // CPU overlaps their cache misses instead of waiting for each
        // node's forwarding lookups before it loads the next node.
        for d in dst[..out].chunks_exact_mut(NODE) {
            for e in 0..EDGE_COUNT {
                let o = EDGES + e * 8;
                let r = u64::from_ne_bytes(d[o..o + 8].try_into().expect("8 bytes"));
                d[o..o + 8].copy_from_slice(&self.forward_ref(r).to_ne_bytes());
            }
        }
        dst[out..].fill(0);
        Ok(())
    }
}

/// What the checksum covers: the live graph's shape (every live node's id
/// and the ids its edges lead to, in address order, and the roots' ids),
/// the sum of values (mutators move value between nodes, never create it)
/// and the sum of touches (mutators add exactly two per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    /// Hash of the shape.
    pub shape: u64,
    /// Wrapping sum of values.
    pub values: u64,
    /// Sum of touch counters.
    pub touches: u64,
}

impl Checksum {
    /// Shape and value sum in one word, for printing.
    pub fn digest(&self) -> u64 {
        self.shape ^ self.values.rotate_left(29)
    }
}

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(23)
}

/// Checksums the live nodes, visited in address order: `live_slots` are
/// their slots (before compaction the marked ones, after it `0..live`).
pub fn checksum(
    heap: &Heap,
    roots: &[AtomicU64],
    live_slots: impl Iterator<Item = usize>,
) -> Checksum {
    let base = heap.addr();
    let id_at = |r: u64| {
        if r == 0 {
            0
        } else {
            heap.load((r - base) as usize + ID)
        }
    };
    let mut c = Checksum {
        shape: 0xcbf2_9ce4_8422_2325,
        values: 0,
        touches: 0,
    };
    for r in roots {
        c.shape = mix(c.shape, id_at(r.load(Ordering::Acquire)));
    }
    for slot in live_slots {
        let off = slot * NODE;
        c.shape = mix(c.shape, heap.load(off + ID));
        for e in 0..EDGE_COUNT {
            c.shape = mix(c.shape, id_at(heap.load(off + EDGES + e * 8)));
        }
        c.shape = mix(c.shape, heap.load(off + TAG));
        c.values = c.values.wrapping_add(heap.load(off + VALUE));
        c.touches += heap.load(off + TOUCHES);
    }
    c
}

/// The slots of marked nodes, in address order.
pub fn marked_slots(marks: &Marks) -> impl Iterator<Item = usize> + '_ {
    marks.words.iter().enumerate().flat_map(|(page, w)| {
        let mut bits = w.bits;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(page * PER_PAGE + i)
        })
    })
}
