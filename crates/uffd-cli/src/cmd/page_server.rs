//! `uffd page-server`: serve one memory image over TCP to destinations
//! restoring it post-copy (`uffd serve --source tcp://HOST:PORT`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use uffd_pager::{FileMode, FileSource, PageSource};
use uffd_remote::{image_identity, PageServer, PageServerConfig, PageServerHandle};

use super::CmdResult;

/// Serve a memory image over TCP for post-copy restores on other hosts.
///
/// Each destination (`uffd serve --source tcp://HOST:PORT` on the host the
/// VM moves to) opens two connections: a demand channel for the pages its
/// vCPUs fault on, answered at once and never queued behind anything, and
/// a bulk channel for its background reads (--prefetch, --background-fill)
/// and, with --push, every page of the image streamed unasked, starting
/// after the latest demand fault. Any number of destinations, each as many
/// times as it likes; a destination that loses its connection reconnects
/// (to this server, or one restarted on the same address with the same
/// file) without losing a page.
///
/// Output: log lines on stderr: where it listens (`serving FILE (N bytes)
/// on HOST:PORT`), each destination attached and gone with what it took;
/// --stats-json writes those figures as JSON at exit.
///
/// Exit status: 0 after SIGTERM or SIGINT, 1 when it cannot serve (the
/// file, the address), 2 for bad arguments.
///
/// Example (source host, then destination host):
///   uffd page-server --mem-file vm.mem --listen 0.0.0.0:7000 --push
///   uffd serve --source tcp://source-host:7000 --socket /run/vm.sock
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// The memory image (a Firecracker snapshot's memory file).
    #[arg(long, value_name = "PATH", required = true)]
    mem_file: Option<PathBuf>,
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the log
    /// says which).
    #[arg(long, value_name = "HOST:PORT", required = true)]
    listen: Option<String>,
    /// Push every page to each destination in the background.
    #[arg(long)]
    push: bool,
    /// Compress data frames (LZ4) where that shrinks them by an eighth or
    /// more: for links slower than about 1 GB/s; on loopback or 10 GbE it
    /// only costs CPU.
    #[arg(long)]
    compress: bool,
    /// Write each destination's figures here as JSON at exit.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Bench(BenchArgs),
}

/// Measure post-copy over an emulated network link.
///
/// The page server is `uffd page-server` in a process of its own; the
/// destination (this process) reaches it through a user-space link
/// emulator that adds a one-way delay per direction (the kernel here has
/// no netem) and holds what a network would in flight: 4 MiB, or a 10 GbE
/// link's bandwidth-delay product where that is more. Per delay: demand-fault
/// latency on an idle link, the same while the server pushes the whole
/// image, the same with the naive one-connection design (faults queued
/// behind the push) as the baseline, the push's throughput against a raw
/// TCP copy of as many bytes over the same link (received into a reused
/// buffer, and again into fresh memory, which is what keeping the bytes
/// costs), a VM's demand faults end to end (`uffd serve --source tcp://`
/// restoring uffd-standin-vmm over the same link, each in a process of
/// its own: the VM touches --samples random pages from one vCPU and times
/// each, and the server's context switches per fault are counted), and
/// the time from connecting to the first page for a 256 MiB
/// and a 4 GiB image, for this process and for a VM (from the stand-in
/// VMM's start to its first touch done, through a running uffd serve).
///
/// Every delay runs once per round (--rounds), the order rotated. Each
/// figure is the median over the rounds; the goals' ratios (p99 under push
/// over p99 idle, push over raw TCP) are taken within each round, where
/// the two sides ran next to each other, and shown as median [min-max]:
/// a goal met "in every run" is one whose worst round meets it.
///
/// Both hosts run on this one: by default (--cpus shared) the page server,
/// the link emulator and the destination share every CPU, so the
/// source's and the link's work can hold up the destination's. --cpus
/// split puts the source side (page server, link emulator, the raw copy's
/// sender) on the first CPU this process may use and the destination
/// (its reading threads, the raw copy's receiver) on the second, as two
/// hosts would be, each with one CPU.
///
/// --link-mb-s N also holds each direction of every emulated connection
/// to N MB/s (10^6 bytes; 125 is 1 GbE), the push and the raw copy alike:
/// a network of that rate, which leaves the CPUs what an unlimited
/// loopback link takes from them.
///
/// Needs --mib of disk in --dir (and a sparse 4 GiB file, which takes none).
///
/// Output: a table, or with --json one object {"rounds", "cpus", "link_mb_s"
/// (null: unlimited), "loadavg_before",
/// "loadavg_after", "hiccups" ({"seconds", "cpus", "longest_us", "over_100us",
/// "over_1ms"}, or null with --hiccup-ms 0), "cases": [{"delay_ms", "demand_p50_us",
/// "demand_p99_idle_us", "demand_p99_push_us", "naive_p99_push_us",
/// "reads_under_push", "naive_reads_under_push" (reads timed while the
/// push ran: a short push leaves its p99 to few reads),
/// "bulk_mb_s", "raw_tcp_mb_s", "raw_tcp_to_memory_mb_s", "added_rtt_us",
/// "link_rtt_p50_us", "vm_fault_p50_us", "vm_fault_p99_us",
/// "vm_server_switches_per_fault" (medians), "p99_push_over_idle",
/// "bulk_over_raw_to_memory", "bulk_over_raw", "p50_over_link_rtt_us",
/// "vm_p50_over_link_rtt_us" ({"median", "min", "max"}), "rounds": [each round's figures]}],
/// "first_page": [{"image_mib", "first_page_ms", "vm_first_page_ms"}]}.
///
/// Exit status: 0 when every case ran, 1 on an error. SIGINT or SIGTERM
/// stop the servers and VMMs it started and remove its scratch files,
/// then exit with 128 + the signal (130, 143).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct BenchArgs {
    /// Image size for the latency and throughput cases, MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB", value_parser = clap::value_parser!(u64).range(8..=65536))]
    mib: u64,
    /// One-way delays to add, ms, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,5",
        value_name = "MS"
    )]
    delays_ms: Vec<u64>,
    /// Demand reads timed per case.
    #[arg(long, default_value_t = 400, value_name = "N")]
    samples: usize,
    /// Rounds; each measures every delay once.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Scratch directory (default: the system's temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Where the two sides run: sharing every CPU, or the source side and
    /// the destination on a CPU each (see above).
    #[arg(long, value_enum, default_value_t = CpusArg::Shared)]
    cpus: CpusArg,
    /// Before the first round, watch for this long how much CPU the
    /// machine itself takes from threads that only spin (kernel threads,
    /// interrupts, a VM's host), ms; 0 skips it. A stall no longer than
    /// what the machine takes anyway is not the program's.
    #[arg(long, default_value_t = 2000, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60000))]
    hiccup_ms: u64,
    /// Hold each direction of every emulated connection to this rate,
    /// MB/s (default: unlimited).
    #[arg(long, value_name = "MB_S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    link_mb_s: Option<u64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CpusArg {
    Shared,
    Split,
}

fn bench(a: BenchArgs) -> CmdResult {
    super::require_userfaultfd("uffd page-server bench (its VM case)")?;
    uffd_bench::leftovers::clean_up_on_interrupt("uffd page-server bench")?;
    let uffd_bin = std::env::current_exe()?;
    let report = uffd_bench::remote::run(
        &uffd_bench::remote::Config {
            mib: a.mib,
            delays_ms: a.delays_ms,
            samples: a.samples.max(10),
            rounds: a.rounds as usize,
            uffd_bin: uffd_bin.clone(),
            vmm_bin: uffd_bin.with_file_name("uffd-standin-vmm"),
            dir: a.dir,
            cpus: match a.cpus {
                CpusArg::Shared => uffd_bench::remote::Cpus::Shared,
                CpusArg::Split => uffd_bench::remote::Cpus::Split,
            },
            hiccup_ms: a.hiccup_ms,
            link_mb_s: a.link_mb_s,
        },
        |what| eprintln!("uffd page-server bench: {what}"),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "medians over {} rounds, CPUs {}, link {} (load {:.2} before, {:.2} after)",
        report.rounds,
        match report.cpus {
            uffd_bench::remote::Cpus::Shared => "shared",
            uffd_bench::remote::Cpus::Split => "split between the source side and the destination",
        },
        match report.link_mb_s {
            Some(mb_s) => format!("{mb_s} MB/s each way"),
            None => "unlimited".to_string(),
        },
        report.loadavg_before.one,
        report.loadavg_after.one
    );
    if let Some(h) = report.hiccups {
        println!("{h}");
    }
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>14} {:>15} {:>10} {:>10} {:>13}",
        "delay ms",
        "link RTT",
        "demand p50",
        "p99 idle",
        "p99 under push",
        "naive p99 push",
        "push MB/s",
        "raw MB/s",
        "raw to memory"
    );
    for c in report.cases.iter().map(|c| &c.median) {
        println!(
            "{:>8} {:>8.0}µs {:>10.0}µs {:>10.0}µs {:>12.0}µs {:>13.0}µs {:>10.0} {:>10.0} {:>13.0}",
            c.delay_ms,
            c.link_rtt_p50_us,
            c.demand_p50_us,
            c.demand_p99_idle_us,
            c.demand_p99_push_us,
            c.naive_p99_push_us,
            c.bulk_mb_s,
            c.raw_tcp_mb_s,
            c.raw_tcp_to_memory_mb_s
        );
    }
    println!("per round, median [min-max]:");
    let range = |s: &uffd_bench::report::Spread, digits: usize| {
        format!("{:.d$} [{:.d$}-{:.d$}]", s.median, s.min, s.max, d = digits)
    };
    for c in &report.cases {
        println!(
            "{:>8} p99 push/idle {} (of {:.0} reads)  push/raw to memory {}  push/raw {}  p50 - link RTT {} µs",
            c.median.delay_ms,
            range(&c.p99_push_over_idle, 2),
            c.median.reads_under_push,
            range(&c.bulk_over_raw_to_memory, 2),
            range(&c.bulk_over_raw, 2),
            range(&c.p50_over_link_rtt_us, 0)
        );
    }
    println!("a VM's faults through uffd serve, each in a process of its own, idle link:");
    for c in &report.cases {
        println!(
            "{:>8} p50 {:.0} µs, p99 {:.0} µs, p50 - link RTT {} µs, {:.2} server context switches a fault",
            c.median.delay_ms,
            c.median.vm_fault_p50_us,
            c.median.vm_fault_p99_us,
            range(&c.vm_p50_over_link_rtt_us, 0),
            c.median.vm_server_switches_per_fault
        );
    }
    for f in &report.first_page {
        println!(
            "first page of a {} MiB image: {:.1} ms; a VM's, from its start: {:.1} ms",
            f.image_mib, f.first_page_ms, f.vm_first_page_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the page server, or its bench.
pub fn run(args: Args) -> CmdResult {
    if let Some(Action::Bench(b)) = args.action {
        return bench(b);
    }
    let mem_file = args.mem_file.ok_or("--mem-file PATH is required")?;
    let listen = args.listen.ok_or("--listen HOST:PORT is required")?;
    serve(
        &mem_file,
        &listen,
        args.push,
        args.compress,
        args.stats_json.as_deref(),
    )
}

fn serve(
    mem_file: &std::path::Path,
    listen: &str,
    push: bool,
    compress: bool,
    stats_json: Option<&std::path::Path>,
) -> CmdResult {
    let _logs = super::serve::init_logs(false);
    let file = std::fs::File::open(mem_file).map_err(|e| format!("{}: {e}", mem_file.display()))?;
    let identity = image_identity(&file)?;
    let source = FileSource::open(mem_file, FileMode::Pread)
        .map_err(|e| format!("{}: {e}", mem_file.display()))?;
    if source.is_empty() {
        return Err(format!(
            "{} is empty: there is no memory to serve",
            mem_file.display()
        )
        .into());
    }
    let len = source.len();
    let source: Arc<dyn PageSource> = Arc::new(source);
    // Caught from before the address is announced: whoever signals the
    // server once it has said where it listens gets a clean stop (exit 0).
    // Before that nothing is held and the signal ends it as it would.
    let running = Arc::new(std::sync::Mutex::new(None::<PageServerHandle>));
    {
        let running = running.clone();
        uffd_bench::leftovers::on_stop_signal("uffd-page-server-signals", move |signo| {
            let running = running.lock().unwrap_or_else(|e| e.into_inner());
            let Some(handle) = running.as_ref() else {
                std::process::exit(128 + signo);
            };
            // Through the log (which never blocks), not stderr itself: a
            // full stderr pipe must not keep the server from stopping.
            tracing::info!("stopping on a signal");
            handle.stop();
        })?;
    }
    let server = PageServer::bind(
        listen,
        source,
        identity,
        PageServerConfig {
            push,
            compress,
            ..PageServerConfig::default()
        },
    )
    .map_err(|e| format!("listening on {}: {e}", listen))?;
    *running.lock().unwrap_or_else(|e| e.into_inner()) = Some(server.handle());
    super::serve::note(format_args!(
        "uffd page-server: serving {} ({len} bytes) on {}{}",
        mem_file.display(),
        server.local_addr()?,
        if push { ", pushing every page" } else { "" }
    ));
    let stats = server.run()?;
    if let Some(path) = stats_json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "destinations": stats }))?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
