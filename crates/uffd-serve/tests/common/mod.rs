//! Shared pieces of the server tests: a memory file, an in-process server,
//! the stand-in VMM as a separate process, bounded waits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_pager::{FileMode, FileSource, PageSource};
use uffd_serve::engine::{Engine, PagerEngine, PagerEngineConfig};
use uffd_serve::server::{Server, ServerConfig, ServerHandle};
use uffd_serve::stats::{Refusal, StatsLog, VmReport};

pub use uffd_testkit::{snapshot_file as memory_file, Scratch};

/// A scratch directory for test `name` holding a memory file `mem` of
/// `len` bytes (see [`memory_file`]); returns both.
pub fn scratch_with_memory(name: &str, len: u64) -> (Scratch, PathBuf) {
    let dir = Scratch::new(name);
    let mem = dir.path("mem");
    memory_file(&mem, len);
    (dir, mem)
}

/// The memory file as a source, and its identity.
pub fn open_source(mem_file: &Path, mode: FileMode) -> (Arc<dyn PageSource>, String) {
    let file = FileSource::open(mem_file, mode).unwrap();
    let identity = file.identity();
    (Arc::new(file), identity)
}

/// A server running on its own thread; shut down (and joined) on drop.
pub struct TestServer {
    pub socket: PathBuf,
    pub handle: ServerHandle,
    pub stats: Arc<StatsLog>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(socket: PathBuf, mem_file: &Path, config: PagerEngineConfig) -> TestServer {
        Self::start_with(socket, mem_file, config, None, None)
    }

    pub fn start_with(
        socket: PathBuf,
        mem_file: &Path,
        config: PagerEngineConfig,
        allow_uid: Option<u32>,
        record: Option<PathBuf>,
    ) -> TestServer {
        Self::start_in_mode(socket, mem_file, FileMode::Mmap, config, allow_uid, record)
    }

    pub fn start_in_mode(
        socket: PathBuf,
        mem_file: &Path,
        mode: FileMode,
        config: PagerEngineConfig,
        allow_uid: Option<u32>,
        record: Option<PathBuf>,
    ) -> TestServer {
        let (source, _) = open_source(mem_file, mode);
        let engine: Arc<dyn Engine> = Arc::new(PagerEngine::new(source, config));
        Self::start_engine(socket, mem_file, mode, engine, allow_uid, record)
    }

    /// A server of `mem_file` with its own `engine` (which must serve the
    /// same file).
    pub fn start_engine(
        socket: PathBuf,
        mem_file: &Path,
        mode: FileMode,
        engine: Arc<dyn Engine>,
        allow_uid: Option<u32>,
        record: Option<PathBuf>,
    ) -> TestServer {
        let (source, source_identity) = open_source(mem_file, mode);
        let file_len = source.len();
        let server = Server::bind(
            ServerConfig {
                socket: socket.clone(),
                file_len,
                allow_uid,
                record,
                stats_json: None,
                handshake_timeout: Duration::from_secs(2),
                drain_timeout: Duration::from_secs(10),
                max_connections: uffd_serve::server::default_max_connections(),
                source_identity: Some(source_identity),
            },
            engine,
        )
        .unwrap();
        let handle = server.handle();
        let stats = server.stats();
        let thread = std::thread::spawn(move || server.run().unwrap());
        TestServer {
            socket,
            handle,
            stats,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until `n` VMs have finished; the reports kept (the
    /// last `KEPT_REPORTS`).
    pub fn wait_reports(&self, n: usize, limit: Duration) -> Vec<VmReport> {
        let deadline = Instant::now() + limit;
        loop {
            let done = self.stats.totals().vms;
            if done >= n as u64 {
                return self.stats.reports();
            }
            assert!(
                Instant::now() < deadline,
                "stuck: only {done} of {n} VMs finished within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the `n`-th refused connection (`n` at most
    /// `KEPT_REPORTS`).
    pub fn wait_refusal(&self, n: usize, limit: Duration) -> Refusal {
        let deadline = Instant::now() + limit;
        loop {
            if self.stats.totals().refused >= n as u64 {
                return self.stats.refusals()[n - 1].clone();
            }
            assert!(
                Instant::now() < deadline,
                "stuck: the server did not refuse the connection within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server and waits for it (bounded).
    pub fn stop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "stuck: the server did not shut down within 20 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("the server thread panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.handle.shutdown();
            return;
        }
        self.stop();
    }
}

/// The stand-in VMM's command line.
pub fn standin(socket: &Path, mem_file: &Path) -> Command {
    let mut c = uffd_testkit::standin_command(
        Path::new(env!("CARGO_BIN_EXE_uffd-standin-vmm")),
        socket,
        mem_file,
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Waits (bounded) for a child; kills it and fails naming `what` if stuck.
/// Returns its exit success and its stdout+stderr.
pub fn finish(mut child: Child, what: &str, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (out.status.success(), text);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "stuck: {what} did not finish within {limit:?}; output: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads one line of a child's stdout (bounded: kills it and fails naming
/// `what` if none arrives in `limit`).
pub fn read_line(child: &mut Child, what: &str, limit: Duration) -> String {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send((line, reader.into_inner()));
    });
    match rx.recv_timeout(limit) {
        Ok((line, stdout)) => {
            child.stdout = Some(stdout);
            line
        }
        Err(_) => {
            let _ = child.kill();
            panic!("stuck: {what} printed nothing within {limit:?}");
        }
    }
}

/// Runs one good stand-in VM to completion and checks it verified every byte.
pub fn good_vm_is_served(server: &TestServer, mem_file: &Path, finished_before: usize) -> VmReport {
    let child = standin(&server.socket, mem_file)
        .args([
            "--size",
            &(4 << 20).to_string(),
            "--threads",
            "2",
            "--balloon-every",
            "9",
        ])
        .spawn()
        .unwrap();
    let (ok, out) = finish(child, "the good stand-in VMM", Duration::from_secs(60));
    assert!(ok, "the good VM was not served correctly: {out}");
    let reports = server.wait_reports(finished_before + 1, Duration::from_secs(10));
    let report = reports[finished_before].clone();
    assert!(report.engine.faults > 0, "{report:?}");
    report
}
