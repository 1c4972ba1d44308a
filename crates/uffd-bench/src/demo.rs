//! `uffd demo`: restore a synthetic memory snapshot lazily while a
//! workload touches it, verify every byte, and compare with the kernel's
//! own file-backed fault-in of the same file.

#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd_pager::{FileMode, FileSource, Region, SigbusPager, SignalSafeSource, Stats};

use crate::baselines::kernel_baseline;
use crate::fixtures::{make_snapshot, Snapshot};
use crate::plot::{sample_while, Distribution, Panel, Sample, Timeline};
use crate::workload::{start_plan, touch, verify, Order, PhaseResult, Plan, ProgressLine, PLANS};
use crate::BoxError;

/// How often a restore's progress is sampled for its timeline.
const TIMELINE_EVERY: Duration = Duration::from_millis(5);

/// What `uffd demo` runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Snapshot size in MiB.
    pub mib: u64,
    /// Strategy names (see [`PLANS`]).
    pub strategies: Vec<String>,
    /// Handler threads per userfaultfd.
    pub threads: u64,
    /// Percentage of zero pages in the snapshot.
    pub zero_percent: u8,
    /// Directory for the snapshot file (default: the system's temp dir).
    pub dir: Option<PathBuf>,
}

/// The result of restoring with one plan.
#[derive(Debug, Serialize)]
pub struct StrategyReport {
    /// The plan's name.
    pub strategy: &'static str,
    /// The first half, touched in order.
    pub sequential: PhaseResult,
    /// The second half, touched in random order.
    pub random: PhaseResult,
    /// Faults the first half took.
    pub faults_sequential: u64,
    /// Faults the second half took.
    pub faults_random: u64,
    /// Start of the pager to everything installed, seconds.
    pub total_seconds: f64,
    /// Pages that differ from the file (must be 0).
    pub mismatched_pages: u64,
    /// The pager's counters.
    pub stats: Stats,
    /// Pages installed over the restore, for `--plot`.
    #[serde(skip)]
    pub timeline: Vec<Sample>,
}

/// The demo's result.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Snapshot size, MiB.
    pub mib: u64,
    /// Zero pages in the snapshot.
    pub zero_pages: u64,
    /// Handler threads per userfaultfd.
    pub threads: u64,
    /// The kernel's fault-in.
    pub kernel: KernelReport,
    /// One report per strategy.
    pub strategies: Vec<StrategyReport>,
    /// Every byte of every restore matched the file.
    pub verified: bool,
}

/// The kernel's fault-in of the same file, same workload.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    /// The first half, in order.
    pub sequential: PhaseResult,
    /// The second half, in random order.
    pub random: PhaseResult,
}

/// The demo's workload on the first `len` bytes of `target`: the first
/// half of the pages in order, then the second half in random order.
/// Returns both phases and `faults()` as read between them (the faults the
/// sequential half took).
fn restore_workload(
    name: &str,
    target: &uffd::Mapping,
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
) -> Result<StrategyReport, BoxError> {
    let len = snapshot.len;
    if plan.sigbus {
        return run_sigbus_plan(plan, snapshot, source, progress);
    }
    let (target, pager, started) = start_plan(plan.name, plan, source, len, threads)?;
    let installed = || {
        let s = pager.stats();
        let all = s.pages_copied + s.pages_zero + s.pages_moved + s.pages_continued;
        (all.saturating_sub(s.prefetched_pages), s.prefetched_pages)
    };
    let ((sequential, faults_sequential, random), timeline) =
        sample_while(TIMELINE_EVERY, installed, || {
            restore_workload(plan.name, &target, len, progress, || {
                pager.stats().faults_missing
            })
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
        timeline,
    })
}

/// Starts a SIGBUS-mode pager over all of `target`, served from `source`
/// by the faulting threads themselves.
pub fn start_sigbus(
    target: &uffd::Mapping,
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
) -> Result<StrategyReport, BoxError> {
    let len = snapshot.len;
    let target = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    let started = Instant::now();
    let pager = start_sigbus(&target, source, plan.granule)?;
    let installed = || {
        let s = pager.stats();
        (s.pages_copied + s.pages_zero, 0)
    };
    let ((sequential, faults_sequential, random), timeline) =
        sample_while(TIMELINE_EVERY, installed, || {
            restore_workload(plan.name, &target, len, progress, || pager.stats().faults)
        });
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
        timeline,
    })
}

/// Runs the demo: the kernel's fault-in, then each strategy in turn.
pub fn run(config: &Config, progress: &ProgressLine) -> Result<Report, BoxError> {
    let plans: Vec<Plan> = config
        .strategies
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
    let dir = config.dir.clone().unwrap_or_else(std::env::temp_dir);
    let len = config.mib << 20;
    let t = Instant::now();
    let snapshot = make_snapshot(&dir, len, config.zero_percent)
        .map_err(|e| format!("writing the snapshot in {}: {e}", dir.display()))?;
    progress.done(&format!(
        "snapshot: {} MiB, {:.0}% zero pages, written to {} in {:.2}s",
        config.mib,
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
        progress,
    )?;
    progress.done(&format!(
        "kernel     faulted in {} MiB in {:.2}s",
        config.mib,
        ks.seconds + kr.seconds
    ));
    let mut reports = Vec::new();
    for plan in plans {
        reports.push(run_plan(
            plan,
            &snapshot,
            &source,
            config.threads as usize,
            progress,
        )?);
    }
    let verified = reports.iter().all(|r| r.mismatched_pages == 0);
    Ok(Report {
        mib: config.mib,
        zero_pages: snapshot.zero_pages,
        threads: config.threads,
        kernel: KernelReport {
            sequential: ks,
            random: kr,
        },
        strategies: reports,
        verified,
    })
}

/// The demo's plot: the random half's touches per strategy (and the
/// kernel's), and each restore's pages over time.
pub fn plot_panels(report: &Report) -> Vec<Panel> {
    // Strategies first, so each keeps its colour in both panels.
    let mut latency: Vec<Distribution> = report
        .strategies
        .iter()
        .map(|s| Distribution {
            label: s.strategy.into(),
            buckets: s.random.latency.clone(),
        })
        .collect();
    latency.push(Distribution {
        label: "kernel (warm page cache)".into(),
        buckets: report.kernel.random.latency.clone(),
    });
    vec![
        Panel::Latency {
            title: "time of one sampled touch in the random half, as the touching thread saw it"
                .into(),
            series: latency,
        },
        Panel::Timeline {
            title:
                "pages installed during each restore: on demand (solid), ahead of demand (dashed)"
                    .into(),
            series: report
                .strategies
                .iter()
                .map(|s| Timeline {
                    label: s.strategy.into(),
                    samples: s.timeline.clone(),
                })
                .collect(),
        },
    ]
}
