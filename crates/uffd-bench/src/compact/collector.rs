//! One collection of the demo heap with mutators running: build, mark,
//! pause and flip, concurrent compaction, verify.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd_compact::{CompactError, Compaction, Heap, Mode, Options, Progress, Report};

use super::graph::{self, GraphCompactor, Rng, EDGES, EDGE_COUNT, TOUCHES, VALUE};

/// What to collect.
#[derive(Debug, Clone)]
pub struct CycleConfig {
    /// Heap size in MiB (64-byte nodes: 16384 per MiB).
    pub mib: usize,
    /// How pages are installed.
    pub mode: Mode,
    /// Mutator threads.
    pub mutators: usize,
    /// Background compacting threads.
    pub gc_threads: usize,
    /// How long mutators run before the collection, to measure their
    /// undisturbed throughput.
    pub warmup: Duration,
    /// Graph seed.
    pub seed: u64,
    /// Fault handler spin before sleeping.
    pub spin: Duration,
    /// Nice value of the background compacting threads.
    pub background_nice: i32,
    /// Ask for a SCHED_FIFO fault handler.
    pub realtime_handler: bool,
    /// The SIGBUS path: faulting mutators compact their page themselves.
    pub sigbus: bool,
}

impl CycleConfig {
    /// Defaults for `mode` on a heap of `mib` MiB.
    pub fn new(mode: Mode, mib: usize) -> CycleConfig {
        CycleConfig {
            mib,
            mode,
            mutators: 2,
            gc_threads: 1,
            warmup: Duration::from_millis(200),
            seed: 0x5eed,
            spin: Duration::ZERO,
            background_nice: 0,
            realtime_handler: false,
            sigbus: false,
        }
    }
}

/// What one collection measured.
#[derive(Debug, Clone, Serialize)]
pub struct Cycle {
    /// `copy`, `move`, `minor`, `stw`.
    pub mode: String,
    /// Heap size.
    pub mib: usize,
    /// Nodes allocated.
    pub nodes: usize,
    /// Nodes reachable (marking found exactly the live nodes built).
    pub live: usize,
    /// Mutator threads.
    pub mutators: usize,
    /// Background compacting threads.
    pub gc_threads: usize,
    /// Shape and value checksum of the live graph before the collection.
    pub checksum_before: String,
    /// The same after it.
    pub checksum_after: String,
    /// Shape and values identical, and the touch counters grew by exactly
    /// two per mutator operation (no write lost, none applied twice).
    pub checksum_ok: bool,
    /// Marking, before the mutators start (not part of compaction).
    pub mark_ms: f64,
    /// From the pause's start until every page is installed.
    pub compaction_ms: f64,
    /// The flip's pause (stop-the-world: the whole compaction).
    pub pause_us: f64,
    /// The part of the pause inside the library (mremap, register).
    pub flip_us: f64,
    /// The longest a mutator waited for compaction: the pause or one access.
    pub max_stall_us: f64,
    /// Median access stall (accesses to pages not installed yet; for
    /// stop-the-world, each mutator's wait at the pause).
    pub p50_stall_us: f64,
    /// 99th percentile of the same.
    pub p99_stall_us: f64,
    /// Stalls counted.
    pub stalls: usize,
    /// The longest single access that waited for a page, µs.
    pub max_access_stall_us: f64,
    /// The longest wait at the pause, µs.
    pub max_pause_wait_us: f64,
    /// Mutator operations per second from the pause's start to the end of
    /// compaction (all mutators together).
    pub mutator_ops_per_s: f64,
    /// The same before the collection, undisturbed.
    pub idle_ops_per_s: f64,
    /// Pages compacted because a mutator touched them.
    pub on_demand_pages: usize,
    /// Handler-side median of those (fault read to install).
    pub on_demand_p50_us: f64,
    /// Handler-side 99th percentile.
    pub on_demand_p99_us: f64,
    /// Compacting-thread CPU time.
    pub compactor_cpu_ms: f64,
    /// Live pages per second of compacting-thread CPU.
    pub compactor_pages_per_cpu_s: f64,
    /// Pages installed by COPY.
    pub copied: usize,
    /// Pages installed by MOVE of a recycled from-space page.
    pub moved: usize,
    /// MOVE mode: pages a mutator took, filled, from a window waiting for
    /// its MOVE (copied; counted in `copied`).
    pub staged_taken: usize,
    /// Pages mapped by CONTINUE.
    pub continued: usize,
    /// Pages written directly (stop-the-world).
    pub written: usize,
    /// Zero pages past the live end.
    pub zeroed: usize,
    /// Mean time in the installing ioctl per page, ns.
    pub install_ns_per_page: f64,
    /// The fault handler ran SCHED_FIFO.
    pub realtime_handler: bool,
    /// Faulting mutators compacted their pages themselves (SIGBUS path).
    pub sigbus: bool,
    /// /proc/loadavg at the end (the machine may be shared).
    pub loadavg: String,
}

/// Runs one collection; `Err` only when the heap or the compaction could
/// not be set up (userfaultfd denied: see [`CompactError::is_denied`]).
pub fn run_cycle(cfg: &CycleConfig) -> Result<Cycle, CompactError> {
    let heap = Arc::new(Heap::new(cfg.mode.heap_kind(), cfg.mib << 20)?);
    let g = graph::build(&heap, cfg.seed, 1024);
    let t = Instant::now();
    let marks = graph::mark(&heap, &g.roots);
    let mark_ms = ms(t.elapsed());
    assert_eq!(
        marks.live(),
        g.live,
        "marking found a different live set than was built"
    );
    let before = graph::checksum(&heap, &g.roots, graph::marked_slots(&marks));
    let live = marks.live();
    let compactor = Arc::new(GraphCompactor {
        marks,
        base: heap.addr(),
    });

    let world = World {
        heap: Arc::clone(&heap),
        roots: g.roots,
        lock: RwLock::new(()),
        epoch: AtomicU64::new(0),
        armed: AtomicBool::new(false),
        compacting: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        progress: OnceLock::new(),
        ops: (0..cfg.mutators)
            .map(|_| Padded(AtomicU64::new(0)))
            .collect(),
    };
    let world = &world;
    let outcome = std::thread::scope(|s| -> Result<_, CompactError> {
        let mutators: Vec<_> = (0..cfg.mutators)
            .map(|i| s.spawn(move || world.mutate(i, cfg.seed ^ ((i as u64 + 1) * 0x1234_5678))))
            .collect();
        let stop_all = || {
            world.stop.store(true, Ordering::Release);
        };
        std::thread::sleep(cfg.warmup);
        let idle_ops = world.total_ops();
        let idle_t = Instant::now();
        std::thread::sleep(cfg.warmup);
        let idle_ops_per_s = (world.total_ops() - idle_ops) as f64 / idle_t.elapsed().as_secs_f64();

        let options = Options::new(cfg.mode)
            .threads(cfg.gc_threads)
            .spin(cfg.spin)
            .background_nice(cfg.background_nice)
            .realtime_handler(cfg.realtime_handler)
            .sigbus(cfg.sigbus && cfg.mode.is_concurrent());
        let prepared = match Compaction::prepare(&heap, options, Arc::clone(&compactor)) {
            Ok(p) => p,
            Err(e) => {
                stop_all();
                return Err(e);
            }
        };
        let _ = world.progress.set(prepared.progress());

        // The pause: mutators finish their operation and wait at the lock.
        world.armed.store(true, Ordering::Release);
        let t0 = Instant::now();
        let guard = world.lock.write().unwrap_or_else(|e| e.into_inner());
        // Odd only while the lock is held: a mutator that sees it odd, or
        // sees it change while it waited, waited for this pause.
        world.epoch.fetch_add(1, Ordering::AcqRel);
        let ops0 = world.total_ops();
        for r in &world.roots {
            r.store(
                compactor.forward_ref(r.load(Ordering::Acquire)),
                Ordering::Release,
            );
        }
        let running = match prepared.start() {
            Ok(r) => r,
            Err(e) => {
                world.epoch.fetch_add(1, Ordering::AcqRel);
                drop(guard);
                stop_all();
                return Err(e);
            }
        };
        world.compacting.store(true, Ordering::Release);
        let (report, pause) = if cfg.mode.is_concurrent() {
            world.epoch.fetch_add(1, Ordering::AcqRel);
            let pause = t0.elapsed();
            drop(guard);
            (running.finish(), pause)
        } else {
            let r = running.finish();
            world.epoch.fetch_add(1, Ordering::AcqRel);
            let pause = t0.elapsed();
            drop(guard);
            (r, pause)
        };
        let elapsed = t0.elapsed();
        world.compacting.store(false, Ordering::Release);
        world.armed.store(false, Ordering::Release);
        let ops1 = world.total_ops();
        stop_all();
        let mut access = Vec::new();
        let mut pauses = Vec::new();
        for m in mutators {
            let out = m.join().expect("mutator panicked");
            access.extend(out.access_ns);
            pauses.extend(out.pause_ns);
        }
        Ok((
            report,
            pause,
            elapsed,
            ops1 - ops0,
            idle_ops_per_s,
            access,
            pauses,
        ))
    })?;
    let (report, pause, elapsed, ops, idle_ops_per_s, mut access, mut pauses) = outcome;
    let report = report?;
    let after = graph::checksum(&heap, &world.roots, 0..live);
    let total_ops = world.total_ops();
    let checksum_ok = after.shape == before.shape
        && after.values == before.values
        && after.touches == before.touches + 2 * total_ops;

    access.sort_unstable();
    pauses.sort_unstable();
    let max_stall = access
        .iter()
        .chain(pauses.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let stalls = if cfg.mode.is_concurrent() {
        &access
    } else {
        &pauses
    };
    let mut service = report.on_demand_ns.clone();
    service.sort_unstable();
    Ok(Cycle {
        mode: cfg.mode.name().to_string(),
        mib: cfg.mib,
        nodes: g.nodes,
        live,
        mutators: cfg.mutators,
        gc_threads: cfg.gc_threads,
        checksum_before: format!("{:016x}", before.digest()),
        checksum_after: format!("{:016x}", after.digest()),
        checksum_ok,
        mark_ms,
        compaction_ms: ms(elapsed),
        pause_us: us(pause),
        flip_us: us(report.flip),
        max_stall_us: max_stall as f64 / 1e3,
        p50_stall_us: percentile(stalls, 50.0) / 1e3,
        p99_stall_us: percentile(stalls, 99.0) / 1e3,
        stalls: stalls.len(),
        max_access_stall_us: access.last().copied().unwrap_or(0) as f64 / 1e3,
        max_pause_wait_us: pauses.last().copied().unwrap_or(0) as f64 / 1e3,
        mutator_ops_per_s: ops as f64 / elapsed.as_secs_f64(),
        idle_ops_per_s,
        on_demand_pages: report.on_demand,
        on_demand_p50_us: percentile(&service, 50.0) / 1e3,
        on_demand_p99_us: percentile(&service, 99.0) / 1e3,
        compactor_cpu_ms: ms(report.compactor_cpu),
        compactor_pages_per_cpu_s: report.compactor_pages_per_cpu_s(),
        copied: report.copied,
        moved: report.moved,
        staged_taken: report.staged_taken,
        continued: report.continued,
        written: report.written,
        zeroed: report.zeroed,
        install_ns_per_page: install_ns_per_page(&report),
        realtime_handler: report.realtime_handler,
        sigbus: cfg.sigbus && cfg.mode.is_concurrent(),
        loadavg: loadavg(),
    })
}

fn install_ns_per_page(r: &Report) -> f64 {
    let pages = r.copied + r.moved + r.continued;
    let total = r.install_copy + r.install_move + r.install_continue;
    if pages == 0 {
        0.0
    } else {
        total.as_nanos() as f64 / pages as f64
    }
}

/// The `p`th percentile of sorted samples (nearest rank), 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The first three fields of /proc/loadavg, or "unknown".
pub fn loadavg() -> String {
    crate::report::LoadAverage::now().map_or_else(|_| "unknown".to_string(), |l| l.to_string())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[repr(align(64))]
struct Padded(AtomicU64);

/// What mutators share.
struct World {
    heap: Arc<Heap>,
    roots: Vec<AtomicU64>,
    /// Mutators hold it for reading during each operation; the pause takes
    /// it for writing.
    lock: RwLock<()>,
    /// Odd while a pause is on.
    epoch: AtomicU64,
    /// Set from just before the pause until compaction ends.
    armed: AtomicBool,
    compacting: AtomicBool,
    stop: AtomicBool,
    progress: OnceLock<Progress>,
    ops: Vec<Padded>,
}

struct MutatorOut {
    access_ns: Vec<u64>,
    pause_ns: Vec<u64>,
}

impl World {
    fn total_ops(&self) -> u64 {
        self.ops.iter().map(|o| o.0.load(Ordering::Acquire)).sum()
    }

    /// Loads a node word, timing the access when its page is not compacted
    /// yet (the access waits for, or triggers, compaction work).
    fn load(&self, node: u64, word: usize, stalls: &mut Vec<u64>) -> u64 {
        let off = (node - self.heap.addr()) as usize + word;
        if self.compacting.load(Ordering::Relaxed) {
            if let Some(p) = self.progress.get() {
                if !p.is_installed(node) {
                    let t = Instant::now();
                    let v = self.heap.load(off);
                    stalls.push(t.elapsed().as_nanos() as u64);
                    return v;
                }
            }
        }
        self.heap.load(off)
    }

    /// Walks from a random root along random edges, then moves one unit of
    /// value from a node it met halfway to the last one, touching both.
    fn mutate(&self, me: usize, seed: u64) -> MutatorOut {
        let mut rng = Rng::new(seed);
        let mut out = MutatorOut {
            access_ns: Vec::new(),
            pause_ns: Vec::new(),
        };
        while !self.stop.load(Ordering::Acquire) {
            // Around a collection, time the wait at the lock: it is the
            // pause if a pause was on when we asked, or ended meanwhile.
            let armed = self.armed.load(Ordering::Acquire);
            let e0 = self.epoch.load(Ordering::Acquire);
            let t0 = armed.then(Instant::now);
            let _guard = self.lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t0) = t0 {
                let e1 = self.epoch.load(Ordering::Acquire);
                if e0 % 2 == 1 || (e1 != e0 && e1.is_multiple_of(2)) {
                    out.pause_ns.push(t0.elapsed().as_nanos() as u64);
                }
            }
            let mut node = self.roots[rng.below(self.roots.len())].load(Ordering::Acquire);
            let steps = 2 + rng.below(6);
            let mut from = node;
            for step in 0..steps {
                if step == steps / 2 {
                    from = node;
                }
                let next = self.load(node, EDGES + rng.below(EDGE_COUNT) * 8, &mut out.access_ns);
                if next != 0 {
                    node = next;
                }
            }
            // Read the last node too, so both nodes written below are
            // installed and any wait for them is counted.
            self.load(node, VALUE, &mut out.access_ns);
            let off = |n: u64, w: usize| (n - self.heap.addr()) as usize + w;
            self.heap.fetch_add(off(from, VALUE), 1u64.wrapping_neg());
            self.heap.fetch_add(off(node, VALUE), 1);
            self.heap.fetch_add(off(from, TOUCHES), 1);
            self.heap.fetch_add(off(node, TOUCHES), 1);
            self.ops[me].0.fetch_add(1, Ordering::Release);
        }
        out
    }
}
