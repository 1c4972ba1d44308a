//! `uffd`: user-space paging for Linux, from the command line.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cmd;

/// The version and the git revision it was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("UFFD_GIT_REVISION"),
    ")"
);

/// User-space paging for Linux with userfaultfd.
///
/// Start with `uffd probe` to see what this kernel and this user may do.
#[derive(Debug, Parser)]
#[command(name = "uffd", version = VERSION, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Probe(cmd::probe::Args),
    Demo(cmd::demo::Args),
    Bench(cmd::bench::Args),
    Selftest(cmd::selftest::Args),
    Serve(cmd::serve::Args),
    Compact(cmd::compact::Args),
    Snapshot(cmd::snapshot::Args),
    PageServer(cmd::page_server::Args),
    Completions(cmd::docs::CompletionsArgs),
    Man(cmd::docs::ManArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => cmd::probe::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Selftest(args) => cmd::selftest::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Compact(args) => cmd::compact::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
        Command::PageServer(args) => cmd::page_server::run(args),
        Command::Completions(args) => cmd::docs::completions(args, Cli::command()),
        Command::Man(args) => cmd::docs::man(args, Cli::command()),
    };
    uffd_bench::leftovers::wait_if_interrupted();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uffd: {e}");
            ExitCode::from(1)
        }
    }
}
