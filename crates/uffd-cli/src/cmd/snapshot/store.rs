//! `uffd snapshot push`, `pull`, `ls` and `info`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uffd_store::snapshot;
use uffd_store::{Location, StoreOptions};

use super::super::CmdResult;

/// Store a memory file as a snapshot in object storage.
///
/// Every 4 KiB page is hashed. Zero pages are not stored. The other pages
/// are packed into chunks of up to --chunk-size, each stored under its
/// blake3 hash in `.chunks/` next to the snapshot (LZ4-compressed when that
/// saves at least an eighth) unless a snapshot in the same folder stored
/// it already. A page index (16 bytes per page) goes to `.pages/NAME`, and
/// the manifest (extents: image range -> bytes of a chunk) is written
/// last, so a snapshot is visible only once complete.
///
/// --parent URL (a snapshot in the same folder) downloads only its
/// manifest and page index, references its chunks for every page that is
/// unchanged, and packs only the changed pages into new chunks: pushing a
/// snapshot that differs from its parent in 5% of its pages uploads about
/// 5% of its bytes, wherever the changes are.
///
/// --working-set FILE (recorded by `uffd serve --record`) packs those
/// pages first, in the recorded order, into chunks of their own, so that
/// `uffd serve --prefetch FILE` downloads about the working set's bytes
/// before the VM needs them, not every chunk it is scattered over.
///
/// Chunk size is a trade-off: a fault fetches one whole chunk (larger:
/// fewer requests, more bytes per fault).
///
/// Output: a summary, or with --json one object {"url", "parent",
/// "image_len", "chunk_size", "pages", "zero_pages", "parent_pages",
/// "new_pages", "working_set_pages", "extents", "unique_chunks",
/// "parent_chunks", "reused_chunks", "uploaded_chunks",
/// "compressed_chunks", "uploaded_bytes", "manifest_bytes",
/// "index_bytes", "downloaded_bytes"}. Progress goes to stderr on a
/// terminal or with --progress.
///
/// Exit status: 0 when the snapshot is stored, 1 on an error (nothing
/// half-written is visible: the manifest is not written).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PushArgs {
    /// The memory file to store.
    #[arg(long, value_name = "PATH", required = true)]
    mem_file: PathBuf,
    /// Where: s3://bucket/dir/NAME (or gs://, az://, file:///dir/NAME).
    #[arg(long, value_name = "URL", required = true)]
    to: String,
    /// Chunk size: a power of two from 4K to 64M (K/M suffixes).
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = crate::cmd::serve::parse_bytes)]
    chunk_size: u64,
    /// A snapshot in the same folder to store only the changes against.
    #[arg(long, value_name = "URL")]
    parent: Option<String>,
    /// A working-set file (uffd serve --record) whose pages to pack first.
    #[arg(long, value_name = "PATH")]
    working_set: Option<PathBuf>,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Print one JSON object (see above) instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Download a snapshot into a memory file.
///
/// Every chunk is checked against its hash; zero pages are left as holes
/// in the file. The file is written under a temporary name next to --to
/// and renamed when complete.
///
/// Output: a summary line, or with --json {"image_len",
/// "downloaded_chunks", "downloaded_bytes"}. Progress as for push.
///
/// Exit status: 0 when the file is complete, 1 on an error (--to is then
/// left as it was).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PullArgs {
    /// The snapshot: s3://bucket/dir/NAME.
    #[arg(long, value_name = "URL", required = true)]
    from: String,
    /// The memory file to write.
    #[arg(long, value_name = "PATH", required = true)]
    to: PathBuf,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// List the snapshots in a folder.
///
/// Output: one line per snapshot (name, image size, chunk size, time
/// written), or with --json an array of {"url", "name", "image_len",
/// "chunk_size", "modified"}. Objects that are not snapshot manifests are
/// skipped.
///
/// Exit status: 0 when the folder could be listed (also when empty), 1 on
/// an error.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct LsArgs {
    /// The folder: s3://bucket/dir.
    #[arg(value_name = "URL", required = true)]
    url: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Describe a snapshot from its manifest.
///
/// Output: image size, chunk size, chunks and extents, zero pages and the
/// zero share of the image, the chunks' bytes (uncompressed and as
/// stored), and with --shared the chunks and bytes it shares with the
/// other snapshots of its folder (this reads every manifest there); or
/// with --json {"url", "version", "image_len", "chunk_size", "chunks",
/// "extents", "zero_pages", "zero_share", "unique_chunks",
/// "unique_bytes", "stored_bytes", "compressed_chunks",
/// "other_snapshots", "shared_chunks", "shared_bytes"} (the last three
/// null without --shared).
///
/// Exit status: 0 when the manifest is valid, 1 when it is missing,
/// corrupt or unreachable.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct InfoArgs {
    /// The snapshot: s3://bucket/dir/NAME.
    #[arg(value_name = "URL", required = true)]
    url: String,
    /// Also count what it shares with the other snapshots of its folder.
    #[arg(long)]
    shared: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn open(url: &str) -> Result<Location, uffd_store::StoreError> {
    Location::open(url, &StoreOptions::default())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Progress on stderr, at most five updates a second, when `shown`.
struct Meter {
    what: &'static str,
    shown: bool,
    last: Mutex<Option<Instant>>,
}

impl Meter {
    fn new(what: &'static str, forced: bool) -> Meter {
        Meter {
            what,
            shown: forced || std::io::stderr().is_terminal(),
            last: Mutex::new(None),
        }
    }

    fn update(&self, done: u64, total: u64) {
        if !self.shown {
            return;
        }
        let mut last = self.last.lock().expect("meter lock");
        let now = Instant::now();
        if done < total && last.is_some_and(|t| now - t < Duration::from_millis(200)) {
            return;
        }
        *last = Some(now);
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{}: {:.1} / {:.1} MiB ({pct:.0}%)",
            self.what,
            mib(done),
            mib(total)
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.shown && self.last.lock().expect("meter lock").is_some() {
            eprintln!();
        }
    }
}

/// Runs `uffd snapshot push`.
pub fn push(a: PushArgs) -> CmdResult {
    let chunk_size = u32::try_from(a.chunk_size)
        .map_err(|_| format!("--chunk-size {}: at most 64M", a.chunk_size))?;
    let location = open(&a.to)?;
    let parent = a.parent.as_deref().map(open).transpose()?;
    let working_set = match &a.working_set {
        Some(path) => {
            let len = std::fs::metadata(&a.mem_file)
                .map_err(|e| format!("{}: {e}", a.mem_file.display()))?
                .len();
            Some(
                uffd_pager::WorkingSet::load(path, len)
                    .map_err(|e| format!("--working-set {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let options = snapshot::PushOptions {
        chunk_size,
        parent: parent.as_ref(),
        working_set: working_set.as_ref(),
    };
    let meter = Meter::new("push", a.progress);
    let report = uffd_store::io_runtime()?.block_on(snapshot::push(
        &a.mem_file,
        &location,
        &options,
        &|d, t| meter.update(d, t),
    ));
    meter.finish();
    let r = report?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {:.1} MiB, {} pages: {} zero (not stored), {} unchanged in the parent, {} new ({} of the working set first); {} chunks packed to {} KiB: {} already stored, {} uploaded ({} compressed); {:.1} MiB uploaded, {:.1} MiB downloaded",
            r.url,
            mib(r.image_len),
            r.pages,
            r.zero_pages,
            r.parent_pages,
            r.new_pages,
            r.working_set_pages,
            r.unique_chunks,
            r.chunk_size >> 10,
            r.reused_chunks,
            r.uploaded_chunks,
            r.compressed_chunks,
            mib(r.uploaded_bytes),
            mib(r.downloaded_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `uffd snapshot pull`.
pub fn pull(a: PullArgs) -> CmdResult {
    let location = open(&a.from)?;
    let meter = Meter::new("pull", a.progress);
    let report = uffd_store::io_runtime()?
        .block_on(snapshot::pull(&location, &a.to, &|d, t| meter.update(d, t)));
    meter.finish();
    let r = report?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {:.1} MiB image, {} chunks ({:.1} MiB) downloaded",
            a.to.display(),
            mib(r.image_len),
            r.downloaded_chunks,
            mib(r.downloaded_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `uffd snapshot ls`.
pub fn ls(a: LsArgs) -> CmdResult {
    let location = open(&a.url)?;
    let listed = uffd_store::io_runtime()?.block_on(snapshot::list(&location))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else {
        for l in &listed {
            println!(
                "{:<32} {:>10.1} MiB  {:>6} KiB chunks  {}",
                l.name,
                mib(l.image_len),
                l.chunk_size >> 10,
                l.modified
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `uffd snapshot info`.
pub fn info(a: InfoArgs) -> CmdResult {
    let location = open(&a.url)?;
    let i = uffd_store::io_runtime()?.block_on(snapshot::info(&location, a.shared))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        println!("snapshot      {}", i.url);
        println!(
            "image         {:.1} MiB ({} bytes)",
            mib(i.image_len),
            i.image_len
        );
        println!("layout        version {}", i.version);
        println!(
            "chunks        {} packed to {} KiB, {} extents",
            i.chunks,
            i.chunk_size >> 10,
            i.extents
        );
        println!(
            "zero          {} pages, {:.1}% of the image",
            i.zero_pages,
            i.zero_share * 100.0
        );
        println!(
            "unique        {} chunks, {:.1} MiB ({:.1} MiB stored, {} compressed)",
            i.unique_chunks,
            mib(i.unique_bytes),
            mib(i.stored_bytes),
            i.compressed_chunks
        );
        if let (Some(n), Some(c), Some(b)) = (i.other_snapshots, i.shared_chunks, i.shared_bytes) {
            println!(
                "shared        {c} chunks, {:.1} MiB stored, with the {n} other snapshots of the folder",
                mib(b)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
