//! What touches memory in the in-process benchmarks, how it is timed and
//! how the result is verified; and the strategies (plans) they compare.

#![allow(unsafe_code)]

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{Features, RegisterMode};
use uffd_pager::{
    Content, FileSource, Histogram, PageSource, Pager, Prefetch, Region, Strategy, WaitMode,
};

use crate::fixtures::shuffled;

/// Options for a userfaultfd serving this process's own memory, which only
/// user-space code touches (`demo`, `bench`): user-mode-only is enough, and
/// it needs no privilege (vm.unprivileged_userfaultfd=0 still allows it).
pub fn in_process_uffd() -> uffd::OpenOptions {
    uffd::OpenOptions::new().user_mode_only(true)
}

/// One way of serving faults, as the demo and bench name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Its name on the command line.
    pub name: &'static str,
    /// How pages are installed.
    pub strategy: Strategy,
    /// Bytes installed per fault.
    pub granule: u64,
    /// What is installed ahead of faults.
    pub prefetch: Prefetch,
    /// A background thread fills every page.
    pub fill: bool,
    /// Served by the faulting thread itself in a SIGBUS handler
    /// ([`uffd_pager::SigbusPager`]) instead of handler threads; `strategy` and
    /// `prefetch` do not apply, `granule` does.
    pub sigbus: bool,
}

/// The strategies `uffd demo` and `uffd bench` know by name.
pub const PLANS: [Plan; 5] = [
    Plan {
        name: "copy-4k",
        strategy: Strategy::Copy,
        granule: 4096,
        prefetch: Prefetch::None,
        fill: false,
        sigbus: false,
    },
    Plan {
        name: "readahead",
        strategy: Strategy::Copy,
        granule: 64 << 10,
        prefetch: Prefetch::Readahead { max_bytes: 2 << 20 },
        fill: false,
        sigbus: false,
    },
    Plan {
        name: "move-2m",
        strategy: Strategy::Move,
        granule: 2 << 20,
        prefetch: Prefetch::None,
        fill: false,
        sigbus: false,
    },
    Plan {
        name: "fill",
        strategy: Strategy::Copy,
        granule: 64 << 10,
        prefetch: Prefetch::Readahead { max_bytes: 2 << 20 },
        fill: true,
        sigbus: false,
    },
    Plan {
        name: "sigbus",
        strategy: Strategy::Copy,
        granule: 4096,
        prefetch: Prefetch::None,
        fill: false,
        sigbus: true,
    },
];

/// How long a handler spins for the next message before sleeping.
pub const SPIN: Duration = Duration::from_micros(200);
/// Touches pages and times a sample of the touches.
#[derive(Debug, Serialize, Clone)]
pub struct PhaseResult {
    /// Pages touched.
    pub pages: u64,
    /// Wall time of all the touches.
    pub seconds: f64,
    /// Bytes of those pages per second, in MB.
    pub mb_per_s: f64,
    /// Median of the sampled touches, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest sampled touch, µs.
    pub max_us: f64,
    /// The sampled touches' whole distribution, for plots.
    #[serde(skip)]
    pub latency: Vec<uffd_pager::Bucket>,
}

/// The order pages are touched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Page 0, 1, 2, ...
    Sequential,
    /// A fixed permutation ([`shuffled`]).
    Random,
}

impl Order {
    /// `sequential` or `random`.
    pub fn name(self) -> &'static str {
        match self {
            Order::Sequential => "sequential",
            Order::Random => "random",
        }
    }
}

/// Reads one word of each page `first..first + count` of `base` in `order`,
/// timing one touch in eight (chosen by a hash, so readahead boundaries are
/// not over-sampled). `progress` is called every 4096 pages.
pub(crate) fn touch(
    base: *const u8,
    first: u64,
    count: u64,
    order: Order,
    mut progress: impl FnMut(u64),
) -> PhaseResult {
    let pages: Vec<u64> = match order {
        Order::Sequential => (first..first + count).collect(),
        Order::Random => shuffled(count, 0x5EED ^ count)
            .into_iter()
            .map(|p| p + first)
            .collect(),
    };
    let histogram = Histogram::default();
    let mut sink = 0u64;
    let start = Instant::now();
    for (n, &page) in pages.iter().enumerate() {
        // SAFETY: `page` lies inside the mapping at `base` (callers pass a
        // range of it); a volatile read so the access really happens.
        let ptr = unsafe { base.add((page * 4096) as usize).cast::<u64>() };
        let sampled = (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) == 0;
        if sampled {
            let t = Instant::now();
            // SAFETY: as above.
            sink ^= unsafe { ptr.read_volatile() };
            histogram.record(t.elapsed());
        } else {
            // SAFETY: as above.
            sink ^= unsafe { ptr.read_volatile() };
        }
        if n % 4096 == 4095 {
            progress(n as u64 + 1);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    let s = histogram.summary();
    PhaseResult {
        pages: count,
        seconds,
        mb_per_s: (count * 4096) as f64 / 1e6 / seconds.max(1e-9),
        p50_us: s.p50_us,
        p90_us: s.p90_us,
        p99_us: s.p99_us,
        max_us: s.max_us,
        latency: histogram.buckets(),
    }
}

/// A progress line on stderr, redrawn in place when stderr is a terminal.
#[derive(Debug)]
pub struct ProgressLine {
    tty: bool,
    quiet: bool,
}

impl ProgressLine {
    /// A progress line; `quiet` prints nothing.
    pub fn new(quiet: bool) -> ProgressLine {
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Redraws `what done/total` (terminal only).
    pub fn update(&self, what: &str, done: u64, total: u64) {
        if self.tty && !self.quiet {
            let pct = done * 100 / total.max(1);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!("\r{what:<32} [{bar:<25}] {pct:>3}%");
        }
    }

    /// Ends a step with a line of its own.
    pub fn done(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r{:<70}\r", "");
        }
        eprintln!("{line}");
    }
}

/// Opens a userfaultfd with what `strategy` needs.
pub fn open_uffd(strategy: Strategy) -> Result<uffd::Uffd, uffd::Error> {
    let mut features = Features::EVENT_REMOVE;
    if strategy == Strategy::Move {
        features |= Features::MOVE;
    }
    in_process_uffd()
        .non_blocking(true)
        .features(features)
        .open()
}

/// For MOVE, asks for transparent huge pages on the target: a fault then
/// reaches the handler before any page table is allocated, so a whole
/// 2 MiB huge page can move in with one PMD update.
pub fn prepare_target(target: &uffd::Mapping, strategy: Strategy) -> std::io::Result<()> {
    if strategy == Strategy::Move {
        target.advise(0, target.len(), rustix::mm::Advice::LinuxHugepage)?;
    }
    Ok(())
}

/// Counts pages of `target` that differ from the file.
pub(crate) fn verify(target: &uffd::Mapping, source: &FileSource, len: u64) -> u64 {
    count_differing(source, len, |offset, got| {
        // SAFETY: `offset + got.len()` lies inside the target mapping,
        // fully installed by now; nothing writes it concurrently.
        let have =
            unsafe { std::slice::from_raw_parts(target.as_ptr().add(offset as usize), got.len()) };
        got.copy_from_slice(have);
    })
    .unwrap_or(u64::MAX)
}

/// Counts the 4 KiB pages of the first `len` bytes whose contents, as
/// `read(offset, buf)` fills them in 2 MiB chunks, differ from the file.
pub(crate) fn count_differing(
    source: &FileSource,
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]),
) -> Result<u64, uffd_pager::SourceError> {
    let mut bad = 0;
    let mut want = vec![0u8; 2 << 20];
    let mut got = vec![0u8; 2 << 20];
    for offset in (0..len).step_by(2 << 20) {
        let n = (2u64 << 20).min(len - offset) as usize;
        read(offset, &mut got[..n]);
        let want = snapshot_chunk(source, offset, &mut want[..n])?;
        bad += got[..n]
            .chunks(4096)
            .zip(want.chunks(4096))
            .filter(|(g, w)| g != w)
            .count() as u64;
    }
    Ok(bad)
}

/// The file's bytes at `offset`, `buf.len()` of them (a zero result may
/// leave the buffer as it was: it is zeroed then).
pub(crate) fn snapshot_chunk<'b>(
    source: &FileSource,
    offset: u64,
    buf: &'b mut [u8],
) -> Result<&'b [u8], uffd_pager::SourceError> {
    if source.read_at(offset, buf)? == Content::Zero {
        buf.fill(0);
    }
    Ok(buf)
}

/// Maps `len` bytes of fresh anonymous memory, registers them and starts
/// a pager with `plan` over them, served from `source` by `threads`
/// handler threads. Returns the memory, the pager and when it started.
pub fn start_plan(
    name: &str,
    plan: Plan,
    source: &Arc<FileSource>,
    len: u64,
    threads: usize,
) -> Result<(uffd::Mapping, Pager, Instant), crate::BoxError> {
    let uffd = open_uffd(plan.strategy)?;
    let target = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    prepare_target(&target, plan.strategy)?;
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let started = Instant::now();
    // SAFETY: the target is a mapping the bench touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::clone(source) as Arc<dyn PageSource>)
            .name(name)
            .strategy(plan.strategy)
            .granule(plan.granule)
            .prefetch(plan.prefetch)
            .background_fill(plan.fill)
            .threads(threads)
            .wait(WaitMode::Spin(SPIN))
            .start(uffd, vec![Region::new(target.addr(), len, 0, 4096)])
    }?;
    Ok((target, pager, started))
}

impl PhaseResult {
    /// `pages` installed in `seconds` with no touch sampled (fills and
    /// first writes, where no single access is timed).
    pub fn untimed(pages: u64, seconds: f64) -> PhaseResult {
        PhaseResult {
            pages,
            seconds,
            mb_per_s: (pages * 4096) as f64 / 1e6 / seconds.max(1e-9),
            p50_us: 0.0,
            p90_us: 0.0,
            p99_us: 0.0,
            max_us: 0.0,
            latency: Vec::new(),
        }
    }
}
