//! The CPUs a bench may use, and how much of them the machine itself takes.
//!
//! A latency a bench reports is the program's only if the machine would
//! not have produced it anyway. On a VM or a busy host, kernel threads,
//! interrupts and the hypervisor take a CPU away from whatever runs on it,
//! for a millisecond or more at a time; a stall of that length inside the
//! program under test says nothing about the program. [`Hiccups`] measures
//! that floor in the same run.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The CPUs the calling thread may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let allowed = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect())
}

/// Moves the calling thread (and the threads it starts later) to `cpu`.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// What the machine took from threads that only read the clock, one pinned
/// to each CPU this process may use, all at once: every gap between two
/// consecutive clock reads is time the thread did not run (another task,
/// an interrupt, or on a VM the host running something else on the vCPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Hiccups {
    /// How long each CPU was watched, seconds.
    pub seconds: f64,
    /// CPUs watched.
    pub cpus: usize,
    /// The longest gap on any CPU, µs.
    pub longest_us: f64,
    /// Gaps over 100 µs, all CPUs together.
    pub over_100us: u64,
    /// Gaps over 1 ms, all CPUs together.
    pub over_1ms: u64,
}

/// Gaps shorter than this are the clock read itself and cache misses,
/// not the machine.
const NOTICED: Duration = Duration::from_micros(100);

impl Hiccups {
    /// Watches every allowed CPU for `window`, which those CPUs spend
    /// spinning: run it when nothing else of the bench runs.
    pub fn measure(window: Duration) -> std::io::Result<Hiccups> {
        let cpus = allowed_cpus()?;
        let watchers: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                std::thread::spawn(move || -> std::io::Result<Vec<Duration>> {
                    pin_to(cpu)?;
                    Ok(watch(window))
                })
            })
            .collect();
        let mut gaps = Vec::new();
        for w in watchers {
            gaps.extend(
                w.join()
                    .map_err(|_| std::io::Error::other("a watcher panicked"))??,
            );
        }
        Ok(Hiccups::of(window, cpus.len(), &gaps))
    }

    /// The figures for the `gaps` over [`NOTICED`] seen on `cpus` CPUs
    /// watched for `window` each.
    fn of(window: Duration, cpus: usize, gaps: &[Duration]) -> Hiccups {
        let over = |d: Duration| gaps.iter().filter(|&&g| g > d).count() as u64;
        Hiccups {
            seconds: window.as_secs_f64(),
            cpus,
            longest_us: gaps.iter().max().map_or(0.0, |g| g.as_secs_f64() * 1e6),
            over_100us: over(NOTICED),
            over_1ms: over(Duration::from_millis(1)),
        }
    }
}

impl std::fmt::Display for Hiccups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "machine hiccups: threads spinning on {} CPU(s) for {:.1} s lost their CPU \
             {} time(s) for over 1 ms, {} for over 100 us, longest {:.0} us \
             (a stall up to that long is the machine's)",
            self.cpus, self.seconds, self.over_1ms, self.over_100us, self.longest_us
        )
    }
}

/// Reads the clock in a loop for `window`; returns the gaps over
/// [`NOTICED`] between consecutive reads.
fn watch(window: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut last = start;
    let mut gaps = Vec::new();
    while last.duration_since(start) < window {
        let now = Instant::now();
        let gap = now.duration_since(last);
        if gap > NOTICED {
            gaps.push(gap);
        }
        last = now;
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_counted_by_length_and_the_longest_is_kept() {
        let us = Duration::from_micros;
        let h = Hiccups::of(
            Duration::from_secs(2),
            2,
            &[us(150), us(900), us(1001), us(2500)],
        );
        assert_eq!((h.seconds, h.cpus), (2.0, 2));
        assert_eq!((h.over_100us, h.over_1ms), (4, 2));
        assert!((h.longest_us - 2500.0).abs() < 1e-6, "{h:?}");
        assert_eq!(Hiccups::of(us(10), 1, &[]).longest_us, 0.0);
    }

    #[test]
    fn every_allowed_cpu_is_watched_for_the_window() {
        let t = Instant::now();
        let h = Hiccups::measure(Duration::from_millis(50)).unwrap();
        assert_eq!(h.cpus, allowed_cpus().unwrap().len());
        // Measuring takes at least the window: no watcher stops early.
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(h.over_1ms <= h.over_100us);
        assert!(h.over_100us == 0 || h.longest_us > 100.0, "{h:?}");
    }

    #[test]
    fn a_cpu_shared_with_a_spinner_shows_as_gaps() {
        std::thread::spawn(|| {
            let cpu = allowed_cpus().unwrap()[0];
            pin_to(cpu).unwrap();
            // Both threads inherit the CPU; the scheduler has to run the
            // spinner for a while, and the watcher must notice each time.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let spinner = {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            };
            let gaps = watch(Duration::from_millis(300));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            spinner.join().unwrap();
            assert!(!gaps.is_empty(), "the spinner never took the CPU");
            assert!(gaps.iter().all(|&g| g > NOTICED));
        })
        .join()
        .unwrap();
    }
}
