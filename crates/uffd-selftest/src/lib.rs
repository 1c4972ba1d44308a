//! The kernel's userfaultfd selftests, re-expressed on the [`uffd`] crate.
//!
//! Every case of `tools/testing/selftests/mm/uffd-unit-tests.c` (the API
//! handshake through both open paths, register-ioctls, zeropage, the move
//! family, the wp-fork family, wp-unpopulated, the minor family, sigbus,
//! events, poison, mmap-changing), `uffd-wp-mremap.c`'s 40-case matrix
//! (every mTHP and hugetlb size, private and shared, with and without
//! swap-out: see [`cases::mremap`]), the WP_ASYNC +
//! PAGEMAP_SCAN check of `pagemap_ioctl.c`, the stress bounce of
//! `uffd-stress.c`, and this project's own regression cases, each runnable
//! per memory type. A case checks first that the kernel feature it needs
//! exists and SKIPs with the reason otherwise.
//!
//! Memory types follow [`uffd::MemoryKind`]. One deliberate difference from
//! the kernel's tests: their "shmem-private" maps the memfd MAP_SHARED (it
//! is shmem under another name), while [`uffd::MemoryKind::ShmemPrivate`]
//! really is a MAP_PRIVATE mapping of a memfd. Where a case's kernel
//! behaviour differs on such a mapping, the case says so (see
//! [`cases`]); releasing its pages punches the file as well, so that no
//! page-cache page hides the next MISSING fault.
//!
//! Some cases change system-wide settings for their duration, as the
//! kernel's tests do: the hugetlb pools, the transparent huge page sizes
//! and swap. [`system`] holds the guards; each change is made under a
//! cross-process [`uffd::SettingLock`] and undone on drop, also when the
//! case fails or panics.
//!
//! ```no_run
//! use uffd_selftest::{run, Plan};
//! let summary = run(&Plan::default(), |r| println!("{}", r.line()));
//! println!("{}", summary.line());
//! ```

#![deny(unsafe_code)]

pub mod cases;
pub mod harness;
mod signals;
pub mod stress;
pub mod system;

use std::time::Instant;

use serde::Serialize;
use uffd::{HugepageReservation, MemoryKind};

pub use harness::{CaseResult, Env, Stop, StressConfig};

/// One case of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The case's name, as the kernel's tests name it where they have it.
    pub name: &'static str,
    /// The memory types the case is defined for; empty for the handshake
    /// cases, which are not about memory (reported as memory type `any`).
    pub kinds: &'static [MemoryKind],
    /// The case itself.
    pub run: fn(&Env) -> CaseResult,
    /// One line on what the case checks.
    pub about: &'static str,
}

/// The memory-type label of handshake cases.
pub const NO_KIND: &str = "any";

/// The verdict of one case on one memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// The case passed.
    Pass,
    /// The case found a fault.
    Fail,
    /// The case could not run here.
    Skip,
}

impl Status {
    /// `PASS`, `FAIL` or `SKIP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// The report of one case run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// The memory type, or `any`.
    pub mem: String,
    /// The verdict.
    pub status: Status,
    /// What was checked (PASS), what went wrong (FAIL) or what is missing (SKIP).
    pub reason: String,
    /// Wall-clock time of the case in milliseconds.
    pub ms: u64,
}

impl CaseReport {
    /// `PASS|FAIL|SKIP <name>/<mem> (<reason>)`.
    pub fn line(&self) -> String {
        if self.reason.is_empty() {
            format!("{} {}/{}", self.status.as_str(), self.name, self.mem)
        } else {
            format!(
                "{} {}/{} ({})",
                self.status.as_str(),
                self.name,
                self.mem,
                self.reason
            )
        }
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases that were skipped.
    pub skipped: usize,
}

impl Summary {
    /// Adds one report.
    pub fn add(&mut self, report: &CaseReport) {
        match report.status {
            Status::Pass => self.passed += 1,
            Status::Fail => self.failed += 1,
            Status::Skip => self.skipped += 1,
        }
    }

    /// `N passed, M failed, K skipped`.
    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Only cases whose name contains this substring.
    pub filter: Option<String>,
    /// Only these memory types (handshake cases always run).
    pub kinds: Vec<MemoryKind>,
    /// The seed of every random choice.
    pub seed: u64,
    /// The size of each unit-case area in MiB (`--mib`); `None` is the
    /// kernel's 32 MiB ([`harness::UNIT_AREA_MIB`]).
    pub mib: Option<usize>,
    /// The stress bounce's size.
    pub stress: StressConfig,
    /// Run only the stress case.
    pub stress_only: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            filter: None,
            kinds: MemoryKind::ALL.to_vec(),
            seed: 1,
            mib: None,
            stress: StressConfig::default(),
            stress_only: false,
        }
    }
}

/// The (case, memory type) pairs a plan selects, in run order: case by
/// case, memory types in the kernel's order.
pub fn selected(plan: &Plan) -> Vec<(Case, Option<MemoryKind>)> {
    let mut out = Vec::new();
    for case in cases::ALL {
        if plan.stress_only && case.name != "stress" {
            continue;
        }
        if let Some(filter) = &plan.filter {
            if !case.name.contains(filter.as_str()) {
                continue;
            }
        }
        if case.kinds.is_empty() {
            out.push((*case, None));
        }
        for kind in MemoryKind::ALL {
            if case.kinds.contains(&kind) && plan.kinds.contains(&kind) {
                out.push((*case, Some(kind)));
            }
        }
    }
    out
}

/// Huge pages a run of hugetlb cases needs: two areas, each a private
/// mapping plus its shared alias, of the larger of the unit and stress
/// sizes, and slack for forked children.
pub fn hugepages_needed(plan: &Plan) -> u64 {
    let unit = Env {
        kind: MemoryKind::Hugetlb,
        seed: 0,
        mib: plan.mib,
        stress: plan.stress,
    }
    .nr_pages();
    let pages = unit.max(plan.stress.pages(MemoryKind::Hugetlb)) as u64;
    4 * pages + 16
}

/// Makes sure enough huge pages are free for hugetlb cases, growing the
/// pool (restored when the value drops); `Err` is the SKIP reason.
pub fn reserve_hugepages(plan: &Plan) -> Result<HugepageReservation, String> {
    let needed = hugepages_needed(plan);
    HugepageReservation::reserve(needed)
        .map_err(|e| format!("cannot reserve {needed} huge pages of 2 MiB: {e}"))
}

static ONE_CASE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one case on one memory type with the plan's seed and sizes (with
/// no huge-page reservation of its own: see [`run_one`]). Panics inside
/// the case become FAILs.
pub fn run_case(case: &Case, kind: Option<MemoryKind>, plan: &Plan) -> CaseReport {
    let env = Env {
        kind: kind.unwrap_or(MemoryKind::Anon),
        seed: plan.seed,
        mib: plan.mib,
        stress: plan.stress,
    };
    // One case at a time per process: a fork by one case would hand its
    // child to another case's EVENT_FORK handler (and both would fail).
    let _alone = ONE_CASE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| (case.run)(&env)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(Stop::Fail(format!("panicked: {msg}")))
    });
    let ms = start.elapsed().as_millis() as u64;
    let (status, reason) = match result {
        Ok(note) => (Status::Pass, note),
        Err(Stop::Skip(why)) => (Status::Skip, why),
        Err(Stop::Fail(why)) => (Status::Fail, why),
    };
    CaseReport {
        name: case.name.to_string(),
        mem: kind.map_or(NO_KIND, MemoryKind::name).to_string(),
        status,
        reason,
        ms,
    }
}

/// Finds a case by name.
pub fn case(name: &str) -> Option<&'static Case> {
    cases::ALL.iter().find(|c| c.name == name)
}

/// Runs one case by name on one memory type, reserving huge pages first
/// when the memory type needs them (the entry point of the `cargo test`
/// wrappers). A failure's reason ends with the command that replays it.
pub fn run_one(name: &str, kind: Option<MemoryKind>, seed: u64) -> CaseReport {
    let case = case(name).unwrap_or_else(|| panic!("no case named {name}"));
    let plan = Plan {
        seed,
        ..Plan::default()
    };
    let _reservation = match kind {
        Some(k) if k.is_hugetlb() => match reserve_hugepages(&plan) {
            Ok(r) => Some(r),
            Err(why) => {
                return CaseReport {
                    name: name.into(),
                    mem: k.name().into(),
                    status: Status::Skip,
                    reason: why,
                    ms: 0,
                }
            }
        },
        _ => None,
    };
    let mut report = run_case(case, kind, &plan);
    if report.status == Status::Fail {
        report
            .reason
            .push_str(&format!("; reproduce: {}", reproduce(name, kind, seed)));
    }
    report
}

/// The command that replays one case.
pub fn reproduce(name: &str, kind: Option<MemoryKind>, seed: u64) -> String {
    match kind {
        Some(k) => format!("uffd selftest --filter {name} --mem {k} --seed {seed}"),
        None => format!("uffd selftest --filter {name} --seed {seed}"),
    }
}

/// Runs a plan, reporting each case as it finishes; reserves huge pages
/// once for all hugetlb cases (SKIPping them with the reason if that fails)
/// and gives them back at the end.
pub fn run(plan: &Plan, mut report: impl FnMut(&CaseReport)) -> Summary {
    let selected = selected(plan);
    let wants_huge = selected
        .iter()
        .any(|(_, k)| k.is_some_and(MemoryKind::is_hugetlb));
    let reservation = wants_huge.then(|| reserve_hugepages(plan));
    let mut summary = Summary::default();
    for (case, kind) in selected {
        let r = match (&reservation, kind) {
            (Some(Err(why)), Some(k)) if k.is_hugetlb() => CaseReport {
                name: case.name.into(),
                mem: k.name().into(),
                status: Status::Skip,
                reason: why.clone(),
                ms: 0,
            },
            _ => {
                let mut r = run_case(&case, kind, plan);
                if r.status == Status::Fail {
                    r.reason.push_str(&format!(
                        "; reproduce: {}",
                        reproduce(case.name, kind, plan.seed)
                    ));
                }
                r
            }
        };
        summary.add(&r);
        report(&r);
    }
    drop(reservation);
    summary
}
