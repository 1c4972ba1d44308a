//! The server: a Unix stream socket, one connection per VM, every VM served
//! concurrently from one memory file.
//!
//! Per connection: the handshake (refused connections are logged and
//! counted, and never disturb other VMs), then the engine serves the VM
//! until the VMM exits (its pidfd becomes readable, or an ioctl returns
//! ESRCH) or the server shuts down. The connection itself is not a sign of
//! life: Firecracker closes it right after the handshake.

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
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
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

    /// Takes every VM over from the server running on `config.socket`
    /// (see [`crate::takeover`]): its listening socket, and each VM's
    /// userfaultfd and pager state, served here from now on. The old server
    /// exits once this one has them all.
    pub fn take_over(config: ServerConfig, engine: Arc<dyn Engine>) -> Result<Server, ServerError> {
        if !engine.can_hand_over() {
            return Err(TakeoverError::Refused(format!(
                "the {} engine cannot take VMs over",
                engine.name()
            ))
            .into());
        }
        let path = takeover::takeover_path(&config.socket);
        let conn = takeover::connect_patiently(&path)?;
        let source = config.source_identity.clone().ok_or_else(|| {
            TakeoverError::Refused("this server does not know its memory file's identity".into())
        })?;
        let request = Packet::Request(takeover::Request {
            version: takeover::VERSION,
            source,
        });
        takeover::send(&conn, &request, &[], "sending the request")?;
        let (reply, mut fds) =
            takeover::recv(&conn, takeover::STEP_TIMEOUT, "waiting for the answer")?;
        let listener = match (reply, fds.len()) {
            (Packet::Accepted, 1) => UnixListener::from(fds.remove(0)),
            (Packet::Refused { reason }, _) => return Err(TakeoverError::Refused(reason).into()),
            (other, n) => {
                return Err(TakeoverError::Protocol {
                    step: "waiting for the answer",
                    problem: format!(
                        "expected the listening socket, got {other:?} with {n} descriptors"
                    ),
                }
                .into())
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: config.socket.clone(),
                source,
            })?;
        let server = Server::new(listener, None, config, engine)?;
        let mut adopted = 0u64;
        loop {
            let (packet, fds) = match takeover::recv(&conn, takeover::STEP_TIMEOUT, "receiving VMs")
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(
                        adopted,
                        "the old server stopped before handing every VM over ({e}); any VM it did not send has no handler now"
                    );
                    break;
                }
            };
            match packet {
                Packet::Vm(header) => match server.adopt(&header, fds) {
                    Ok(()) => adopted += 1,
                    Err(e) => tracing::error!(
                        vm = header.vm,
                        pid = header.pid,
                        "cannot carry on serving the VM: {e}"
                    ),
                },
                Packet::Done { vms } => {
                    if vms != adopted {
                        tracing::error!(
                            sent = vms,
                            adopted,
                            "some handed-over VMs could not be served"
                        );
                    }
                    if let Err(e) = takeover::send(
                        &conn,
                        &Packet::Adopted { vms: adopted },
                        &[],
                        "acknowledging",
                    ) {
                        tracing::warn!("{e}");
                    }
                    break;
                }
                other => {
                    tracing::error!(
                        ?other,
                        "unexpected takeover packet; stopping the takeover here"
                    );
                    break;
                }
            }
        }
        tracing::info!(vms = adopted, "took over");
        *lock(&server.predecessor) = Some(conn);
        Ok(server)
    }

    /// Starts serving a VM another server handed over.
    fn adopt(&self, header: &takeover::VmHeader, fds: Vec<OwnedFd>) -> Result<(), String> {
        let [uffd, pidfd, state]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|fds: Vec<OwnedFd>| format!("expected 3 descriptors, got {}", fds.len()))?;
        if header.page_size != crate::protocol::PAGE_4K
            && header.page_size != crate::protocol::PAGE_2M
        {
            return Err(format!("unsupported page size {}", header.page_size));
        }
        let state = takeover::read_state(state, header).map_err(|e| e.to_string())?;
        let uffd = uffd::Uffd::from_fd(uffd, uffd::Features::EVENT_REMOVE)
            .map_err(|e| format!("not a userfaultfd: {e}"))?;
        let vm = self
            .engine
            .resume(uffd, header.pid, pidfd, header.page_size, state)
            .map_err(|e| e.to_string())?;
        let id = self.next_id.fetch_add(1, SeqCst);
        let peer = Peer {
            pid: header.pid,
            uid: header.uid,
            gid: 0,
        };
        tracing::info!(
            vm = id,
            previous_vm = header.vm,
            pid = header.pid,
            "serving a handed-over VM"
        );
        let worker = self.worker(id);
        let slot = ActiveSlot::take(&self.active);
        let (page_size, memory_bytes) = (header.page_size, header.memory_bytes);
        let thread = std::thread::Builder::new()
            .name(format!("uffd-vm-{id}"))
            .spawn(move || {
                let _slot = slot;
                worker.serve(peer, vm, page_size, memory_bytes);
            })
            .map_err(|e| format!("cannot start a thread for the VM: {e}"))?;
        lock(&self.workers).push(thread);
        Ok(())
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

    /// A server that took over binds `<socket>.takeover` (for the next
    /// upgrade) once its predecessor, which owned that path, has closed
    /// its end.
    fn bind_takeover_once_predecessor_left(&self) {
        {
            let mut predecessor = lock(&self.predecessor);
            if let Some(conn) = predecessor.as_ref() {
                let mut fds = [PollFd::new(conn, PollFlags::IN)];
                let now = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                if !rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0) {
                    return;
                }
                if !fds[0].revents().contains(PollFlags::HUP) {
                    // Readable: end of file, or a packet nobody asked for.
                    let mut byte = [0u8; 1];
                    if !matches!(rustix::io::read(conn, &mut byte), Ok(0) | Err(_)) {
                        return;
                    }
                }
                *predecessor = None;
                *lock(&self.bind_takeover_until) = Some(Instant::now() + Duration::from_secs(30));
            }
        }
        let mut until = lock(&self.bind_takeover_until);
        let Some(deadline) = *until else {
            return;
        };
        match bind_takeover(&self.config.socket) {
            Ok(fd) => {
                *lock(&self.takeover) = Some(fd);
                *until = None;
                tracing::info!(
                    "the previous server is gone; taking over from this one is possible now"
                );
            }
            Err(e) if Instant::now() >= deadline => {
                *until = None;
                tracing::warn!("the next takeover will not be possible: {e}");
            }
            Err(_) => {}
        }
    }

    /// An accepted connection on the takeover socket, if one is waiting.
    fn takeover_request(&self) -> Option<OwnedFd> {
        let takeover = lock(&self.takeover);
        let listener = takeover.as_ref()?;
        match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(conn) => Some(conn),
            Err(Errno::AGAIN | Errno::INTR) => None,
            Err(errno) => {
                tracing::warn!("accepting on the takeover socket failed: {errno}");
                None
            }
        }
    }

    /// Answers a takeover request on `conn`; `Ok(true)` once every VM went
    /// to the new server, which also holds the VMM socket now.
    fn hand_over(&self, conn: &OwnedFd) -> Result<bool, TakeoverError> {
        let refuse = |reason: String| -> Result<bool, TakeoverError> {
            tracing::warn!("takeover refused: {reason}");
            takeover::send(conn, &Packet::Refused { reason }, &[], "refusing")?;
            Ok(false)
        };
        if !takeover::peer_is_trusted(conn) {
            return refuse("the requesting process runs as another user".into());
        }
        let (packet, _) = takeover::recv(conn, Duration::from_secs(5), "reading the request")?;
        let Packet::Request(request) = packet else {
            return refuse(format!("expected a request, got {packet:?}"));
        };
        if request.version != takeover::VERSION {
            return refuse(format!(
                "protocol version {} requested, this server speaks {}",
                request.version,
                takeover::VERSION
            ));
        }
        let Some(own) = &self.config.source_identity else {
            return refuse("this server does not know its memory file's identity".into());
        };
        if &request.source != own {
            return refuse(format!(
                "the new server serves another memory file ({}, this one {own}): VMs restore from the file they started with",
                request.source
            ));
        }
        if !self.engine.can_hand_over() {
            return refuse(format!(
                "the {} engine cannot hand VMs over",
                self.engine.name()
            ));
        }
        tracing::info!("takeover requested: handing every VM to the new server");
        self.handle.inner.handing_over.store(true, SeqCst);
        takeover::send(
            conn,
            &Packet::Accepted,
            &[self.listener.as_fd()],
            "sending the listening socket",
        )?;
        takeover::pause_point("accepted");
        // Every worker hands its VM over (one still in its handshake does
        // so right after it); collect until all have ended.
        let mut sent = 0u64;
        let handed = lock(&self.handed.1);
        loop {
            let all_ended = lock(&self.workers).iter().all(JoinHandle::is_finished);
            match handed.recv_timeout(Duration::from_millis(20)) {
                Ok(vm) => {
                    let (memfd, state_bytes) =
                        takeover::state_memfd(&vm.state).map_err(|e| TakeoverError::Io {
                            step: "writing a VM's state",
                            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
                        })?;
                    let header = takeover::VmHeader {
                        vm: vm.id,
                        pid: vm.peer.pid,
                        uid: vm.peer.uid,
                        page_size: vm.page_size,
                        memory_bytes: vm.memory_bytes,
                        state_bytes,
                    };
                    takeover::send(
                        conn,
                        &Packet::Vm(header),
                        &[vm.uffd.as_fd(), vm.pidfd.as_fd(), memfd.as_fd()],
                        "sending a VM",
                    )?;
                    sent += 1;
                    tracing::info!(vm = vm.id, pid = vm.peer.pid, "handed over");
                }
                Err(_) if all_ended => break,
                Err(_) => {}
            }
        }
        drop(handed);
        takeover::send(conn, &Packet::Done { vms: sent }, &[], "finishing")?;
        takeover::pause_point("sent-all");
        match takeover::recv(conn, takeover::STEP_TIMEOUT, "waiting for the new server") {
            Ok((Packet::Adopted { vms }, _)) => {
                tracing::info!(vms, "the new server took every VM over")
            }
            Ok((other, _)) => {
                tracing::warn!(?other, "unexpected answer; the VMs were handed over anyway")
            }
            Err(e) => tracing::warn!("{e}; the VMs were handed over anyway"),
        }
        takeover::pause_point("adopted");
        Ok(true)
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

/// Binds `<socket>.takeover`, replacing a stale one.
fn bind_takeover(socket: &Path) -> Result<OwnedFd, ServerError> {
    let path = takeover::takeover_path(socket);
    remove_stale_socket(&path)?;
    takeover::listen(&path).map_err(|source| ServerError::Bind { path, source })
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

/// Removes a socket file left by a server that died, so that binding can
/// succeed. Only a socket that nobody answers on is removed; anything else
/// at the path (a file, a directory, a live server's socket) is refused.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let file_type = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !file_type.is_socket() {
        let what = if file_type.is_file() {
            "a regular file"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
            what,
        });
    }
    let answers = match UnixStream::connect(path) {
        Ok(_) => true,
        // A SOCK_SEQPACKET socket (a takeover socket) refuses a stream.
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => takeover::connect(path).is_ok(),
        Err(_) => false,
    };
    if answers {
        return Err(ServerError::InUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the socket this server listened on, and nothing else: if the
/// path was replaced by something other than a socket meanwhile, it stays.
fn remove_own_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
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

struct VmWorker {
    id: u64,
    policy: HandshakePolicy,
    engine: Arc<dyn Engine>,
    handle: ServerHandle,
    stats: Arc<StatsLog>,
    live: Arc<Mutex<HashMap<u64, LiveVm>>>,
    record: Option<PathBuf>,
    stats_json: Option<PathBuf>,
    drain_timeout: Duration,
    handed: Sender<HandedVm>,
}

impl VmWorker {
    fn run(self, stream: UnixStream) {
        let id = self.id;
        let handshake = match handshake::accept(&stream, &self.policy) {
            Ok(h) => h,
            Err(e) => return self.refuse(&stream, e),
        };
        let peer = handshake.peer;
        // A peer in another pid namespace shows as pid 0 and cannot be watched.
        let pidfd = match Pid::from_raw(peer.pid)
            .ok_or(rustix::io::Errno::SRCH)
            .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()))
        {
            Ok(fd) => fd,
            Err(errno) => {
                return self.refuse(
                    &stream,
                    HandshakeError::WatchPeer {
                        pid: peer.pid,
                        errno,
                    },
                );
            }
        };
        let Handshake { regions, uffd, .. } = handshake;
        let memory_bytes: u64 = regions.iter().map(|r| r.len).sum();
        let page_size = regions[0].page_size;
        tracing::info!(
            vm = id,
            pid = peer.pid,
            uid = peer.uid,
            regions = regions.len(),
            memory_mib = memory_bytes >> 20,
            page_size,
            "serving VM"
        );
        let vm = match self.engine.start(uffd, &regions, peer.pid, pidfd) {
            Ok(vm) => vm,
            Err(e) => {
                tracing::error!(vm = id, pid = peer.pid, "cannot serve the VM: {e}");
                self.stats.refuse(Refusal {
                    step: "engine-start",
                    reason: e.to_string(),
                    pid: Some(peer.pid),
                });
                return;
            }
        };
        // Firecracker closes the connection after the handshake: the pidfd
        // (watched by the engine), not the stream, says when the VMM is gone.
        drop(stream);
        self.serve(peer, vm, page_size, memory_bytes);
    }

    /// Serves a VM until its VMM exits, the server stops (drain) or a new
    /// server takes it over; then reports it.
    fn serve(self, peer: Peer, mut vm: Box<dyn RunningVm>, page_size: u64, memory_bytes: u64) {
        let id = self.id;
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveVm {
                vm: id,
                pid: peer.pid,
                memory_bytes,
            },
        );
        let started = Instant::now();
        // A panic while watching the VM (a bug, an engine failing in a way
        // nobody foresaw) must not leave it without a handler: it is
        // drained like a VM at shutdown.
        let ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.watch(vm.as_ref(), peer.pid)
        })) {
            Ok(ended) => ended,
            Err(panic) => {
                tracing::error!(
                    vm = id,
                    pid = peer.pid,
                    panic = panic_message(&*panic),
                    "the VM's worker panicked; draining the VM so that it runs on"
                );
                Ended::Panicked
            }
        };
        // A VM still running when the server stops keeps its own copy of
        // the userfaultfd: closing ours would leave its next missing page
        // waiting forever. Make it independent first.
        let mut handed = None;
        let drain = if ended == Ended::HandedOver {
            handed = vm.hand_over();
            if handed.is_none() {
                tracing::error!(
                    vm = id,
                    pid = peer.pid,
                    "the VM could not be handed over; draining it"
                );
                let drain = vm.detach(self.drain_timeout);
                log_drain(id, peer.pid, &drain);
                Some(drain)
            } else {
                None
            }
        } else if ended == Ended::Panicked || (ended == Ended::Shutdown && !vm.is_finished()) {
            let drain = vm.detach(self.drain_timeout);
            log_drain(id, peer.pid, &drain);
            Some(drain)
        } else {
            vm.shutdown();
            None
        };
        // The new server records on: only a VM that stays here is saved,
        // and not from an engine that just panicked.
        let recorded = if handed.is_none() && ended != Ended::Panicked {
            self.save_working_set(vm.as_ref(), peer.pid)
        } else {
            None
        };
        let report = VmReport {
            vm: id,
            pid: peer.pid,
            uid: peer.uid,
            memory_bytes,
            page_size,
            seconds: started.elapsed().as_secs_f64(),
            ended,
            engine: vm.stats(),
            recorded_pages: recorded,
            drain,
        };
        drop(vm);
        if let Some(HandedOver {
            uffd,
            pidfd: Some(pidfd),
            state,
        }) = handed
        {
            let _ = self.handed.send(HandedVm {
                id,
                peer,
                page_size,
                memory_bytes,
                uffd,
                pidfd,
                state,
            });
        }
        log_report(&report);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.stats.push(report);
        if let Err(e) = write_stats(&self.stats, self.stats_json.as_deref()) {
            tracing::warn!("{e}");
        }
    }

    /// Watches the VM until its VMM exits, the server stops or a new
    /// server takes it over; writes its working set on request meanwhile.
    fn watch(&self, vm: &dyn RunningVm, pid: i32) -> Ended {
        let mut seen_generation = self.handle.inner.record_generation.load(SeqCst);
        loop {
            if self.handle.is_handing_over() {
                return Ended::HandedOver;
            }
            if self.handle.is_stopping() {
                return Ended::Shutdown;
            }
            if vm.is_finished() {
                return Ended::VmmExited;
            }
            let generation = self.handle.inner.record_generation.load(SeqCst);
            if generation != seen_generation {
                seen_generation = generation;
                self.save_working_set(vm, pid);
            }
            // The engine watches the VMM's pidfd; this loop only looks at
            // what it says, and wakes at once for shutdown or takeover.
            let mut fds = [PollFd::new(&self.handle.inner.stop, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        }
    }

    fn refuse(&self, stream: &UnixStream, e: HandshakeError) {
        let pid = handshake::peer_of(stream).ok().map(|p| p.pid);
        tracing::warn!(
            vm = self.id,
            pid,
            step = e.step(),
            "connection refused: {e}"
        );
        self.stats.refuse(Refusal {
            step: e.step(),
            reason: e.to_string(),
            pid,
        });
    }

    /// Writes the VM's working set if recording; returns its page count.
    fn save_working_set(&self, vm: &dyn RunningVm, pid: i32) -> Option<u64> {
        let template = self.record.as_ref()?;
        // Losing a recording is better than losing the VM's report.
        let ws = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.working_set())) {
            Ok(ws) => ws?,
            Err(panic) => {
                tracing::error!(
                    vm = self.id,
                    pid,
                    panic = panic_message(&*panic),
                    "taking the working set panicked; not recorded"
                );
                return None;
            }
        };
        let path = PathBuf::from(
            template
                .to_string_lossy()
                .replace("{pid}", &pid.to_string())
                .replace("{vm}", &self.id.to_string()),
        );
        match ws.save(&path) {
            Ok(()) => {
                tracing::info!(vm = self.id, pages = ws.len(), path = %path.display(), "working set written");
                Some(ws.len() as u64)
            }
            Err(e) => {
                tracing::warn!(vm = self.id, "writing the working set failed: {e}");
                None
            }
        }
    }
}

fn log_drain(vm: u64, pid: i32, d: &DrainReport) {
    match d.outcome {
        DrainOutcome::Released => tracing::info!(
            vm,
            pid,
            installed_pages = d.installed_pages,
            unregistered_mib =
                format_args!("{:.1}", d.unregistered_bytes as f64 / (1 << 20) as f64),
            poisoned_pages = d.poisoned_pages,
            "released: every page installed and unregistered; the VM runs on without the server"
        ),
        DrainOutcome::Incomplete => {
            for r in &d.still_registered {
                tracing::error!(
                    vm,
                    pid,
                    start = format_args!("{:#x}", r.start),
                    len = r.len,
                    why = %r.why,
                    "range stays registered with no server: the VM will wait on a fault there"
                );
            }
            tracing::error!(
                vm,
                pid,
                installed_pages = d.installed_pages,
                unregistered_mib =
                    format_args!("{:.1}", d.unregistered_bytes as f64 / (1 << 20) as f64),
                ranges = d.still_registered.len(),
                "drain incomplete"
            );
        }
        other => tracing::warn!(
            vm,
            pid,
            outcome = ?other,
            error = d.error.as_deref(),
            "serving stopped without a drain: the VM waits on its next missing page"
        ),
    }
}

fn log_report(r: &VmReport) {
    tracing::info!(
        vm = r.vm,
        pid = r.pid,
        ended = %r.ended,
        seconds = format_args!("{:.3}", r.seconds),
        faults = r.engine.faults,
        installed_mib = format_args!("{:.1}", r.engine.installed_bytes as f64 / (1 << 20) as f64),
        zero_pages = r.engine.zero_pages,
        prefetched_pages = r.engine.prefetched_pages,
        prefetch_hits = r.engine.prefetch_hits,
        removes = r.engine.removes,
        poisoned = r.engine.poisoned,
        p50_us = format_args!("{:.1}", r.engine.p50_us),
        p90_us = format_args!("{:.1}", r.engine.p90_us),
        p99_us = format_args!("{:.1}", r.engine.p99_us),
        max_us = format_args!("{:.1}", r.engine.max_us),
        "VM done"
    );
}
