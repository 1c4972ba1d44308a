//! The restore benchmark: a snapshot, a workload touching a recorded
//! working set in random order, and three ways of serving it, measured in
//! one run so that only ratios matter.
//!
//! 1. `record`: one restore served on demand with recording on, which
//!    writes the working set;
//! 2. `prefetch`: restore with that working set prefetched;
//! 3. `on-demand`: restore served on demand only;
//! 4. `one-by-one`: a handler written like Firecracker's example (one
//!    thread, one 4 KiB COPY per fault).
//!
//! Each restore goes through the real socket and handshake, with the
//! guest memory mapped afresh in this process; restore-to-done is the time
//! from the handshake until the workload has touched every page of the
//! working set. Every touched page is checked against the file.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{Mapping, MemoryKind};

use crate::engine::{Engine, OneByOneEngine, PagerEngine, PagerEngineConfig};
use crate::server::{Server, ServerConfig};
use crate::stats::VmReport;
use crate::vmm::HandOver;
use uffd_pager::{FileMode, FileSource, PageSource, WorkingSet};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Snapshot size in MiB.
    pub size_mib: u64,
    /// Share of pages in the working set, percent.
    pub working_set_percent: u64,
    /// Threads touching guest memory (vCPUs).
    pub vcpus: usize,
    /// Handler threads per VM for the uffd engines.
    pub threads: usize,
    /// Spin time of the handler threads before blocking.
    pub spin: Duration,
    /// Bytes the uffd engine installs per fault (4096 = the faulting page only).
    pub granule: u64,
    /// Rounds of the three measured restores; each case reports its median.
    pub rounds: usize,
    /// Where to put the snapshot file (a temporary directory by default).
    pub dir: Option<PathBuf>,
    /// Report progress on stderr.
    pub progress: bool,
}

/// One measured restore.
#[derive(Debug, Clone, Serialize)]
pub struct BenchCase {
    /// `prefetch`, `on-demand`, `one-by-one`.
    pub name: &'static str,
    /// Restore-to-done, seconds (median of the rounds).
    pub seconds: f64,
    /// Faults the server saw.
    pub faults: u64,
    /// Pages installed ahead of faults.
    pub prefetched_pages: u64,
    /// Fault service time percentiles (message read to resolved), µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Pages whose contents did not match the file (must be 0).
    pub mismatched_pages: u64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Snapshot size, MiB.
    pub size_mib: u64,
    /// Pages in the recorded working set.
    pub working_set_pages: u64,
    /// Bytes of the working-set file.
    pub working_set_file_bytes: u64,
    /// The measured restores.
    pub cases: Vec<BenchCase>,
    /// on-demand seconds / prefetch seconds (target >= 3).
    pub prefetch_vs_on_demand: f64,
    /// one-by-one seconds / on-demand seconds (target >= 1.5).
    pub on_demand_vs_one_by_one: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up files or memory failed.
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// xorshift64*.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn shuffle(v: &mut [u64], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        let j = (next_random(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Writes a snapshot: three data pages in four (each stamped with its
/// index), one zero page in four, as guest memory tends to be.
fn write_snapshot(path: &Path, size: u64) -> Result<(), BenchError> {
    let file = std::fs::File::create(path).map_err(setup("creating the snapshot"))?;
    let chunk_pages = 512u64;
    let mut chunk = vec![0u8; (chunk_pages * 4096) as usize];
    for start in (0..size / 4096).step_by(chunk_pages as usize) {
        for (k, page) in chunk.chunks_mut(4096).enumerate() {
            let index = start + k as u64;
            if index % 4 == 3 {
                page.fill(0);
            } else {
                page.fill((index % 251) as u8 | 1);
                page[..8].copy_from_slice(&index.to_le_bytes());
            }
        }
        file.write_all_at(&chunk, start * 4096)
            .map_err(setup("writing the snapshot"))?;
    }
    Ok(())
}

struct Restore {
    seconds: f64,
    report: VmReport,
    mismatched: u64,
}

/// One restore: a server with `engine`, a fresh guest, the workload.
fn restore(
    dir: &Path,
    name: &str,
    file_len: u64,
    engine: Arc<dyn Engine>,
    record: Option<PathBuf>,
    pages: &[u64],
    vcpus: usize,
) -> Result<Restore, BenchError> {
    let socket = dir.join(format!("{name}.sock"));
    let server = Server::bind(
        ServerConfig {
            socket: socket.clone(),
            file_len,
            allow_uid: None,
            record,
            stats_json: None,
            handshake_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            max_connections: crate::server::default_max_connections(),
            source_identity: None,
        },
        engine,
    )
    .map_err(setup("starting the server"))?;
    let handle = server.handle();
    let stats = server.stats();
    let runner = std::thread::spawn(move || server.run());
    let guest =
        Mapping::new(MemoryKind::Anon, file_len as usize).map_err(setup("mapping guest memory"))?;
    let started = Instant::now();
    let handed = HandOver::new(&socket)
        .region(guest.addr(), file_len, 0, 4096)
        .send()
        .map_err(setup("handing guest memory over"));
    let handed = match handed {
        Ok(h) => h,
        Err(e) => {
            handle.shutdown();
            let _ = runner.join();
            return Err(e);
        }
    };
    let mismatched = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for chunk in pages.chunks(pages.len().div_ceil(vcpus.max(1)).max(1)) {
            let (guest, mismatched) = (&guest, &mismatched);
            s.spawn(move || {
                for &p in chunk {
                    let mut stamp = [0u8; 8];
                    guest.read((p * 4096) as usize, &mut stamp);
                    let want = if p % 4 == 3 { 0 } else { p };
                    if u64::from_le_bytes(stamp) != want {
                        mismatched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    handle.shutdown();
    runner
        .join()
        .map_err(|_| BenchError::Setup("the server thread panicked".into()))?
        .map_err(setup("the server"))?;
    drop(handed);
    let report = stats
        .reports()
        .pop()
        .ok_or_else(|| BenchError::Setup("the server reported no VM".into()))?;
    Ok(Restore {
        seconds,
        report,
        mismatched: mismatched.into_inner(),
    })
}

/// The run with the median restore-to-done time.
fn median(mut runs: Vec<Restore>) -> Restore {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

fn case(name: &'static str, r: &Restore) -> BenchCase {
    BenchCase {
        name,
        seconds: r.seconds,
        faults: r.report.engine.faults,
        prefetched_pages: r.report.engine.prefetched_pages,
        p50_us: r.report.engine.p50_us,
        p99_us: r.report.engine.p99_us,
        mismatched_pages: r.mismatched,
    }
}

/// Runs the benchmark.
pub fn run(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    let scratch = match &config.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("uffd-serve-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch).map_err(setup("creating the scratch directory"))?;
    let result = run_in(config, &scratch);
    if config.dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

fn run_in(config: &BenchConfig, dir: &Path) -> Result<BenchReport, BenchError> {
    let say = |m: &str| {
        if config.progress {
            eprintln!("uffd serve bench: {m}");
        }
    };
    let size = config.size_mib.max(1) << 20;
    let snapshot = dir.join("snapshot.mem");
    say(&format!("writing a {} MiB snapshot", config.size_mib));
    write_snapshot(&snapshot, size)?;
    let source: Arc<dyn PageSource> = Arc::new(
        FileSource::open(&snapshot, FileMode::Mmap).map_err(setup("opening the snapshot"))?,
    );
    let total = size / 4096;
    let mut all: Vec<u64> = (0..total).collect();
    shuffle(&mut all, 0x5EED);
    let mut working: Vec<u64> =
        all[..(total * config.working_set_percent.clamp(1, 100) / 100) as usize].to_vec();
    let uffd_engine =
        |prefetch: Option<WorkingSet>, record: bool, spin: Duration| -> Arc<dyn Engine> {
            Arc::new(PagerEngine::new(
                source.clone(),
                PagerEngineConfig {
                    threads: config.threads,
                    record,
                    prefetch,
                    spin,
                    granule: config.granule,
                    ..PagerEngineConfig::default()
                },
            ))
        };

    say(&format!(
        "recording the working set ({} pages, random order)",
        working.len()
    ));
    let ws_path = dir.join("snapshot.ws");
    let recorded = restore(
        dir,
        "record",
        source.len(),
        uffd_engine(None, true, config.spin),
        Some(ws_path.clone()),
        &working,
        config.vcpus,
    )?;
    if recorded.mismatched != 0 {
        return Err(BenchError::Setup(format!(
            "{} pages were served wrong while recording",
            recorded.mismatched
        )));
    }
    let ws = WorkingSet::load(&ws_path, size).map_err(setup("reading the recorded working set"))?;
    let ws_file_bytes = std::fs::metadata(&ws_path).map(|m| m.len()).unwrap_or(0);

    // The measured runs touch the same set in another random order.
    shuffle(&mut working, 0xBEEF);
    // Rounds of the three restores, interleaved so that a burst of load
    // from elsewhere hits all of them alike; each case reports its median.
    let mut runs: [Vec<Restore>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 1..=config.rounds.max(1) {
        say(&format!("round {round}: restore with prefetch"));
        // The prefetcher needs the CPU a spinning handler would take.
        runs[0].push(restore(
            dir,
            "prefetch",
            source.len(),
            uffd_engine(Some(ws.clone()), false, Duration::ZERO),
            None,
            &working,
            config.vcpus,
        )?);
        say(&format!("round {round}: restore on demand"));
        runs[1].push(restore(
            dir,
            "on-demand",
            source.len(),
            uffd_engine(None, false, config.spin),
            None,
            &working,
            config.vcpus,
        )?);
        say(&format!(
            "round {round}: restore with the one-by-one handler"
        ));
        runs[2].push(restore(
            dir,
            "one-by-one",
            source.len(),
            Arc::new(OneByOneEngine::new(source.clone())),
            None,
            &working,
            config.vcpus,
        )?);
    }
    let [prefetch, on_demand, one_by_one] = runs.map(median);
    Ok(BenchReport {
        size_mib: config.size_mib,
        working_set_pages: ws.len() as u64,
        working_set_file_bytes: ws_file_bytes,
        prefetch_vs_on_demand: on_demand.seconds / prefetch.seconds,
        on_demand_vs_one_by_one: one_by_one.seconds / on_demand.seconds,
        cases: vec![
            case("prefetch", &prefetch),
            case("on-demand", &on_demand),
            case("one-by-one", &one_by_one),
        ],
    })
}
