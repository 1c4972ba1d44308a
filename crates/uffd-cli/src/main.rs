//! `uffd`: user-space paging for Linux, from the command line.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// User-space paging for Linux with userfaultfd.
///
/// Start with `uffd probe` to see what this kernel and this user may do.
#[derive(Debug, Parser)]
#[command(name = "uffd", version, about, long_about = None, propagate_version = true)]
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uffd: {e}");
            ExitCode::from(1)
        }
    }
}
