//! A Firecracker-compatible snapshot restore server over userfaultfd.
//!
//! - [`protocol`]: the one-message handshake (a JSON array of regions) and
//!   the checks every region must pass;
//! - [`handshake`]: the server side of it (`SO_PEERCRED`, `recvmsg` with
//!   `SCM_RIGHTS`, the userfaultfd check), each failure a typed error;
//! - [`vmm`]: the VMM side, for any Rust VMM to hand its guest memory to a
//!   server the way Firecracker does at restore.

pub mod handshake;
pub mod protocol;
pub mod vmm;
