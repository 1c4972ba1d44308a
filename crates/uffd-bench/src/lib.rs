//! Benchmarks for the uffd workspace, one module per subject.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod compact;
