//! Post-copy memory across hosts: a VM resumes on the destination before
//! its memory has moved, and each page comes over the network when it is
//! touched, or earlier.
//!
//! - [`protocol`]: the wire format, versioned, every frame length-limited
//!   and every data frame checksummed;
//! - [`server`]: [`PageServer`], `uffd page-server`: one image to many
//!   destinations, many times each, optionally pushing every page;
//! - [`client`]: [`RemoteSource`], the pager's source for
//!   `uffd serve --source tcp://HOST:PORT`: a demand channel for faulting
//!   pages, a bulk channel for background reads and the push, reconnects
//!   that lose no page, and POISON (never a zero page, never a hang) past
//!   the reconnect timeout;
//! - [`shmem`]: [`ShmemDestination`], a process's own memory restored into
//!   a shmem memfd: pushed pages land in the page cache with no ioctl, a
//!   first touch costs one CONTINUE.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
mod io;
pub mod protocol;
pub mod server;
pub mod shmem;

/// A runtime of one worker thread at nice `nice`: bulk work (the push,
/// background reads) runs on one at 10, so faulting pages' requests and
/// answers get the CPU first on a busy machine.
fn runtime(name: &str, nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .on_thread_start(move || {
            if nice != 0 {
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice);
            }
        })
        .enable_all()
        .build()
}

pub use client::{ConnectError, RemoteConfig, RemoteSource, RemoteStats};
pub use io::{FrameReader, LinkError};
pub use server::{image_identity, PageServer, PageServerConfig, PageServerHandle, SessionStats};
pub use shmem::{ShmemDestination, ShmemError, ShmemOptions};
