//! `uffd compact demo` and `uffd compact bench`: concurrent heap compaction
//! with userfaultfd, on a demo heap of linked objects.

use std::process::ExitCode;

use uffd_bench::compact::{self, BenchConfig, Cycle, CycleConfig, Stat};
use uffd_compact::Mode;

use super::CmdResult;

/// Compact a heap while mutator threads keep using it, the way Android's
/// runtime does with userfaultfd.
///
/// The heap is a graph of 64-byte objects linked by address (16384 per
/// MiB), 30-70% of each page garbage. Mutator threads walk it from roots
/// and move value between objects the whole time. The collector marks the
/// live objects, pauses the mutators only to point the roots at the new
/// addresses and flip the heap to a from-space (one mremap), then compacts
/// it in place while they run: a background thread fills to-space pages in
/// order, and a mutator touching a page not done yet has it compacted on
/// demand by the fault handler (each page exactly once, whoever is first).
///
/// Modes: copy (UFFDIO_COPY from a per-thread buffer), move (UFFDIO_MOVE
/// of from-space pages recycled once nothing live is left in them), minor
/// (a shmem heap: pages written through an alias of the next memfd,
/// mapped with UFFDIO_CONTINUE), stw (the same compaction with the
/// mutators paused throughout; needs no userfaultfd).
///
/// Runs unprivileged: the heap is this process's memory touched from user
/// space, so a user-mode-only userfaultfd is enough.
///
/// Examples:
///   uffd compact demo --mib 64 --mode move
///   uffd compact demo --mode minor --threads 4 --json
///   uffd compact bench --mib 256 --rounds 3
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Demo(DemoArgs),
    Bench(BenchArgs),
}

/// Build a heap, collect it once with mutators running, and verify it.
///
/// Output: the checksum of the live graph before and after (its shape, the
/// sum of the values mutators move around, and their touch counters: no
/// write may be lost or doubled), compaction wall time, the pause, mutator
/// stalls (accesses that waited for a page to be compacted: p50, p99, max;
/// for stw each mutator's wait at the pause), mutator throughput during
/// compaction beside the undisturbed one, and how pages were installed.
/// --json prints one object with the same figures (mode, checksum_ok,
/// compaction_ms, max_stall_us, p99_stall_us, mutator_ops_per_s, ...).
///
/// Exit status: 0 when the checksum matches, 1 when it does not or the
/// compaction failed, 2 when userfaultfd is denied here (the message says
/// how to allow it; --mode stw needs no userfaultfd).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct DemoArgs {
    /// Heap size in MiB (64 MiB is about a million objects).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    mib: usize,
    /// copy, move, minor or stw.
    #[arg(long, default_value = "move", value_name = "MODE")]
    mode: Mode,
    /// Mutator threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    threads: usize,
    /// Background compacting threads.
    #[arg(long, default_value_t = 1, value_name = "N")]
    gc_threads: usize,
    /// Fault handler: microseconds to keep reading before sleeping in poll
    /// (lower fault latency for CPU; 0 = sleep at once).
    #[arg(long, default_value_t = 0, value_name = "US")]
    spin_us: u64,
    /// Nice value (0-19) of the background compacting threads: higher lets
    /// the fault handler and mutators win the CPU (shorter stalls, longer
    /// compaction).
    #[arg(long, default_value_t = 0, value_name = "N")]
    nice: i32,
    /// Run the fault handler SCHED_FIFO (needs CAP_SYS_NICE; the output
    /// says whether it was granted).
    #[arg(long)]
    realtime: bool,
    /// copy, move and minor: a faulting mutator compacts its page itself
    /// in a SIGBUS handler (no handler thread, no wake-up), as ART does.
    #[arg(long)]
    sigbus: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Run every mode on the same heap size, in interleaved rounds, and report
/// median and min/max per mode.
///
/// Measures compaction wall time, the longest mutator stall, p50/p99 of
/// accesses that waited for compaction, mutator throughput during
/// compaction, and compactor throughput (live pages per second of
/// compacting-thread CPU time), with MOVE's throughput over COPY's. Prints
/// /proc/loadavg before and after: on a shared machine read the ratios.
/// First it watches how long the machine itself takes a CPU from a thread
/// that only spins (--hiccup-ms): on a VM that can be milliseconds, and a
/// stall no longer than that is the machine's, not the collector's.
///
/// Output: a table per mode (median, min and max of each figure over the
/// rounds), the load average and the machine's hiccups; `--json` prints
/// one object with the same ("hiccups": {"seconds", "cpus", "longest_us",
/// "over_100us", "over_1ms"}, or null with --hiccup-ms 0).
///
/// Exit status: 0 when every checksum matched, 1 otherwise, 2 when
/// userfaultfd is denied.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct BenchArgs {
    /// Heap size in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mib: usize,
    /// Rounds (each runs every mode once, order rotated).
    #[arg(long, default_value_t = 3, value_name = "N")]
    rounds: usize,
    /// Mutator threads.
    #[arg(long, default_value_t = 2, value_name = "N")]
    threads: usize,
    /// Background compacting threads.
    #[arg(long, default_value_t = 1, value_name = "N")]
    gc_threads: usize,
    /// Modes to run, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "copy,move,minor,stw",
        value_name = "MODES"
    )]
    modes: Vec<Mode>,
    /// Nice value (0-19) of the background compacting threads.
    #[arg(long, default_value_t = 0, value_name = "N")]
    nice: i32,
    /// Run the fault handler SCHED_FIFO (needs CAP_SYS_NICE).
    #[arg(long)]
    realtime: bool,
    /// copy, move and minor: faulting mutators compact their pages
    /// themselves in a SIGBUS handler.
    #[arg(long)]
    sigbus: bool,
    /// Before the first round, watch for this long how much CPU the
    /// machine itself takes from threads that only spin (kernel threads,
    /// interrupts, a VM's host), ms; 0 skips it. A stall no longer than
    /// what the machine takes anyway is not the program's.
    #[arg(long, default_value_t = 2000, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60000))]
    hiccup_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `uffd compact`.
pub fn run(args: Args) -> CmdResult {
    match args.action {
        Action::Demo(a) => demo(a),
        Action::Bench(a) => bench(a),
    }
}

fn denied_or(e: uffd_compact::CompactError) -> CmdResult {
    if e.is_denied() {
        eprintln!("uffd compact: {e}");
        Ok(ExitCode::from(2))
    } else {
        Err(e.into())
    }
}

fn demo(a: DemoArgs) -> CmdResult {
    let mut cfg = CycleConfig::new(a.mode, a.mib.max(1));
    cfg.mutators = a.threads;
    cfg.gc_threads = a.gc_threads.max(1);
    cfg.spin = std::time::Duration::from_micros(a.spin_us);
    cfg.background_nice = a.nice;
    cfg.realtime_handler = a.realtime;
    cfg.sigbus = a.sigbus;
    let c = match compact::run_cycle(&cfg) {
        Ok(c) => c,
        Err(e) => return denied_or(e),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print_cycle(&c);
    }
    Ok(if c.checksum_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_cycle(c: &Cycle) {
    println!(
        "{} MiB heap, {} objects, {} live; mode {}; {} mutator(s), {} compacting thread(s)",
        c.mib, c.nodes, c.live, c.mode, c.mutators, c.gc_threads
    );
    println!(
        "checksum   before {}  after {}  {}",
        c.checksum_before,
        c.checksum_after,
        if c.checksum_ok { "OK" } else { "MISMATCH" }
    );
    println!(
        "compaction {:.1} ms (pause {:.0} us, of which the flip {:.0} us); marking before it {:.1} ms",
        c.compaction_ms, c.pause_us, c.flip_us, c.mark_ms
    );
    println!(
        "stalls     {} counted: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        c.stalls, c.p50_stall_us, c.p99_stall_us, c.max_stall_us
    );
    println!(
        "mutators   {:.0} ops/s during compaction ({:.0} ops/s before)",
        c.mutator_ops_per_s, c.idle_ops_per_s
    );
    println!(
        "pages      {} copied, {} moved, {} continued, {} written, {} zero; {} on demand \
         (handler p50 {:.1} us, p99 {:.1} us)",
        c.copied,
        c.moved,
        c.continued,
        c.written,
        c.zeroed,
        c.on_demand_pages,
        c.on_demand_p50_us,
        c.on_demand_p99_us
    );
    println!(
        "compactor  {:.1} ms CPU, {:.0} pages per CPU second, install {:.0} ns/page",
        c.compactor_cpu_ms, c.compactor_pages_per_cpu_s, c.install_ns_per_page
    );
    if c.sigbus {
        println!("faults     SIGBUS path: each faulting mutator compacted its page itself");
    } else if c.realtime_handler {
        println!("handler    SCHED_FIFO");
    }
    println!("loadavg    {} (the machine may be shared)", c.loadavg);
}

fn bench(a: BenchArgs) -> CmdResult {
    let mut cfg = BenchConfig::new(a.mib.max(1), a.rounds);
    cfg.modes = a.modes;
    cfg.mutators = a.threads;
    cfg.gc_threads = a.gc_threads.max(1);
    cfg.background_nice = a.nice;
    cfg.realtime_handler = a.realtime;
    cfg.sigbus = a.sigbus;
    cfg.hiccup_ms = a.hiccup_ms;
    let quiet = a.json;
    let result = compact::run(&cfg, |c| {
        if !quiet {
            eprintln!(
                "  {:<5} {:>8.1} ms  max stall {:>9.1} us  p99 {:>7.1} us  checksum {}",
                c.mode,
                c.compaction_ms,
                c.max_stall_us,
                c.p99_stall_us,
                if c.checksum_ok { "ok" } else { "MISMATCH" }
            )
        }
    });
    let r = match result {
        Ok(r) => r,
        Err(e) => return denied_or(e),
    };
    let ok = r.modes.iter().all(|m| m.checksum_ok);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} MiB heap, {} round(s), {} mutator(s), {} compacting thread(s) (nice {}), handler {}; \
             loadavg {} -> {}",
            r.mib,
            r.rounds,
            r.mutators,
            r.gc_threads,
            r.background_nice,
            if r.sigbus {
                "SIGBUS path (copy, move)"
            } else if r.realtime_handler {
                "SCHED_FIFO"
            } else {
                "normal"
            },
            r.loadavg_before,
            r.loadavg_after
        );
        if let Some(h) = r.hiccups {
            println!("{h}");
        }
        println!("median [min, max] over rounds");
        println!(
            "{:<6}  {:>24}  {:>28}  {:>28}  {:>26}  {:>26}  checksum",
            "mode",
            "compaction ms",
            "max stall us",
            "p99 stall us",
            "mutator ops/s",
            "compactor pages/CPU s"
        );
        let f = |s: Stat| format!("{:.1} [{:.1}, {:.1}]", s.median, s.min, s.max);
        for m in &r.modes {
            println!(
                "{:<6}  {:>24}  {:>28}  {:>28}  {:>26}  {:>26}  {}",
                m.mode,
                f(m.compaction_ms),
                f(m.max_stall_us),
                f(m.p99_stall_us),
                format!(
                    "{:.0} [{:.0}, {:.0}]",
                    m.mutator_ops_per_s.median, m.mutator_ops_per_s.min, m.mutator_ops_per_s.max
                ),
                format!(
                    "{:.0} [{:.0}, {:.0}]",
                    m.compactor_pages_per_cpu_s.median,
                    m.compactor_pages_per_cpu_s.min,
                    m.compactor_pages_per_cpu_s.max
                ),
                if m.checksum_ok { "ok" } else { "MISMATCH" }
            );
        }
        if let Some(s) = r.move_over_copy {
            println!("MOVE / COPY compactor throughput: {}", f(s));
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
