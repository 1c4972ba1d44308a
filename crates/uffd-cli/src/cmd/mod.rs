//! One module per subcommand, each with its `Args` and `run`.

pub mod bench;
pub mod compact;
pub mod demo;
pub mod probe;
pub mod selftest;
pub mod serve;
pub mod snapshot;

/// What a subcommand returns: an exit code, or an error printed as `uffd: ...`.
pub type CmdResult = Result<std::process::ExitCode, Box<dyn std::error::Error + Send + Sync>>;
