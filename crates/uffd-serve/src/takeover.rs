//! Zero-downtime restart: a new server takes every VM over from the one
//! running, which then exits, and no VM ever waits on a fault nobody will
//! serve.
//!
//! Every server listens on a second socket, `<socket>.takeover`
//! (`SOCK_SEQPACKET`, mode 0600, peers of the server's own uid or root
//! only). `uffd serve --takeover` connects there and the two speak one
//! JSON message per packet, descriptors as `SCM_RIGHTS`:
//!
//! 1. new → old: [`Request`] (protocol version, the memory file's
//!    identity: both must serve the same file);
//! 2. old → new: `accepted`, with the VMM socket's **listening** descriptor:
//!    VMMs connecting from now on wait in its backlog for the new server,
//!    none is refused;
//! 3. old → new, per VM: `vm` (pid, uid, page size) with its userfaultfd,
//!    its pidfd and a sealed memfd holding the pager's [`PagerState`]
//!    (present, removed and poisoned pages, the recording), sent after the
//!    old server's pager for it stopped ([`crate::engine::RunningVm::hand_over`]);
//!    faults meanwhile wait in the kernel's queue;
//! 4. old → new: `done`; new → old: `adopted`; the old server exits 0
//!    without draining and without removing the VMM socket.
//!
//! Once the new server holds a VM's descriptors, the old one dying (even
//! by SIGKILL) cannot hurt that VM: the kernel keeps the userfaultfd open
//! through the new server's copy, and the new pager wakes every range when
//! it starts, so a fault the old one read but never served is seen again.
//!
//! `UFFD_TAKEOVER_PAUSE_AT=accepted|sent-one|sent-all|adopted` makes the
//! old server stop itself (SIGSTOP) at that step (`sent-one`: after the
//! first VM): the tests kill it there.

#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use uffd_pager::PagerState;

/// The takeover protocol's version; both servers must speak the same.
pub const VERSION: u32 = 1;

/// Largest JSON packet either side accepts.
const MAX_PACKET: usize = 64 << 10;

/// Largest pager state accepted, per page of guest memory described (a run
/// of pages costs at most a few dozen bytes as JSON) plus room for the
/// recording; the header's memory size bounds it.
const STATE_BYTES_PER_PAGE: u64 = 64;

/// How long one step of the exchange may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The takeover socket beside a VMM socket.
pub fn takeover_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".takeover");
    PathBuf::from(path)
}

/// What the new server asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`].
    pub version: u32,
    /// The memory file's identity ([`uffd_pager::FileSource::identity`]).
    pub source: String,
}

/// One VM, as handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHeader {
    /// The old server's connection id for it (for the logs).
    pub vm: u64,
    /// The VMM's pid.
    pub pid: i32,
    /// The VMM's uid.
    pub uid: u32,
    /// Its page size.
    pub page_size: u64,
    /// Guest memory bytes (bounds the state's size).
    pub memory_bytes: u64,
    /// Bytes of the state memfd.
    pub state_bytes: u64,
}

/// The old server's packets, and the new server's last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Packet {
    /// A [`Request`] (new → old).
    Request(Request),
    /// The takeover goes ahead; the listening socket comes with it.
    Accepted,
    /// The old server will not hand over, and why.
    Refused {
        /// A reason a person can act on.
        reason: String,
    },
    /// One VM; its userfaultfd, pidfd and state memfd come with it.
    Vm(VmHeader),
    /// Every VM was sent.
    Done {
        /// How many.
        vms: u64,
    },
    /// The new server serves every VM it received (new → old).
    Adopted {
        /// How many.
        vms: u64,
    },
}

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// No server answers on the takeover socket.
    #[error(
        "no server to take over at {path}: {source} (is `uffd serve` running with this --socket?)"
    )]
    Connect {
        /// The takeover socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The running server refused.
    #[error("the running server refused the takeover: {0}")]
    Refused(String),
    /// Sending or receiving failed, or the peer went away.
    #[error("takeover {step}: {errno}")]
    Io {
        /// The step.
        step: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The peer did not answer in time.
    #[error("takeover {0}: no answer within {STEP_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The peer sent something this side does not accept.
    #[error("takeover {step}: {problem}")]
    Protocol {
        /// The step.
        step: &'static str,
        /// What was wrong.
        problem: String,
    },
    /// The peer closed the connection.
    #[error("takeover {0}: the other server closed the connection")]
    Closed(&'static str),
}

fn io(step: &'static str) -> impl Fn(Errno) -> TakeoverError {
    move |errno| TakeoverError::Io { step, errno }
}

fn protocol(step: &'static str, problem: impl Into<String>) -> TakeoverError {
    TakeoverError::Protocol {
        step,
        problem: problem.into(),
    }
}

/// Binds the takeover socket at `path` (a stale one is replaced, as for
/// the VMM socket), readable and writable by the owner only.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::listen(&fd, 4)?;
    Ok(fd)
}

/// Connects to the takeover socket at `path`, retrying for a few seconds
/// while it refuses: a server that has just taken over binds it only once
/// its own predecessor has gone.
pub fn connect_patiently(path: &Path) -> Result<OwnedFd, TakeoverError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(path) {
            Err(TakeoverError::Connect { source, .. })
                if source.raw_os_error() == Some(libc::ECONNREFUSED)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Connects to the takeover socket at `path`.
pub fn connect(path: &Path) -> Result<OwnedFd, TakeoverError> {
    let connect = || -> std::io::Result<OwnedFd> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(fd)
    };
    connect().map_err(|source| TakeoverError::Connect {
        path: path.to_path_buf(),
        source,
    })
}

/// True when the peer on `conn` runs as this process's uid, or as root.
pub fn peer_is_trusted(conn: &OwnedFd) -> bool {
    let Ok(cred) = rustix::net::sockopt::socket_peercred(conn) else {
        return false;
    };
    let uid = cred.uid.as_raw();
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Sends one packet with `fds`.
pub fn send(
    conn: &OwnedFd,
    packet: &Packet,
    fds: &[BorrowedFd<'_>],
    step: &'static str,
) -> Result<(), TakeoverError> {
    let bytes = serde_json::to_vec(packet).expect("packets always serialise");
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(protocol(step, "too many descriptors for one packet"));
    }
    loop {
        match rustix::net::sendmsg(
            conn,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(io(step)(errno)),
        }
    }
}

/// Receives one packet and the descriptors that came with it (at most
/// four; a packet that brought more is refused and all are closed).
pub fn recv(
    conn: &OwnedFd,
    timeout: Duration,
    step: &'static str,
) -> Result<(Packet, Vec<OwnedFd>), TakeoverError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TakeoverError::Timeout(step));
        }
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut [PollFd::new(conn, PollFlags::IN)], Some(&ts)) {
            Ok(0) => return Err(TakeoverError::Timeout(step)),
            Ok(_) | Err(Errno::INTR) => {}
            Err(errno) => return Err(io(step)(errno)),
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            conn,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(errno) => return Err(io(step)(errno)),
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            return Err(TakeoverError::Closed(step));
        }
        if msg
            .flags
            .intersects(ReturnFlags::CTRUNC | ReturnFlags::TRUNC)
        {
            return Err(protocol(step, "packet or descriptors truncated"));
        }
        let packet = serde_json::from_slice(&buf[..msg.bytes])
            .map_err(|e| protocol(step, format!("not a takeover packet: {e}")))?;
        return Ok((packet, fds));
    }
}

/// A sealed memfd holding `state` as JSON, and its length.
pub fn state_memfd(state: &PagerState) -> std::io::Result<(OwnedFd, u64)> {
    let fd = rustix::fs::memfd_create(
        "uffd-takeover-state",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    let bytes = serde_json::to_vec(state).expect("states always serialise");
    file.write_all(&bytes)?;
    file.rewind()?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(
        &fd,
        rustix::fs::SealFlags::WRITE
            | rustix::fs::SealFlags::GROW
            | rustix::fs::SealFlags::SHRINK
            | rustix::fs::SealFlags::SEAL,
    )?;
    Ok((fd, bytes.len() as u64))
}

/// Reads a VM's state from its memfd, refusing one larger than a VM of
/// `header.memory_bytes` can need or than the header announced.
pub fn read_state(fd: OwnedFd, header: &VmHeader) -> Result<PagerState, TakeoverError> {
    let step = "reading a VM's state";
    let pages = header.memory_bytes / header.page_size.max(4096);
    let limit = pages
        .saturating_mul(STATE_BYTES_PER_PAGE)
        .saturating_add(4096);
    let size = rustix::fs::fstat(&fd).map_err(io(step))?.st_size.max(0) as u64;
    if size != header.state_bytes || size > limit {
        return Err(protocol(
            step,
            format!(
                "state of {size} bytes (header says {}, limit {limit})",
                header.state_bytes
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    std::fs::File::from(fd)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| protocol(step, e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| protocol(step, format!("not a pager state: {e}")))
}

/// The old server's test hook: stops this process (SIGSTOP) when
/// `UFFD_TAKEOVER_PAUSE_AT` names `step`.
pub fn pause_point(step: &str) {
    if std::env::var("UFFD_TAKEOVER_PAUSE_AT").is_ok_and(|at| at == step) {
        tracing::warn!(step, "UFFD_TAKEOVER_PAUSE_AT: stopping here");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }
}
