//! `uffd snapshot live-demo`: a live snapshot of memory that writer
//! threads keep writing, checked page by page, then rounds of dirty
//! tracking and deltas.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{HugepageReservation, Mapping, MemoryKind};
use uffd_snapshot::check::{VersionedMemory, PAGE};
use uffd_snapshot::{
    copy_image, merge, write_delta, DirtyTracker, ForkImage, LiveSnapshot, Region, SnapshotOptions,
};

use crate::cmd::CmdResult;

/// Take a live snapshot while threads write, verify it, then deltas.
///
/// Memory of --mib MiB is written by --threads writer threads at random
/// pages; every page carries a version counter and a pattern derived from
/// it, and each writer records the version it overwrites first after t0.
/// The snapshot write-protects everything while the writers run (each page
/// they write after the walk passed it faults once and is recorded), then
/// at t0 holds the writers only while the recorded pages are protected
/// again (--t0 walk instead holds them for the whole walk); a saver thread
/// then copies each page before its first write and all others in the
/// background. The image is checked against
/// the memory at t0, page for page. This is done twice: as a backup takes
/// it (no write tracking: the figures reported at the top level), then
/// with write tracking as the base of the deltas (every page first written
/// meanwhile faults once; its figures under "tracked"). Then --rounds rounds: writers run for
/// --round-ms, are held while the pages written since the previous round
/// (WP_ASYNC + PAGEMAP_SCAN) go to a delta file, and base + deltas are
/// checked against memory; finally `merge` of all layers is checked too.
///
/// Output: the t0 pause, the snapshot's duration, the writers' throughput
/// and longest stall during it, how pages were saved, each round's dirty
/// bytes, delta size and scan time, the cost of a first write to a
/// tracked page, and whether every check passed. Before the live snapshot,
/// the same writers run against two baselines, each checked against its
/// t0 too: fork() with the child writing the image (Redis BGSAVE; anon
/// memory only, a child shares shmem and hugetlb pages with the writers)
/// and a stop-the-world copy. --json prints one object: consistent,
/// layers_consistent, merged_consistent, protect_ms, arm_ms, rearmed_pages, stall_ms_by_phase{}, snapshot_ms,
/// longest_stall_ms, writer_ops_per_s, saved_on_fault,
/// saved_in_background, longest_fault_us, image_data_bytes,
/// host_steal_ms (the hypervisor's steal of this machine's CPUs meanwhile,
/// here and in each baseline: on a VM the writers' longest stalls come
/// from it), tracker,
/// pagemap_scan_ms, softdirty_scan_ms (null without soft-dirty),
/// first_write_us, rounds[], tracked{}, fork{}, fork_longest_stall_ms,
/// fork_writer_ops_per_s, stop_the_world{}.
///
/// Files go to --dir (default: the temp directory) and are removed at the
/// end unless --keep.
///
/// Exit status: 0 when the image equals memory at t0 and every layered
/// and merged image equals memory; 1 when any check fails or the snapshot
/// fails; 2 when userfaultfd (with kernel-mode faults) is denied here, or
/// hugetlb pages cannot be reserved (the message says why).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct LiveDemoArgs {
    /// Memory size in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mib: usize,
    /// Writer threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    threads: u64,
    /// Memory type: anon, shmem or hugetlb.
    #[arg(long, default_value = "anon", value_name = "TYPE")]
    mem: MemoryKind,
    /// Incremental rounds after the base snapshot.
    #[arg(long, default_value_t = 2, value_name = "N")]
    rounds: u32,
    /// How long writers run in each round.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    round_ms: u64,
    /// Directory for the image and the deltas.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the files.
    #[arg(long)]
    keep: bool,
    /// How t0 protects memory: arm (walk every page table while writers
    /// run, then hold them while the pages they wrote meanwhile are
    /// protected again) or walk (hold them for the whole walk).
    #[arg(long, default_value = "arm", value_name = "HOW")]
    t0: T0,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// How the demo's snapshots reach t0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum T0 {
    Arm,
    Walk,
}

/// Protects `prepared` at t0 with the writers of `vm` held: across the
/// whole walk (`T0::Walk`), or across protecting again what they wrote
/// during a walk made while they ran (`T0::Arm`). Also returns the
/// longest write during the arm walk and until t0 ended.
fn reach_t0(
    vm: &VersionedMemory,
    prepared: uffd_snapshot::Prepared,
    how: T0,
) -> Result<(uffd_snapshot::Running, Duration, Duration), uffd_snapshot::Error> {
    vm.take_longest_op();
    let (running, arming) = vm.reach_t0(prepared, how == T0::Arm)?;
    Ok((running, arming, vm.take_longest_op()))
}

/// The longest write in each part of a live snapshot, ms.
#[derive(Debug, Clone, Copy, Serialize)]
struct StallsByPhase {
    /// During the arm walk (writers running; --t0 arm only).
    arm: f64,
    /// Writes that ended while t0 held the writers (a write held there
    /// ends after t0, so it counts under `saving`).
    t0: f64,
    /// From t0 until every page is saved.
    saving: f64,
}

impl StallsByPhase {
    fn of(arm: Duration, t0: Duration, saving: Duration) -> StallsByPhase {
        StallsByPhase {
            arm: ms(arm),
            t0: ms(t0),
            saving: ms(saving),
        }
    }
}

#[derive(Debug, Serialize)]
struct Round {
    dirty_bytes: u64,
    delta_bytes: u64,
    scan_ms: f64,
    pause_ms: f64,
    consistent: bool,
}

#[derive(Debug, Serialize)]
struct Summary {
    mem: String,
    mib: usize,
    threads: u64,
    consistent: bool,
    layers_consistent: bool,
    merged_consistent: bool,
    /// The live snapshot as a backup takes it.
    #[serde(flatten)]
    live: LiveFigures,
    tracker: &'static str,
    pagemap_scan_ms: f64,
    first_write_us: f64,
    rounds: Vec<Round>,
    /// fork() with the child writing the image (anonymous memory only: a
    /// child shares shmem/hugetlb pages with the writers).
    fork: Option<Baseline>,
    fork_longest_stall_ms: Option<f64>,
    fork_writer_ops_per_s: Option<f64>,
    /// The chain's base: the same snapshot with write tracking.
    tracked: Tracked,
    /// Writers held while everything is copied.
    stop_the_world: Baseline,
    softdirty_scan_ms: Option<f64>,
}

/// One live snapshot's figures.
#[derive(Debug, Serialize)]
struct LiveFigures {
    protect_ms: f64,
    /// With --t0 arm: the walk made while the writers ran.
    arm_ms: f64,
    /// With --t0 arm: pages written during it, protected again at t0.
    rearmed_pages: u64,
    /// Where the longest stall fell.
    stall_ms_by_phase: StallsByPhase,
    snapshot_ms: f64,
    longest_stall_ms: f64,
    writer_ops_per_s: f64,
    saved_on_fault: u64,
    saved_in_background: u64,
    faults: u64,
    longest_fault_us: f64,
    image_data_bytes: u64,
    /// Time the hypervisor ran something else on this machine's CPUs
    /// while the snapshot ran (/proc/stat's steal, all CPUs; null where
    /// unreadable): a saver or writer whose vCPU is taken waits that long,
    /// whatever the code does.
    host_steal_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Tracked {
    consistent: bool,
    #[serde(flatten)]
    figures: LiveFigures,
}

impl LiveFigures {
    fn of(
        report: &uffd_snapshot::Report,
        elapsed: Duration,
        ops: u64,
        stalls: StallsByPhase,
        host_steal: Option<Duration>,
    ) -> LiveFigures {
        LiveFigures {
            protect_ms: ms(report.protect_time),
            arm_ms: ms(report.arm_time),
            rearmed_pages: report.rearmed,
            stall_ms_by_phase: stalls,
            snapshot_ms: ms(elapsed),
            longest_stall_ms: stalls.arm.max(stalls.t0).max(stalls.saving),
            writer_ops_per_s: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            saved_on_fault: report.saved_on_fault,
            saved_in_background: report.saved_in_background,
            faults: report.faults,
            longest_fault_us: report.longest_fault.as_secs_f64() * 1e6,
            image_data_bytes: report.data_bytes,
            host_steal_ms: host_steal.map(ms),
        }
    }
}

/// Steal time of every CPU so far, from /proc/stat; `None` where it cannot
/// be read (no /proc, or a kernel without the column).
fn host_steal() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal
    let ticks: u64 = cpu.split_whitespace().nth(8)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// A stretch of the demo being measured: its wall time and the steal
/// (see [`host_steal`]) in it.
struct Window {
    started: Instant,
    steal_before: Option<Duration>,
}

impl Window {
    fn open() -> Window {
        Window {
            started: Instant::now(),
            steal_before: host_steal(),
        }
    }

    /// Wall time and steal since [`Window::open`].
    fn close(&self) -> (Duration, Option<Duration>) {
        let steal = host_steal().zip(self.steal_before);
        (
            self.started.elapsed(),
            steal.map(|(now, before)| now.saturating_sub(before)),
        )
    }
}

/// A live snapshot without write tracking, taken and checked against t0
/// while the writers run.
fn live_untracked(
    vm: &VersionedMemory,
    region: Region,
    path: &std::path::Path,
    how: T0,
) -> Result<(LiveFigures, bool), Box<dyn std::error::Error + Send + Sync>> {
    let prepared = LiveSnapshot::prepare(&[region], path, SnapshotOptions::new())?;
    vm.take_ops();
    let window = Window::open();
    let (running, arming, through_t0) = reach_t0(vm, prepared, how)?;
    running.wait_saved(None);
    let (elapsed, steal) = window.close();
    let (ops, saving) = (vm.take_ops(), vm.take_longest_op());
    let report = running.finish()?;
    let paused = vm.pause();
    let consistent = vm
        .file_mismatches_at_t0(&std::fs::File::open(path)?)?
        .is_empty();
    drop(paused);
    let stalls = StallsByPhase::of(arming, through_t0, saving);
    Ok((
        LiveFigures::of(&report, elapsed, ops, stalls, steal),
        consistent,
    ))
}

#[derive(Debug, Serialize)]
struct Baseline {
    consistent: bool,
    total_ms: f64,
    /// fork(): the call itself; stop-the-world: the whole copy.
    pause_ms: f64,
    longest_stall_ms: f64,
    writer_ops_per_s: f64,
    /// As in a live snapshot's figures.
    host_steal_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Files(Vec<PathBuf>, bool);

impl Drop for Files {
    fn drop(&mut self) {
        if !self.1 {
            for f in &self.0 {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Runs `uffd snapshot live-demo`.
pub fn run(a: LiveDemoArgs) -> CmdResult {
    if let Err(e) = uffd::OpenOptions::new().open() {
        eprintln!(
            "uffd: the live demo needs a userfaultfd that catches kernel-mode faults, which this \
             process cannot open: {e}\n(`uffd probe` says which ways of opening were refused and how to allow one)"
        );
        return Ok(ExitCode::from(2));
    }
    if !matches!(
        a.mem,
        MemoryKind::Anon | MemoryKind::Shmem | MemoryKind::Hugetlb
    ) {
        return Err(format!("--mem {}: expected anon, shmem or hugetlb", a.mem).into());
    }
    let len = (a.mib.max(1) << 20).next_multiple_of(a.mem.page_size());
    let _reservation = if a.mem.is_hugetlb() {
        match HugepageReservation::reserve((len / a.mem.page_size()) as u64) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("uffd: cannot reserve huge pages for --mem hugetlb: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    } else {
        None
    };
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tag = std::process::id();
    let base = dir.join(format!("uffd-live-{tag}.mem"));
    let merged = dir.join(format!("uffd-live-{tag}-merged.mem"));
    let mut files = Files(vec![base.clone(), merged.clone()], a.keep);

    let vm = Arc::new(VersionedMemory::new(Mapping::new(a.mem, len)?));
    let mut buf = [0u8; PAGE];
    for p in 0..vm.pages() {
        if p % 8 != 7 {
            vm.write_next(p, &mut buf);
        }
    }
    let region = Region::of(vm.mapping());
    let writers: Vec<_> = (0..a.threads.max(1))
        .map(|i| {
            let vm = vm.clone();
            let n = a.threads.max(1);
            std::thread::spawn(move || vm.writer(i, n, Duration::ZERO))
        })
        .collect();
    let stop_writers = |writers: Vec<std::thread::JoinHandle<()>>| {
        vm.stop();
        for w in writers {
            let _ = w.join();
        }
    };
    std::thread::sleep(Duration::from_millis(50));

    // The baselines first, with the same writers: fork() and a child
    // writing the image, then a stop-the-world copy.
    let baseline_path = dir.join(format!("uffd-live-{tag}-baseline.mem"));
    files.0.push(baseline_path.clone());
    let fork = if a.mem == MemoryKind::Anon {
        vm.take_ops();
        vm.take_longest_op();
        let window = Window::open();
        let forked = vm.at_t0(|| ForkImage::start(&[region], &baseline_path));
        let result = forked.and_then(|f| {
            let pause = f.fork_time;
            f.wait().map(|total| (pause, total))
        });
        let (elapsed, steal) = window.close();
        let (ops, stall) = (vm.take_ops(), vm.take_longest_op());
        let (pause, total) = match result {
            Ok(t) => t,
            Err(e) => {
                stop_writers(writers);
                return Err(e.into());
            }
        };
        let paused = vm.pause();
        let ok = vm
            .file_mismatches_at_t0(&std::fs::File::open(&baseline_path)?)?
            .is_empty();
        drop(paused);
        Some(Baseline {
            consistent: ok,
            total_ms: ms(total),
            pause_ms: ms(pause),
            longest_stall_ms: ms(stall),
            writer_ops_per_s: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            host_steal_ms: steal.map(ms),
        })
    } else {
        None
    };
    vm.take_ops();
    vm.take_longest_op();
    let window = Window::open();
    let copied = vm.at_t0(|| copy_image(&[region], &baseline_path));
    let (stw_time, stw_steal) = window.close();
    let (ops, stall) = (vm.take_ops(), vm.take_longest_op());
    if let Err(e) = copied {
        stop_writers(writers);
        return Err(e.into());
    }
    let paused = vm.pause();
    let stw_ok = vm
        .file_mismatches_at_t0(&std::fs::File::open(&baseline_path)?)?
        .is_empty();
    drop(paused);
    let _ = std::fs::remove_file(&baseline_path);
    let stop_the_world = Baseline {
        consistent: stw_ok,
        total_ms: ms(stw_time),
        pause_ms: ms(stw_time),
        longest_stall_ms: ms(stall),
        writer_ops_per_s: ops as f64 / stw_time.as_secs_f64().max(1e-9),
        host_steal_ms: stw_steal.map(ms),
    };

    // The live snapshot as a backup takes it, and the bench's figures: no
    // write tracking, so a page faults at most once, before it is saved.
    let untracked_path = dir.join(format!("uffd-live-{tag}-untracked.mem"));
    files.0.push(untracked_path.clone());
    let (untracked, untracked_ok) = match live_untracked(&vm, region, &untracked_path, a.t0) {
        Ok(figures) => figures,
        Err(e) => {
            stop_writers(writers);
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(&untracked_path);

    // The base of the incremental chain. Write tracking stays on so that
    // the first delta holds what was written while the base was being
    // saved (every page first written during the snapshot faults once).
    let prepared =
        match LiveSnapshot::prepare(&[region], &base, SnapshotOptions::new().track_writes(true)) {
            Ok(p) => p,
            Err(e) => {
                stop_writers(writers);
                return Err(e.into());
            }
        };
    vm.take_ops();
    let window = Window::open();
    let (running, arming, through_t0) = match reach_t0(&vm, prepared, a.t0) {
        Ok(r) => r,
        Err(e) => {
            stop_writers(writers);
            return Err(e.into());
        }
    };
    running.wait_saved(None);
    let (snapshot_time, tracked_steal) = window.close();
    let ops = vm.take_ops();
    let stalls = StallsByPhase::of(arming, through_t0, vm.take_longest_op());
    // Hand tracking over from the snapshot to a dirty tracker with the
    // writers held, then check the base against t0 (still held: the check
    // reads what the writers recorded).
    let paused = vm.pause();
    let stopped = running.stop();
    let tracker = stopped.as_ref().ok().map(|_| DirtyTracker::new(&[region]));
    let (stopped, mut tracker) = match (stopped, tracker) {
        (Ok(s), Some(Ok(t))) => (s, t),
        (Err(e), _) | (_, Some(Err(e))) => {
            drop(paused);
            stop_writers(writers);
            return Err(e.into());
        }
        (Ok(_), None) => unreachable!("a tracker is made when the snapshot stopped"),
    };
    let report = stopped.commit()?;
    let bad = vm.file_mismatches_at_t0(&std::fs::File::open(&base)?)?;
    drop(paused);
    vm.take_longest_op();

    let mut carried = report.written.clone();
    let mut layers = Vec::new();
    let mut rounds = Vec::new();
    let mut layers_ok = true;
    let mut last_scan = Duration::ZERO;
    for round in 0..a.rounds {
        std::thread::sleep(Duration::from_millis(a.round_ms));
        let path = dir.join(format!("uffd-live-{tag}-d{}", round + 1));
        files.0.push(path.clone());
        let paused = vm.pause();
        let held = Instant::now();
        let scan = Instant::now();
        let mut ranges = tracker.written_image_ranges()?;
        last_scan = scan.elapsed();
        ranges.append(&mut carried);
        let stats = write_delta(&[region], &ranges, &path)?;
        let pause = held.elapsed();
        layers.push(path);
        // The check reads base + layers through the same sources `uffd
        // serve --layer` uses, while the writers are still held.
        let check = dir.join(format!("uffd-live-{tag}-check.mem"));
        merge(&base, &layers, &check)?;
        let ok = vm
            .file_mismatches_now(&std::fs::File::open(&check)?)?
            .is_empty();
        let _ = std::fs::remove_file(&check);
        drop(paused);
        layers_ok &= ok;
        rounds.push(Round {
            dirty_bytes: (stats.data_pages + stats.zero_pages) * PAGE as u64,
            delta_bytes: stats.file_bytes,
            scan_ms: ms(last_scan),
            pause_ms: ms(pause),
            consistent: ok,
        });
    }
    stop_writers(writers);
    // The final state: one more delta with the writers stopped, merged.
    let last = dir.join(format!("uffd-live-{tag}-d{}", a.rounds + 1));
    files.0.push(last.clone());
    let mut ranges = tracker.written_image_ranges()?;
    ranges.append(&mut carried);
    write_delta(&[region], &ranges, &last)?;
    layers.push(last);
    merge(&base, &layers, &merged)?;
    let merged_ok = vm
        .file_mismatches_now(&std::fs::File::open(&merged)?)?
        .is_empty();

    // The cost of a first write to a tracked page (writers stopped).
    let n = vm.pages().min(4096);
    tracker.written()?;
    let t = Instant::now();
    for p in 0..n {
        vm.mapping().write_byte(p as usize * PAGE + 8, 1);
    }
    let first_write = t.elapsed() / n.max(1) as u32;
    tracker.written()?;
    let tracker_mode = tracker.mode().name();
    drop(tracker);
    // The same scan with soft-dirty bits, where this kernel keeps them.
    let softdirty_scan =
        match DirtyTracker::with_mode(&[region], uffd_snapshot::TrackerMode::SoftDirty) {
            Ok(mut sd) => {
                for p in (0..vm.pages()).step_by(100) {
                    vm.mapping().write_byte(p as usize * PAGE + 8, 2);
                }
                let t = Instant::now();
                sd.written()?;
                Some(t.elapsed())
            }
            Err(_) => None,
        };

    let summary = Summary {
        mem: a.mem.to_string(),
        mib: a.mib,
        threads: a.threads,
        consistent: bad.is_empty() && untracked_ok,
        layers_consistent: layers_ok,
        merged_consistent: merged_ok,
        live: untracked,
        tracked: Tracked {
            consistent: bad.is_empty(),
            figures: LiveFigures::of(&report, snapshot_time, ops, stalls, tracked_steal),
        },
        tracker: tracker_mode,
        pagemap_scan_ms: ms(last_scan),
        first_write_us: first_write.as_secs_f64() * 1e6,
        rounds,
        fork_longest_stall_ms: fork.as_ref().map(|f| f.longest_stall_ms),
        fork_writer_ops_per_s: fork.as_ref().map(|f| f.writer_ops_per_s),
        fork,
        stop_the_world,
        softdirty_scan_ms: softdirty_scan.map(ms),
    };
    let ok = summary.consistent
        && summary.layers_consistent
        && summary.merged_consistent
        && summary.stop_the_world.consistent
        && summary.fork.as_ref().is_none_or(|f| f.consistent);
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "live snapshot of {} MiB {} with {} writer thread(s): {}",
            a.mib,
            summary.mem,
            a.threads,
            if summary.consistent {
                "the image equals memory at t0, every page".to_string()
            } else {
                format!(
                    "{} page range(s) differ from t0: {:?}",
                    bad.len(),
                    &bad[..bad.len().min(8)]
                )
            }
        );
        if a.t0 == T0::Arm {
            println!(
                "  armed in {:.1} ms with the writers running; at t0 they were held while {} pages written meanwhile were protected again",
                summary.live.arm_ms, summary.live.rearmed_pages
            );
        }
        println!(
            "  t0 pause {:.3} ms; saved in {:.1} ms ({} pages on a writer's fault, {} in the background)",
            summary.live.protect_ms, summary.live.snapshot_ms, summary.live.saved_on_fault, summary.live.saved_in_background
        );
        println!(
            "  writers meanwhile: {:.0} writes/s, longest stall {:.3} ms (arm walk {:.3}, t0 {:.3}, saving {:.3}; longest fault served in {:.0} us)",
            summary.live.writer_ops_per_s,
            summary.live.longest_stall_ms,
            summary.live.stall_ms_by_phase.arm,
            summary.live.stall_ms_by_phase.t0,
            summary.live.stall_ms_by_phase.saving,
            summary.live.longest_fault_us
        );
        if let Some(steal) = summary.live.host_steal_ms {
            println!(
                "  the hypervisor took {steal:.0} ms of this machine's CPU time meanwhile (steal)"
            );
        }
        println!(
            "  image: {} bytes of data in a sparse file of {} bytes",
            summary.live.image_data_bytes, len
        );
        let t = &summary.tracked.figures;
        println!(
            "  with write tracking (the base of the deltas): t0 pause {:.3} ms, saved in {:.1} ms, writers {:.0} writes/s, longest stall {:.3} ms, image {}",
            t.protect_ms,
            t.snapshot_ms,
            t.writer_ops_per_s,
            t.longest_stall_ms,
            if summary.tracked.consistent { "equals t0" } else { "DIFFERS from t0" }
        );
        for (i, r) in summary.rounds.iter().enumerate() {
            println!(
                "  delta {}: {} dirty bytes, file {} bytes, scan {:.3} ms, writers held {:.1} ms, base + deltas {}",
                i + 1,
                r.dirty_bytes,
                r.delta_bytes,
                r.scan_ms,
                r.pause_ms,
                if r.consistent { "equal memory" } else { "DIFFER from memory" }
            );
        }
        println!(
            "  tracker {}: first write to a tracked page {:.2} us; merged image {}",
            summary.tracker,
            summary.first_write_us,
            if summary.merged_consistent {
                "equals memory"
            } else {
                "DIFFERS from memory"
            }
        );
        if let Some(f) = &summary.fork {
            println!(
                "  fork() baseline: fork {:.3} ms, child done in {:.1} ms, writers {:.0} writes/s, longest stall {:.3} ms, image {}",
                f.pause_ms,
                f.total_ms,
                f.writer_ops_per_s,
                f.longest_stall_ms,
                if f.consistent { "equals t0" } else { "DIFFERS from t0" }
            );
        }
        let w = &summary.stop_the_world;
        println!(
            "  stop-the-world baseline: writers held {:.1} ms, image {}",
            w.pause_ms,
            if w.consistent {
                "equals t0"
            } else {
                "DIFFERS from t0"
            }
        );
        match summary.softdirty_scan_ms {
            Some(t) => println!(
                "  soft-dirty scan of the same memory: {t:.3} ms (PAGEMAP_SCAN: {:.3} ms)",
                summary.pagemap_scan_ms
            ),
            None => {
                println!("  soft-dirty: not available on this kernel (CONFIG_MEM_SOFT_DIRTY off)")
            }
        }
        if a.keep {
            println!(
                "  files kept: {}",
                files
                    .0
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
