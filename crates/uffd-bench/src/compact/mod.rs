//! Concurrent compaction: a demo collector over a linked heap
//! ([`collector::run_cycle`]) and the bench that runs it in every mode
//! ([`bench::run`]).
//!
//! The heap is a graph of 64-byte nodes (16384 per MiB) linked by address,
//! 30-70% of each page garbage. Mutator threads walk it from roots and move
//! value between nodes while it is compacted; the checksum of the live
//! graph (its shape, the sum of values, and the touch counters) must be the
//! same afterwards.

pub mod bench;
pub mod collector;
pub mod graph;

pub use bench::{run, BenchConfig, BenchResult, ModeSummary, Stat};
pub use collector::{run_cycle, Cycle, CycleConfig};
