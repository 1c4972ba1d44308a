//! The server side of Firecracker's handshake: who connected, the one JSON
//! message, and the one userfaultfd passed with it as `SCM_RIGHTS`.
//!
//! Each step has its own error variant, so a refused connection is logged
//! with the step that failed and the reason, and nothing the peer sends can
//! make the server panic or keep a stray file descriptor open.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use uffd::{Features, Uffd};

use crate::protocol::{self, MessageError, Region, MAX_MESSAGE};

/// How long a peer may take to send its whole message after connecting.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Room for this many descriptors per `recvmsg`; more than one is refused
/// anyway, and any beyond this room are closed by the kernel (`MSG_CTRUNC`).
const FD_ROOM: usize = 8;

/// The connecting process, from `SO_PEERCRED` at `connect(2)` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    /// Its process id.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

/// A handshake that passed every check.
#[derive(Debug)]
pub struct Handshake {
    /// Who sent it.
    pub peer: Peer,
    /// The guest memory regions, sorted by address.
    pub regions: Vec<Region>,
    /// The userfaultfd covering them.
    pub uffd: Uffd,
}

impl Handshake {
    /// The page size all regions share.
    pub fn page_size(&self) -> u64 {
        self.regions[0].page_size
    }

    /// Total guest memory in bytes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// Why a connection was refused, named for the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `getsockopt(SO_PEERCRED)` failed.
    #[error("reading the peer's credentials (SO_PEERCRED) failed: {0}")]
    PeerCredentials(Errno),
    /// The peer runs as a user that `--allow-uid` does not admit.
    #[error("peer pid {pid} runs as uid {uid}; only uid {allowed} may connect (--allow-uid)")]
    UidNotAllowed {
        /// The peer's pid.
        pid: i32,
        /// The peer's uid.
        uid: u32,
        /// The admitted uid.
        allowed: u32,
    },
    /// `recvmsg(2)` or `poll(2)` on the connection failed.
    #[error("receiving the handshake failed: {0}")]
    Receive(Errno),
    /// The peer sent nothing, or not all of it, in time.
    #[error("no complete handshake within {timeout:?} ({bytes} bytes received)")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// Bytes received until then.
        bytes: usize,
    },
    /// The peer closed the connection before sending anything.
    #[error("the peer closed the connection without sending a handshake")]
    ClosedBeforeMessage,
    /// The JSON message is unusable (malformed, truncated, or a region fails a check).
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The message came without a file descriptor.
    #[error("the handshake carries no file descriptor; the userfaultfd must be sent as SCM_RIGHTS with the message")]
    NoFd,
    /// The message came with more than one descriptor.
    #[error("the handshake carries {count}{} file descriptors where exactly one (the userfaultfd) is expected; all were closed", if *.truncated { " or more" } else { "" })]
    TooManyFds {
        /// How many arrived.
        count: usize,
        /// More were sent than fit (the kernel closed the rest).
        truncated: bool,
    },
    /// The descriptor is something else than a userfaultfd.
    #[error("the file descriptor sent is not a userfaultfd but {what}")]
    NotUserfaultfd {
        /// What it is, as `/proc/self/fd` names it.
        what: String,
    },
    /// `pidfd_open(2)` on the peer failed (it may have exited already).
    #[error("watching peer pid {pid} for exit (pidfd_open) failed: {errno}")]
    WatchPeer {
        /// The peer's pid.
        pid: i32,
        /// What the kernel said.
        errno: Errno,
    },
}

impl HandshakeError {
    /// A short stable name for logs and stats (`uid-not-allowed`, `no-fd`, ...).
    pub fn step(&self) -> &'static str {
        match self {
            HandshakeError::PeerCredentials(_) => "peer-credentials",
            HandshakeError::UidNotAllowed { .. } => "uid-not-allowed",
            HandshakeError::Receive(_) => "receive",
            HandshakeError::Timeout { .. } => "timeout",
            HandshakeError::ClosedBeforeMessage => "closed-before-message",
            HandshakeError::Message(MessageError::Malformed(_)) => "malformed-json",
            HandshakeError::Message(MessageError::Truncated { .. }) => "truncated-json",
            HandshakeError::Message(MessageError::TooLarge) => "message-too-large",
            HandshakeError::Message(MessageError::Empty) => "no-regions",
            HandshakeError::Message(MessageError::TooManyRegions { .. }) => "too-many-regions",
            HandshakeError::Message(MessageError::BadRegion { .. }) => "bad-region",
            HandshakeError::Message(MessageError::Overlap { .. }) => "overlapping-regions",
            HandshakeError::Message(MessageError::MixedPageSizes { .. }) => "mixed-page-sizes",
            HandshakeError::NoFd => "no-fd",
            HandshakeError::TooManyFds { .. } => "too-many-fds",
            HandshakeError::NotUserfaultfd { .. } => "not-userfaultfd",
            HandshakeError::WatchPeer { .. } => "watch-peer",
        }
    }
}

/// What the server admits.
#[derive(Debug, Clone, Copy)]
pub struct HandshakePolicy {
    /// Only peers of this uid, when set.
    pub allow_uid: Option<u32>,
    /// The memory file's length: regions must lie inside it.
    pub file_len: u64,
    /// How long the peer may take to send the message.
    pub timeout: Duration,
}

/// The peer's credentials as the kernel recorded them at `connect(2)`.
pub fn peer_of(stream: &UnixStream) -> Result<Peer, HandshakeError> {
    let cred =
        rustix::net::sockopt::socket_peercred(stream).map_err(HandshakeError::PeerCredentials)?;
    Ok(Peer {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    })
}

/// Runs the whole server side of the handshake on a freshly accepted
/// connection: credentials, the message and its descriptor, the checks.
pub fn accept(stream: &UnixStream, policy: &HandshakePolicy) -> Result<Handshake, HandshakeError> {
    let peer = peer_of(stream)?;
    if let Some(allowed) = policy.allow_uid {
        if peer.uid != allowed {
            return Err(HandshakeError::UidNotAllowed {
                pid: peer.pid,
                uid: peer.uid,
                allowed,
            });
        }
    }
    let received = receive(stream, policy.timeout)?;
    let mappings = received.mappings;
    let uffd_fd = match (received.fds.len(), received.fds_truncated) {
        (_, true) => {
            return Err(HandshakeError::TooManyFds {
                count: received.fds.len(),
                truncated: true,
            })
        }
        (0, false) => return Err(HandshakeError::NoFd),
        (1, false) => received.fds.into_iter().next().expect("one fd"),
        (count, false) => {
            // Dropping `received.fds` closes every one of them.
            return Err(HandshakeError::TooManyFds {
                count,
                truncated: false,
            });
        }
    };
    let what = fd_target(&uffd_fd);
    // Firecracker enables EVENT_REMOVE when a balloon may inflate; the
    // features only decide how messages are decoded, and REMOVE decodes the
    // same either way.
    let uffd = Uffd::from_fd(uffd_fd, Features::EVENT_REMOVE)
        .map_err(|_| HandshakeError::NotUserfaultfd { what })?;
    let regions = protocol::validate(&mappings, policy.file_len)?;
    Ok(Handshake {
        peer,
        regions,
        uffd,
    })
}

struct Received {
    mappings: Vec<protocol::GuestRegionUffdMapping>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
}

/// Reads until the JSON array is complete (a large message may arrive in
/// several pieces), collecting every descriptor that comes along.
fn receive(stream: &UnixStream, timeout: Duration) -> Result<Received, HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut fds_truncated = false;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !wait_readable(stream, left)? {
            return Err(HandshakeError::Timeout {
                timeout,
                bytes: bytes.len(),
            });
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FD_ROOM))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(errno) => return Err(HandshakeError::Receive(errno)),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        fds_truncated |= msg.flags.contains(ReturnFlags::CTRUNC);
        if msg.bytes == 0 {
            return Err(if bytes.is_empty() {
                HandshakeError::ClosedBeforeMessage
            } else {
                MessageError::Truncated { bytes: bytes.len() }.into()
            });
        }
        if bytes.len() + msg.bytes > MAX_MESSAGE {
            return Err(MessageError::TooLarge.into());
        }
        bytes.extend_from_slice(&chunk[..msg.bytes]);
        if let Some(mappings) = protocol::parse_message(&bytes)? {
            return Ok(Received {
                mappings,
                fds,
                fds_truncated,
            });
        }
    }
}

fn wait_readable(stream: &UnixStream, left: Duration) -> Result<bool, HandshakeError> {
    let timeout = rustix::time::Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(Errno::INTR) => Ok(true),
        Err(errno) => Err(HandshakeError::Receive(errno)),
    }
}

/// What a descriptor refers to, as `/proc/self/fd` names it.
fn fd_target(fd: impl AsFd) -> String {
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    std::fs::read_link(link)
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("an unknown file ({e})"))
}
