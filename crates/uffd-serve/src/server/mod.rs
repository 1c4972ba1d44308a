//! The server: a Unix stream socket, one connection per VM, every VM served
//! concurrently from one memory file.
//!
//! Per connection: the handshake (refused connections are logged and
//! counted, and never disturb other VMs), then the engine serves the VM
//! until the VMM exits (its pidfd becomes readable, or an ioctl returns
//! ESRCH) or the server shuts down. The connection itself is not a sign of
//! life: Firecracker closes it right after the handshake.
//!
//! `mod.rs` holds the configuration, the handle and the accept loop;
//! `vm.rs` one VM's worker (handshake, serving, working set, report);
//! `successor.rs` takeovers in both directions; `socket.rs` the socket
//! paths the server may remove.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags};

use crate::engine::{Engine, RunningVm};
use crate::handshake::{self, Handshake, HandshakeError, HandshakePolicy, Peer};
use crate::stats::{DrainOutcome, DrainReport, Ended, Refusal, StatsLog, VmReport};
use crate::takeover::{self, Packet, TakeoverError};
use uffd_pager::{panic_message, HandedOver, StopSignal};

mod socket;
mod successor;
mod vm;

use socket::{bind_takeover, listen_then_publish, remove_own_socket, remove_stale_socket};
use vm::VmWorker;

/// What the server needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub socket: PathBuf,
    /// The memory file's length (regions are checked against it).
    pub file_len: u64,
    /// Admit only peers of this uid.
    pub allow_uid: Option<u32>,
    /// Per-VM working-set output; `{pid}` and `{vm}` are replaced.
    pub record: Option<PathBuf>,
    /// Where to write every VM's statistics as JSON.
    pub stats_json: Option<PathBuf>,
    /// How long a peer may take to send its handshake.
    pub handshake_timeout: Duration,
    /// At shutdown, how long each VM still running may take to become
    /// independent of the server (every page installed, every range
    /// unregistered; see [`RunningVm::detach`]).
    pub drain_timeout: Duration,
    /// The memory file's identity ([`uffd_pager::FileSource::identity`]): a
    /// takeover is accepted only by a server serving the same file. `None`
    /// refuses takeovers (and cannot take over).
    pub source_identity: Option<String>,
    /// Connections handled at once (handshaking or served). One more is
    /// accepted and closed at once with a refusal (step
    /// `too-many-connections`), so idle peers cannot exhaust threads or
    /// file descriptors. See [`default_max_connections`].
    pub max_connections: usize,
}

/// File descriptors one VM holds while served: its connection, the
/// userfaultfd, a pidfd, the pager's eventfds, with headroom.
pub const FDS_PER_VM: u64 = 8;

/// The default connection cap: 256, or fewer if the file-descriptor limit
/// (`RLIMIT_NOFILE`, `ulimit -n`) would run out first at [`FDS_PER_VM`]
/// descriptors per VM, keeping 32 for the server itself.
pub fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    (soft.saturating_sub(32) / FDS_PER_VM).clamp(1, 256) as usize
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the socket failed.
    #[error("listening on {path} failed: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// Something already listens there.
    #[error("{0} is in use by a running server")]
    InUse(PathBuf),
    /// Something that is not a socket is at the socket path. It is never
    /// removed: a mistyped `--socket` must not delete a snapshot.
    #[error("{path} exists and is {what}, not a socket: refusing to replace it (choose another --socket path, or remove it yourself)")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there ("a regular file", "a directory", ...).
        what: &'static str,
    },
    /// Creating the control eventfd failed.
    #[error("creating the server's control eventfd failed: {0}")]
    Control(rustix::io::Errno),
    /// Taking the VMs over from the running server failed.
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    /// Writing the statistics failed.
    #[error("writing {path} failed: {source}")]
    Stats {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// Controls a running server from other threads (and signal handlers'
/// helper thread).
#[derive(Debug, Clone)]
pub struct ServerHandle {
    inner: Arc<Control>,
}

#[derive(Debug)]
struct Control {
    stop: StopSignal,
    /// A new server takes the VMs over: every worker hands its VM over
    /// instead of draining it.
    handing_over: AtomicBool,
    record_generation: AtomicU64,
}

impl ServerHandle {
    /// Stops accepting, drains every VM still running (every page installed
    /// and every range unregistered, so it runs on without the server; see
    /// [`RunningVm::detach`]), writes working sets and statistics, and makes
    /// [`Server::run`] return.
    pub fn shutdown(&self) {
        self.inner.stop.request();
    }

    /// Writes every recording VM's working set now (as SIGUSR1 does).
    pub fn record_now(&self) {
        self.inner.record_generation.fetch_add(1, SeqCst);
    }

    /// Whether shutdown was requested.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_requested()
    }

    fn is_handing_over(&self) -> bool {
        self.inner.handing_over.load(SeqCst)
    }
}

/// A bound server.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// `<socket>.takeover`, where a new server asks for the VMs; `None`
    /// until the server it took over from has gone.
    takeover: Mutex<Option<OwnedFd>>,
    /// The server this one took over from, until it closes its end.
    predecessor: Mutex<Option<OwnedFd>>,
    /// Until when binding `<socket>.takeover` is retried after the
    /// predecessor closed its end (it may still be on its way out).
    bind_takeover_until: Mutex<Option<Instant>>,
    config: ServerConfig,
    engine: Arc<dyn Engine>,
    handle: ServerHandle,
    stats: Arc<StatsLog>,
    live: Arc<Mutex<HashMap<u64, LiveVm>>>,
    active: Arc<AtomicUsize>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    handed: (Sender<HandedVm>, Mutex<Receiver<HandedVm>>),
    next_id: AtomicU64,
}

/// A VM a worker stopped serving for a new server to carry on.
struct HandedVm {
    id: u64,
    peer: Peer,
    page_size: u64,
    memory_bytes: u64,
    uffd: uffd::Uffd,
    pidfd: OwnedFd,
    state: uffd_pager::PagerState,
}

/// What the server shows about a VM being served.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveVm {
    /// Connection id.
    pub vm: u64,
    /// The VMM's pid.
    pub pid: i32,
    /// Guest memory bytes.
    pub memory_bytes: u64,
}

impl Server {
    /// Binds `config.socket` (replacing a stale socket file left by a
    /// server that died, refusing one that still answers).
    pub fn bind(config: ServerConfig, engine: Arc<dyn Engine>) -> Result<Server, ServerError> {
        let path = &config.socket;
        remove_stale_socket(path)?;
        let listener =
            listen_then_publish(path, |at| UnixListener::bind(at)).map_err(|source| {
                ServerError::Bind {
                    path: path.clone(),
                    source,
                }
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: path.clone(),
                source,
            })?;
        let takeover = bind_takeover(path)?;
        Server::new(listener, Some(takeover), config, engine)
    }

    fn new(
        listener: UnixListener,
        takeover: Option<OwnedFd>,
        config: ServerConfig,
        engine: Arc<dyn Engine>,
    ) -> Result<Server, ServerError> {
        let stop = StopSignal::new().map_err(ServerError::Control)?;
        let (tx, rx) = std::sync::mpsc::channel();
        Ok(Server {
            listener,
            takeover: Mutex::new(takeover),
            predecessor: Mutex::new(None),
            bind_takeover_until: Mutex::new(None),
            config,
            engine,
            handle: ServerHandle {
                inner: Arc::new(Control {
                    stop,
                    handing_over: AtomicBool::new(false),
                    record_generation: AtomicU64::new(0),
                }),
            },
            stats: Arc::new(StatsLog::default()),
            live: Arc::new(Mutex::new(HashMap::new())),
            active: Arc::new(AtomicUsize::new(0)),
            workers: Mutex::new(Vec::new()),
            handed: (tx, Mutex::new(rx)),
            next_id: AtomicU64::new(1),
        })
    }

    fn worker(&self, id: u64) -> VmWorker {
        VmWorker {
            id,
            policy: HandshakePolicy {
                allow_uid: self.config.allow_uid,
                file_len: self.config.file_len,
                timeout: self.config.handshake_timeout,
            },
            engine: self.engine.clone(),
            handle: self.handle.clone(),
            stats: self.stats.clone(),
            live: self.live.clone(),
            record: self.config.record.clone(),
            stats_json: self.config.stats_json.clone(),
            drain_timeout: self.config.drain_timeout,
            handed: self.handed.0.clone(),
        }
    }

    /// A handle to stop the server or request recordings.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Statistics collected so far (finished VMs and refusals).
    pub fn stats(&self) -> Arc<StatsLog> {
        self.stats.clone()
    }

    /// VMs being served right now.
    pub fn live(&self) -> Vec<LiveVm> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Accepts and serves connections until [`ServerHandle::shutdown`], or
    /// until a new server took every VM over (see [`crate::takeover`]).
    pub fn run(&self) -> Result<(), ServerError> {
        // After an accept error (EMFILE, ENFILE, ENOMEM...) the listener
        // stays readable: wait this long before trying again.
        let mut backoff = Duration::ZERO;
        let mut accept_errors = RateLimited::new(Duration::from_secs(5));
        let mut over_cap = RateLimited::new(Duration::from_secs(5));
        tracing::info!(
            socket = %self.config.socket.display(),
            engine = self.engine.name(),
            max_connections = self.config.max_connections,
            "listening"
        );
        let mut handed_over = false;
        while !self.handle.is_stopping() {
            self.wait_for_work(backoff);
            lock(&self.workers).retain(|w| !w.is_finished());
            self.bind_takeover_once_predecessor_left();
            if let Some(conn) = self.takeover_request() {
                match self.hand_over(&conn) {
                    Ok(true) => {
                        // Close the takeover socket before the connection:
                        // the new server binds the path once it sees ours
                        // close, and must then find nobody listening.
                        lock(&self.takeover).take();
                        drop(conn);
                        handed_over = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // The VMs handed over are the new server's; those
                        // not sent yet are still ours.
                        tracing::error!("takeover failed: {e}");
                        self.handle.inner.handing_over.store(false, SeqCst);
                    }
                }
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        backoff = Duration::ZERO;
                        self.start_worker(stream, &mut over_cap);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        if let Some(suppressed) = accept_errors.allow() {
                            tracing::warn!(
                                suppressed,
                                retry_in_ms = backoff.as_millis() as u64,
                                active = self.active.load(SeqCst),
                                "accept failed: {e}{}",
                                if e.raw_os_error() == Some(libc::EMFILE) {
                                    " (raise `ulimit -n` or lower --max-connections)"
                                } else {
                                    ""
                                }
                            );
                        }
                        break;
                    }
                }
            }
        }
        let workers: Vec<JoinHandle<()>> = lock(&self.workers).drain(..).collect();
        if !handed_over {
            tracing::info!(vms = workers.len(), "shutting down: draining VMs");
        }
        for w in workers {
            let _ = w.join();
        }
        if !handed_over {
            // Handed over, both paths are the new server's now.
            remove_own_socket(&self.config.socket);
            remove_own_socket(&takeover::takeover_path(&self.config.socket));
        }
        write_stats(&self.stats, self.config.stats_json.as_deref())?;
        tracing::info!(
            served = self.stats.totals().vms,
            refused = self.stats.totals().refused,
            handed_over,
            "stopped"
        );
        Ok(())
    }

    /// Sleeps until a connection, a takeover request, the control eventfd,
    /// the predecessor closing, or one second; only the control eventfd
    /// during an accept back-off.
    fn wait_for_work(&self, backoff: Duration) {
        let timeout = if backoff.is_zero() {
            Duration::from_secs(1)
        } else {
            backoff
        };
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos().into(),
        };
        let takeover = lock(&self.takeover);
        let predecessor = lock(&self.predecessor);
        let mut fds = vec![PollFd::new(&self.handle.inner.stop, PollFlags::IN)];
        if backoff.is_zero() {
            fds.push(PollFd::new(&self.listener, PollFlags::IN));
        }
        if let Some(t) = takeover.as_ref() {
            fds.push(PollFd::new(t, PollFlags::IN));
        }
        if let Some(p) = predecessor.as_ref() {
            fds.push(PollFd::new(p, PollFlags::IN));
        }
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }

    fn start_worker(&self, stream: UnixStream, over_cap: &mut RateLimited) {
        let id = self.next_id.fetch_add(1, SeqCst);
        if self.active.load(SeqCst) >= self.config.max_connections {
            let pid = handshake::peer_of(&stream).ok().map(|p| p.pid);
            let limit = self.config.max_connections;
            if let Some(suppressed) = over_cap.allow() {
                tracing::warn!(
                    vm = id,
                    pid,
                    max_connections = limit,
                    suppressed,
                    "connection refused: the server is at --max-connections"
                );
            }
            self.stats.refuse(Refusal {
                step: "too-many-connections",
                reason: format!("{limit} connections are handled already (--max-connections)"),
                pid,
            });
            return;
        }
        let slot = ActiveSlot::take(&self.active);
        let vm = self.worker(id);
        match std::thread::Builder::new()
            .name(format!("uffd-vm-{id}"))
            .spawn(move || {
                let _slot = slot;
                vm.run(stream)
            }) {
            Ok(w) => lock(&self.workers).push(w),
            Err(e) => tracing::error!(
                vm = id,
                "cannot start a thread for the VM, connection dropped: {e}"
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one connection slot for as long as it lives, also when the
/// thread that holds it panics.
struct ActiveSlot(Arc<AtomicUsize>);

impl ActiveSlot {
    fn take(active: &Arc<AtomicUsize>) -> ActiveSlot {
        active.fetch_add(1, SeqCst);
        ActiveSlot(active.clone())
    }
}

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Lets one log line through per `every`, counting the ones held back.
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be
    /// logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn write_stats(stats: &StatsLog, path: Option<&Path>) -> Result<(), ServerError> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(&stats.to_json()).expect("stats serialise");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| ServerError::Stats {
            path: path.to_path_buf(),
            source,
        })
}
