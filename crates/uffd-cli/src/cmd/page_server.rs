//! `uffd page-server`: serve one memory image over TCP to destinations
//! restoring it post-copy (`uffd serve --source tcp://HOST:PORT`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use uffd_pager::{FileMode, FileSource, PageSource};
use uffd_remote::{image_identity, PageServer, PageServerConfig};

use super::CmdResult;

/// Serve a memory image over TCP for post-copy restores on other hosts.
///
/// Each destination (`uffd serve --source tcp://HOST:PORT` on the host the
/// VM moves to) opens two connections: a demand channel for the pages its
/// vCPUs fault on, answered at once and never queued behind anything, and
/// a bulk channel for its background reads (--prefetch, --background-fill)
/// and, with --push, every page of the image streamed unasked, starting
/// after the latest demand fault. Any number of destinations, each as many
/// times as it likes; a destination that loses its connection reconnects
/// (to this server, or one restarted on the same address with the same
/// file) without losing a page.
///
/// Output: log lines on stderr: where it listens (`serving FILE (N bytes)
/// on HOST:PORT`), each destination attached and gone with what it took;
/// --stats-json writes those figures as JSON at exit.
///
/// Exit status: 0 after SIGTERM or SIGINT, 1 when it cannot serve (the
/// file, the address), 2 for bad arguments.
///
/// Example (source host, then destination host):
///   uffd page-server --mem-file vm.mem --listen 0.0.0.0:7000 --push
///   uffd serve --source tcp://source-host:7000 --socket /run/vm.sock
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The memory image (a Firecracker snapshot's memory file).
    #[arg(long, value_name = "PATH", required = true)]
    mem_file: PathBuf,
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the log
    /// says which).
    #[arg(long, value_name = "HOST:PORT", required = true)]
    listen: String,
    /// Push every page to each destination in the background.
    #[arg(long)]
    push: bool,
    /// Write each destination's figures here as JSON at exit.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
}

/// Runs the page server.
pub fn run(args: Args) -> CmdResult {
    super::serve::init_logs(false);
    let file = std::fs::File::open(&args.mem_file)
        .map_err(|e| format!("{}: {e}", args.mem_file.display()))?;
    let identity = image_identity(&file)?;
    let source = FileSource::open(&args.mem_file, FileMode::Pread)
        .map_err(|e| format!("{}: {e}", args.mem_file.display()))?;
    if source.is_empty() {
        return Err(format!(
            "{} is empty: there is no memory to serve",
            args.mem_file.display()
        )
        .into());
    }
    let len = source.len();
    let source: Arc<dyn PageSource> = Arc::new(source);
    let server = PageServer::bind(
        &args.listen,
        source,
        identity,
        PageServerConfig {
            push: args.push,
            ..PageServerConfig::default()
        },
    )
    .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    eprintln!(
        "uffd page-server: serving {} ({len} bytes) on {}{}",
        args.mem_file.display(),
        server.local_addr()?,
        if args.push {
            ", pushing every page"
        } else {
            ""
        }
    );
    let handle = server.handle();
    std::thread::Builder::new()
        .name("uffd-page-server-signals".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for signals");
            runtime.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            eprintln!("uffd page-server: stopping");
            handle.stop();
        })?;
    let stats = server.run()?;
    if let Some(path) = &args.stats_json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "destinations": stats }))?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
