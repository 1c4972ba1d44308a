//! The workspace's benchmarks, each concept with one owner:
//!
//! - [`fixtures`]: the one synthetic snapshot generator and page orders;
//! - [`workload`]: what touches memory and how it is timed and verified;
//! - [`baselines`]: what uffd is measured against, one of each kind: the
//!   kernel's own fault-in of the file, and a handler written like
//!   Firecracker's example (one thread, poll, read one message, one 4 KiB
//!   `UFFDIO_COPY`, a wake after EEXIST);
//! - [`pager`]: `uffd bench`, the pager's strategies in this process (a
//!   second opinion: no VMM in another process);
//! - [`demo`]: `uffd demo`, one restore per strategy, verified;
//! - [`serve`]: `uffd serve bench`, the restore server, the baseline
//!   handler and the VMM each in a process of its own;
//! - [`plot`]: the SVG plots behind `--plot`;
//! - [`remote`]: `uffd page-server bench`, post-copy over an emulated link;
//! - [`report`]: medians, minima, and what the machine was doing
//!   (load average, a process's context switches and CPU time);
//! - [`machine`]: the CPUs a bench may use, pinning to them, and how much
//!   of them the machine itself takes ([`machine::Hiccups`]);
//! - [`leftovers`]: what an interrupted bench made or started, cleaned
//!   up on SIGINT or SIGTERM;
//! - [`compact`]: a demo collector over a linked heap and the
//!   concurrent-compaction bench.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod baselines;
pub mod compact;
pub mod demo;
pub mod fixtures;
pub mod leftovers;
pub mod machine;
pub mod pager;
pub mod plot;
pub mod remote;
pub mod report;
pub mod serve;
pub mod workload;

/// What a benchmark returns on failure.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
