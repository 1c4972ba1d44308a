//! `uffd selftest`: the kernel's userfaultfd selftests, re-expressed on
//! the uffd crate, plus this project's regression cases.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;
use uffd::MemoryKind;
use uffd_selftest::{CaseReport, Plan, StressConfig, Summary};

use super::CmdResult;

/// Run the kernel's userfaultfd selftests on this machine.
///
/// Runs every case of the kernel's uffd-unit-tests (the API handshake via
/// the syscall and /dev/userfaultfd, register-ioctls, zeropage, move*,
/// wp-fork*, wp-unpopulated, minor*, sigbus*, events*, poison,
/// mmap-changing) on the kernel's 32 MiB areas, uffd-wp-mremap's matrix
/// (every mTHP and hugetlb size, private and shared, with and without
/// swap-out), WP_ASYNC with PAGEMAP_SCAN, this project's own cases and a
/// short stress bounce, on each memory type where the kernel defines the
/// case. A case whose kernel feature is missing is SKIPped with the reason.
///
/// Output: one line per case, `PASS|FAIL|SKIP <name>/<mem> (<reason>)`,
/// then `N passed, M failed, K skipped`. Exit status 1 if any case failed.
/// A FAIL's reason ends with the command that replays it.
///
/// Hugetlb cases need free 2 MiB huge pages (and one 1 GiB page for
/// wp-mremap-hugetlb-1g): as root the pool is grown for the run and
/// restored afterwards; otherwise they are SKIPped. Likewise, as root the
/// wp-mremap THP cases enable their size in
/// /sys/kernel/mm/transparent_hugepage while they allocate, and the
/// swap-out cases add a swap file in the temporary directory when the
/// system has no swap; both are restored, also on failure.
///
/// `--stress` runs only the kernel's uffd-stress bounce, e.g.
/// `uffd selftest --stress --mem anon --mib 64 --bounces 16`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only cases whose name contains PATTERN (e.g. `minor`, `wp-fork`).
    #[arg(long, value_name = "PATTERN")]
    filter: Option<String>,

    /// Memory types, comma separated: anon, shmem, shmem-private, hugetlb,
    /// hugetlb-private (default: all).
    #[arg(long, value_name = "TYPES", value_delimiter = ',', value_parser = parse_kind)]
    mem: Vec<MemoryKind>,

    /// Print one JSON object: {"cases": [{"name", "mem", "status",
    /// "reason", "ms"}], "passed", "failed", "skipped"}.
    #[arg(long)]
    json: bool,

    /// Seed of the random choices (page order in the stress bounce); a
    /// FAIL prints the seed to replay it.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Run only the stress bounce (uffd-stress), with --mib and --bounces.
    #[arg(long)]
    stress: bool,

    /// Size of each area in MiB: the two areas of the unit cases (default
    /// 32, the kernel's size for every memory type) and the stress areas
    /// (default 4, or 16 for hugetlb).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=65536))]
    mib: Option<u64>,

    /// Number of stress bounces; 16 cover every mode combination.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    bounces: u32,

    /// List the selected cases, their memory types and what each checks;
    /// run nothing.
    #[arg(long)]
    list: bool,
}

fn parse_kind(s: &str) -> Result<MemoryKind, String> {
    s.parse()
}

#[derive(Serialize)]
struct JsonReport<'a> {
    cases: &'a [CaseReport],
    passed: usize,
    failed: usize,
    skipped: usize,
}

/// Runs the selftests.
pub fn run(args: Args) -> CmdResult {
    let plan = Plan {
        filter: args.filter.clone(),
        kinds: if args.mem.is_empty() {
            MemoryKind::ALL.to_vec()
        } else {
            args.mem.clone()
        },
        seed: args.seed,
        mib: args.mib.map(|m| m as usize),
        stress: StressConfig {
            mib: args.mib.map(|m| m as usize),
            bounces: args.bounces,
            progress: args.stress,
        },
        stress_only: args.stress,
    };
    let selected = uffd_selftest::selected(&plan);
    if args.list {
        for (case, kind) in &selected {
            let label = format!(
                "{}/{}",
                case.name,
                kind.map_or(uffd_selftest::NO_KIND, MemoryKind::name)
            );
            println!("{label:<40} {}", case.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if selected.is_empty() {
        return Err(format!(
            "no case matches --filter {:?} on the memory types {:?} (try --list)",
            args.filter.unwrap_or_default(),
            plan.kinds.iter().map(|k| k.name()).collect::<Vec<_>>()
        )
        .into());
    }
    let total = selected.len();
    let mut reports = Vec::new();
    let mut done = 0;
    let summary: Summary = uffd_selftest::run(&plan, |r| {
        done += 1;
        if args.json {
            eprintln!("[{done}/{total}] {}", r.line());
        } else {
            // A closed pipe (e.g. `| head`) must not abort the run.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", r.line());
            let _ = out.flush();
        }
        reports.push(r.clone());
    });
    if args.json {
        let out = JsonReport {
            cases: &reports,
            passed: summary.passed,
            failed: summary.failed,
            skipped: summary.skipped,
        };
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&out)?);
    } else {
        let _ = writeln!(std::io::stdout(), "{}", summary.line());
    }
    Ok(if summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
