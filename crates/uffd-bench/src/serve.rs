//! `uffd serve bench`: restore-to-done with every party in a process of
//! its own, as in production.
//!
//! - the server: the real `uffd serve` binary (the product, flags and all,
//!   so what is measured is what ships), with `--prefetch` of a recorded
//!   working set, or on demand;
//! - the baseline: `uffd-bench-baseline-handler`, the Firecracker-example
//!   style handler ([`crate::baselines::OneByOneEngine`]) behind the same
//!   handshake, serving the same memory file;
//! - the VMM: `uffd-standin-vmm`, which does what Firecracker does at
//!   restore, touches the working set from N vCPU threads in random order
//!   (`--touch-list`), and verifies every page it touched.
//!
//! First one restore on demand with `--record` writes the working set
//! (10% of the pages by default, touched in one random order). Then, per
//! round, every (case, vCPUs) pair restores once, with the case order
//! rotated each round so drift in the machine's load hits every case
//! alike. Restore-to-done is the VMM's own figure: from handing its memory
//! over to the last touch of the working set. Each server is a fresh
//! process; its context switches and CPU time are read from `/proc`
//! before the VMM connects and after the VMM has touched everything.
//! With `count_syscalls`, one further restore per pair runs under
//! `strace -c -f` (slow, so never timed).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fixtures::{make_snapshot, shuffled, write_page_list};
use crate::report::{LoadAverage, ProcCounters, Spread};
use crate::BoxError;

/// What to measure, and the programs that take part.
#[derive(Debug, Clone)]
pub struct Config {
    /// Snapshot size, MiB.
    pub mib: u64,
    /// Working set, percent of the snapshot's pages.
    pub working_set_percent: u64,
    /// vCPU thread counts of the VMM; each is a separate set of cases.
    pub vcpus: Vec<usize>,
    /// Rounds of every (case, vCPUs) pair.
    pub rounds: usize,
    /// `uffd serve --threads`.
    pub threads: usize,
    /// `uffd serve --spin-us`.
    pub spin_us: u64,
    /// `uffd serve --handler-per-cpu`.
    pub handler_per_cpu: bool,
    /// `uffd serve --granule`.
    pub granule: u64,
    /// Percentage of zero pages in the snapshot.
    pub zero_percent: u8,
    /// Scratch directory (default: a fresh one under the temp dir, removed).
    pub dir: Option<PathBuf>,
    /// Also count the servers' system calls with strace (untimed restores).
    pub count_syscalls: bool,
    /// The `uffd` binary (runs `uffd serve`).
    pub uffd_bin: PathBuf,
    /// The `uffd-standin-vmm` binary.
    pub vmm_bin: PathBuf,
    /// The `uffd-bench-baseline-handler` binary.
    pub baseline_bin: PathBuf,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// Who serves the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// `uffd serve --prefetch <recorded working set>`.
    Prefetch,
    /// `uffd serve`, faults only.
    OnDemand,
    /// `uffd-bench-baseline-handler`.
    Baseline,
}

impl Case {
    /// The case's name in the output.
    pub fn name(self) -> &'static str {
        match self {
            Case::Prefetch => "prefetch",
            Case::OnDemand => "on-demand",
            Case::Baseline => "baseline",
        }
    }
}

const CASES: [Case; 3] = [Case::Prefetch, Case::OnDemand, Case::Baseline];

/// What the server did per fault, from `/proc` (and strace).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerFault {
    /// Voluntary plus involuntary context switches of the server per fault
    /// (median over the rounds; null when the server saw no fault).
    pub ctxt_switches: Option<f64>,
    /// Of which voluntary (blocking).
    pub voluntary_ctxt_switches: Option<f64>,
    /// Server CPU time per fault, µs.
    pub cpu_us: Option<f64>,
    /// System calls per fault (strace -c -f, a separate untimed restore;
    /// null without `--count-syscalls`).
    pub syscalls: Option<f64>,
}

/// One (case, vCPUs) pair over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// `prefetch`, `on-demand` or `baseline`.
    pub case: Case,
    /// VMM threads touching memory.
    pub vcpus: usize,
    /// Restore-to-done (the VMM's touch time), seconds.
    pub seconds: Spread,
    /// The same, each round in order.
    pub seconds_per_round: Vec<f64>,
    /// Faults the server saw (median).
    pub faults: f64,
    /// Server context switches over the restore (median).
    pub ctxt_switches: f64,
    /// Server CPU seconds over the restore (median).
    pub cpu_seconds: f64,
    /// The per-fault figures.
    pub per_fault: PerFault,
    /// The most frequent system calls of the strace restore, with counts.
    pub top_syscalls: Vec<(String, u64)>,
}

/// A ratio per round, and its spread.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Each round's own ratio, in round order.
    pub per_round: Vec<f64>,
    /// Their median, minimum (the goals are judged by it) and maximum.
    #[serde(flatten)]
    pub spread: Spread,
}

/// The speed-ups at one vCPU count.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// VMM threads.
    pub vcpus: usize,
    /// baseline seconds / on-demand seconds (above 1: `uffd serve` is faster).
    pub on_demand_vs_baseline: Ratio,
    /// on-demand seconds / prefetch seconds (above 1: prefetch helps).
    pub prefetch_vs_on_demand: Ratio,
}

/// The benchmark's result (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where the VMM ran: always `separate-process`.
    pub vmm: &'static str,
    /// Snapshot size, MiB.
    pub mib: u64,
    /// Pages in the recorded working set.
    pub working_set_pages: u64,
    /// Rounds.
    pub rounds: usize,
    /// `uffd serve --threads`, `--spin-us`, `--granule`.
    pub server_threads: usize,
    /// Spin time, µs.
    pub server_spin_us: u64,
    /// `uffd serve --handler-per-cpu`.
    pub server_handler_per_cpu: bool,
    /// Bytes per fault.
    pub server_granule: u64,
    /// /proc/loadavg when the bench started.
    pub load_average_start: LoadAverage,
    /// /proc/loadavg when it ended.
    pub load_average_end: LoadAverage,
    /// Every (case, vCPUs) pair.
    pub cases: Vec<CaseReport>,
    /// The speed-ups, per vCPU count.
    pub ratios: Vec<Ratios>,
    /// Pages the VMM found wrong over every restore (must be 0).
    pub mismatched_pages: u64,
}

/// System calls per fault (none without faults), and the most frequent.
type Syscalls = (Option<f64>, Vec<(String, u64)>);

/// One restore's figures.
#[derive(Debug, Clone, Default)]
struct Restore {
    seconds: f64,
    faults: u64,
    server: ProcCounters,
    mismatched: u64,
    syscalls: Option<(u64, Vec<(String, u64)>)>,
}

/// A server process, stopped (SIGTERM, then SIGKILL) on drop.
pub(crate) struct ServerProcess {
    child: Child,
    socket: PathBuf,
    stats_json: PathBuf,
    _held: crate::leftovers::Held,
}

impl ServerProcess {
    /// `uffd serve` (or the baseline) for `case`, serving `snapshot`.
    fn start(
        config: &Config,
        dir: &Path,
        case: Case,
        snapshot: &Path,
        working_set: &Path,
        record: bool,
    ) -> Result<ServerProcess, BoxError> {
        let mut cmd = match case {
            Case::Baseline => Command::new(&config.baseline_bin),
            _ => {
                let mut c = Command::new(&config.uffd_bin);
                c.arg("serve")
                    .arg("--threads")
                    .arg(config.threads.to_string())
                    .arg("--spin-us")
                    .arg(config.spin_us.to_string())
                    .arg("--granule")
                    .arg(config.granule.to_string());
                if config.handler_per_cpu {
                    c.arg("--handler-per-cpu");
                }
                c
            }
        };
        cmd.arg("--mem-file").arg(snapshot);
        if case == Case::Prefetch {
            cmd.arg("--prefetch").arg(working_set);
        }
        if record {
            cmd.arg("--record").arg(working_set);
        }
        ServerProcess::spawn(cmd, dir, case.name())
    }

    /// Starts `cmd` (a server taking `--socket` and `--stats-json`, which
    /// this adds, with files in `dir` named after `name`) and waits until
    /// it listens; its log goes to `dir/NAME.log`.
    pub(crate) fn spawn(
        mut cmd: Command,
        dir: &Path,
        name: &str,
    ) -> Result<ServerProcess, BoxError> {
        let socket = dir.join(format!("{name}.sock"));
        let stats_json = dir.join(format!("{name}.stats.json"));
        let _ = std::fs::remove_file(&stats_json);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--stats-json")
            .arg(&stats_json);
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let (child, held) = crate::leftovers::spawn(&mut cmd)
            .map_err(|e| format!("starting {}: {e}", cmd.get_program().to_string_lossy()))?;
        let mut server = ServerProcess {
            _held: held,
            child,
            socket,
            stats_json,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
            if let Some(status) = server.child.try_wait()? {
                return Err(format!(
                    "the {name} server exited ({status}) before listening; see {}",
                    log_path.display()
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!("the {name} server did not listen within 20 s").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // That probe connection was a refused handshake: let the server
        // log it and get back to accepting before the measured VMM comes.
        std::thread::sleep(Duration::from_millis(20));
        Ok(server)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Faults of the last VM, once the server has written its report.
    pub(crate) fn faults(&self) -> Result<u64, BoxError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.stats_json) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(vm) = v["vms"].as_array().and_then(|a| a.last()) {
                        return Ok(vm["faults"].as_u64().unwrap_or(0));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("the server wrote no report for the VM within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn stop(mut self) -> Result<(), BoxError> {
        signal(self.pid(), rustix::process::Signal::TERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))?;
        if !status.success() {
            return Err(format!("the server exited with {status}").into());
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("a process did not exit within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `strace -c -f -p` attached to a server until [`Strace::finish`].
struct Strace {
    child: Child,
    out: PathBuf,
}

impl Strace {
    fn attach(pid: u32, out: PathBuf) -> Result<Strace, BoxError> {
        let child = Command::new("strace")
            .args(["-c", "-f", "-q", "-o"])
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting strace (apt-get install strace): {e}"))?;
        // Attached once the server's main thread names a tracer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let traced = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .is_some_and(|v| v.trim() != "0");
            if traced {
                break;
            }
            if Instant::now() > deadline {
                return Err("strace did not attach within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Strace { child, out })
    }

    /// Detaches and returns (total calls, the ten most frequent).
    fn finish(mut self) -> Result<(u64, Vec<(String, u64)>), BoxError> {
        signal(self.child.id(), rustix::process::Signal::INT);
        wait_timeout(&mut self.child, Duration::from_secs(30))?;
        let text = std::fs::read_to_string(&self.out)?;
        Ok(parse_strace_summary(&text))
    }
}

/// Parses `strace -c` output: (total calls, the ten most frequent calls).
fn parse_strace_summary(text: &str) -> (u64, Vec<(String, u64)>) {
    let mut total = 0;
    let mut calls = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(n) = f[3].parse::<u64>() else { continue };
        let name = f[f.len() - 1];
        if name == "total" {
            total = n;
        } else {
            calls.push((name.to_string(), n));
        }
    }
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    calls.truncate(10);
    (total, calls)
}

/// What the stand-in VMM reported.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmRun {
    /// From handing memory over to the last touch.
    pub touch_seconds: f64,
    /// Touches timed one by one, µs: median and 99th percentile.
    pub touch_p50_us: f64,
    pub touch_p99_us: f64,
    /// Pages whose bytes were wrong.
    pub mismatched: u64,
}

/// Runs the VMM (`vmm_bin`) against `server`: hands memory over, touches
/// `touch_list` from `vcpus` threads, then calls `at_touched` while it
/// waits, so the server's counters can be read while its threads still
/// live, and verifies.
pub(crate) fn run_vmm(
    vmm_bin: &Path,
    server: &ServerProcess,
    snapshot: &Path,
    touch_list: &Path,
    vcpus: usize,
    at_touched: impl FnOnce() -> Result<(), BoxError>,
) -> Result<VmRun, BoxError> {
    let mut cmd = Command::new(vmm_bin);
    cmd.arg("--socket")
        .arg(&server.socket)
        .arg("--mem-file")
        .arg(snapshot)
        .arg("--threads")
        .arg(vcpus.to_string())
        .arg("--touch-list")
        .arg(touch_list)
        .arg("--pause-before-verify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let (mut child, _held) = crate::leftovers::spawn(&mut cmd)
        .map_err(|e| format!("starting {}: {e}", vmm_bin.display()))?;
    let result = drive_vmm(&mut child, at_touched);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = wait_timeout(&mut child, Duration::from_secs(120))?;
    let run = result?;
    if status.code() == Some(2) {
        return Err(format!("the stand-in VMM could not set up ({status})").into());
    }
    Ok(run)
}

fn drive_vmm(
    child: &mut Child,
    at_touched: impl FnOnce() -> Result<(), BoxError>,
) -> Result<VmRun, BoxError> {
    let mut stdin: ChildStdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    read_line(&mut stdout, &mut line)?;
    if line.trim() != "touched" {
        return Err(format!("the stand-in VMM said {line:?}, expected \"touched\"").into());
    }
    at_touched()?;
    stdin.write_all(b"\n")?;
    drop(stdin);
    read_line(&mut stdout, &mut line)?;
    let report: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| format!("the stand-in VMM's report {line:?}: {e}"))?;
    let figure = |key: &str| {
        report[key]
            .as_f64()
            .ok_or_else(|| format!("the stand-in VMM reported no {key}"))
    };
    let mismatched = report["mismatched_pages"].as_u64().unwrap_or(u64::MAX);
    if let Some(first) = report["first_mismatch"].as_str() {
        eprintln!("uffd serve bench: the VMM found a wrong page: {first}");
    }
    Ok(VmRun {
        touch_seconds: figure("touch_seconds")?,
        touch_p50_us: figure("touch_p50_us")?,
        touch_p99_us: figure("touch_p99_us")?,
        mismatched,
    })
}

fn read_line(r: &mut BufReader<ChildStdout>, line: &mut String) -> Result<(), BoxError> {
    line.clear();
    if r.read_line(line)? == 0 {
        return Err("the stand-in VMM exited early (see its message above)".into());
    }
    Ok(())
}

struct Bench<'a> {
    config: &'a Config,
    dir: &'a Path,
    snapshot: PathBuf,
    working_set: PathBuf,
    touch_list: PathBuf,
}

impl Bench<'_> {
    fn say(&self, m: &str) {
        if self.config.progress {
            eprintln!("uffd serve bench: {m}");
        }
    }

    fn restore(&self, case: Case, vcpus: usize, strace: bool) -> Result<Restore, BoxError> {
        let server = ServerProcess::start(
            self.config,
            self.dir,
            case,
            &self.snapshot,
            &self.working_set,
            false,
        )?;
        let pid = server.pid();
        let tracer = if strace {
            Some(Strace::attach(pid, self.dir.join("strace.txt"))?)
        } else {
            None
        };
        let before = ProcCounters::read(pid)?;
        let mut after = None;
        let mut tracer = tracer;
        let mut syscalls = None;
        let vm = run_vmm(
            &self.config.vmm_bin,
            &server,
            &self.snapshot,
            &self.touch_list,
            vcpus,
            || {
                after = Some(ProcCounters::read(pid)?);
                if let Some(t) = tracer.take() {
                    syscalls = Some(t.finish()?);
                }
                Ok(())
            },
        )?;
        let faults = server.faults()?;
        server.stop()?;
        Ok(Restore {
            seconds: vm.touch_seconds,
            faults,
            server: before.delta(&after.unwrap_or_default()),
            mismatched: vm.mismatched,
            syscalls,
        })
    }
}

/// Runs the benchmark.
pub fn run(config: &Config) -> Result<Report, BoxError> {
    for (what, path) in [
        ("uffd", &config.uffd_bin),
        ("uffd-standin-vmm", &config.vmm_bin),
        ("uffd-bench-baseline-handler", &config.baseline_bin),
    ] {
        if !path.is_file() {
            return Err(format!(
                "{what} not found at {} (cargo build --release --workspace builds it)",
                path.display()
            )
            .into());
        }
    }
    if config.vcpus.is_empty() || config.vcpus.contains(&0) {
        return Err("--vcpus needs one or more counts, each at least 1".into());
    }
    let scratch = match &config.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("uffd-serve-bench-{}", std::process::id())),
    };
    let _held = config
        .dir
        .is_none()
        .then(|| crate::leftovers::path(&scratch));
    std::fs::create_dir_all(&scratch)?;
    let result = run_in(config, &scratch);
    if config.dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

fn run_in(config: &Config, dir: &Path) -> Result<Report, BoxError> {
    let load_average_start = LoadAverage::now()?;
    let len = config.mib.max(1) << 20;
    let snapshot = make_snapshot(dir, len, config.zero_percent)?;
    let bench = Bench {
        config,
        dir,
        snapshot: snapshot.path.clone(),
        working_set: dir.join("snapshot.ws"),
        touch_list: dir.join("touch.list"),
    };
    bench.say(&format!(
        "{} MiB snapshot written; load average {:.2} {:.2} {:.2}",
        config.mib, load_average_start.one, load_average_start.five, load_average_start.fifteen
    ));
    let pages = len / 4096;
    let ws_pages = (pages * config.working_set_percent.clamp(1, 100) / 100).max(1);
    let mut working: Vec<u64> = shuffled(pages, 0x5EED)[..ws_pages as usize].to_vec();
    write_page_list(&bench.touch_list, &working)?;

    bench.say(&format!(
        "recording the working set ({ws_pages} pages, random order)"
    ));
    let recorder = ServerProcess::start(
        config,
        dir,
        Case::OnDemand,
        &bench.snapshot,
        &bench.working_set,
        true,
    )?;
    let bad = run_vmm(
        &config.vmm_bin,
        &recorder,
        &bench.snapshot,
        &bench.touch_list,
        1,
        || Ok(()),
    )?
    .mismatched;
    recorder.faults()?;
    recorder.stop()?;
    if bad != 0 {
        return Err(format!("{bad} pages were served wrong while recording").into());
    }
    let recorded = uffd_pager::WorkingSet::load(&bench.working_set, len)
        .map_err(|e| format!("the recorded working set: {e}"))?;

    // The measured restores touch the same pages in another random order.
    let order = shuffled(working.len() as u64, 0xBEEF);
    working = order.iter().map(|&i| working[i as usize]).collect();
    write_page_list(&bench.touch_list, &working)?;

    let pairs: Vec<(Case, usize)> = config
        .vcpus
        .iter()
        .flat_map(|&v| CASES.iter().map(move |&c| (c, v)))
        .collect();
    // results[pair][round]
    let mut results: Vec<Vec<Restore>> = vec![Vec::new(); pairs.len()];
    let rounds = config.rounds.max(1);
    for round in 0..rounds {
        for k in 0..pairs.len() {
            let i = (k + round) % pairs.len();
            let (case, vcpus) = pairs[i];
            let r = bench.restore(case, vcpus, false)?;
            bench.say(&format!(
                "round {}/{rounds}: {:<9} {vcpus} vCPU(s): {:.4} s, {} faults, {} ctx switches{}",
                round + 1,
                case.name(),
                r.seconds,
                r.faults,
                r.server.context_switches(),
                if r.mismatched == 0 {
                    String::new()
                } else {
                    format!(", {} WRONG PAGES", r.mismatched)
                }
            ));
            results[i].push(r);
        }
    }
    let mut syscalls: Vec<Option<Syscalls>> = vec![None; pairs.len()];
    if config.count_syscalls {
        for (i, &(case, vcpus)) in pairs.iter().enumerate() {
            bench.say(&format!(
                "counting system calls: {} {vcpus} vCPU(s), under strace (untimed)",
                case.name()
            ));
            let r = bench.restore(case, vcpus, true)?;
            // Divided by the faults of the traced restore itself.
            syscalls[i] = r
                .syscalls
                .map(|(total, top)| ((r.faults > 0).then(|| total as f64 / r.faults as f64), top));
        }
    }
    let mut cases = Vec::new();
    for (i, &(case, vcpus)) in pairs.iter().enumerate() {
        let rs = &results[i];
        let med =
            |f: &dyn Fn(&Restore) -> f64| Spread::of(&rs.iter().map(f).collect::<Vec<_>>()).median;
        let per_fault = |f: &dyn Fn(&Restore) -> f64| -> Option<f64> {
            let v: Vec<f64> = rs
                .iter()
                .filter(|r| r.faults > 0)
                .map(|r| f(r) / r.faults as f64)
                .collect();
            (!v.is_empty()).then(|| Spread::of(&v).median)
        };
        let ctxt = |r: &Restore| r.server.context_switches() as f64;
        let (syscalls_per_fault, top) = match &syscalls[i] {
            Some((per_fault, top)) => (*per_fault, top.clone()),
            None => (None, Vec::new()),
        };
        cases.push(CaseReport {
            case,
            vcpus,
            seconds: Spread::of(&rs.iter().map(|r| r.seconds).collect::<Vec<_>>()),
            seconds_per_round: rs.iter().map(|r| r.seconds).collect(),
            faults: med(&|r| r.faults as f64),
            ctxt_switches: med(&ctxt),
            cpu_seconds: med(&|r| r.server.cpu_seconds),
            per_fault: PerFault {
                ctxt_switches: per_fault(&ctxt),
                voluntary_ctxt_switches: per_fault(&|r| r.server.voluntary_ctxt_switches as f64),
                cpu_us: per_fault(&|r| r.server.cpu_seconds * 1e6),
                syscalls: syscalls_per_fault,
            },
            top_syscalls: top,
        });
    }
    let seconds_of = |case: Case, vcpus: usize| -> Vec<f64> {
        let i = pairs
            .iter()
            .position(|&p| p == (case, vcpus))
            .expect("every pair ran");
        results[i].iter().map(|r| r.seconds).collect()
    };
    let ratio = |num: Vec<f64>, den: Vec<f64>| {
        let per_round: Vec<f64> = num
            .iter()
            .zip(&den)
            .map(|(n, d)| n / d.max(1e-12))
            .collect();
        Ratio {
            spread: Spread::of(&per_round),
            per_round,
        }
    };
    let ratios = config
        .vcpus
        .iter()
        .map(|&v| Ratios {
            vcpus: v,
            on_demand_vs_baseline: ratio(
                seconds_of(Case::Baseline, v),
                seconds_of(Case::OnDemand, v),
            ),
            prefetch_vs_on_demand: ratio(
                seconds_of(Case::OnDemand, v),
                seconds_of(Case::Prefetch, v),
            ),
        })
        .collect();
    let mismatched_pages = results.iter().flatten().map(|r| r.mismatched).sum();
    Ok(Report {
        vmm: "separate-process",
        mib: config.mib,
        working_set_pages: recorded.len() as u64,
        rounds,
        server_threads: config.threads,
        server_spin_us: config.spin_us,
        server_handler_per_cpu: config.handler_per_cpu,
        server_granule: config.granule,
        load_average_start,
        load_average_end: LoadAverage::now()?,
        cases,
        ratios,
        mismatched_pages,
    })
}

/// `uffd serve bench`'s plot: each case's restore-to-done per vCPU count.
pub fn plot_panels(report: &Report) -> Vec<crate::plot::Panel> {
    let series = CASES
        .iter()
        .map(|&case| crate::plot::RestoreTimes {
            label: match case {
                Case::Prefetch => "uffd serve --prefetch".to_string(),
                Case::OnDemand => "uffd serve, on demand".to_string(),
                Case::Baseline => "Firecracker-example-style handler".to_string(),
            },
            points: report
                .cases
                .iter()
                .filter(|c| c.case == case)
                .map(|c| (c.vcpus, c.seconds_per_round.clone()))
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    vec![crate::plot::Panel::Restores {
        title: format!(
            "restore-to-done of a VMM in another process touching {} pages (lower is faster)",
            report.working_set_pages
        ),
        series,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_summaries_parse() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
            ------ ----------- ----------- --------- --------- ----------------\n\
             60.00    0.006000           2      3000           ioctl\n\
             40.00    0.004000           1      2500        12 read\n\
            ------ ----------- ----------- --------- --------- ----------------\n\
            100.00    0.010000           1      5500        12 total\n";
        let (total, top) = parse_strace_summary(text);
        assert_eq!(total, 5500);
        assert_eq!(top[0], ("ioctl".to_string(), 3000));
        assert_eq!(top[1], ("read".to_string(), 2500));
    }
}
