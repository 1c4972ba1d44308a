//! Counters and a latency histogram, updated lock-free by handler threads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Log-linear histogram of durations in nanoseconds: 16 sub-buckets per
/// power of two, so any percentile is within about 6% of the truth.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
    count: AtomicU64,
}

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The smallest value that falls in `bucket`, and the bucket's width.
fn bucket_bounds(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < SUB {
        return (bucket, 1);
    }
    let exp = bucket / SUB + u64::from(SUB_BITS) - 1;
    let sub = bucket % SUB;
    let width = 1u64 << (exp - u64::from(SUB_BITS));
    ((1u64 << exp) + sub * width, width)
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.record_ns(ns);
    }

    /// Records one duration in nanoseconds.
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The `q`-quantile (0.0..=1.0) in nanoseconds (the middle of its
    /// bucket), or 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_bounds(i);
                return (low + width / 2).min(self.max_ns.load(Relaxed));
            }
        }
        self.max_ns.load(Relaxed)
    }

    /// The non-empty buckets in order: each bucket's smallest value and
    /// width in nanoseconds, and how many durations fell in it (for plots
    /// of the whole distribution).
    pub fn buckets(&self) -> Vec<Bucket> {
        self.buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let count = b.load(Relaxed);
                let (low_ns, width_ns) = bucket_bounds(i);
                (count > 0).then_some(Bucket {
                    low_ns,
                    width_ns,
                    count,
                })
            })
            .collect()
    }

    /// p50, p90, p99 and max, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: self.count(),
            p50_us: us(self.quantile_ns(0.50)),
            p90_us: us(self.quantile_ns(0.90)),
            p99_us: us(self.quantile_ns(0.99)),
            max_us: us(self.max_ns.load(Relaxed)),
        }
    }
}

/// One bucket of a [`Histogram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// The smallest duration in the bucket, ns.
    pub low_ns: u64,
    /// Its width, ns.
    pub width_ns: u64,
    /// Durations recorded in it.
    pub count: u64,
}

/// Percentiles of a latency distribution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// The live counters of a pager (all uffds it serves).
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: AtomicU64, )*
            pub(crate) latency: Histogram,
        }

        /// A snapshot of a pager's counters.
        #[derive(Debug, Clone, Default, PartialEq, Serialize)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: u64, )*
            /// Handler service time per demand fault: from reading the
            /// message to the page being installed and the thread woken.
            pub latency: LatencySummary,
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats {
                    $( $name: self.$name.load(Relaxed), )*
                    latency: self.latency.summary(),
                }
            }
        }
    };
}

counters! {
    /// Missing-page fault messages read.
    faults_missing,
    /// Minor fault messages read (page in the page cache, not mapped).
    faults_minor,
    /// Write-protect fault messages read.
    faults_wp,
    /// Fault messages for pages another thread or the prefetcher was
    /// already installing, or had installed (answered with a wake).
    duplicate_faults,
    /// Faults at addresses outside every region (served zero pages).
    faults_outside_regions,
    /// Pages installed with UFFDIO_COPY.
    pages_copied,
    /// Pages installed as zero pages (ZEROPAGE, or COPY of zeros on hugetlb).
    pages_zero,
    /// Pages installed with UFFDIO_MOVE.
    pages_moved,
    /// Pages mapped with UFFDIO_CONTINUE.
    pages_continued,
    /// Pages written into the page cache through the alias mapping.
    pages_written_through_alias,
    /// Bytes installed (all strategies, zero pages included).
    bytes_installed,
    /// Resolving ioctls that found the page already present (then woken).
    eexist,
    /// Resolving ioctls that returned EAGAIN (deferred until events were read).
    eagain,
    /// Source reads retried after a transient error.
    source_retries,
    /// Pages poisoned because their source failed.
    poisoned,
    /// Pages installed by readahead, replay or background fill.
    prefetched_pages,
    /// Of those, the pages working-set replay or background fill installed
    /// (the rest is readahead around faults).
    background_pages,
    /// Demand faults on pages a prefetch had installed or was installing.
    prefetch_hits,
    /// Resolutions abandoned because an event changed the range meanwhile
    /// (the waiters were woken to fault again).
    abandoned,
    /// Non-cooperative events: REMOVE.
    events_remove,
    /// Non-cooperative events: UNMAP.
    events_unmap,
    /// Non-cooperative events: REMAP.
    events_remap,
    /// Non-cooperative events: FORK.
    events_fork,
    /// Messages of a type this version does not know (counted, ignored).
    events_unknown,
    /// Resolving ioctls (COPY, ZEROPAGE, MOVE, CONTINUE) that failed with an
    /// error other than EEXIST/EAGAIN/ESRCH (the waiters were woken to
    /// fault again).
    failed_installs,
    /// Write-protect faults whose unprotect failed.
    failed_unprotects,
    /// `read(2)` calls on the userfaultfd that returned messages.
    reads,
    /// Pages written while write-protected (dirty tracking).
    pages_dirtied,
    /// Reads started on an asynchronous source (each for one claimed run
    /// of pages, however many faults wanted it).
    async_fetches,
    /// Of those, reads the handler thread sent itself and the source's
    /// own thread answered ([`crate::AsyncPageSource::read_direct`]), with no
    /// trip through the runtime.
    async_direct,
    /// Asynchronous reads installed by the thread that received their
    /// answer (a direct read's), with no handler woken.
    async_installed_on_arrival,
    /// Runs an asynchronous source had at hand (a cache hit), read and
    /// installed by the handler thread at once, with no asynchronous read.
    async_ready,
    /// Most asynchronous reads in flight at once.
    async_in_flight_max,
    /// Demand faults on pages the fill or replay had claimed, served at
    /// once instead of after the background batch.
    stolen_from_background,
    /// Panics caught in handler, fill or detach threads (each logged; the
    /// pages being served then are poisoned, the thread carries on).
    handler_panics,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Relaxed);
        }
    }
}

/// The text of a panic payload, when it is one: what the engine logs when
/// one of its threads panics, and what a server built on it logs for its
/// own threads.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            1000,
            4095,
            4096,
            1 << 40,
            u64::MAX,
        ] {
            let b = bucket_of(ns);
            assert!(b >= last && b < BUCKETS, "{ns} -> {b}");
            let (low, width) = bucket_bounds(b);
            assert!(
                low <= ns && ns - low < width.max(1),
                "{ns}: [{low}, +{width})"
            );
            last = b;
        }
    }

    #[test]
    fn buckets_hold_every_sample_where_it_belongs() {
        let h = Histogram::default();
        for ns in [3, 3, 1_000, 1_010, 250_000] {
            h.record_ns(ns);
        }
        let b = h.buckets();
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 5);
        for ns in [3, 1_000, 1_010, 250_000] {
            assert!(b
                .iter()
                .any(|b| b.low_ns <= ns && ns < b.low_ns + b.width_ns));
        }
        assert!(b
            .windows(2)
            .all(|w| w[0].low_ns + w[0].width_ns <= w[1].low_ns));
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for i in 1..=1000u64 {
            h.record_ns(i * 1000);
        }
        let p50 = h.quantile_ns(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
        let p99 = h.quantile_ns(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "{p99}");
        assert_eq!(h.summary().max_us, 1000.0);
        assert_eq!(h.count(), 1000);
    }
}
