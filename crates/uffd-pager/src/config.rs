//! What the engine is told to do: resolution strategy, wait mode and
//! prefetch policy.

use std::time::Duration;

use crate::WorkingSet;

/// How missing pages are installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// `UFFDIO_COPY` from the source's bytes (straight from its mapping when
    /// it has one), `UFFDIO_ZEROPAGE` for zero pages. Works for every memory
    /// kind and for targets in other processes.
    Copy,
    /// Read into a per-thread staging buffer (2 MiB aligned, transparent
    /// huge pages, `MADV_DONTFORK`) and `UFFDIO_MOVE` its pages into place:
    /// no kernel-side copy, and an aligned 2 MiB granule moves as one huge
    /// page. The buffer is refilled for the next fault. Anonymous memory of
    /// **this** process only (MOVE's source is in the target's address space).
    Move,
    /// For shmem and hugetlbfs targets registered MINOR: write the content
    /// through the region's alias mapping (see [`crate::Region::with_alias`])
    /// and map it with `UFFDIO_CONTINUE`. Background fill needs no ioctl at
    /// all; only pages touched first pay for a CONTINUE.
    Continue,
    /// Like `Copy`, but pages are installed write-protected
    /// (`UFFDIO_COPY_MODE_WP`; the range must be registered MISSING|WP) and
    /// the first write to each is recorded as dirty, then unprotected.
    CopyWp,
}

impl Strategy {
    /// Parses `copy`, `move`, `continue`, `copy-wp`.
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "copy" => Strategy::Copy,
            "move" => Strategy::Move,
            "continue" | "minor" => Strategy::Continue,
            "copy-wp" | "wp" => Strategy::CopyWp,
            _ => return None,
        })
    }

    /// The name `parse` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Copy => "copy",
            Strategy::Move => "move",
            Strategy::Continue => "continue",
            Strategy::CopyWp => "copy-wp",
        }
    }
}

/// How handler threads wait for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitMode {
    /// Sleep in `poll(2)` until a message (or shutdown) arrives.
    Block,
    /// Poll without sleeping for up to this long after the last message,
    /// then sleep: a fault that follows soon after another is seen without
    /// a scheduler wake-up of the handler, at the cost of a busy core.
    Spin(Duration),
    /// Like `Spin`, but only while nobody else wants the core: when the
    /// scheduler preempts a spinning handler (more runnable threads, such
    /// as vCPUs, than cores), it sleeps instead for a while, longer each
    /// time. The right default for a server that shares the machine with
    /// the VMs it serves.
    Adaptive(Duration),
}

/// What else to fetch when a page faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefetch {
    /// Only the faulting granule.
    None,
    /// Adaptive sequential readahead: a fault right after the previous
    /// window doubles the window (up to `max_bytes`, at most 2 MiB); a
    /// fault elsewhere halves it. The faulting granule is installed (and
    /// its thread woken) first, the rest of the window right after.
    Readahead {
        /// Largest window in bytes.
        max_bytes: u64,
    },
}

/// Largest range one resolution handles (a 2 MiB huge page).
pub const BATCH_BYTES: u64 = 2 << 20;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub strategy: Strategy,
    pub granule: u64,
    pub threads: usize,
    pub handler_per_cpu: bool,
    pub wait: WaitMode,
    pub prefetch: Prefetch,
    pub background_fill: bool,
    pub replay: Option<WorkingSet>,
    pub record: bool,
    pub source_retries: u32,
    pub detect_zero_pages: bool,
    pub content_in_place: bool,
    pub target_pid: Option<i32>,
    pub name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            strategy: Strategy::Copy,
            granule: 4096,
            threads: 1,
            handler_per_cpu: false,
            wait: WaitMode::Block,
            prefetch: Prefetch::None,
            background_fill: false,
            replay: None,
            record: false,
            source_retries: 3,
            detect_zero_pages: true,
            content_in_place: false,
            target_pid: None,
            name: "pager".into(),
        }
    }
}
