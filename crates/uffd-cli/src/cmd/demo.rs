//! `uffd demo`: restore a synthetic memory snapshot lazily while a workload
//! touches it, verify every byte, and compare with the kernel's own
//! file-backed fault-in of the same file.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{Features, RegisterMode};
use uffd_pager::{
    AlignedAnon, Content, FileMode, FileSource, Histogram, PageSource, Pager, Prefetch, Region,
    SigbusPager, SignalSafeSource, Stats, Strategy, WaitMode,
};

use super::CmdResult;

/// Restore a memory snapshot lazily with userfaultfd, verify it, and
/// compare with the kernel.
///
/// Creates a synthetic snapshot (by default 1 GiB, a mix of zero and data
/// pages) in a temporary directory. For each strategy, maps fresh memory,
/// lets a pager fill it on demand while a workload touches every page
/// (the first half sequentially, the second half in random order), then
/// checks every byte against the file. The baseline is the kernel itself
/// faulting in the same file (`mmap` MAP_PRIVATE, warm page cache) under
/// the same workload.
///
/// Strategies: copy-4k (one 4 KiB UFFDIO_COPY per fault), readahead (64 KiB
/// granules plus an adaptive window up to 2 MiB), move-2m (UFFDIO_MOVE of
/// whole 2 MiB huge pages from a staging buffer; each move takes the
/// buffer's pages, so the next fault allocates fresh ones), fill (readahead
/// plus a background thread filling everything, demand faults first),
/// sigbus (no handler thread: the faulting thread gets SIGBUS and installs
/// the page itself in its signal handler, one 4 KiB UFFDIO_COPY; for memory
/// of this process only, so a VMM's remote userfaultfd cannot use it).
///
/// Exit status: 0 when every byte matched, 1 on a mismatch or error.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot size in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(4..=65536))]
    mib: u64,
    /// Strategies to run, comma separated: copy-4k, readahead, move-2m,
    /// fill, sigbus.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "copy-4k,readahead,move-2m,fill,sigbus"
    )]
    strategy: Vec<String>,
    /// Handler threads per userfaultfd.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Percentage of zero pages in the snapshot.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Directory for the snapshot file (default: the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// One way of serving faults, as the demo and bench name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub name: &'static str,
    pub strategy: Strategy,
    pub granule: u64,
    pub prefetch: Prefetch,
    pub fill: bool,
    /// Served by the faulting thread itself in a SIGBUS handler
    /// ([`SigbusPager`]) instead of handler threads; `strategy` and
    /// `prefetch` do not apply, `granule` does.
    pub sigbus: bool,
}

pub(crate) const PLANS: [Plan; 5] = [
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
pub(crate) const SPIN: Duration = Duration::from_micros(200);

/// A synthetic snapshot file, removed on drop.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub path: PathBuf,
    pub len: u64,
    pub zero_pages: u64,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Writes a snapshot of `len` bytes: runs of zero pages (left as holes,
/// as a sparse snapshot has them) between runs of data pages, plus scattered
/// all-zero pages written explicitly (as a dense snapshot has them). Every
/// data page starts with its own offset, so a misplaced page is caught.
pub(crate) fn make_snapshot(dir: &Path, len: u64, zero_percent: u8) -> std::io::Result<Snapshot> {
    let path = dir.join(format!("uffd-demo-{}.snap", std::process::id()));
    let file = File::create(&path)?;
    file.set_len(len)?;
    let mut snapshot = Snapshot {
        path,
        len,
        zero_pages: 0,
    };
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ len;
    let chunk = 2u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut offset = 0;
    let threshold = u64::from(zero_percent) * 1024 / 100;
    while offset < len {
        let this = chunk.min(len - offset);
        let mut any_data = false;
        // Decide per 64 KiB block: mostly zero runs, some single zero pages.
        for block in (0..this).step_by(64 << 10) {
            let zero_block = (xorshift(&mut rng) % 1024) < threshold * 8 / 10;
            for page in (block..(block + (64 << 10)).min(this)).step_by(4096) {
                let p = &mut buf[page as usize..page as usize + 4096];
                if zero_block || (xorshift(&mut rng) % 1024) < threshold * 2 / 10 {
                    p.fill(0);
                    snapshot.zero_pages += 1;
                    continue;
                }
                any_data = true;
                for w in p.chunks_exact_mut(8) {
                    w.copy_from_slice(&xorshift(&mut rng).to_ne_bytes());
                }
                p[..8].copy_from_slice(&(offset + page).to_ne_bytes());
            }
        }
        if any_data {
            // Write data blocks only; zero 64 KiB blocks stay holes.
            let mut b = 0;
            while b < this {
                let end = (b + (64 << 10)).min(this);
                let block = &buf[b as usize..end as usize];
                if !uffd_pager::source::is_zero(block) {
                    rustix::io::pwrite(&file, block, offset + b)?;
                }
                b = end;
            }
        }
        offset += this;
    }
    Ok(snapshot)
}

/// Touches pages and times a sample of the touches.
#[derive(Debug, Serialize, Clone, Copy)]
pub(crate) struct PhaseResult {
    pub pages: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// The order pages are touched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Sequential,
    Random,
}

impl Order {
    pub fn name(self) -> &'static str {
        match self {
            Order::Sequential => "sequential",
            Order::Random => "random",
        }
    }
}

/// A permutation of `0..n` from a fixed seed (same order in every run).
pub(crate) fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = seed | 1;
    for i in (1..v.len()).rev() {
        let j = (xorshift(&mut rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
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
    }
}

/// A progress line on stderr, redrawn in place when stderr is a terminal.
#[derive(Debug)]
pub(crate) struct ProgressLine {
    tty: bool,
    quiet: bool,
}

impl ProgressLine {
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
pub(crate) fn open_uffd(strategy: Strategy) -> Result<uffd::Uffd, uffd::Error> {
    let mut features = Features::EVENT_REMOVE;
    if strategy == Strategy::Move {
        features |= Features::MOVE;
    }
    super::in_process_uffd()
        .non_blocking(true)
        .features(features)
        .open()
}

/// For MOVE, asks for transparent huge pages on the target: a fault then
/// reaches the handler before any page table is allocated, so a whole
/// 2 MiB huge page can move in with one PMD update.
pub(crate) fn prepare_target(target: &AlignedAnon, strategy: Strategy) -> std::io::Result<()> {
    if strategy == Strategy::Move {
        target.advise(rustix::mm::Advice::LinuxHugepage)?;
    }
    Ok(())
}

/// The result of restoring with one plan.
#[derive(Debug, Serialize)]
struct StrategyReport {
    strategy: &'static str,
    sequential: PhaseResult,
    random: PhaseResult,
    faults_sequential: u64,
    faults_random: u64,
    total_seconds: f64,
    mismatched_pages: u64,
    stats: Stats,
}

#[derive(Debug, Serialize)]
struct Report {
    mib: u64,
    zero_pages: u64,
    threads: u64,
    kernel: KernelReport,
    strategies: Vec<StrategyReport>,
    verified: bool,
}

#[derive(Debug, Serialize)]
struct KernelReport {
    sequential: PhaseResult,
    random: PhaseResult,
}

/// The kernel's own fault-in of the file (MAP_PRIVATE, read): the
/// baseline. Returns (sequential over the first half, random over the
/// second half), the same split as the pager's workload in `run_plan`.
/// The caller warms the page cache first ([`FileSource::populate`]), so
/// the kernel and the pager read the same cached pages.
pub(crate) fn kernel_baseline(
    path: &Path,
    len: u64,
    orders: (Order, Order),
    progress: &ProgressLine,
) -> std::io::Result<(PhaseResult, PhaseResult)> {
    let map = PrivateFileMap::new(path, len)?;
    let half = len / 4096 / 2;
    let first = touch(map.base(), 0, half, orders.0, |n| {
        progress.update("kernel fault-in", n, half * 2)
    });
    let second = touch(map.base(), half, len / 4096 - half, orders.1, |n| {
        progress.update("kernel fault-in", half + n, half * 2)
    });
    Ok((first, second))
}

/// The kernel's fault-in of the whole file in one order, on a fresh
/// private mapping (the page cache warmed by the caller).
pub(crate) fn kernel_fault_in(path: &Path, len: u64, order: Order) -> std::io::Result<PhaseResult> {
    let map = PrivateFileMap::new(path, len)?;
    Ok(touch(map.base(), 0, len / 4096, order, |_| {}))
}

/// A read-only MAP_PRIVATE mapping of a file, unmapped on drop.
struct PrivateFileMap {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

impl PrivateFileMap {
    fn new(path: &Path, len: u64) -> std::io::Result<PrivateFileMap> {
        let file = File::open(path)?;
        // SAFETY: a fresh private read-only mapping of our own file.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
                &file,
                0,
            )
        }?;
        Ok(PrivateFileMap {
            ptr,
            len: len as usize,
        })
    }

    fn base(&self) -> *const u8 {
        self.ptr.cast::<u8>().cast_const()
    }
}

impl Drop for PrivateFileMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; nothing refers to it.
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

/// Counts pages of `target` that differ from the file.
pub(crate) fn verify(target: &AlignedAnon, source: &FileSource, len: u64) -> u64 {
    let mut bad = 0;
    let mut buf = vec![0u8; 2 << 20];
    let mut offset = 0;
    while offset < len {
        let n = (2u64 << 20).min(len - offset) as usize;
        // A zero result may leave the buffer as it was.
        let want: &[u8] = match source.read_at(offset, &mut buf[..n]) {
            Ok(Content::Zero) => {
                buf[..n].fill(0);
                &buf[..n]
            }
            _ => &buf[..n],
        };
        // SAFETY: `offset + n` lies inside the target mapping, fully
        // installed by now; nothing writes it concurrently.
        let got = unsafe { std::slice::from_raw_parts(target.as_ptr().add(offset as usize), n) };
        bad += got
            .chunks(4096)
            .zip(want.chunks(4096))
            .filter(|(g, w)| g != w)
            .count() as u64;
        offset += n as u64;
    }
    bad
}

/// The demo's workload on the first `len` bytes of `target`: the first
/// half of the pages in order, then the second half in random order.
/// Returns both phases and `faults()` as read between them (the faults the
/// sequential half took).
fn restore_workload(
    name: &str,
    target: &AlignedAnon,
    len: u64,
    progress: &ProgressLine,
    faults: impl Fn() -> u64,
) -> (PhaseResult, u64, PhaseResult) {
    let pages = len / 4096;
    let half = pages / 2;
    let label = format!("{name} restore");
    let sequential = touch(target.as_ptr(), 0, half, Order::Sequential, |n| {
        progress.update(&label, n, pages)
    });
    let faults_sequential = faults();
    let random = touch(target.as_ptr(), half, pages - half, Order::Random, |n| {
        progress.update(&label, half + n, pages)
    });
    (sequential, faults_sequential, random)
}

/// The progress line closing one restore.
fn restored_line(name: &str, len: u64, seconds: f64, faults: u64, mismatched_pages: u64) -> String {
    format!(
        "{name:<10} restored {} MiB in {seconds:.2}s, {faults} faults, {mismatched_pages} mismatched pages",
        len >> 20
    )
}

fn run_plan(
    plan: Plan,
    snapshot: &Snapshot,
    source: &Arc<FileSource>,
    threads: usize,
    progress: &ProgressLine,
) -> Result<StrategyReport, Box<dyn std::error::Error + Send + Sync>> {
    let len = snapshot.len;
    if plan.sigbus {
        return run_sigbus_plan(plan, snapshot, source, progress);
    }
    let uffd = open_uffd(plan.strategy)?;
    let target = AlignedAnon::new(len as usize)?;
    prepare_target(&target, plan.strategy)?;
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let started = Instant::now();
    let pager = Pager::builder(Arc::clone(source) as Arc<dyn PageSource>)
        .name(plan.name)
        .strategy(plan.strategy)
        .granule(plan.granule)
        .prefetch(plan.prefetch)
        .background_fill(plan.fill)
        .threads(threads)
        .wait(WaitMode::Spin(SPIN))
        .start(uffd, vec![Region::new(target.addr(), len, 0, 4096)])?;
    let (sequential, faults_sequential, random) =
        restore_workload(plan.name, &target, len, progress, || {
            pager.stats().faults_missing
        });
    if plan.fill {
        // Everything is present once the workload has touched every page;
        // the fill thread only has to notice.
        pager.wait_filled(Duration::from_secs(60));
    }
    let total_seconds = started.elapsed().as_secs_f64();
    let stats = pager.shutdown();
    let mismatched_pages = verify(&target, source, len);
    progress.done(&restored_line(
        plan.name,
        len,
        total_seconds,
        stats.faults_missing,
        mismatched_pages,
    ));
    Ok(StrategyReport {
        strategy: plan.name,
        sequential,
        random,
        faults_sequential,
        faults_random: stats.faults_missing - faults_sequential,
        total_seconds,
        mismatched_pages,
        stats,
    })
}

/// Starts a SIGBUS-mode pager over all of `target`, served from `source`
/// by the faulting threads themselves.
pub(crate) fn start_sigbus(
    target: &AlignedAnon,
    source: &Arc<FileSource>,
    granule: u64,
) -> Result<SigbusPager, uffd_pager::SigbusError> {
    let region = Region::new(target.addr(), target.len() as u64, 0, 4096);
    // SAFETY: `target` is a fresh anonymous mapping of this process that
    // outlives the pager (callers shut it down first) and that nothing
    // reads before the pager fills it.
    unsafe {
        SigbusPager::builder(SignalSafeSource::file(Arc::clone(source)))
            .granule(granule)
            .start(vec![region])
    }
}

/// [`run_plan`] for a SIGBUS-mode plan: same workload, same checks.
fn run_sigbus_plan(
    plan: Plan,
    snapshot: &Snapshot,
    source: &Arc<FileSource>,
    progress: &ProgressLine,
) -> Result<StrategyReport, Box<dyn std::error::Error + Send + Sync>> {
    let len = snapshot.len;
    let target = AlignedAnon::new(len as usize)?;
    let started = Instant::now();
    let pager = start_sigbus(&target, source, plan.granule)?;
    let (sequential, faults_sequential, random) =
        restore_workload(plan.name, &target, len, progress, || pager.stats().faults);
    let total_seconds = started.elapsed().as_secs_f64();
    let s = pager.shutdown();
    let mismatched_pages = verify(&target, source, len);
    progress.done(&restored_line(
        plan.name,
        len,
        total_seconds,
        s.faults,
        mismatched_pages,
    ));
    if s.failed != 0 {
        return Err(format!("{}: {} faults could not be served", plan.name, s.failed).into());
    }
    let stats = Stats {
        faults_missing: s.faults,
        pages_copied: s.pages_copied,
        pages_zero: s.pages_zero,
        eexist: s.eexist,
        eagain: s.eagain,
        latency: s.latency,
        ..Stats::default()
    };
    Ok(StrategyReport {
        strategy: plan.name,
        sequential,
        random,
        faults_sequential,
        faults_random: s.faults - faults_sequential,
        total_seconds,
        mismatched_pages,
        stats,
    })
}

/// Runs the demo.
pub fn run(args: Args) -> CmdResult {
    let plans: Vec<Plan> = args
        .strategy
        .iter()
        .map(|name| {
            PLANS
                .iter()
                .find(|p| p.name == name.trim())
                .copied()
                .ok_or_else(|| {
                    format!(
                        "unknown strategy {name:?}; expected copy-4k, readahead, move-2m, fill or sigbus"
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    if let Err(e) = uffd::probe() {
        return Err(format!("userfaultfd is not available: {e}").into());
    }
    let progress = ProgressLine::new(false);
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let len = args.mib << 20;
    let t = Instant::now();
    let snapshot = make_snapshot(&dir, len, args.zero_percent)
        .map_err(|e| format!("writing the snapshot in {}: {e}", dir.display()))?;
    progress.done(&format!(
        "snapshot: {} MiB, {:.0}% zero pages, written to {} in {:.2}s",
        args.mib,
        snapshot.zero_pages as f64 * 100.0 / (len / 4096) as f64,
        snapshot.path.display(),
        t.elapsed().as_secs_f64()
    ));
    let source = Arc::new(FileSource::open(&snapshot.path, FileMode::Mmap)?);
    // A restore server maps its snapshot once for all VMs: pay that here,
    // outside the timings. It also warms the page cache for the kernel's
    // baseline, so both read the same cached pages.
    source.populate()?;
    let (ks, kr) = kernel_baseline(
        &snapshot.path,
        len,
        (Order::Sequential, Order::Random),
        &progress,
    )?;
    progress.done(&format!(
        "kernel     faulted in {} MiB in {:.2}s",
        args.mib,
        ks.seconds + kr.seconds
    ));
    let mut reports = Vec::new();
    for plan in plans {
        reports.push(run_plan(
            plan,
            &snapshot,
            &source,
            args.threads as usize,
            &progress,
        )?);
    }
    let verified = reports.iter().all(|r| r.mismatched_pages == 0);
    let report = Report {
        mib: args.mib,
        zero_pages: snapshot.zero_pages,
        threads: args.threads,
        kernel: KernelReport {
            sequential: ks,
            random: kr,
        },
        strategies: reports,
        verified,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_table(r: &Report) {
    println!(
        "Lazy restore of a {} MiB snapshot ({} zero pages), {} handler thread(s); \
         first half touched sequentially, second half in random order.",
        r.mib, r.zero_pages, r.threads
    );
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "strategy / phase",
        "faults",
        "seconds",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "vs kernel"
    );
    let row = |name: String, faults: String, p: &PhaseResult, kernel: &PhaseResult| {
        println!(
            "{:<22} {:>8} {:>9.3} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9.2}x",
            name,
            faults,
            p.seconds,
            p.mb_per_s,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.max_us,
            p.mb_per_s / kernel.mb_per_s.max(1e-9)
        );
    };
    row(
        "kernel sequential".into(),
        "-".into(),
        &r.kernel.sequential,
        &r.kernel.sequential,
    );
    row(
        "kernel random".into(),
        "-".into(),
        &r.kernel.random,
        &r.kernel.random,
    );
    for s in &r.strategies {
        row(
            format!("{} sequential", s.strategy),
            s.faults_sequential.to_string(),
            &s.sequential,
            &r.kernel.sequential,
        );
        row(
            format!("{} random", s.strategy),
            s.faults_random.to_string(),
            &s.random,
            &r.kernel.random,
        );
    }
    println!();
    for s in &r.strategies {
        println!(
            "{:<10} copied {} pages, {} zero pages, {} moved, {} prefetched, {} EEXIST, {} EAGAIN; \
             handler latency p50 {:.1} µs p99 {:.1} µs; verify: {}",
            s.strategy,
            s.stats.pages_copied,
            s.stats.pages_zero,
            s.stats.pages_moved,
            s.stats.prefetched_pages,
            s.stats.eexist,
            s.stats.eagain,
            s.stats.latency.p50_us,
            s.stats.latency.p99_us,
            if s.mismatched_pages == 0 {
                "every byte matches".to_string()
            } else {
                format!("{} pages DIFFER", s.mismatched_pages)
            }
        );
    }
}
