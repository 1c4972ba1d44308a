//! `uffd snapshot`: memory snapshots in object storage (push, pull, ls,
//! info; see store.rs).

use super::CmdResult;

mod store;

/// Keep memory snapshots in object storage, to restore anywhere.
///
/// A snapshot is a manifest object plus content-addressed chunks: zero
/// chunks are not stored, and a chunk held by any snapshot in the same
/// folder is stored once. `uffd serve --source URL` restores VMs from it
/// directly, fetching the chunks their faults need.
///
/// URLs: s3://bucket/dir/NAME (also gs://, az://, file:///dir/NAME). The
/// store is configured by the standard environment variables: for S3
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and for an
/// S3-compatible server AWS_ENDPOINT_URL (plus AWS_ALLOW_HTTP=true for
/// plain http).
///
/// Examples:
///   uffd snapshot push --mem-file vm.mem --to s3://snaps/fleet/vm-1
///   uffd snapshot ls s3://snaps/fleet
///   uffd snapshot info s3://snaps/fleet/vm-1 --json
///   uffd snapshot pull --from s3://snaps/fleet/vm-1 --to vm.mem
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
}

/// Runs `uffd snapshot ...`.
pub fn run(args: Args) -> CmdResult {
    match args.action {
        Action::Push(a) => store::push(a),
        Action::Pull(a) => store::pull(a),
        Action::Ls(a) => store::ls(a),
        Action::Info(a) => store::info(a),
    }
}
