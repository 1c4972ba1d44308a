//! A Firecracker-compatible snapshot restore server over userfaultfd.
//!
//! - [`protocol`]: the one-message handshake (a JSON array of regions) and
//!   the checks every region must pass;
//! - [`handshake`]: the server side of it (`SO_PEERCRED`, `recvmsg` with
//!   `SCM_RIGHTS`, the userfaultfd check), each failure a typed error;
//! - [`vmm`]: the VMM side, for any Rust VMM to hand its guest memory to a
//!   server the way Firecracker does at restore;
//! - [`server`]: the socket, one connection per VM, lifecycle and stats;
//! - [`engine`]: how faults are served, behind the [`engine::Engine`] trait
//!   (the `uffd-pager` runtime; working sets use its file format);
//!
//! Its benchmarks (`uffd serve bench`) and the baseline handler they
//! compare with live in the `uffd-bench` crate.

#![deny(unsafe_code)]

pub mod engine;
pub mod handshake;
pub mod protocol;
pub mod server;
pub mod signals;
pub mod stats;
pub mod takeover;
pub mod vmm;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
