//! What a compaction did, for the runtime's logs and the bench.

use std::time::Duration;

use crate::Mode;

/// Counters and timings of one compaction.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The mode that ran.
    pub mode: Option<Mode>,
    /// Heap pages.
    pub pages: usize,
    /// Pages filled by the compactor (the rest were installed as zero).
    pub live_pages: usize,
    /// Time inside [`crate::Prepared::start`]: the flip (mremap, mapping,
    /// registration). Mutators must be paused for this long.
    pub flip: Duration,
    /// From the end of the flip until every page was installed.
    pub wall: Duration,
    /// Pages installed with UFFDIO_COPY (COPY mode; in MOVE mode, pages
    /// compacted on demand, pages a fault took from a MOVE window, and
    /// windows for which no run of recycled pages was free).
    pub copied: usize,
    /// Pages installed with UFFDIO_MOVE from a recycled from-space page.
    pub moved: usize,
    /// Pages of MOVEs the kernel refused (EBUSY: a shared source page),
    /// copied from their recycled pages instead.
    pub move_busy: usize,
    /// MOVE mode: pages a fault found filled and waiting for their
    /// window's MOVE, installed with a COPY of the filled page (counted in
    /// `copied` and `on_demand` too).
    pub staged_taken: usize,
    /// Pages mapped with UFFDIO_CONTINUE after being written through the alias.
    pub continued: usize,
    /// Pages written directly (stop-the-world).
    pub written: usize,
    /// Pages past the live end installed as zero (ZEROPAGE, or a punched hole).
    pub zeroed: usize,
    /// Pages compacted by the fault handler because a mutator touched them.
    pub on_demand: usize,
    /// Faults on pages another thread was compacting at that moment (woken
    /// when it finished).
    pub waited: usize,
    /// Faults on pages already installed (woken at once).
    pub late_faults: usize,
    /// From-space pages that held no live object and were resident, so the
    /// MOVE pool started with them.
    pub pool_seeded: usize,
    /// CPU time of the compacting threads (background and fault handler),
    /// from their thread clocks: "compacting-thread time".
    pub compactor_cpu: Duration,
    /// Time spent in the installing ioctls, per kind (copy, move, continue).
    pub install_copy: Duration,
    /// See `install_copy`.
    pub install_move: Duration,
    /// See `install_copy`.
    pub install_continue: Duration,
    /// The fault handler ran SCHED_FIFO (asked for and granted).
    pub realtime_handler: bool,
    /// Handler-side service time of each on-demand page, nanoseconds (from
    /// reading the fault to the installing ioctl's return).
    pub on_demand_ns: Vec<u64>,
}

impl Report {
    /// Pages filled per second of compacting-thread CPU time.
    pub fn compactor_pages_per_cpu_s(&self) -> f64 {
        let secs = self.compactor_cpu.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.live_pages as f64 / secs
        }
    }
}
