//! `uffd page-server bench`: what post-copy over a network costs. The page
//! server is the real `uffd page-server` binary in a process of its own;
//! the destination is [`RemoteSource`] in this process, reached through a
//! user-space link emulator (this kernel has no netem) that adds a one-way
//! delay, holding no more in flight than a socket buffer or a 10 GbE
//! link would, and optionally carrying no more than a given rate.
//!
//! Per added delay (0, 1, 5 ms one way): demand-fault latency on an idle
//! link, the same while the server pushes the whole image on the bulk
//! channel, the same again with the naive one-connection design (demand
//! requests queued behind the push) as the baseline; the push's throughput
//! against a raw TCP copy of as many bytes over the same emulated link; a
//! VM's demand faults end to end (the real `uffd serve --source tcp://`
//! restoring a stand-in VMM, each in a process of its own, over the same
//! link); and time from connecting to the first page for a small and a
//! large image.
//!
//! Every delay is measured in each of several rounds, the delays' order
//! rotated from round to round. A case reports each figure's median over
//! the rounds, and the goals' ratios (p99 under push over p99 idle, push
//! over raw TCP) as median, minimum and maximum of the ratio *within* each
//! round: on a VM whose first touches of memory vary with the host, the
//! push and the raw copy it is compared with are only comparable when
//! measured next to each other.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd_pager::AsyncPageSource;
use uffd_remote::{RemoteConfig, RemoteSource};

use crate::fixtures::{make_snapshot, shuffled, write_page_list};
use crate::machine::{allowed_cpus, pin_to, Hiccups};
use crate::report::{median, LoadAverage, ProcCounters, Spread};
use crate::serve::{run_vmm, ServerProcess};
use crate::BoxError;

/// Where the bench's threads run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cpus {
    /// Anywhere: the source side, the link and the destination share
    /// every CPU, as the scheduler places them.
    #[default]
    Shared,
    /// Two hosts modelled on one: the source side (the page server, the
    /// link emulator, the raw copy's sender, the round-trip echo) on one
    /// CPU, the destination (this process's reading threads and the raw
    /// copy's receiver) on another, so neither side's work takes the
    /// other's CPU.
    Split,
}

/// The CPUs of [`Cpus::Split`]: (source side, destination).
#[derive(Debug, Clone, Copy)]
struct Pin(Option<(usize, usize)>);

impl Pin {
    fn new(cpus: Cpus) -> Result<Pin, BoxError> {
        if cpus == Cpus::Shared {
            return Ok(Pin(None));
        }
        match allowed_cpus()?[..] {
            [source, destination, ..] => Ok(Pin(Some((source, destination)))),
            _ => Err("--cpus split needs two CPUs this process may run on; it has one".into()),
        }
    }

    fn on(cpu: usize) {
        // Only ever a CPU the affinity mask allowed, so this cannot fail
        // for a reason worth stopping the bench for.
        let _ = pin_to(cpu);
    }

    /// Moves the calling thread (and what it starts later) to the source side.
    fn source(self) {
        if let Some((cpu, _)) = self.0 {
            Pin::on(cpu);
        }
    }

    /// Moves the calling thread (and what it starts later) to the destination.
    fn destination(self) {
        if let Some((_, cpu)) = self.0 {
            Pin::on(cpu);
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Image size for the latency and throughput cases, MiB.
    pub mib: u64,
    /// One-way delays added by the link emulator, ms.
    pub delays_ms: Vec<u64>,
    /// Demand reads timed per case.
    pub samples: usize,
    /// Rounds: each measures every delay once.
    pub rounds: usize,
    /// The `uffd` binary (for `uffd page-server` and `uffd serve`).
    pub uffd_bin: PathBuf,
    /// The `uffd-standin-vmm` binary: the VM restored over the link.
    pub vmm_bin: PathBuf,
    /// Scratch directory (default: the temp dir).
    pub dir: Option<PathBuf>,
    /// Where the source side and the destination run.
    pub cpus: Cpus,
    /// How long to watch the machine's own hiccups before the first round
    /// ([`Hiccups`]), ms; 0 skips it.
    pub hiccup_ms: u64,
    /// The most each direction of every emulated connection carries, MB/s
    /// (10^6 bytes); `None`: as much as the CPUs move.
    pub link_mb_s: Option<u64>,
}

/// One delay's figures in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// One-way delay added, ms.
    pub delay_ms: u64,
    /// Median demand read, idle link, µs.
    pub demand_p50_us: f64,
    /// 99th percentile, idle link, µs.
    pub demand_p99_idle_us: f64,
    /// 99th percentile while the whole image is pushed, µs.
    pub demand_p99_push_us: f64,
    /// 99th percentile with demand requests behind the push (one
    /// connection), µs.
    pub naive_p99_push_us: f64,
    /// Demand reads timed while the push ran: the reads stop when it
    /// ends, so with a short push (a small image, a long delay) the p99
    /// under push is that of few reads, at most their maximum.
    pub reads_under_push: f64,
    /// The same for the one-connection design.
    pub naive_reads_under_push: f64,
    /// The push: image bytes over seconds until every page arrived, MB/s.
    pub bulk_mb_s: f64,
    /// A raw TCP copy of as many bytes over the same link, MB/s.
    pub raw_tcp_mb_s: f64,
    /// The same copy received into fresh memory of the image's size
    /// (4 KiB pages faulted in as it fills), as a receiver that keeps the
    /// bytes must: what landing them costs on this machine, MB/s.
    pub raw_tcp_to_memory_mb_s: f64,
    /// The round trip the emulator adds, µs (twice the delay).
    pub added_rtt_us: f64,
    /// A plain TCP request of 24 bytes answered by 4 KiB over the same
    /// emulated link, median, µs: the link's own round trip, relay
    /// threads included, which a demand fault cannot beat.
    pub link_rtt_p50_us: f64,
    /// A VM's demand fault end to end, idle link, median, µs: `uffd
    /// serve --source tcp://` in a process of its own restores a stand-in
    /// VMM (another process, one vCPU thread) that touches as many random
    /// pages as reads are timed, each a fault, timing each touch.
    pub vm_fault_p50_us: f64,
    /// Their 99th percentile, µs.
    pub vm_fault_p99_us: f64,
    /// Context switches of the `uffd serve` process per fault meanwhile
    /// (every thread, voluntary and not): a count, unlike the time, that
    /// the machine's neighbours do not move.
    pub vm_server_switches_per_fault: f64,
}

/// One delay's figures over the rounds: each the median, and the goals'
/// ratios taken round by round.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Each figure's median over the rounds (the JSON keeps a round's keys).
    #[serde(flatten)]
    pub median: Round,
    /// p99 under push over p99 idle, per round.
    pub p99_push_over_idle: Spread,
    /// The push over raw TCP into fresh memory, per round.
    pub bulk_over_raw_to_memory: Spread,
    /// The push over raw TCP into a reused buffer, per round.
    pub bulk_over_raw: Spread,
    /// Demand p50 minus the link's round trip, per round, µs.
    pub p50_over_link_rtt_us: Spread,
    /// The VM's fault p50 minus the link's round trip, per round, µs.
    pub vm_p50_over_link_rtt_us: Spread,
    /// Every round's figures.
    pub rounds: Vec<Round>,
}

impl Case {
    fn of(delay_ms: u64, rounds: Vec<Round>) -> Case {
        fn ratio(a: f64, b: f64) -> f64 {
            if b > 0.0 {
                a / b
            } else {
                0.0
            }
        }
        let values = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
        let med = |f: &dyn Fn(&Round) -> f64| median(values(f));
        let spread = |f: &dyn Fn(&Round) -> f64| Spread::of(&values(f));
        Case {
            median: Round {
                delay_ms,
                demand_p50_us: med(&|r| r.demand_p50_us),
                demand_p99_idle_us: med(&|r| r.demand_p99_idle_us),
                demand_p99_push_us: med(&|r| r.demand_p99_push_us),
                naive_p99_push_us: med(&|r| r.naive_p99_push_us),
                reads_under_push: med(&|r| r.reads_under_push),
                naive_reads_under_push: med(&|r| r.naive_reads_under_push),
                bulk_mb_s: med(&|r| r.bulk_mb_s),
                raw_tcp_mb_s: med(&|r| r.raw_tcp_mb_s),
                raw_tcp_to_memory_mb_s: med(&|r| r.raw_tcp_to_memory_mb_s),
                added_rtt_us: med(&|r| r.added_rtt_us),
                link_rtt_p50_us: med(&|r| r.link_rtt_p50_us),
                vm_fault_p50_us: med(&|r| r.vm_fault_p50_us),
                vm_fault_p99_us: med(&|r| r.vm_fault_p99_us),
                vm_server_switches_per_fault: med(&|r| r.vm_server_switches_per_fault),
            },
            p99_push_over_idle: spread(&|r| ratio(r.demand_p99_push_us, r.demand_p99_idle_us)),
            bulk_over_raw_to_memory: spread(&|r| ratio(r.bulk_mb_s, r.raw_tcp_to_memory_mb_s)),
            bulk_over_raw: spread(&|r| ratio(r.bulk_mb_s, r.raw_tcp_mb_s)),
            p50_over_link_rtt_us: spread(&|r| r.demand_p50_us - r.link_rtt_p50_us),
            vm_p50_over_link_rtt_us: spread(&|r| r.vm_fault_p50_us - r.link_rtt_p50_us),
            rounds,
        }
    }
}

/// Time from connecting to the first page read, per image size.
#[derive(Debug, Clone, Serialize)]
pub struct FirstPage {
    /// Image size, MiB.
    pub image_mib: u64,
    /// Connect plus one demand read, ms.
    pub first_page_ms: f64,
    /// A VM's first page: from starting the stand-in VMM (a process of
    /// its own, mapping memory as large as the image) to its first touch
    /// done, through a running `uffd serve --source tcp://`: the VMM's
    /// start, its memory handed over, one fault; ms.
    pub vm_first_page_ms: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Rounds run.
    pub rounds: usize,
    /// Where the source side and the destination ran.
    pub cpus: Cpus,
    /// The emulated link's rate per direction, MB/s (null: unlimited).
    pub link_mb_s: Option<u64>,
    /// `/proc/loadavg` before the first round and after the last.
    pub loadavg_before: LoadAverage,
    /// See `loadavg_before`.
    pub loadavg_after: LoadAverage,
    /// What the machine took from spinning threads just before the first
    /// round: a floor under any latency below (none when not watched).
    pub hiccups: Option<Hiccups>,
    /// One per delay.
    pub cases: Vec<Case>,
    /// First page for a small and a large image (no delay).
    pub first_page: Vec<FirstPage>,
}

/// Kills the page server when dropped.
struct Server {
    child: Child,
    addr: String,
    _held: crate::leftovers::Held,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn page_server(uffd: &Path, mem: &Path, push: bool, pin: Pin) -> Result<Server, BoxError> {
    let mut cmd = Command::new(uffd);
    cmd.args(["page-server", "--mem-file"])
        .arg(mem)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped());
    if push {
        cmd.arg("--push");
    }
    // The child and the threads it starts inherit the spawning thread's CPU.
    pin.source();
    let spawned = crate::leftovers::spawn(&mut cmd);
    pin.destination();
    let (mut child, held) = spawned?;
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    err.read_line(&mut line)?;
    let addr = serving_address(&line).ok_or_else(|| format!("uffd page-server said {line:?}"))?;
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Ok(Server {
        child,
        addr,
        _held: held,
    })
}

/// The address in the first line `uffd page-server` writes to stderr
/// ("uffd page-server: serving FILE (N bytes) on ADDR[, pushing every
/// page]"), which is how a script learns the port of `--listen HOST:0`.
pub fn serving_address(line: &str) -> Option<String> {
    let addr = line.split(" on ").nth(1)?.split([',', '\n']).next()?.trim();
    (!addr.is_empty()).then(|| addr.to_string())
}

/// A TCP relay on loopback that delays every byte by `delay` each way,
/// without limiting bandwidth beyond what it holds in flight (4 MiB, or
/// a 10 GbE link's bandwidth-delay product where that is more): what a
/// long fat link does.
pub fn delay_link(upstream: String, delay: Duration) -> std::io::Result<String> {
    pinned_link(upstream, Link { delay, rate: None }, Pin(None))
}

/// What the emulated network does to each direction of a connection.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// One-way delay.
    delay: Duration,
    /// The most it carries, MB/s (10^6 bytes), as a network of that rate
    /// does: a frame waits for the bytes ahead of it on its connection to
    /// go out, then for the delay. `None`: unlimited.
    rate: Option<u64>,
}

impl Link {
    /// How long `bytes` take to go onto the wire.
    fn serialisation(self, bytes: usize) -> Duration {
        match self.rate {
            Some(mb_s) => Duration::from_secs_f64(bytes as f64 / (mb_s.max(1) as f64 * 1e6)),
            None => Duration::ZERO,
        }
    }
}

/// [`delay_link`], its threads on the source side of `pin`: the link
/// stands for the network, which takes no CPU of the destination's.
fn pinned_link(upstream: String, link: Link, pin: Pin) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        pin.source();
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c, s) = (client.try_clone(), server.try_clone());
            if let (Ok(c), Ok(s)) = (c, s) {
                delayed_pipe(client, s, link, pin);
                delayed_pipe(server, c, link, pin);
            }
        }
    });
    Ok(addr)
}

/// The most a link direction holds in flight: a socket buffer's worth
/// (Linux's largest default send buffer, 4 MiB), or a 10 GbE link's
/// bandwidth-delay product where that is more.
fn in_flight_limit(delay: Duration) -> usize {
    const TEN_GBE_BYTES_PER_S: f64 = 1.25e9;
    (4usize << 20).max((delay.as_secs_f64() * TEN_GBE_BYTES_PER_S) as usize)
}

/// One direction of the link: bytes read from `from` are written to `to`
/// once those ahead of them have gone out at the link's rate, and its
/// delay later. It holds at most [`in_flight_limit`] bytes, in buffers
/// passed between its two threads; with none free it stops reading, so
/// the sender's TCP window closes as over a real link, instead of the
/// link queueing without bound (a request behind a push would then wait
/// for everything the sender could read ahead, which no network holds).
fn delayed_pipe(mut from: TcpStream, mut to: TcpStream, link: Link, pin: Pin) {
    const CHUNK: usize = 256 << 10;
    let slots = in_flight_limit(link.delay).div_ceil(CHUNK);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>, usize)>(slots);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..slots {
        let _ = free_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::spawn(move || {
        pin.source();
        while let Ok(mut buf) = free_rx.recv() {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if full_tx.send((Instant::now(), buf, n)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        pin.source();
        // When the wire is free again after what went out before.
        let mut wire_free = Instant::now();
        while let Ok((arrived, buf, n)) = full_rx.recv() {
            wire_free = wire_free.max(arrived) + link.serialisation(n);
            let due = wire_free + link.delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = free_tx.send(buf);
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// Times up to `samples` demand reads of distinct random pages that had
/// not arrived yet; a read answered from pushed bytes is not a network
/// fault and is skipped. With `push_len`, stops once that many bytes were
/// pushed: later reads would not be under push. Returns the latencies, µs.
fn demand_latencies(
    runtime: &tokio::runtime::Runtime,
    remote: &RemoteSource,
    pages: u64,
    samples: usize,
    push_len: Option<u64>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(samples);
    for page in shuffled(pages, 0xD3A7) {
        let pushed = push_len.is_some_and(|len| remote.stats().pushed_bytes.load(Relaxed) >= len);
        if out.len() >= samples || pushed {
            break;
        }
        let hits = remote.stats().local_hits.load(Relaxed);
        let t = Instant::now();
        let r = runtime.block_on(remote.read(page * 4096, 4096));
        let us = t.elapsed().as_secs_f64() * 1e6;
        if r.is_ok() && remote.stats().local_hits.load(Relaxed) == hits {
            out.push(us);
        }
        // Space the faults a little, as a guest's are.
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn connect(addr: &str, single_channel: bool) -> Result<RemoteSource, BoxError> {
    Ok(RemoteSource::connect(
        addr,
        RemoteConfig {
            single_channel,
            ..RemoteConfig::default()
        },
    )?)
}

/// Seconds until every pushed byte of a `len`-byte image has arrived.
fn push_seconds(remote: &RemoteSource, len: u64, started: Instant) -> f64 {
    let deadline = started + Duration::from_secs(120);
    while remote.stats().pushed_bytes.load(Relaxed) < len && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    started.elapsed().as_secs_f64()
}

/// The median round trip of a 24-byte request answered by a page over a
/// link delayed by `delay`, µs.
fn link_rtt(link: Link, samples: usize, pin: Pin) -> Result<f64, BoxError> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?.to_string();
    std::thread::spawn(move || {
        pin.source();
        let Ok((mut s, _)) = echo.accept() else {
            return;
        };
        let _ = s.set_nodelay(true);
        let (mut req, page) = ([0u8; 24], vec![7u8; 4096 + 40]);
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&page).is_err() {
                return;
            }
        }
    });
    let mut c = TcpStream::connect(pinned_link(echo_addr, link, pin)?)?;
    c.set_nodelay(true)?;
    let mut page = vec![0u8; 4096 + 40];
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        c.write_all(&[1u8; 24])?;
        c.read_exact(&mut page)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(median(times))
}

/// A raw TCP copy of `len` bytes over a link delayed by `delay`, MB/s,
/// received into a reused buffer or, `to_memory`, into fresh memory of
/// `len` bytes.
fn raw_tcp(len: u64, link: Link, to_memory: bool, pin: Pin) -> Result<f64, BoxError> {
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let sink_addr = sink.local_addr()?.to_string();
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = sink.accept()?;
        if !to_memory {
            return std::io::copy(&mut s, &mut std::io::sink());
        }
        // Untouched until received into: calloc maps it fresh.
        let mut memory = vec![0u8; len as usize];
        let mut got = 0;
        while got < memory.len() {
            match s.read(&mut memory[got..])? {
                0 => break,
                n => got += n,
            }
        }
        Ok(got as u64)
    });
    let mut out = TcpStream::connect(pinned_link(sink_addr, link, pin)?)?;
    let started = Instant::now();
    std::thread::spawn(move || -> std::io::Result<()> {
        pin.source();
        let chunk = vec![0x5au8; 1 << 20];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min((len - sent) as usize);
            out.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        Ok(())
    })
    .join()
    .map_err(|_| "the sender panicked")??;
    let got = receiver.join().map_err(|_| "the receiver panicked")??;
    let seconds = started.elapsed().as_secs_f64();
    Ok(got as f64 / 1e6 / seconds.max(1e-9))
}

/// Runs every case.
pub fn run(config: &Config, progress: impl Fn(&str)) -> Result<Report, BoxError> {
    let loadavg_before = LoadAverage::now().unwrap_or_default();
    // Before anything is pinned or written: every CPU, a quiet disk.
    let hiccups = match config.hiccup_ms {
        0 => None,
        ms => Some(Hiccups::measure(Duration::from_millis(ms))?),
    };
    let dir = config.dir.clone().unwrap_or_else(std::env::temp_dir);
    let len = config.mib << 20;
    let scratch = dir.join(format!("uffd-page-server-bench-{}", std::process::id()));
    let _held = crate::leftovers::path(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let snapshot = make_snapshot(&scratch, len, 10);
    let snapshot = match snapshot {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e.into());
        }
    };
    let pages = len / 4096;
    let pin = Pin::new(config.cpus)?;
    // This thread is the destination, and so is every thread it starts
    // unless moved: the sources' reading threads, the raw copy's receiver.
    pin.destination();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rounds = config.rounds.max(1);
    let mut per_delay: Vec<Vec<Round>> = vec![Vec::new(); config.delays_ms.len()];
    let mut first_page = Vec::new();
    let measured = (|| -> Result<(), BoxError> {
        for round in 0..rounds {
            for k in 0..config.delays_ms.len() {
                let i = (k + round) % config.delays_ms.len();
                let delay_ms = config.delays_ms[i];
                let say = |what: &str| {
                    progress(&format!(
                        "round {}/{rounds}, {delay_ms} ms: {what}",
                        round + 1
                    ))
                };
                per_delay[i].push(measure_round(
                    config,
                    &runtime,
                    &scratch,
                    &snapshot.path,
                    pages,
                    delay_ms,
                    pin,
                    say,
                )?);
            }
        }
        let _ = std::fs::remove_file(&snapshot.path);
        for image_mib in [256u64, 4096] {
            progress(&format!("first page of a {image_mib} MiB image"));
            first_page.push(first_page_of(config, &runtime, &scratch, image_mib, pin)?);
        }
        Ok(())
    })();
    // The images (and the VMs' sockets and logs) are gone whether every
    // step ran or one failed.
    let _ = std::fs::remove_dir_all(&scratch);
    measured?;
    let cases = config
        .delays_ms
        .iter()
        .zip(per_delay)
        .map(|(&d, r)| Case::of(d, r))
        .collect();
    Ok(Report {
        rounds,
        cpus: config.cpus,
        link_mb_s: config.link_mb_s,
        loadavg_before,
        loadavg_after: LoadAverage::now().unwrap_or_default(),
        hiccups,
        cases,
        first_page,
    })
}

/// One round of one delay: idle, under push, the naive design, raw TCP,
/// a VM.
#[allow(clippy::too_many_arguments)]
fn measure_round(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    scratch: &Path,
    image: &Path,
    pages: u64,
    delay_ms: u64,
    pin: Pin,
    progress: impl Fn(&str),
) -> Result<Round, BoxError> {
    let len = pages * 4096;
    let link = Link {
        delay: Duration::from_millis(delay_ms),
        rate: config.link_mb_s,
    };
    progress("idle link");
    let idle = {
        let server = page_server(&config.uffd_bin, image, false, pin)?;
        let remote = connect(&pinned_link(server.addr.clone(), link, pin)?, false)?;
        demand_latencies(runtime, &remote, pages, config.samples, None)
    };
    progress("under push");
    let (under_push, bulk_mb_s) = {
        let server = page_server(&config.uffd_bin, image, true, pin)?;
        let started = Instant::now();
        let remote = Arc::new(connect(
            &pinned_link(server.addr.clone(), link, pin)?,
            false,
        )?);
        let watcher = {
            let remote = Arc::clone(&remote);
            std::thread::spawn(move || push_seconds(&remote, len, started))
        };
        let lat = demand_latencies(runtime, &remote, pages, config.samples, Some(len));
        let seconds = watcher.join().map_err(|_| "the push watcher panicked")?;
        (lat, len as f64 / 1e6 / seconds)
    };
    progress("one connection, under push");
    let naive = {
        let server = page_server(&config.uffd_bin, image, true, pin)?;
        let remote = connect(&pinned_link(server.addr.clone(), link, pin)?, true)?;
        demand_latencies(runtime, &remote, pages, config.samples, Some(len))
    };
    progress("raw TCP");
    let raw_tcp_mb_s = raw_tcp(len, link, false, pin)?;
    let raw_tcp_to_memory_mb_s = raw_tcp(len, link, true, pin)?;
    let link_rtt_p50_us = link_rtt(link, config.samples.min(200), pin)?;
    progress("a VM in another process, idle link");
    let vm = vm_faults(config, scratch, image, pages, link, pin)?;
    Ok(Round {
        delay_ms,
        demand_p50_us: median(idle.clone()),
        demand_p99_idle_us: percentile(idle, 99.0),
        reads_under_push: under_push.len() as f64,
        naive_reads_under_push: naive.len() as f64,
        demand_p99_push_us: percentile(under_push, 99.0),
        naive_p99_push_us: percentile(naive, 99.0),
        bulk_mb_s,
        raw_tcp_mb_s,
        raw_tcp_to_memory_mb_s,
        added_rtt_us: 2.0 * delay_ms as f64 * 1000.0,
        link_rtt_p50_us,
        vm_fault_p50_us: vm.touch_p50_us,
        vm_fault_p99_us: vm.touch_p99_us,
        vm_server_switches_per_fault: vm.switches_per_fault,
    })
}

/// The first page of an image of `image_mib` (sparse, in `scratch`),
/// over direct loopback: for this process's source, and for a VM.
fn first_page_of(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    scratch: &Path,
    image_mib: u64,
    pin: Pin,
) -> Result<FirstPage, BoxError> {
    let path = scratch.join(format!("first-page-{image_mib}.img"));
    std::fs::File::create(&path)?.set_len(image_mib << 20)?;
    let server = page_server(&config.uffd_bin, &path, false, pin)?;
    let started = Instant::now();
    let remote = Arc::new(connect(&server.addr, false)?);
    runtime
        .block_on(remote.read(0, 4096))
        .map_err(|e| format!("first page: {e}"))?;
    let first_page_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(remote);
    let touch_list = scratch.join("first-page.list");
    write_page_list(&touch_list, &[0])?;
    let vm_server = serve_from(config, &server.addr, scratch, "first-page-server")?;
    let started = Instant::now();
    let mut touched = None;
    let vm = run_vmm(&config.vmm_bin, &vm_server, &path, &touch_list, 1, || {
        touched = Some(started.elapsed());
        Ok(())
    })?;
    vm_server.stop()?;
    if vm.mismatched != 0 {
        return Err(format!("the VM's first page of {image_mib} MiB was wrong").into());
    }
    let _ = std::fs::remove_file(&path);
    Ok(FirstPage {
        image_mib,
        first_page_ms,
        vm_first_page_ms: touched.unwrap_or_default().as_secs_f64() * 1e3,
    })
}

/// `uffd serve --source tcp://ADDR`, listening, its files in `scratch`
/// named after `name`.
fn serve_from(
    config: &Config,
    addr: &str,
    scratch: &Path,
    name: &str,
) -> Result<ServerProcess, BoxError> {
    let mut cmd = Command::new(&config.uffd_bin);
    cmd.arg("serve")
        .arg("--source")
        .arg(format!("tcp://{addr}"));
    ServerProcess::spawn(cmd, scratch, name)
}

/// A VM's faults over the link, end to end.
struct VmFaults {
    touch_p50_us: f64,
    touch_p99_us: f64,
    switches_per_fault: f64,
}

/// Restores a stand-in VMM through `uffd serve --source tcp://` over
/// `link` (both in processes of their own, on the destination's CPU)
/// from a page server that does not push; the VMM touches
/// `config.samples` random pages from one vCPU and verifies them.
fn vm_faults(
    config: &Config,
    scratch: &Path,
    image: &Path,
    pages: u64,
    link: Link,
    pin: Pin,
) -> Result<VmFaults, BoxError> {
    let touched: Vec<u64> = shuffled(pages, 0x7E57)
        .into_iter()
        .take(config.samples)
        .collect();
    let touch_list = scratch.join("vm-touch.list");
    write_page_list(&touch_list, &touched)?;
    let page_server = page_server(&config.uffd_bin, image, false, pin)?;
    let addr = pinned_link(page_server.addr.clone(), link, pin)?;
    let server = serve_from(config, &addr, scratch, "vm-server")?;
    let pid = server.pid();
    let before = ProcCounters::read(pid)?;
    let mut after = None;
    let vm = run_vmm(&config.vmm_bin, &server, image, &touch_list, 1, || {
        after = Some(ProcCounters::read(pid)?);
        Ok(())
    })?;
    let faults = server.faults()?;
    server.stop()?;
    if vm.mismatched != 0 {
        let bad = vm.mismatched;
        return Err(format!("the VM restored over the link read {bad} wrong pages").into());
    }
    if faults == 0 {
        return Err("the VM restored over the link faulted on no page".into());
    }
    let switches = before.delta(&after.unwrap_or_default());
    Ok(VmFaults {
        touch_p50_us: vm.touch_p50_us,
        touch_p99_us: vm.touch_p99_us,
        switches_per_fault: switches.context_switches() as f64 / faults as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<usize> {
        allowed_cpus().unwrap()
    }

    #[test]
    fn split_puts_each_side_on_a_cpu_of_its_own() {
        std::thread::spawn(|| {
            let cpus = allowed();
            if cpus.len() < 2 {
                assert!(Pin::new(Cpus::Split).is_err());
                return;
            }
            let pin = Pin::new(Cpus::Split).unwrap();
            pin.source();
            assert_eq!(allowed(), [cpus[0]]);
            // What a pinned thread starts stays on its side.
            let child = std::thread::spawn(allowed).join().unwrap();
            assert_eq!(child, [cpus[0]]);
            pin.destination();
            assert_eq!(allowed(), [cpus[1]]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_link_delays_every_byte_in_order_and_holds_a_bounded_amount() {
        let sink = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = delay_link(
            sink.local_addr().unwrap().to_string(),
            Duration::from_millis(20),
        )
        .unwrap();
        let mut out = TcpStream::connect(link).unwrap();
        let (mut inp, _) = sink.accept().unwrap();
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        out.write_all(&sent[..1]).unwrap();
        let mut first = [0u8; 1];
        inp.read_exact(&mut first).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
        out.write_all(&sent[1..]).unwrap();
        let mut got = vec![0u8; sent.len() - 1];
        inp.read_exact(&mut got).unwrap();
        assert!(first[0] == sent[0] && got == sent[1..]);

        // A receiver that stops reading: the sender is held up once the
        // link and the socket buffers are full, as over a network.
        out.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0usize;
        while written < 512 << 20 {
            match out.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        assert!(
            written < 128 << 20,
            "{written} bytes went into a link nobody read"
        );
    }

    #[test]
    fn a_shaped_link_carries_no_more_than_its_rate_and_keeps_the_order() {
        let sink = TcpListener::bind("127.0.0.1:0").unwrap();
        let shaped = Link {
            delay: Duration::ZERO,
            rate: Some(20),
        };
        let link = pinned_link(sink.local_addr().unwrap().to_string(), shaped, Pin(None)).unwrap();
        let mut out = TcpStream::connect(link).unwrap();
        let (mut inp, _) = sink.accept().unwrap();
        let sent: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let t = Instant::now();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || out.write_all(&sent).unwrap())
        };
        let mut got = vec![0u8; sent.len()];
        inp.read_exact(&mut got).unwrap();
        let took = t.elapsed();
        writer.join().unwrap();
        assert!(got == sent, "every byte, in order");
        // 4 MB at 20 MB/s: the wire alone takes 200 ms.
        assert!(took >= Duration::from_millis(195), "{took:?}");
    }

    #[test]
    fn split_needs_two_cpus_and_shared_pins_nothing() {
        std::thread::spawn(|| {
            let before = allowed();
            let shared = Pin::new(Cpus::Shared).unwrap();
            shared.source();
            shared.destination();
            assert_eq!(allowed(), before);
            Pin::on(before[0]);
            let e = Pin::new(Cpus::Split).unwrap_err().to_string();
            assert!(e.contains("two CPUs"), "{e}");
        })
        .join()
        .unwrap();
    }
}
