//! One module per subcommand, each with its `Args` and `run`.

pub mod bench;
pub mod compact;
pub mod demo;
pub mod probe;
pub mod selftest;
pub mod serve;

/// What a subcommand returns: an exit code, or an error printed as `uffd: ...`.
pub type CmdResult = Result<std::process::ExitCode, Box<dyn std::error::Error + Send + Sync>>;

/// Options for a userfaultfd serving this process's own memory, which only
/// user-space code touches (`demo`, `bench`): user-mode-only is enough, and
/// it needs no privilege (vm.unprivileged_userfaultfd=0 still allows it).
pub fn in_process_uffd() -> uffd::OpenOptions {
    uffd::OpenOptions::new().user_mode_only(true)
}
