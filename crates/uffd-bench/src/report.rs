//! Summaries over rounds, and what the machine and a process were doing:
//! the load average, and a process's context switches and CPU time read
//! from `/proc`.

use serde::Serialize;

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median, minimum and maximum of one figure over the rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        Spread {
            median: median(values.to_vec()),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// `/proc/loadavg`: runnable tasks averaged over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoadAverage {
    /// Over the last minute.
    pub one: f64,
    /// Over five minutes.
    pub five: f64,
    /// Over fifteen minutes.
    pub fifteen: f64,
}

impl LoadAverage {
    /// Reads `/proc/loadavg`.
    pub fn now() -> std::io::Result<LoadAverage> {
        let text = std::fs::read_to_string("/proc/loadavg")?;
        let mut f = text
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
        let mut next = || f.next().unwrap_or(f64::NAN);
        Ok(LoadAverage {
            one: next(),
            five: next(),
            fifteen: next(),
        })
    }
}

/// As `/proc/loadavg` shows them: "1.05 0.98 0.71".
impl std::fmt::Display for LoadAverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} {:.2} {:.2}", self.one, self.five, self.fifteen)
    }
}

/// A process's scheduling counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcCounters {
    /// Voluntary context switches (the thread blocked: poll, read, a
    /// lock), summed over the threads alive at the time of reading.
    pub voluntary_ctxt_switches: u64,
    /// Involuntary ones (preempted).
    pub nonvoluntary_ctxt_switches: u64,
    /// Time on a CPU, summed over the threads alive at the time of
    /// reading, seconds.
    pub cpu_seconds: f64,
    /// Threads alive.
    pub threads: u64,
}

impl ProcCounters {
    /// Reads every `/proc/<pid>/task/*/{status,schedstat}`.
    /// The kernel keeps context switches per thread and drops them with
    /// the thread, so read while the threads of interest still run.
    pub fn read(pid: u32) -> std::io::Result<ProcCounters> {
        let mut c = ProcCounters::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task_path = task?.path();
            let Ok(status) = std::fs::read_to_string(task_path.join("status")) else {
                continue; // the thread exited meanwhile
            };
            c.threads += 1;
            // schedstat's first field: nanoseconds on a CPU (ticks in
            // /proc/PID/stat are 10 ms, too coarse for a short restore).
            if let Ok(sched) = std::fs::read_to_string(task_path.join("schedstat")) {
                let ns: u64 = sched
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                c.cpu_seconds += ns as f64 / 1e9;
            }
            for line in status.lines() {
                let value = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches:") {
                    c.voluntary_ctxt_switches += value(line);
                } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                    c.nonvoluntary_ctxt_switches += value(line);
                }
            }
        }
        Ok(c)
    }

    /// Context switches of both kinds.
    pub fn context_switches(&self) -> u64 {
        self.voluntary_ctxt_switches + self.nonvoluntary_ctxt_switches
    }

    /// What happened between `self` (earlier) and `later`.
    pub fn delta(&self, later: &ProcCounters) -> ProcCounters {
        ProcCounters {
            voluntary_ctxt_switches: later
                .voluntary_ctxt_switches
                .saturating_sub(self.voluntary_ctxt_switches),
            nonvoluntary_ctxt_switches: later
                .nonvoluntary_ctxt_switches
                .saturating_sub(self.nonvoluntary_ctxt_switches),
            cpu_seconds: (later.cpu_seconds - self.cpu_seconds).max(0.0),
            threads: later.threads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_average_prints_as_the_kernel_shows_it() {
        let l = LoadAverage {
            one: 1.05,
            five: 0.98,
            fifteen: 0.7,
        };
        assert_eq!(l.to_string(), "1.05 0.98 0.70");
        let now = LoadAverage::now().unwrap().to_string();
        assert_eq!(now.split(' ').count(), 3, "{now}");
    }

    #[test]
    fn spread_and_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn this_process_can_be_read() {
        let c = ProcCounters::read(std::process::id()).expect("reading /proc/self");
        assert!(c.threads >= 1);
        assert!(LoadAverage::now().expect("loadavg").one >= 0.0);
    }
}
