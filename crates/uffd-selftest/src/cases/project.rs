//! The stress bounce per memory type, and this project's race case.

use crate::ensure;
use crate::harness::{CaseResult, Env};
use crate::stress::{self, StressOptions};

/// The kernel's uffd-stress, short by default (see [`crate::StressConfig`]).
pub fn stress(env: &Env) -> CaseResult {
    let opts = StressOptions::for_env(env);
    let r = stress::run(&opts)?;
    Ok(format!(
        "{} bounces of {} pages: {} missing, {} WP faults, {} EEXIST, {} pages by background COPY{}",
        r.bounces,
        opts.pages,
        r.missing,
        r.wp,
        r.eexist,
        r.background,
        if r.wp_enabled { "" } else { " (no write-protect on this kernel)" }
    ) + &write_missing_note(r.write_missing))
}

/// (a) Write-protect toggling and COPY race so that EEXIST happens; every
/// EEXIST is followed by a wake, and no faulting thread may be left asleep
/// (the stress run FAILs naming the page of a thread that is).
pub fn wake_after_copy_failure(env: &Env) -> CaseResult {
    let mut opts = StressOptions::for_env(env);
    opts.pages = 256.min(opts.pages);
    opts.bounces = 4;
    opts.toggle_wp = true;
    opts.racing_only = true;
    let mut total = stress::StressReport::default();
    // EEXIST needs a race; give it a few rounds to happen.
    for round in 0..4 {
        opts.seed = env.seed.wrapping_add(round);
        let r = stress::run(&opts)?;
        total.eexist += r.eexist;
        total.wp += r.wp;
        total.missing += r.missing;
        total.write_missing += r.write_missing;
        if total.eexist > 0 {
            break;
        }
    }
    ensure!(
        total.eexist > 0,
        "no COPY met EEXIST in 16 racing bounces: the race this case is about did not happen"
    );
    Ok(format!(
        "{} EEXIST (each woken), {} WP and {} missing faults; no thread left asleep",
        total.eexist, total.wp, total.missing
    ) + &write_missing_note(total.write_missing))
}

fn write_missing_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(
            "; {n} writes reported as MISSING after a read (MAP_PRIVATE memfd quirk, data intact)"
        )
    }
}
