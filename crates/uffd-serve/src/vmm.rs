//! The VMM side: hand guest memory to a page server exactly as Firecracker
//! does when it restores a snapshot with the `Uffd` memory backend.
//!
//! 1. create a userfaultfd (non-blocking, close-on-exec, kernel faults
//!    caught, `EVENT_REMOVE` so a balloon's `MADV_DONTNEED` is reported);
//! 2. register every guest memory region in MISSING mode;
//! 3. connect to the server's Unix stream socket and send one JSON array of
//!    regions with the userfaultfd as the only `SCM_RIGHTS` descriptor.
//!
//! ```no_run
//! use uffd_serve::vmm::HandOver;
//! # let (addr, size) = (0u64, 0u64);
//! let memory = HandOver::new("/run/vm0.uffd.sock")
//!     .region(addr, size, 0, 4096)
//!     .send()?;
//! // The guest may run now; `memory.uffd()` stays open for as long as the
//! // guest memory is in use, as Firecracker keeps its copy.
//! # Ok::<(), uffd_serve::vmm::HandOverError>(())
//! ```

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use uffd::{Features, OpenOptions, RegisterMode, Uffd};

use crate::protocol::{encode_message, Region};

/// Why handing memory over failed, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// No region was given.
    #[error("no guest memory region to hand over")]
    NoRegions,
    /// Creating the userfaultfd failed.
    #[error("creating the userfaultfd failed: {0}")]
    CreateUffd(#[source] uffd::Error),
    /// `UFFDIO_REGISTER` of a region failed.
    #[error("registering region {base:#x}+{size:#x} failed: {source}")]
    Register {
        /// The region's start.
        base: u64,
        /// Its length.
        size: u64,
        /// The core library's error.
        #[source]
        source: uffd::Error,
    },
    /// Connecting to the server's socket failed.
    #[error("connecting to the page server at {path} failed: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// `sendmsg(2)` of the message failed.
    #[error("sending the handshake failed: {0}")]
    Send(Errno),
    /// The kernel took only part of the message (the server stopped reading).
    #[error("the handshake was sent only in part ({sent} of {len} bytes)")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Message length.
        len: usize,
    },
}

/// Guest memory handed to a page server, and the connection it went over.
#[derive(Debug)]
pub struct GuestMemoryUffd {
    uffd: Uffd,
    stream: UnixStream,
    regions: Vec<Region>,
}

impl GuestMemoryUffd {
    /// The VMM's own copy of the userfaultfd. Keep it open while the guest
    /// memory lives: if the server dies, faults then wait instead of being
    /// silently served as zero pages by the kernel.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The connection to the server. Firecracker closes it right after
    /// sending; the server does not depend on it staying open.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The regions as sent.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }
}

/// Builder for the handover.
#[derive(Debug, Clone)]
pub struct HandOver {
    socket: PathBuf,
    regions: Vec<Region>,
    balloon: bool,
}

impl HandOver {
    /// Hands memory to the server listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
            regions: Vec::new(),
            balloon: true,
        }
    }

    /// Adds a guest memory region: `size` bytes mapped at `base` in this
    /// process, whose contents live at `offset` in the memory file, mapped
    /// with pages of `page_size` bytes (4096, or 2 MiB for hugetlbfs).
    pub fn region(mut self, base: u64, size: u64, offset: u64, page_size: u64) -> Self {
        self.regions
            .push(Region::new(base, size, offset, page_size));
        self
    }

    /// Whether a balloon may remove pages (requests `EVENT_REMOVE`; default on).
    pub fn balloon(mut self, on: bool) -> Self {
        self.balloon = on;
        self
    }

    /// Creates and registers the userfaultfd, connects and sends.
    pub fn send(self) -> Result<GuestMemoryUffd, HandOverError> {
        if self.regions.is_empty() {
            return Err(HandOverError::NoRegions);
        }
        let features = if self.balloon {
            Features::EVENT_REMOVE
        } else {
            Features::empty()
        };
        let uffd = OpenOptions::new()
            .non_blocking(true)
            .close_on_exec(true)
            .user_mode_only(false)
            .features(features)
            .open()
            .map_err(HandOverError::CreateUffd)?;
        for r in &self.regions {
            uffd.register(r.start, r.len, RegisterMode::MISSING)
                .map_err(|source| HandOverError::Register {
                    base: r.start,
                    size: r.len,
                    source,
                })?;
        }
        let stream =
            UnixStream::connect(&self.socket).map_err(|source| HandOverError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        send_with_fds(&stream, &encode_message(&self.regions), &[uffd.as_fd()])?;
        Ok(GuestMemoryUffd {
            uffd,
            stream,
            regions: self.regions,
        })
    }
}

/// Sends `bytes` with `fds` attached as one `SCM_RIGHTS` message in a
/// single `sendmsg(2)`, as Firecracker does. Exposed so tests and tools can
/// speak the protocol with arbitrary (also deliberately wrong) contents.
pub fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandOverError> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandOverError::Send(Errno::NOBUFS));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(HandOverError::Send(errno)),
        }
    };
    if sent != bytes.len() {
        return Err(HandOverError::ShortSend {
            sent,
            len: bytes.len(),
        });
    }
    Ok(())
}
