//! One module per subcommand, each with its `Args` and `run`.

pub mod bench;
pub mod compact;
pub mod demo;
pub mod docs;
pub mod page_server;
pub mod probe;
pub mod selftest;
pub mod serve;
pub mod snapshot;

/// What a subcommand returns: an exit code, or an error printed as `uffd: ...`.
pub type CmdResult = Result<std::process::ExitCode, Box<dyn std::error::Error + Send + Sync>>;

/// `--json` and `--plot`, the same on every benchmark and demo.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Print one JSON object (the schema is in this command's help)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG plot of the figures here (what it draws is in
    /// this command's help).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

impl ReportArgs {
    /// With `--plot`, draws `panels` under `title` and says where.
    pub fn write_plot(
        &self,
        title: impl FnOnce() -> String,
        panels: impl FnOnce() -> Vec<uffd_bench::plot::Panel>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(path) = &self.plot else {
            return Ok(());
        };
        uffd_bench::plot::write_svg(path, &title(), &panels())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("plot written to {}", path.display());
        Ok(())
    }
}

/// Fails with what to do when this process may not open a userfaultfd;
/// `what` names the command that needs one.
pub fn require_userfaultfd(what: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match uffd::probe() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "{what} needs userfaultfd, which this process cannot open: {e}\n\
             (`uffd probe` says which ways of opening were refused and how to allow one)"
        )
        .into()),
    }
}
