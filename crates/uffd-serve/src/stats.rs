//! Per-VM counters and the server's statistics log. Latencies are
//! recorded with `uffd_pager::Histogram` by the engines.

use std::sync::Mutex;

use serde::Serialize;

/// What an engine reports about one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineStats {
    /// Missing-page fault messages read.
    pub faults: u64,
    /// Faults on pages already installed or being installed (answered with a wake).
    pub duplicate_faults: u64,
    /// Bytes installed, by faults and prefetch alike.
    pub installed_bytes: u64,
    /// Pages installed as zero pages (all-zero in the file, or removed).
    pub zero_pages: u64,
    /// Pages installed ahead of faults (working-set replay, fill, readahead).
    pub prefetched_pages: u64,
    /// Faults on pages a prefetch had installed or was installing.
    pub prefetch_hits: u64,
    /// REMOVE events (balloon inflation).
    pub removes: u64,
    /// Resolves that waited for pending events (EAGAIN).
    pub eagain: u64,
    /// Pages poisoned because the file could not provide them.
    pub poisoned: u64,
    /// Fault service time (message read to page installed), median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
}

/// A snapshot of one VM's statistics, for logs and `--stats-json`.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// The server's id for the connection.
    pub vm: u64,
    /// The VMM's pid.
    pub pid: i32,
    /// The VMM's uid.
    pub uid: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// How long the VM was served.
    pub seconds: f64,
    /// Why serving ended.
    pub ended: Ended,
    /// The engine's counters.
    #[serde(flatten)]
    pub engine: EngineStats,
    /// Pages recorded in the working set, when recording.
    pub recorded_pages: Option<u64>,
    /// What the server's drain did for a VM still running when the server
    /// stopped (absent when the VMM had exited).
    pub drain: Option<DrainReport>,
}

/// Why the server stopped serving a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ended {
    /// The VMM exited (its pidfd, or ESRCH from the kernel).
    VmmExited,
    /// The server was stopped (SIGTERM/SIGINT); see the drain.
    Shutdown,
    /// A new server took the VM over (`--takeover`).
    HandedOver,
    /// The VM's worker panicked; the VM was drained (see the drain).
    Panicked,
}

impl Ended {
    /// The name `--stats-json` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::VmmExited => "vmm-exited",
            Ended::Shutdown => "shutdown",
            Ended::HandedOver => "handed-over",
            Ended::Panicked => "panicked",
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Ended {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainOutcome {
    /// Every page installed and every range unregistered: the VM runs on
    /// without the server.
    Released,
    /// `still_registered` ranges depend on a handler that is gone (a
    /// fault there waits).
    Incomplete,
    /// The engine only stopped serving (the baseline engine).
    NotSupported,
    /// The VM had been stopped already.
    AlreadyStopped,
    /// The drain itself failed; see `error`.
    Failed,
}

impl DrainOutcome {
    /// The name `--stats-json` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainOutcome::Released => "released",
            DrainOutcome::Incomplete => "incomplete",
            DrainOutcome::NotSupported => "not-supported",
            DrainOutcome::AlreadyStopped => "already-stopped",
            DrainOutcome::Failed => "failed",
        }
    }
}

impl PartialEq<&str> for DrainOutcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// How a VM still running at server shutdown was left.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainReport {
    /// What the drain achieved.
    pub outcome: DrainOutcome,
    /// Why the drain failed, for [`DrainOutcome::Failed`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Pages installed during the drain (fill and faults served meanwhile).
    pub installed_pages: u64,
    /// Bytes unregistered.
    pub unregistered_bytes: u64,
    /// Ranges left registered, and why.
    pub still_registered: Vec<RegisteredRange>,
    /// Pages poisoned (the file could not provide them): SIGBUS when read.
    pub poisoned_pages: u64,
}

/// A range of the VMM's memory left registered by the drain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisteredRange {
    /// Start address in the VMM.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why its pages were not installed.
    pub why: String,
}

/// How many finished VMs and refusals [`StatsLog`] keeps in full; older
/// ones live on only in the totals, so a server that runs for months does
/// not grow with every VM it served.
pub const KEPT_REPORTS: usize = 256;

/// Every VM's report, collected for `--stats-json`: the last
/// [`KEPT_REPORTS`] in full, and totals since the server started.
#[derive(Debug, Default)]
pub struct StatsLog {
    inner: Mutex<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    reports: std::collections::VecDeque<VmReport>,
    refused: std::collections::VecDeque<Refusal>,
    totals: Totals,
}

/// Counts since the server started, kept however many reports were
/// dropped from the ring.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// VMs served to the end.
    pub vms: u64,
    /// Connections refused.
    pub refused: u64,
    /// Refusals by step.
    pub refused_by_step: std::collections::BTreeMap<&'static str, u64>,
    /// Faults served, over every VM.
    pub faults: u64,
    /// Bytes installed, over every VM.
    pub installed_bytes: u64,
    /// Pages poisoned, over every VM.
    pub poisoned_pages: u64,
}

/// A refused connection, for `--stats-json`.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// The step that failed.
    pub step: &'static str,
    /// The full reason.
    pub reason: String,
    /// The peer's pid, when known.
    pub pid: Option<i32>,
}

impl StatsLog {
    fn inner(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a finished VM.
    pub fn push(&self, report: VmReport) {
        let mut inner = self.inner();
        let t = &mut inner.totals;
        t.vms += 1;
        t.faults += report.engine.faults;
        t.installed_bytes += report.engine.installed_bytes;
        t.poisoned_pages += report.engine.poisoned;
        if inner.reports.len() == KEPT_REPORTS {
            inner.reports.pop_front();
        }
        inner.reports.push_back(report);
    }

    /// Adds a refused connection.
    pub fn refuse(&self, refusal: Refusal) {
        let mut inner = self.inner();
        inner.totals.refused += 1;
        *inner
            .totals
            .refused_by_step
            .entry(refusal.step)
            .or_default() += 1;
        if inner.refused.len() == KEPT_REPORTS {
            inner.refused.pop_front();
        }
        inner.refused.push_back(refusal);
    }

    /// The last finished VMs (at most [`KEPT_REPORTS`]), oldest first.
    pub fn reports(&self) -> Vec<VmReport> {
        self.inner().reports.iter().cloned().collect()
    }

    /// The last refused connections (at most [`KEPT_REPORTS`]).
    pub fn refusals(&self) -> Vec<Refusal> {
        self.inner().refused.iter().cloned().collect()
    }

    /// Totals since the start.
    pub fn totals(&self) -> Totals {
        self.inner().totals.clone()
    }

    /// `{"totals": {...}, "vms": [...], "refused": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let inner = self.inner();
        serde_json::json!({
            "totals": inner.totals,
            "vms": inner.reports,
            "refused": inner.refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_json() {
        for o in [
            DrainOutcome::Released,
            DrainOutcome::Incomplete,
            DrainOutcome::NotSupported,
            DrainOutcome::AlreadyStopped,
            DrainOutcome::Failed,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
        for e in [
            Ended::VmmExited,
            Ended::Shutdown,
            Ended::HandedOver,
            Ended::Panicked,
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
    }

    #[test]
    fn the_log_keeps_the_last_reports_and_every_total() {
        let log = StatsLog::default();
        for i in 0..(KEPT_REPORTS as u64 + 10) {
            log.refuse(Refusal {
                step: if i % 2 == 0 { "no-fd" } else { "timeout" },
                reason: format!("r{i}"),
                pid: None,
            });
        }
        let kept = log.refusals();
        assert_eq!(kept.len(), KEPT_REPORTS);
        assert_eq!(kept[0].reason, "r10");
        let totals = log.totals();
        assert_eq!(totals.refused, KEPT_REPORTS as u64 + 10);
        assert_eq!(totals.refused_by_step["no-fd"], KEPT_REPORTS as u64 / 2 + 5);
        assert_eq!(log.to_json()["totals"]["refused"], KEPT_REPORTS as u64 + 10);
    }
}
