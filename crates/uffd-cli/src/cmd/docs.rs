//! `uffd completions` and `uffd man`: shell completions and man pages
//! generated from the same clap definitions as `--help`, so they cannot
//! drift from it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap_complete::Shell;

use super::CmdResult;

/// Print a shell completion script for uffd.
///
/// Install it where your shell looks, for example:
///   uffd completions bash > ~/.local/share/bash-completion/completions/uffd
///   uffd completions zsh  > ~/.zfunc/_uffd      (with fpath+=~/.zfunc)
///   uffd completions fish > ~/.config/fish/completions/uffd.fish
///
/// Output: the script, on stdout.
///
/// Exit status: 0, or 1 when stdout cannot be written.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: Shell,
}

/// Write man pages for uffd and each subcommand.
///
/// Writes uffd.1, uffd-serve.1, uffd-serve-bench.1 and so on into --dir.
/// Install them with, for example:
///   uffd man --dir ~/.local/share/man/man1 && man uffd-serve
///
/// Output: the path of each page written, one per line.
///
/// Exit status: 0 when every page was written, 1 otherwise.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ManArgs {
    /// Directory for the pages (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Prints the completion script of `command` for `args.shell`.
pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> CmdResult {
    let name = command.get_name().to_string();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Writes one man page per command and subcommand into `args.dir`.
pub fn man(args: ManArgs, command: clap::Command) -> CmdResult {
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("creating {}: {e}", args.dir.display()))?;
    for path in write_pages(&args.dir, command, "")? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_pages(
    dir: &std::path::Path,
    command: clap::Command,
    prefix: &str,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error + Send + Sync>> {
    let name = if prefix.is_empty() {
        command.get_name().to_string()
    } else {
        format!("{prefix}-{}", command.get_name())
    };
    let command = command.name(name.clone());
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let mut written = vec![path];
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        written.extend(write_pages(dir, sub.clone(), &name)?);
    }
    Ok(written)
}
