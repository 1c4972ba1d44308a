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
//!   the reconnect timeout.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
mod io;
pub mod protocol;
pub mod server;

pub use client::{ConnectError, RemoteConfig, RemoteSource, RemoteStats};
pub use io::{FrameReader, LinkError};
pub use server::{image_identity, PageServer, PageServerConfig, PageServerHandle, SessionStats};
