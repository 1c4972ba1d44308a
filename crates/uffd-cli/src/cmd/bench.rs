//! `uffd bench`: the pager's strategies side by side with two baselines,
//! the kernel's own file-backed fault-in and a minimal "typical" handler,
//! all in one run on one snapshot file.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{
    CopyMode, Event, EventBuffer, Features, Mapping, MemoryKind, OpenOptions, Outcome, RegisterMode,
};
use uffd_pager::{
    AlignedAnon, FileMode, FileSource, PageSource, Pager, Prefetch, Region, Strategy, WaitMode,
};

use super::demo::{
    kernel_baseline, make_snapshot, open_uffd, prepare_target, touch, verify, Order, PhaseResult,
    Plan, ProgressLine, PLANS, SPIN,
};
use super::CmdResult;

/// Benchmark lazy restore strategies against the kernel and a typical handler.
///
/// Cases (each on a fresh mapping of the same snapshot file):
/// kernel-sequential / kernel-random (baseline: mmap MAP_PRIVATE of the file,
/// warm page cache), typical-sequential / typical-random (baseline: poll,
/// read one message, one 4 KiB UFFDIO_COPY, one thread), random-4k,
/// sequential-readahead, full-restore (background fill while random
/// touches run; time until every page is present), copy-2m and
/// move-vs-copy (UFFDIO_MOVE of 2 MiB huge pages from a recycled staging
/// buffer vs COPY of the same granules), copy-anon-64k and
/// minor-continue-shmem (content written through a shmem alias, mapped
/// with UFFDIO_CONTINUE, vs COPY into anonymous memory).
///
/// Ratios compare MB/s with the baseline of the same access order.
/// Measure on a quiet machine; numbers from one run are comparable only
/// with each other.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the snapshot and of each mapping, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=65536))]
    mib: u64,
    /// Percentage of zero pages in the snapshot.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Print `{"cases": [...]}` as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize, Clone)]
struct Case {
    name: String,
    mib: u64,
    seconds: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    ratio_vs_kernel: f64,
    ratio_vs_typical: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_vs_copy: Option<f64>,
    #[serde(skip)]
    order: Order,
}

fn case(name: &str, mib: u64, order: Order, p: &PhaseResult) -> Case {
    Case {
        name: name.to_string(),
        mib,
        seconds: p.seconds,
        mb_per_s: p.mb_per_s,
        p50_us: p.p50_us,
        p99_us: p.p99_us,
        ratio_vs_kernel: 0.0,
        ratio_vs_typical: 0.0,
        ratio_vs_copy: None,
        order,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A handler written like the common public examples: one thread, poll,
/// read one message, one 4 KiB UFFDIO_COPY from the mapped snapshot.
fn typical_handler(
    source: &Arc<FileSource>,
    len: u64,
    order: Order,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let uffd = Arc::new(OpenOptions::new().non_blocking(true).open()?);
    let target = AlignedAnon::new(len as usize)?;
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let base = target.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let uffd = Arc::clone(&uffd);
        let source = Arc::clone(source);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> Result<(), uffd::Error> {
            let mut one = EventBuffer::new(1);
            while !stop.load(Ordering::Relaxed) {
                if !uffd.wait_readable(Some(Duration::from_millis(50)))? {
                    continue;
                }
                for event in uffd.read_events(&mut one)?.drain(..) {
                    let Event::Pagefault(fault) = event else {
                        continue;
                    };
                    let page = fault.page(4096);
                    let src = source
                        .mapped(page - base, 4096)
                        .expect("the snapshot is mapped")
                        .as_ptr();
                    // SAFETY: `src` is 4 KiB of the read-only snapshot
                    // mapping; `page` is registered memory nobody references.
                    if unsafe { uffd.copy(page, src, 4096, CopyMode::empty())? }
                        == Outcome::AlreadyPresent
                    {
                        uffd.wake(page, 4096)?;
                    }
                }
            }
            Ok(())
        })
    };
    let pages = len / 4096;
    let label = format!("typical handler {}", order.name());
    let result = touch(target.as_ptr(), 0, pages, order, |n| {
        progress.update(&label, n, pages)
    });
    stop.store(true, Ordering::Relaxed);
    handler
        .join()
        .map_err(|_| "the typical handler panicked")??;
    let bad = verify(&target, source, len);
    if bad != 0 {
        return Err(format!("typical handler: {bad} pages differ from the snapshot").into());
    }
    progress.done(&format!("{label:<32} {:>8.0} MB/s", result.mb_per_s));
    Ok(result)
}

/// Runs `plan` with `order` into anonymous memory, verifies it.
fn pager_anon(
    name: &str,
    plan: Plan,
    order: Order,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let uffd = open_uffd(plan.strategy)?;
    let target = AlignedAnon::new(len as usize)?;
    prepare_target(&target, plan.strategy)?;
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let start = Instant::now();
    let pager = Pager::builder(Arc::clone(source) as Arc<dyn PageSource>)
        .name(name)
        .strategy(plan.strategy)
        .granule(plan.granule)
        .prefetch(plan.prefetch)
        .background_fill(plan.fill)
        .wait(WaitMode::Spin(SPIN))
        .start(uffd, vec![Region::new(target.addr(), len, 0, 4096)])?;
    let pages = len / 4096;
    let mut result = touch(target.as_ptr(), 0, pages, order, |n| {
        progress.update(name, n, pages)
    });
    if plan.fill {
        // Full restore: done when every page is present.
        while pager.progress().installed_pages < pages
            && !pager.wait_filled(Duration::from_millis(20))
        {
            let p = pager.progress();
            progress.update(&format!("{name} fill"), p.installed_pages, p.total_pages);
        }
        result.seconds = start.elapsed().as_secs_f64();
        result.mb_per_s = len as f64 / 1e6 / result.seconds;
    }
    let stats = pager.shutdown();
    let bad = verify(&target, source, len);
    if bad != 0 {
        return Err(format!("{name}: {bad} pages differ from the snapshot").into());
    }
    progress.done(&format!(
        "{name:<32} {:>8.0} MB/s  ({} faults, {} prefetched)",
        result.mb_per_s, stats.faults_missing, stats.prefetched_pages
    ));
    Ok(result)
}

/// MINOR + CONTINUE on shmem: the pager writes each granule through the
/// alias and maps it.
fn pager_shmem_continue(
    name: &str,
    plan: Plan,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let uffd = OpenOptions::new()
        .non_blocking(true)
        .features(Features::MINOR_SHMEM | Features::EVENT_REMOVE)
        .open()?;
    let memory = Mapping::new(MemoryKind::Shmem, len as usize)?;
    let file = memory.file().ok_or("shmem has a file")?;
    // Every page in the page cache: each first access is a minor fault.
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)?;
    uffd.register(memory.addr(), len, RegisterMode::MINOR)?;
    let alias = memory.alias_ptr().ok_or("shmem has an alias")?;
    // SAFETY: the alias lives as long as `memory`, which outlives the pager
    // (shut down below), and nothing else references it meanwhile.
    let region = unsafe { Region::new(memory.addr(), len, 0, 4096).with_alias(alias) };
    let pager = Pager::builder(Arc::clone(source) as Arc<dyn PageSource>)
        .name(name)
        .strategy(Strategy::Continue)
        .granule(plan.granule)
        .prefetch(plan.prefetch)
        .wait(WaitMode::Spin(SPIN))
        .start(uffd, vec![region])?;
    let pages = len / 4096;
    let result = touch(memory.as_ptr(), 0, pages, Order::Sequential, |n| {
        progress.update(name, n, pages)
    });
    let stats = pager.shutdown();
    let mut bad = 0;
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        memory.read((p * 4096) as usize, &mut page);
        let mut want = [0u8; 4096];
        source.read_at(p * 4096, &mut want)?;
        if page != want {
            bad += 1;
        }
    }
    if bad != 0 {
        return Err(format!("{name}: {bad} pages differ from the snapshot").into());
    }
    progress.done(&format!(
        "{name:<32} {:>8.0} MB/s  ({} minor faults)",
        result.mb_per_s, stats.faults_minor
    ));
    Ok(result)
}

/// Runs the benchmark.
pub fn run(args: Args) -> CmdResult {
    if let Err(e) = uffd::probe() {
        return Err(format!("userfaultfd is not available: {e}").into());
    }
    let have_move = uffd::probe()?.features.contains(Features::MOVE);
    let progress = ProgressLine::new(false);
    let len = args.mib << 20;
    let snapshot = make_snapshot(&std::env::temp_dir(), len, args.zero_percent)?;
    progress.done(&format!(
        "snapshot: {} MiB at {}",
        args.mib,
        snapshot.path.display()
    ));
    let source = Arc::new(FileSource::open(&snapshot.path, FileMode::Mmap)?);
    // A restore server maps its snapshot once for all VMs: pay that here,
    // outside the timings.
    source.populate()?;
    let mib = args.mib;
    let plan = |name: &str| *PLANS.iter().find(|p| p.name == name).expect("known plan");

    let mut cases = Vec::new();
    let (ks, _) = kernel_baseline(
        &snapshot.path,
        len,
        (Order::Sequential, Order::Sequential),
        &progress,
    )?;
    let (_, kr) = kernel_baseline(
        &snapshot.path,
        len,
        (Order::Random, Order::Random),
        &progress,
    )?;
    let (kernel_seq, kernel_rand) = (ks, kr);
    progress.done(&format!(
        "{:<32} {:>8.0} MB/s sequential, {:.0} MB/s random (half the file each)",
        "kernel fault-in", kernel_seq.mb_per_s, kernel_rand.mb_per_s
    ));
    cases.push(case(
        "kernel-sequential",
        mib / 2,
        Order::Sequential,
        &kernel_seq,
    ));
    cases.push(case("kernel-random", mib / 2, Order::Random, &kernel_rand));

    let typical_seq = typical_handler(&source, len, Order::Sequential, &progress)?;
    cases.push(case(
        "typical-sequential",
        mib,
        Order::Sequential,
        &typical_seq,
    ));
    let typical_rand = typical_handler(&source, len, Order::Random, &progress)?;
    cases.push(case("typical-random", mib, Order::Random, &typical_rand));

    let r = pager_anon(
        "random-4k",
        plan("copy-4k"),
        Order::Random,
        &source,
        len,
        &progress,
    )?;
    cases.push(case("random-4k", mib, Order::Random, &r));
    let r = pager_anon(
        "sequential-readahead",
        plan("readahead"),
        Order::Sequential,
        &source,
        len,
        &progress,
    )?;
    let copy_anon_64k = r;
    cases.push(case("sequential-readahead", mib, Order::Sequential, &r));
    let r = pager_anon(
        "full-restore",
        plan("fill"),
        Order::Random,
        &source,
        len,
        &progress,
    )?;
    cases.push(case("full-restore", mib, Order::Random, &r));

    let copy_2m = Plan {
        name: "copy-2m",
        strategy: Strategy::Copy,
        granule: 2 << 20,
        prefetch: Prefetch::None,
        fill: false,
    };
    let copy = pager_anon(
        "copy-2m",
        copy_2m,
        Order::Sequential,
        &source,
        len,
        &progress,
    )?;
    cases.push(case("copy-2m", mib, Order::Sequential, &copy));
    if have_move {
        let mv = pager_anon(
            "move-vs-copy",
            plan("move-2m"),
            Order::Sequential,
            &source,
            len,
            &progress,
        )?;
        let mut c = case("move-vs-copy", mib, Order::Sequential, &mv);
        c.ratio_vs_copy = Some(mv.mb_per_s / copy.mb_per_s.max(1e-9));
        cases.push(c);
    } else {
        progress.done("move-vs-copy: skipped, this kernel has no UFFDIO_MOVE");
    }
    let minor = pager_shmem_continue(
        "minor-continue-shmem",
        plan("readahead"),
        &source,
        len,
        &progress,
    )?;
    let mut c = case("minor-continue-shmem", mib, Order::Sequential, &minor);
    c.ratio_vs_copy = Some(minor.mb_per_s / copy_anon_64k.mb_per_s.max(1e-9));
    cases.push(c);

    for c in &mut cases {
        let (k, t) = match c.order {
            Order::Sequential => (&kernel_seq, &typical_seq),
            Order::Random => (&kernel_rand, &typical_rand),
        };
        c.ratio_vs_kernel = c.mb_per_s / k.mb_per_s.max(1e-9);
        c.ratio_vs_typical = c.mb_per_s / t.mb_per_s.max(1e-9);
    }
    if args.json {
        println!("{}", serde_json::json!({ "cases": cases }));
    } else {
        println!(
            "{:<22} {:>6} {:>8} {:>9} {:>8} {:>8} {:>10} {:>11} {:>8}",
            "case",
            "MiB",
            "seconds",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "vs kernel",
            "vs typical",
            "vs copy"
        );
        for c in &cases {
            println!(
                "{:<22} {:>6} {:>8.3} {:>9.0} {:>8.2} {:>8.2} {:>9.2}x {:>10.2}x {:>8}",
                c.name,
                c.mib,
                c.seconds,
                c.mb_per_s,
                c.p50_us,
                c.p99_us,
                c.ratio_vs_kernel,
                c.ratio_vs_typical,
                c.ratio_vs_copy
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
