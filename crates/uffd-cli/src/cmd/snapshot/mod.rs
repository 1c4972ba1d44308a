//! `uffd snapshot ...`: memory snapshots: in object storage (push, pull,
//! ls, info; store.rs), taken live while writers run with dirty tracking
//! and incremental layers (live-demo; live.rs), and merged (merge).

use std::path::PathBuf;
use std::process::ExitCode;

use super::CmdResult;

mod live;
mod store;

/// Memory snapshots: kept in object storage, taken live, layered, merged.
///
/// In object storage a snapshot is a manifest object plus content-addressed
/// chunks: zero pages are not stored, a chunk held by any snapshot in the
/// same folder is stored once, and with --parent only the pages changed
/// since the parent are. `uffd serve --source URL` restores VMs
/// from it directly, fetching the chunks their faults need. URLs:
/// s3://bucket/dir/NAME (also gs://, az://, file:///dir/NAME). The store is
/// configured by the standard environment variables: for S3
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and for an
/// S3-compatible server AWS_ENDPOINT_URL (plus AWS_ALLOW_HTTP=true for
/// plain http).
///
/// A live snapshot write-protects memory at t0 with userfaultfd and saves
/// each page before its first write; deltas hold only the pages written
/// since the previous snapshot (dirty tracking with WP_ASYNC and
/// PAGEMAP_SCAN). `uffd serve --mem-file BASE --layer D1 --layer D2`
/// restores base and deltas; `uffd snapshot merge` folds them into one
/// memory file.
///
/// Examples:
///   uffd snapshot push --mem-file vm.mem --to s3://snaps/fleet/vm-1 --working-set vm.ws
///   uffd snapshot push --mem-file vm2.mem --to s3://snaps/fleet/vm-2 --parent s3://snaps/fleet/vm-1
///   uffd snapshot ls s3://snaps/fleet
///   uffd snapshot info s3://snaps/fleet/vm-1 --json
///   uffd snapshot pull --from s3://snaps/fleet/vm-1 --to vm.mem
///   uffd snapshot live-demo --mib 256 --threads 4
///   uffd snapshot merge --base vm.mem --layer d1 --layer d2 --output vm-now.mem
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Push(store::PushArgs),
    Pull(store::PullArgs),
    Ls(store::LsArgs),
    Info(store::InfoArgs),
    LiveDemo(live::LiveDemoArgs),
    Merge(MergeArgs),
}

/// Merge a base memory file and deltas into one memory file.
///
/// Later layers win. The output is what `uffd serve --mem-file BASE
/// --layer D1 --layer D2 ...` serves, byte for byte: a raw memory file
/// (Firecracker's layout), sparse where pages are zero, fsync'd and
/// renamed into place only when complete. Every delta is checked first
/// (format version, every field, every checksum) and must belong to an
/// image as long as the base.
///
/// Output: one line naming the file written and its size.
///
/// Exit status: 0 when the file was written; 1 when a delta is damaged,
/// of another snapshot, or a file cannot be read or written (nothing is
/// left at --output then).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct MergeArgs {
    /// The base memory file (a full snapshot).
    #[arg(long, value_name = "PATH")]
    base: PathBuf,
    /// A delta to lay over it; repeat in the order they were taken.
    #[arg(long = "layer", value_name = "PATH")]
    layers: Vec<PathBuf>,
    /// Where to write the merged memory file.
    #[arg(long, short, value_name = "PATH")]
    output: PathBuf,
}

/// Runs `uffd snapshot ...`.
pub fn run(args: Args) -> CmdResult {
    match args.action {
        Action::Push(a) => store::push(a),
        Action::Pull(a) => store::pull(a),
        Action::Ls(a) => store::ls(a),
        Action::Info(a) => store::info(a),
        Action::LiveDemo(a) => live::run(a),
        Action::Merge(a) => {
            let len = uffd_snapshot::merge(&a.base, &a.layers, &a.output)?;
            println!(
                "merged {} and {} layer(s) into {} ({len} bytes)",
                a.base.display(),
                a.layers.len(),
                a.output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
