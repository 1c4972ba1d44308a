//! Every mode on the same heap, in interleaved rounds: compaction wall
//! time, mutator stalls, mutator throughput, compactor throughput.

use serde::Serialize;
use uffd_compact::{CompactError, Mode};

use super::collector::{loadavg, run_cycle, Cycle, CycleConfig};
use crate::machine::Hiccups;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Heap size in MiB.
    pub mib: usize,
    /// Rounds; each runs every mode once, in a rotated order.
    pub rounds: usize,
    /// The modes.
    pub modes: Vec<Mode>,
    /// Mutator threads.
    pub mutators: usize,
    /// Background compacting threads.
    pub gc_threads: usize,
    /// Mutators' undisturbed run before each collection, ms.
    pub warmup_ms: u64,
    /// Nice value of the background compacting threads.
    pub background_nice: i32,
    /// Ask for a SCHED_FIFO fault handler.
    pub realtime_handler: bool,
    /// The SIGBUS path for COPY, MOVE and MINOR.
    pub sigbus: bool,
    /// How long to watch the machine's own hiccups before the first round
    /// ([`Hiccups`]), ms; 0 skips it.
    pub hiccup_ms: u64,
}

impl BenchConfig {
    /// All four modes on a heap of `mib` MiB.
    pub fn new(mib: usize, rounds: usize) -> BenchConfig {
        BenchConfig {
            mib,
            rounds: rounds.max(1),
            modes: Mode::ALL.to_vec(),
            mutators: 2,
            gc_threads: 1,
            warmup_ms: 200,
            background_nice: 0,
            realtime_handler: false,
            sigbus: false,
            hiccup_ms: 2000,
        }
    }
}

/// Median, minimum and maximum over rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Median (the lower middle value for an even count).
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Stat {
    /// Over `values` (zeros when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Stat {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        v.sort_by(f64::total_cmp);
        Stat {
            median: v[(v.len() - 1) / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// One mode over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ModeSummary {
    /// The mode.
    pub mode: String,
    /// Every round's checksum matched.
    pub checksum_ok: bool,
    /// Pause start to every page installed, ms.
    pub compaction_ms: Stat,
    /// The flip (stop-the-world: whole compaction), µs.
    pub pause_us: Stat,
    /// Longest stall per round, µs.
    pub max_stall_us: Stat,
    /// Median access stall per round, µs.
    pub p50_stall_us: Stat,
    /// 99th percentile per round, µs.
    pub p99_stall_us: Stat,
    /// Mutator operations per second during compaction.
    pub mutator_ops_per_s: Stat,
    /// Mutator operations per second before the collection.
    pub idle_ops_per_s: Stat,
    /// Live pages per compacting-thread CPU second.
    pub compactor_pages_per_cpu_s: Stat,
    /// Mean installing ioctl time per page, ns.
    pub install_ns_per_page: Stat,
    /// Pages compacted on demand per round.
    pub on_demand_pages: Stat,
    /// Every round, in the order run.
    pub runs: Vec<Cycle>,
}

/// The whole bench.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Heap size.
    pub mib: usize,
    /// Rounds.
    pub rounds: usize,
    /// Mutator threads.
    pub mutators: usize,
    /// Background compacting threads.
    pub gc_threads: usize,
    /// Nice value of the background compacting threads.
    pub background_nice: i32,
    /// COPY, MOVE and MINOR ran the SIGBUS path.
    pub sigbus: bool,
    /// Whether every round's fault handler ran SCHED_FIFO.
    pub realtime_handler: bool,
    /// /proc/loadavg before the first round.
    pub loadavg_before: String,
    /// /proc/loadavg after the last.
    pub loadavg_after: String,
    /// What the machine took from spinning threads just before the first
    /// round: the floor under the longest stall (none when not watched, or
    /// when this process's CPUs could not be read).
    pub hiccups: Option<Hiccups>,
    /// Per mode.
    pub modes: Vec<ModeSummary>,
    /// MOVE's compactor throughput over COPY's, per round.
    pub move_over_copy: Option<Stat>,
}

impl BenchResult {
    /// The summary of `mode`, if it ran.
    pub fn mode(&self, mode: Mode) -> Option<&ModeSummary> {
        self.modes.iter().find(|m| m.mode == mode.name())
    }
}

/// Runs the bench, calling `each` after every collection.
pub fn run(cfg: &BenchConfig, mut each: impl FnMut(&Cycle)) -> Result<BenchResult, CompactError> {
    let loadavg_before = loadavg();
    let hiccups = match cfg.hiccup_ms {
        0 => None,
        ms => Hiccups::measure(std::time::Duration::from_millis(ms)).ok(),
    };
    let mut runs: Vec<Vec<Cycle>> = vec![Vec::new(); cfg.modes.len()];
    for round in 0..cfg.rounds {
        for k in 0..cfg.modes.len() {
            // Rotate the order so no mode always runs first (cold) or last.
            let i = (k + round) % cfg.modes.len();
            let mut c = CycleConfig::new(cfg.modes[i], cfg.mib);
            c.mutators = cfg.mutators;
            c.gc_threads = cfg.gc_threads;
            c.warmup = std::time::Duration::from_millis(cfg.warmup_ms);
            c.seed = 0x5eed + round as u64;
            c.background_nice = cfg.background_nice;
            c.realtime_handler = cfg.realtime_handler;
            c.sigbus = cfg.sigbus;
            let cycle = run_cycle(&c)?;
            each(&cycle);
            runs[i].push(cycle);
        }
    }
    let modes: Vec<ModeSummary> = cfg
        .modes
        .iter()
        .zip(runs)
        .map(|(mode, runs)| {
            let stat = |f: fn(&Cycle) -> f64| Stat::of(runs.iter().map(f));
            ModeSummary {
                mode: mode.name().to_string(),
                checksum_ok: runs.iter().all(|c| c.checksum_ok),
                compaction_ms: stat(|c| c.compaction_ms),
                pause_us: stat(|c| c.pause_us),
                max_stall_us: stat(|c| c.max_stall_us),
                p50_stall_us: stat(|c| c.p50_stall_us),
                p99_stall_us: stat(|c| c.p99_stall_us),
                mutator_ops_per_s: stat(|c| c.mutator_ops_per_s),
                idle_ops_per_s: stat(|c| c.idle_ops_per_s),
                compactor_pages_per_cpu_s: stat(|c| c.compactor_pages_per_cpu_s),
                install_ns_per_page: stat(|c| c.install_ns_per_page),
                on_demand_pages: stat(|c| c.on_demand_pages as f64),
                runs,
            }
        })
        .collect();
    let find = |m: Mode| modes.iter().find(|s| s.mode == m.name());
    let move_over_copy =
        match (find(Mode::Move), find(Mode::Copy)) {
            (Some(mv), Some(cp)) => Some(Stat::of(mv.runs.iter().zip(&cp.runs).map(|(m, c)| {
                m.compactor_pages_per_cpu_s / c.compactor_pages_per_cpu_s.max(1e-9)
            }))),
            _ => None,
        };
    Ok(BenchResult {
        mib: cfg.mib,
        rounds: cfg.rounds,
        mutators: cfg.mutators,
        gc_threads: cfg.gc_threads,
        background_nice: cfg.background_nice,
        sigbus: cfg.sigbus,
        realtime_handler: cfg.realtime_handler
            && modes
                .iter()
                .filter(|m| m.mode != Mode::StopTheWorld.name())
                .all(|m| m.runs.iter().all(|c| c.realtime_handler)),
        loadavg_before,
        loadavg_after: loadavg(),
        hiccups,
        modes,
        move_over_copy,
    })
}
