//! `uffd serve`: a Firecracker-compatible snapshot restore server, and
//! `uffd serve bench`, its restore benchmark.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use uffd_pager::{FileMode, FileSource, PageSource, WorkingSet};
use uffd_serve::engine::{Engine, PagerEngine, PagerEngineConfig};
use uffd_serve::server::{Server, ServerConfig};

use super::CmdResult;

/// Serve guest memory to Firecracker (or any VMM speaking its handshake)
/// from a memory snapshot file, over userfaultfd.
///
/// Listens on a Unix stream socket. Each VM connects once and sends one
/// JSON array of regions with its userfaultfd (Firecracker's `Uffd` memory
/// backend does exactly this at snapshot load). Many VMs can restore from
/// the same file at once. Bad handshakes are refused with a log line naming
/// the step that failed; other VMs are not affected.
///
/// Point Firecracker at it in the snapshot load request:
///   "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/vm.uffd.sock"}
///
/// Upgrades: `uffd serve --takeover` with the same --mem-file and
/// --socket takes every VM over from the running server (their
/// userfaultfds and what is installed, over `<socket>.takeover`), which
/// then exits 0; no VM waits meanwhile. A server killed outright (SIGKILL,
/// the OOM killer) cannot do that: its VMs wait on their next missing page.
///
/// Signals: SIGTERM or SIGINT stop accepting and drain every VM still
/// running: its missing pages are installed from the file and its memory is
/// unregistered, so it runs on without the server (bounded by
/// --drain-timeout; ranges not installed in time stay registered and are
/// logged). Then working sets and statistics are written and the server
/// exits. SIGUSR1 writes working sets now. A signal that comes while a
/// --takeover is still receiving VMs waits for the takeover to finish, so
/// those VMs are drained too and none is left without a handler.
///
/// Output: log lines on stderr, one per VM event (connected with its
/// regions, refused and why, ended, drained), `--json-logs` for JSON
/// lines; --stats-json writes every VM's statistics as JSON at exit.
///
/// Exit status: 0 after a requested stop (SIGTERM, SIGINT, or every VM
/// handed to a successor), 1 when the server cannot start (a memory file it
/// cannot serve, a socket path in use or not a socket) or fails, 2 for bad
/// arguments.
///
/// Examples:
///   uffd serve --mem-file vm.mem --socket /run/vm.sock --record vm.ws
///   uffd serve --mem-file vm.mem --socket /run/vm.sock --prefetch vm.ws --background-fill
///   uffd serve --source s3://snaps/fleet/vm-1 --socket /run/vm.sock --cache-dir /var/cache/uffd
///   uffd serve bench --mib 1024 --vcpus 1,2,4,8
#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    verbatim_doc_comment
)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    // Boxed: the server's many flags would otherwise make every variant of
    // the command enum as large as this one.
    #[command(flatten)]
    serve: Box<ServeArgs>,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Bench(Box<BenchArgs>),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("image").required(true).args(["mem_file", "source"])))]
struct ServeArgs {
    /// The memory snapshot file (Firecracker's `mem_file_path` output of
    /// snapshot creation). Region offsets index into it. The same as
    /// `--source file://PATH`.
    #[arg(long, value_name = "PATH")]
    mem_file: Option<PathBuf>,
    /// Where the memory image comes from: `file://PATH`, or
    /// `tcp://HOST:PORT` for `uffd page-server` on another host (post-copy:
    /// the VM runs here while its pages arrive; faulting pages take the
    /// demand channel, --prefetch and --background-fill the bulk channel),
    /// or a snapshot stored with `uffd snapshot push`: s3://BUCKET/DIR/NAME
    /// (or gs://, az://, or file:// naming a local manifest), configured by
    /// the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_REGION, AWS_ALLOW_HTTP...); the chunk holding a faulting page is
    /// fetched once, however many faults and VMs want it, into a cache
    /// shared by every VM (--cache-memory, --cache-dir).
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// With a tcp:// source: how long to keep reconnecting after the page
    /// server's connection drops (faulting threads wait meanwhile); past it,
    /// pages that cannot be fetched are poisoned (SIGBUS on access) and
    /// logged. A duration such as 60s.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    reconnect_timeout: Duration,
    /// With a tcp:// source: keep every page that arrived on this host
    /// after a VM has it, so that the next VM restored from this server
    /// takes it from memory instead of the network. Costs a copy of the
    /// image here for as long as the server runs. Without it, a page's
    /// memory is given back once a VM holds the page, and a later VM
    /// fetches it again.
    #[arg(long)]
    keep_landed: bool,
    /// With an object-store source: bytes of chunks kept in memory (K/M/G
    /// suffixes), shared by every VM.
    #[arg(long, default_value = "1G", value_name = "BYTES", value_parser = parse_bytes)]
    cache_memory: u64,
    /// With an object-store source: also keep fetched chunks in this
    /// directory, so a restarted server starts warm. Files are checked
    /// against their hash when used; bad ones are fetched again.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// With --cache-dir: bytes of chunks kept there (least recently used
    /// go first).
    #[arg(long, default_value = "16G", value_name = "BYTES", value_parser = parse_bytes)]
    cache_dir_size: u64,
    /// With an object-store source: how long one chunk may take, retries of
    /// 5xx answers, timeouts, lost connections and corrupt chunks included,
    /// before its pages are poisoned (the guest gets SIGBUS touching them;
    /// logged as an error). A duration such as 30s.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    fetch_timeout: Duration,
    /// A delta (from `uffd snapshot live-demo` or `uffd_snapshot::write_delta`)
    /// laid over the image (--mem-file or --source): its pages are served instead of the memory
    /// file's. Repeat in the order the deltas were taken; later ones win.
    /// Each is checked (format, every field, every checksum) at start.
    #[arg(long = "layer", value_name = "PATH")]
    layers: Vec<PathBuf>,
    /// The Unix socket to listen on (Firecracker's `backend_path`). A stale
    /// socket file is replaced; one with a live server is refused.
    #[arg(long, value_name = "PATH", required = true)]
    socket: Option<PathBuf>,
    /// Fault handler threads per VM. One is fastest for a memory file: a
    /// second only contends for the engine's table lock (measured: 3.1
    /// futex calls per fault at 2 threads, none at 1) and installs from
    /// the page cache never block; reads of slow sources are kept in
    /// flight without a thread each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    threads: usize,
    /// Record each VM's first-touched pages into this working-set file when
    /// the VM exits (and on SIGUSR1). `{pid}` and `{vm}` in the path are
    /// replaced, to keep one file per VM.
    #[arg(long, value_name = "WS")]
    record: Option<PathBuf>,
    /// Install the pages of this recorded working set first, in large
    /// batches in file order, while faults keep priority. From object
    /// storage, the chunks holding them are also fetched into the cache at
    /// start, 32 at a time, in recorded order (a snapshot pushed with
    /// `uffd snapshot push --working-set` keeps them in chunks of their
    /// own). Fault handlers are then one per CPU, sleeping until a fault
    /// (as with --handler-per-cpu): a spinning handler takes CPU the
    /// replay needs (serve bench, 5 rounds: restore-to-done 0.033-0.043 s
    /// median at 2-8 vCPUs instead of 0.035-0.062 s).
    #[arg(long, value_name = "WS")]
    prefetch: Option<PathBuf>,
    /// After the working set (if any), install every other page in the
    /// background, so the VM stops faulting altogether. From object
    /// storage, every chunk is also fetched into the cache, 4 at a time,
    /// in the order the push packed them (up to --cache-memory).
    #[arg(long)]
    background_fill: bool,
    /// Write every VM's statistics (and refused connections) as JSON here,
    /// updated whenever a VM ends.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Refuse peers whose uid (SO_PEERCRED) is not this one.
    #[arg(long, value_name = "UID")]
    allow_uid: Option<u32>,
    /// Spin this many microseconds reading the userfaultfd before sleeping:
    /// a fault soon after another is served without waking the handler.
    /// Spinning backs off while other threads (the VMs' vCPUs) want the
    /// core; 0 = never spin.
    #[arg(long, default_value_t = 50, value_name = "US")]
    spin_us: u64,
    /// Spin for --spin-us even when other threads want the core (for a
    /// server with cores of its own).
    #[arg(long)]
    spin_always: bool,
    /// Instead of --threads and spinning: one handler thread per CPU (up
    /// to 8), each pinned to its CPU and sleeping until a fault arrives; a
    /// fault wakes them all and the one on the CPU the faulting vCPU just
    /// left usually serves it, on that core, with no cross-core wake-up.
    /// Overrides --threads, --spin-us and --spin-always.
    #[arg(long)]
    handler_per_cpu: bool,
    /// Bytes installed per fault on 4 KiB regions: 4096 serves exactly the
    /// faulting page (as Firecracker's handler does); a larger power of two
    /// up to 2 MiB also installs its aligned neighbours (fewer faults, more
    /// memory). 2 MiB regions always use 2 MiB.
    #[arg(long, default_value = "4096", value_name = "BYTES", value_parser = parse_bytes)]
    granule: u64,
    /// Adaptive sequential readahead, up to this many bytes per fault
    /// (K/M suffixes; at most 2M; 0 = off): while the guest reads memory in
    /// order each fault installs a window that doubles up to this size,
    /// and a random touch shrinks it again, so a guest that re-reads its
    /// memory sequentially gets large installs without a recorded working
    /// set, and one touching it at random is served page by page.
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = parse_bytes)]
    readahead: u64,
    /// How the memory file is read: `mmap` (COPY straight from the page
    /// cache) or `pread` (bounded reads; for files that may change size).
    #[arg(long, default_value = "mmap", value_name = "MODE")]
    file_mode: String,
    /// How long a VMM may take to send its handshake: a duration such as
    /// 500ms, 5s or 2m (a bare number is seconds).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// The old spelling of --handshake-timeout, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        hide = true,
        conflicts_with = "handshake_timeout"
    )]
    handshake_timeout_ms: Option<u64>,
    /// On SIGTERM/SIGINT, how long each VM still running may take to be
    /// drained: every page not yet installed is installed and its memory
    /// unregistered, so it runs on without the server. Ranges not installed
    /// in time stay registered (logged as errors): a VM touching them waits.
    /// A duration such as 30s or 2m (a bare number is seconds).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Connections handled at once, handshaking or served; one more is
    /// accepted, logged and closed at once. Default: 256, or fewer when
    /// `ulimit -n` would run out first (8 descriptors per VM).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Take every VM over from the server running on --socket, which then
    /// exits: an upgrade or restart with no VM left waiting. Both must
    /// serve the same --mem-file; this server's own flags (--threads,
    /// --background-fill, ...) apply from then on.
    #[arg(long)]
    takeover: bool,
    /// Do not map the whole memory file into this process's page tables at
    /// start (mmap mode). Mapping it costs a pass over the file's page
    /// tables once (about 2 MiB of them per GiB) and saves a minor fault in
    /// the server per page each VM touches first; skip it for snapshots
    /// much larger than memory.
    #[arg(long)]
    no_populate: bool,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long)]
    json_logs: bool,
}

/// Measure restore-to-done with the VMM, the server and the baseline each
/// in a process of its own, as in production.
///
/// A VMM (`uffd-standin-vmm`, which hands its memory over exactly as
/// Firecracker does and then verifies every page it touched) restores a
/// synthetic snapshot and touches its recorded working set (10% of the
/// pages by default) in random order from N vCPU threads. It is served by:
///
///   prefetch   `uffd serve --prefetch <working set recorded first>`
///   on-demand  `uffd serve`, faults only
///   baseline   `uffd-bench-baseline-handler`: the same handshake, served
///              like Firecracker's example handler (one thread, poll, read
///              one message, one 4 KiB UFFDIO_COPY, a wake after EEXIST)
///
/// Every (case, vCPUs) pair runs once per round; the order rotates each
/// round. Reported per pair: restore-to-done (the VMM's time from handing
/// memory over to its last touch) median, min and max; the server's
/// faults, context switches and CPU time per fault (from /proc/PID before
/// and after); with --count-syscalls, system calls per fault from one more
/// untimed restore under `strace -c -f`. Ratios per round:
/// on_demand_vs_baseline = baseline seconds / on-demand seconds, and
/// prefetch_vs_on_demand = on-demand seconds / prefetch seconds (above 1
/// means faster), with their median, min (the goals are judged by it) and
/// max. The load average at start and end is part of the output: figures
/// taken on a loaded machine say so.
///
/// The programs are found next to this `uffd` binary (cargo build --release
/// --workspace builds them all). Progress goes to stderr.
///
/// Output (--json): one object {"vmm": "separate-process", "mib",
/// "working_set_pages", "rounds", "server_threads", "server_spin_us",
/// "server_granule", "load_average_start": {"one","five","fifteen"},
/// "load_average_end", "cases": [{"case", "vcpus", "seconds": {"median",
/// "min","max"}, "seconds_per_round", "faults", "ctxt_switches", "cpu_seconds", "per_fault":
/// {"ctxt_switches", "voluntary_ctxt_switches", "cpu_us", "syscalls"},
/// "top_syscalls": [[name, calls]]}], "ratios": [{"vcpus",
/// "on_demand_vs_baseline": {"per_round", "median", "min", "max"},
/// "prefetch_vs_on_demand": {...}}], "mismatched_pages"}. Per-fault
/// figures are null when the server saw no fault. Without --json, a table
/// of the same. --plot FILE.svg also draws every round's restore-to-done
/// per case and vCPU count.
///
/// Needs --mib of disk in --dir and about twice --mib of memory.
///
/// Exit status: 0 when every touched page matched the file, 1 on a
/// mismatch or an error. SIGINT or SIGTERM stop the servers and VMMs it
/// started and remove its scratch files, then exit with 128 + the signal
/// (130, 143).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct BenchArgs {
    /// Snapshot size in MiB.
    #[arg(long, alias = "size-mib", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    mib: u64,
    /// Working set, percent of the snapshot's pages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    working_set_percent: u64,
    /// vCPU threads of the VMM, a comma-separated list; each count is a
    /// set of cases of its own.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    vcpus: Vec<usize>,
    /// Rounds of every (case, vCPUs) pair.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// `uffd serve --threads` of the prefetch and on-demand servers (the
    /// server's default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `uffd serve --spin-us` of those servers (the server's default:
    /// adaptive spinning, which backs off while vCPUs need the core).
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// `uffd serve --handler-per-cpu` for those servers.
    #[arg(long)]
    handler_per_cpu: bool,
    /// `uffd serve --granule` of those servers (the baseline always
    /// installs 4096 bytes per fault; K/M suffixes).
    #[arg(long, default_value = "4096", value_name = "BYTES", value_parser = parse_bytes)]
    granule: u64,
    /// Percentage of zero pages in the snapshot.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    /// Also count each server's system calls per fault with `strace -c -f`
    /// (one extra restore per pair, not timed: strace slows it down).
    #[arg(long)]
    count_syscalls: bool,
    /// Scratch directory for the snapshot, sockets and server logs (kept;
    /// default: a temporary directory, removed).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    report: super::ReportArgs,
}

/// A duration: a number with an optional unit, ms, s, m or h (none means
/// seconds), for every timeout flag alike.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 500ms, 5s, 2m)"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.trim().char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text.trim()[..i], c.to_ascii_uppercase()),
        _ => (text.trim(), 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        other => return Err(format!("unknown unit {other:?}: use K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("{text:?} is not a byte count: {e}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))
}

/// Runs `uffd serve` or `uffd serve bench`.
pub fn run(args: Args) -> CmdResult {
    match args.action {
        Some(Action::Bench(bench)) => run_bench(*bench),
        None => run_server(*args.serve),
    }
}

/// Logs to stderr through a writer thread that drops lines when stderr
/// does not keep up (a pipe its reader stopped reading, or closed), so a
/// server never waits on its log. Keep the guard until exit: dropping it
/// flushes what is queued.
pub(super) fn init_logs(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("uffd-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    guard
}

/// Writes one line to stderr, ignoring failure (a closed pipe must not
/// take the caller down, as `eprintln!` would).
pub(super) fn note(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A source, its identity for takeovers, and the object-store source
/// behind it, if it is one (for its statistics and cache warming).
type Image = (
    Arc<dyn PageSource>,
    Option<String>,
    Option<Arc<uffd_store::ObjectSource>>,
);

/// The image `--mem-file` or `--source` names, and an identity for
/// takeovers (a successor must serve the same image).
fn open_image(a: &ServeArgs) -> Result<Image, uffd_bench::BoxError> {
    let remote = a
        .source
        .as_deref()
        .is_some_and(|url| url.starts_with("tcp://"));
    if a.keep_landed && !remote {
        return Err(
            "--keep-landed is for a tcp:// source (pages that arrive from a page server); \
                    other sources keep nothing of their own to give back"
                .into(),
        );
    }
    let mem_file = match (&a.mem_file, a.source.as_deref()) {
        (Some(path), None) => path.clone(),
        (None, Some(url)) => match url.split_once("://") {
            // A memory file, unless it is a manifest of `uffd snapshot push`.
            Some(("file", path)) if !is_manifest(std::path::Path::new(path)) => {
                PathBuf::from(path)
            }
            Some(("tcp", addr)) => {
                let remote = uffd_remote::RemoteSource::connect(
                    addr,
                    uffd_remote::RemoteConfig {
                        reconnect_timeout: a.reconnect_timeout,
                        keep_installed: a.keep_landed,
                        ..uffd_remote::RemoteConfig::default()
                    },
                )?;
                let identity = format!("{url}:{}", remote.len_and_identity());
                let source = uffd_pager::AsyncSource::new(Arc::new(remote))?;
                return Ok((Arc::new(source), Some(identity), None));
            }
            Some(("file" | "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss", _)) => {
                return open_object_store(a, url)
            }
            _ => {
                return Err(format!(
                    "--source {url}: expected file://PATH, tcp://HOST:PORT, s3://BUCKET/NAME, gs:// or az://"
                )
                .into())
            }
        },
        _ => return Err("give the image as --mem-file PATH or --source URL, once".into()),
    };
    let file_mode = match a.file_mode.as_str() {
        "mmap" => FileMode::Mmap,
        "pread" => FileMode::Pread,
        other => return Err(format!("--file-mode {other}: expected mmap or pread").into()),
    };
    let file = FileSource::open(&mem_file, file_mode)
        .map_err(|e| format!("cannot serve the memory file: {e}"))?;
    if !a.no_populate {
        // One pass over the page tables now, instead of one minor fault in
        // this process per page every VM touches first.
        if let Err(e) = file.populate() {
            tracing::warn!("mapping the memory file ahead of time failed ({e}); serving anyway");
        }
    }
    let identity = Some(file.identity());
    if file.is_empty() {
        return Err(format!(
            "the memory file {} is empty: no VM could be restored from it (is it the snapshot's memory file, not its state file?)",
            mem_file.display()
        )
        .into());
    }
    Ok((Arc::new(file), identity, None))
}

/// True when `path` starts with a snapshot manifest's magic bytes.
fn is_manifest(path: &std::path::Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == uffd_store::manifest::MAGIC
}

/// A snapshot pushed with `uffd snapshot push`, served through the
/// host-wide chunk cache.
fn open_object_store(a: &ServeArgs, url: &str) -> Result<Image, uffd_bench::BoxError> {
    let timeout = a.fetch_timeout.max(Duration::from_millis(100));
    let location = uffd_store::Location::open(
        url,
        &uffd_store::StoreOptions {
            timeout,
            ..uffd_store::StoreOptions::default()
        },
    )?;
    let store = Arc::new(uffd_store::ObjectSource::open(
        location,
        uffd_store::CacheConfig {
            memory_bytes: a.cache_memory,
            dir: a.cache_dir.clone(),
            dir_bytes: a.cache_dir_size,
            fetch_timeout: timeout,
        },
    )?);
    if store.manifest().image_len() == 0 {
        return Err(format!("the snapshot {url} is empty: no VM could be restored from it").into());
    }
    let identity = store.identity();
    tracing::info!(source = %uffd_pager::AsyncPageSource::describe(&*store), "serving from object storage");
    let source = uffd_pager::AsyncSource::new(store.clone())?;
    Ok((Arc::new(source), Some(identity), Some(store)))
}

/// Chunk fetches in flight at once when warming the cache with a working set.
const WARM_IN_FLIGHT: usize = 32;

/// The image with each `--layer` delta laid over it, in order. A
/// takeover must serve the same bytes, so the layers join the identity.
fn with_layers(image: Image, layers: &[PathBuf]) -> Result<Image, uffd_bench::BoxError> {
    let (source, identity, store) = image;
    if layers.is_empty() {
        return Ok((source, identity, store));
    }
    let identity = identity.map(|mut id| {
        for layer in layers {
            let len = std::fs::metadata(layer).map(|m| m.len()).unwrap_or(0);
            id.push_str(&format!(" + layer {} ({len} bytes)", layer.display()));
        }
        id
    });
    let source = uffd_snapshot::layered(source, layers).map_err(|e| format!("--layer: {e}"))?;
    Ok((source, identity, store))
}

fn run_server(a: ServeArgs) -> CmdResult {
    let _logs = init_logs(a.json_logs);
    let socket = a
        .socket
        .clone()
        .ok_or("--socket PATH is required (where VMMs connect)")?;
    let (source, source_identity, store) = with_layers(open_image(&a)?, &a.layers)?;
    let prefetch = match &a.prefetch {
        Some(path) => {
            let ws = WorkingSet::load(path, source.len())
                .map_err(|e| format!("--prefetch {}: {e}", path.display()))?;
            tracing::info!(pages = ws.len(), path = %path.display(), "working set loaded");
            Some(ws)
        }
        None => None,
    };
    if let Some(store) = &store {
        // The working set's chunks, many in flight, into the host-wide
        // cache, while the engine replays it page by page; with background
        // fill, then every other chunk in the order they were packed (the
        // engine's fill goes in image order, which in a snapshot packed
        // working set first or pushed against a parent jumps between
        // chunks).
        let pages = prefetch.iter().flat_map(|ws| ws.pages().iter().copied());
        let then = if a.background_fill {
            uffd_store::ThenFill::Every(uffd_store::FILL_IN_FLIGHT)
        } else {
            uffd_store::ThenFill::No
        };
        if prefetch.is_some() || a.background_fill {
            store.warm(pages, WARM_IN_FLIGHT, then);
        }
    }
    if let Err(e) = uffd::probe() {
        tracing::warn!("userfaultfd is not available to this process ({e}); VMMs must still be able to create theirs");
    }
    let file_len = source.len();
    let handler_per_cpu = a.handler_per_cpu || prefetch.is_some();
    let engine: Arc<dyn Engine> = Arc::new(PagerEngine::new(
        source,
        PagerEngineConfig {
            threads: a.threads.max(1),
            record: a.record.is_some(),
            prefetch,
            background_fill: a.background_fill,
            spin: Duration::from_micros(a.spin_us),
            spin_adaptive: !a.spin_always,
            handler_per_cpu,
            granule: a.granule,
            readahead: match a.readahead {
                0 => 0,
                n if (4096..=2 << 20).contains(&n) => n,
                n => return Err(format!("--readahead {n}: expected 0 (off) or 4K to 2M").into()),
            },
        },
    ));
    let config = ServerConfig {
        socket,
        file_len,
        allow_uid: a.allow_uid,
        record: a.record,
        stats_json: a.stats_json,
        handshake_timeout: a
            .handshake_timeout_ms
            .map_or(a.handshake_timeout, Duration::from_millis),
        drain_timeout: a.drain_timeout,
        max_connections: match a.max_connections {
            Some(0) => return Err("--max-connections must be at least 1".into()),
            Some(n) => n,
            None => uffd_serve::server::default_max_connections(),
        },
        source_identity,
    };
    // Before the first VM is taken on: see `uffd_serve::signals`.
    let signals = uffd_serve::signals::install()?;
    let server = if a.takeover {
        Server::take_over(config, engine)?
    } else {
        Server::bind(config, engine)?
    };
    signals.route_to(server.handle());
    server.run()?;
    if let Some(store) = store {
        let st = store.stats();
        tracing::info!(
            gets = st.gets,
            fetched_bytes = st.fetched_bytes,
            memory_hits = st.memory_hits,
            disk_hits = st.disk_hits,
            joined = st.joined,
            corrupt = st.corrupt,
            failed = st.failed,
            "chunk cache"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_bench(a: BenchArgs) -> CmdResult {
    super::require_userfaultfd("uffd serve bench")?;
    uffd_bench::leftovers::clean_up_on_interrupt("uffd serve bench")?;
    let report_args = a.report.clone();
    let uffd_bin = std::env::current_exe()?;
    let beside = |name: &str| uffd_bin.with_file_name(name);
    let report = uffd_bench::serve::run(&uffd_bench::serve::Config {
        mib: a.mib,
        working_set_percent: a.working_set_percent,
        vcpus: a.vcpus,
        rounds: a.rounds as usize,
        threads: a.threads.max(1),
        spin_us: a.spin_us,
        handler_per_cpu: a.handler_per_cpu,
        granule: a.granule,
        zero_percent: a.zero_percent,
        dir: a.dir,
        count_syscalls: a.count_syscalls,
        vmm_bin: beside("uffd-standin-vmm"),
        baseline_bin: beside("uffd-bench-baseline-handler"),
        uffd_bin,
        progress: true,
    })?;
    if a.report.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_serve_bench(&report);
    }
    report_args.write_plot(
        || {
            format!(
                "uffd serve bench: {} MiB snapshot, VMM in another process",
                report.mib
            )
        },
        || uffd_bench::serve::plot_panels(&report),
    )?;
    if report.mismatched_pages > 0 {
        return Err(format!(
            "{} pages did not match the snapshot",
            report.mismatched_pages
        )
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_serve_bench(r: &uffd_bench::serve::Report) {
    let l = |x: &uffd_bench::report::LoadAverage| {
        format!("{:.2} {:.2} {:.2}", x.one, x.five, x.fifteen)
    };
    println!(
        "VMM in a separate process; snapshot {} MiB, working set {} pages touched in random order, {} rounds; \
         server --threads {} --spin-us {} --granule {}",
        r.mib, r.working_set_pages, r.rounds, r.server_threads, r.server_spin_us, r.server_granule
    );
    println!(
        "load average at start {}, at end {}",
        l(&r.load_average_start),
        l(&r.load_average_end)
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<10} {:>5} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "case",
        "vcpus",
        "median s",
        "min s",
        "max s",
        "faults",
        "csw/fault",
        "cpu µs/f",
        "sys/fault"
    );
    for c in &r.cases {
        println!(
            "{:<10} {:>5} {:>9.4} {:>9.4} {:>9.4} {:>8.0} {:>10} {:>10} {:>10}",
            c.case.name(),
            c.vcpus,
            c.seconds.median,
            c.seconds.min,
            c.seconds.max,
            c.faults,
            opt(c.per_fault.ctxt_switches),
            opt(c.per_fault.cpu_us),
            opt(c.per_fault.syscalls)
        );
    }
    println!("speed-ups per round (median, min, max):");
    for x in &r.ratios {
        let s = |r: &uffd_bench::serve::Ratio| {
            format!(
                "{:.2}x (min {:.2}x, max {:.2}x)",
                r.spread.median, r.spread.min, r.spread.max
            )
        };
        println!(
            "  {} vCPU(s): on-demand vs baseline {}; prefetch vs on-demand {}",
            x.vcpus,
            s(&x.on_demand_vs_baseline),
            s(&x.prefetch_vs_on_demand)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_byte_counts_parse_with_their_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e999s").is_err());
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("2M"), Ok(2 << 20));
        assert!(parse_bytes("3X").is_err());
        assert!(parse_bytes("99999999999G").is_err());
    }
}
