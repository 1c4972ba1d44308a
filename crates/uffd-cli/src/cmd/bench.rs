//! `uffd bench`: argument parsing and printing; the cases live in
//! `uffd_bench::pager`.

use std::process::ExitCode;

use uffd_bench::pager::{self, Config};
use uffd_bench::workload::ProgressLine;

use super::CmdResult;

/// Benchmark lazy restore strategies against the kernel and a typical
/// handler, IN THIS PROCESS (a second opinion: `uffd serve bench` measures
/// with the VMM in another process, as in production).
///
/// Cases (each on a fresh mapping of the same snapshot file):
/// kernel-sequential / kernel-random (baseline: mmap MAP_PRIVATE of the file,
/// warm page cache), kernel-anon-first-write (reference: the kernel
/// allocating and zeroing fresh anonymous pages, one write per page, no
/// userfaultfd: the floor under any restore into private anonymous memory),
/// typical-sequential / typical-random (baseline: the Firecracker-example
/// style handler, one thread, poll, read one message, one 4 KiB
/// UFFDIO_COPY, a wake after EEXIST), random-4k,
/// random-4k-sigbus (no handler thread: the faulting thread gets SIGBUS
/// and copies its own 4 KiB page in the signal handler, so it never sleeps
/// and is never woken; memory of this process only), sequential-readahead
/// (COPY into anonymous memory, 64 KiB granules plus an adaptive window up
/// to 2 MiB), sequential-continue-tmpfs (zero-copy: the snapshot already
/// sits in the page cache of a memfd, as it would on tmpfs; the target is
/// a shared mapping of that memfd registered MINOR and each window is mapped
/// with UFFDIO_CONTINUE, nothing copied; the counterpart of the kernel
/// baseline's warm page cache, but the restored memory is then the tmpfs
/// file itself, shared, not a private anonymous copy), full-restore (background fill while random
/// touches run; time until every page is present), copy-2m and
/// move-2m-fresh-vs-copy (UFFDIO_MOVE of 2 MiB huge pages from a staging
/// buffer that each move empties, so every fault allocates fresh pages, vs
/// COPY of the same granules), minor-continue-shmem (content written
/// through a shmem alias, mapped with UFFDIO_CONTINUE; ratio_vs_copy
/// against sequential-readahead's COPY into anonymous memory).
///
/// Pages that come and go (a region evicted and restored again, measured
/// over one steady-state cycle of install plus eviction, verified):
/// copy-recycled-fill (UFFDIO_COPY in 64 KiB runs, evicted with
/// MADV_DONTNEED: every cycle allocates and frees every page),
/// move-vs-copy (the recycled MOVE design: the content is written into a
/// staging page and UFFDIO_MOVEd in, eviction MOVEs every page back into
/// the staging pool, so no page is allocated or freed in steady state;
/// ratio_vs_copy against copy-recycled-fill), move-populated-fill (as
/// move-vs-copy, but evicted with MADV_DONTNEED and the pool refilled with
/// MADV_POPULATE_WRITE), and the same three with a handler thread serving
/// 4 KiB faults in random order on an eighth of the file
/// (copy-recycled-faults, move-recycled-faults, move-populated-faults).
///
/// Ratios compare MB/s with the baseline of the same access order.
/// Measure on a quiet machine; numbers from one run are comparable only
/// with each other. Needs --mib of disk in the temp dir and about three
/// times --mib of memory.
///
/// Output: one row per case: MiB, seconds, MB/s, the time of one sampled
/// touch as the touching thread saw it (touch p50/p99, µs; blank for cases
/// with no timed touch), and MB/s over the kernel, over the typical handler
/// and over COPY (where the case has a COPY counterpart), each the median
/// over the rounds. `--json` prints `{"cases": [...]}` with the same
/// fields; `--plot FILE.svg` also draws each case's touch-time
/// distribution, one panel per access order.
///
/// Exit status: 0 when every case ran and verified, 1 on an error (a case
/// that served a wrong byte is an error). SIGINT or SIGTERM remove its
/// snapshot file and exit with 128 + the signal (130, 143).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the snapshot and of each mapping, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=65536))]
    mib: u64,
    /// Percentage of zero pages in the snapshot.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Rounds of every case, interleaved; each figure is the median over
    /// the rounds (ratios: the median of each round's own ratio).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    #[command(flatten)]
    report: super::ReportArgs,
}

/// Runs the benchmark.
pub fn run(args: Args) -> CmdResult {
    super::require_userfaultfd("uffd bench")?;
    uffd_bench::leftovers::clean_up_on_interrupt("uffd bench")?;
    let progress = ProgressLine::new(false);
    progress.done("uffd bench: in-process (this process's own memory; see `uffd serve bench` for a VMM in another process)");
    let cases = pager::run(
        &Config {
            mib: args.mib,
            zero_percent: args.zero_percent,
            rounds: args.rounds,
        },
        &progress,
    )?;
    if args.report.json {
        println!("{}", serde_json::json!({ "cases": cases }));
    } else {
        println!(
            "{:<26} {:>6} {:>8} {:>9} {:>9} {:>8} {:>10} {:>11} {:>8}",
            "case",
            "MiB",
            "seconds",
            "MB/s",
            "touch p50",
            "p99",
            "vs kernel",
            "vs typical",
            "vs copy"
        );
        for c in &cases {
            println!(
                "{:<26} {:>6} {:>8.3} {:>9.0} {:>9.2} {:>8.2} {:>9.2}x {:>10.2}x {:>8}",
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
    args.report.write_plot(
        || format!("uffd bench (in this process): {} MiB", args.mib),
        || pager::plot_panels(&cases),
    )?;
    Ok(ExitCode::SUCCESS)
}
