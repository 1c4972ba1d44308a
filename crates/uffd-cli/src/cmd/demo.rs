//! `uffd demo`: restore a synthetic memory snapshot lazily while a workload
//! touches it, verify every byte, and compare with the kernel's own
//! file-backed fault-in of the same file. Argument parsing and printing;
//! the restores live in `uffd_bench::demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use uffd_bench::demo::{self, Config, Report};
use uffd_bench::workload::{PhaseResult, ProgressLine};

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
/// Needs about --mib of disk in --dir (the snapshot file, removed at the
/// end) and twice --mib of memory while a restore runs (the page cache of
/// the file and the restored copy).
///
/// Output: a table with one row per strategy and phase: faults, seconds,
/// MB/s, the time one sampled touch took as the touching thread saw it
/// (p50/p90/p99/max, µs), and MB/s relative to the kernel's fault-in of the
/// same phase; then one line per strategy with the pager's counters and
/// the handler's own time per fault (from reading the fault to the page
/// installed). `--json` prints the same as one object; `--plot FILE.svg`
/// also draws the touch-time distributions and each restore's pages over
/// time.
///
/// Exit status: 0 when every byte matched, 1 on a mismatch or error.
/// SIGINT or SIGTERM remove its snapshot file and exit with 128 + the
/// signal (130, 143).
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
    #[command(flatten)]
    report: super::ReportArgs,
}

/// Runs the demo.
pub fn run(args: Args) -> CmdResult {
    super::require_userfaultfd("uffd demo")?;
    uffd_bench::leftovers::clean_up_on_interrupt("uffd demo")?;
    let progress = ProgressLine::new(false);
    let report = demo::run(
        &Config {
            mib: args.mib,
            strategies: args.strategy,
            threads: args.threads,
            zero_percent: args.zero_percent,
            dir: args.dir,
        },
        &progress,
    )?;
    if args.report.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    args.report.write_plot(
        || format!("uffd demo: lazy restore of {} MiB", report.mib),
        || demo::plot_panels(&report),
    )?;
    Ok(if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_table(r: &Report) {
    let pages = (r.mib << 20) / 4096;
    println!(
        "Lazy restore of a {} MiB snapshot ({} of {pages} pages zero, {:.1}%), {} handler thread(s); \
         first half touched sequentially, second half in random order.",
        r.mib,
        r.zero_pages,
        r.zero_pages as f64 * 100.0 / pages.max(1) as f64,
        r.threads
    );
    println!(
        "touch µs: time of one sampled touch as the touching thread saw it (fault, wait, install, wake). \
         vs kernel: MB/s over the kernel mapping the same file from a warm page cache, which needs \
         no copy: a restore into fresh private memory must allocate and fill every page, so it stays \
         below 1x; compare strategies with each other (and see `uffd bench` for a typical handler)."
    );
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10}",
        "strategy / phase",
        "faults",
        "seconds",
        "MB/s",
        "touch p50",
        "p90",
        "p99",
        "max",
        "vs kernel"
    );
    let row = |name: String, faults: String, p: &PhaseResult, kernel: &PhaseResult| {
        println!(
            "{:<22} {:>8} {:>9.3} {:>9.0} {:>9.2} {:>8.2} {:>8.2} {:>9.1} {:>9.2}x",
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
             handler time per fault (read to installed) p50 {:.1} µs p99 {:.1} µs; verify: {}",
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
