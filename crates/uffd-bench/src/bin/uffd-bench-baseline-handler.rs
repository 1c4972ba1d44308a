//! The baseline of `uffd serve bench`, in a process of its own: the real
//! server and handshake (`uffd_serve::server`), every VM served by a
//! handler written like Firecracker's example on-demand handler (one
//! thread, poll, read one message, one 4 KiB `UFFDIO_COPY`, a wake after
//! EEXIST; `uffd_bench::baselines::OneByOneEngine`) from the memory file's
//! mapping.
//!
//! ```text
//! uffd-bench-baseline-handler --mem-file F --socket S [--stats-json J]
//! ```
//!
//! Runs until SIGTERM or SIGINT. Exit status 0 after a clean stop, 1 on an
//! error, 2 on bad arguments.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use uffd_bench::baselines::OneByOneEngine;
use uffd_pager::{FileMode, FileSource, PageSource};
use uffd_serve::server::{Server, ServerConfig};

fn main() -> ExitCode {
    let mut mem_file = None;
    let mut socket = None;
    let mut stats_json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--mem-file" => &mut mem_file,
            "--socket" => &mut socket,
            "--stats-json" => &mut stats_json,
            other => {
                eprintln!("uffd-bench-baseline-handler: unknown argument {other}");
                return ExitCode::from(2);
            }
        };
        *slot = args.next().map(PathBuf::from);
    }
    let (Some(mem_file), Some(socket)) = (mem_file, socket) else {
        eprintln!("usage: uffd-bench-baseline-handler --mem-file F --socket S [--stats-json J]");
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match serve(mem_file, socket, stats_json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uffd-bench-baseline-handler: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(
    mem_file: PathBuf,
    socket: PathBuf,
    stats_json: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let source: Arc<dyn PageSource> = Arc::new(FileSource::open(&mem_file, FileMode::Mmap)?);
    let config = ServerConfig {
        socket,
        file_len: source.len(),
        allow_uid: None,
        record: None,
        stats_json,
        handshake_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(30),
        max_connections: uffd_serve::server::default_max_connections(),
        source_identity: None,
    };
    let signals = uffd_serve::signals::install()?;
    let server = Server::bind(config, Arc::new(OneByOneEngine::new(source)))?;
    signals.route_to(server.handle());
    server.run()?;
    Ok(())
}
