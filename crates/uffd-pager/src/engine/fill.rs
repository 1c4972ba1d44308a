//! The engine side of the background policies: working-set replay (at
//! normal priority: the VM needs those pages next) and background fill (at
//! a lower priority); demand faults take over the pages they claimed.

use super::*;

/// The fill thread: replays the working set, then fills everything else.
pub(super) fn fill_main(shared: &Arc<Shared>, target: &Arc<Target>) {
    let _span = debug_span!("fill", pager = %shared.config.name).entered();
    let finish = || {
        *lock(&shared.fill_done) = true;
        shared.fill_cv.notify_all();
    };
    let mut worker = match Worker::new(shared) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "fill thread cannot allocate its buffers");
            finish();
            return;
        }
    };
    if let Some(ws) = &shared.config.replay {
        if replay_in_parallel(&mut worker, shared, target, ws) == FillEnd::Gone {
            shared.mark_gone(target);
            return finish();
        }
    }
    if shared.config.background_fill {
        // The rest of memory is background work: it runs at a lower
        // priority than the handlers and the threads they serve, never
        // needs to wait for a fault (faults take its pages over), and so on
        // a busy machine takes only the CPU left. The working set above ran
        // at normal priority: the VM is about to touch those pages, and
        // against vCPU threads at normal priority a nice-10 replay gets a
        // tenth of a core, leaving most of the pages to demand faults.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
        match fill_missing(&mut worker, shared, target, None) {
            FillEnd::Gone => {
                shared.mark_gone(target);
                return finish();
            }
            FillEnd::Stopped | FillEnd::Done => {}
        }
    }
    finish();
}

/// Pages per replay thread below which a second thread is not worth it.
const PAGES_PER_REPLAY_THREAD: usize = 4096;

/// Replays `ws` with one thread per core (at most two): the recorded pages,
/// sorted by file offset, are split into that many contiguous parts. The
/// replay's floor is one resolving ioctl per run of recorded pages, which
/// a second core halves; the VMM's threads mostly wait on the few faults
/// left meanwhile.
fn replay_in_parallel(
    worker: &mut Worker<'_>,
    shared: &Arc<Shared>,
    target: &Target,
    ws: &WorkingSet,
) -> FillEnd {
    let mut pages = ws.pages().to_vec();
    pages.sort_unstable();
    pages.dedup();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = cores
        .min(2)
        .min(pages.len() / PAGES_PER_REPLAY_THREAD)
        .max(1);
    let per_part = pages.len().div_ceil(parts).max(1);
    let mut chunks = pages.chunks(per_part);
    let first = chunks.next().unwrap_or(&[]);
    std::thread::scope(|scope| {
        let others: Vec<_> = chunks
            .map(|part| {
                scope.spawn(move || match Worker::new(shared) {
                    Ok(mut w) => replay(&mut w, shared, target, part),
                    Err(e) => {
                        error!(error = %e, "a replay thread cannot allocate its buffers");
                        FillEnd::Done
                    }
                })
            })
            .collect();
        let mut end = replay(worker, shared, target, first);
        for other in others {
            match other.join() {
                Ok(FillEnd::Gone) => end = FillEnd::Gone,
                Ok(FillEnd::Stopped) if end == FillEnd::Done => end = FillEnd::Stopped,
                Ok(_) => {}
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        end
    })
}

/// Installs `pages` (sorted source offsets) in file order, one window of
/// up to [`BATCH_BYTES`] at a time: the source is read front to back, and
/// each window costs one claim pass and one install pass however sparse
/// the recorded pages are in it (only they are claimed). A demand fault on
/// a claimed page takes it over.
pub(super) fn replay(
    worker: &mut Worker<'_>,
    shared: &Shared,
    target: &Target,
    pages: &[u64],
) -> FillEnd {
    let mut selected: Vec<bool> = Vec::new();
    let mut k = 0;
    let mut retries = 0;
    while k < pages.len() {
        if !fill_may_go_on(shared, target, None) {
            return FillEnd::Stopped;
        }
        let table = read(&target.table);
        let Some((span, lo)) = table.by_source(pages[k]) else {
            k += 1;
            continue;
        };
        let span = span.clone();
        let batch = ((BATCH_BYTES / span.page_size) as usize).max(1);
        let hi = (lo + batch).min(span.index_end());
        let window_end = span.source_of(hi);
        selected.clear();
        selected.resize(hi - lo, false);
        let mut next = k;
        while next < pages.len() && pages[next] < window_end {
            selected[((pages[next] - span.source_of(lo)) / span.page_size) as usize] = true;
            next += 1;
        }
        match after_chunk(
            fill_chunk(worker, target, table, span, lo, hi, Some(&selected)),
            &mut retries,
        ) {
            Next::Gone => return FillEnd::Gone,
            Next::Again => {}
            Next::On => k = next,
        }
    }
    FillEnd::Done
}

/// Why [`fill_missing`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FillEnd {
    /// Every chunk was visited (pages whose source failed are poisoned, or
    /// left missing when POISON failed).
    Done,
    /// Shutdown was requested or the deadline passed.
    Stopped,
    /// The target process is gone.
    Gone,
}

/// Installs every page of `target` still missing, in chunks aligned to
/// [`BATCH_BYTES`], while demand faults take over its pages (the handler threads keep
/// serving them meanwhile). Removed (ballooned) pages stay unpopulated:
/// they read as zero with or without a handler. Used by the background
/// fill and by [`Pager::detach`]; `deadline` stops it between chunks.
pub(super) fn fill_missing(
    worker: &mut Worker<'_>,
    shared: &Shared,
    target: &Target,
    deadline: Option<Instant>,
) -> FillEnd {
    let states: Vec<Arc<PageStates>> = {
        let table = read(&target.table);
        let mut v: Vec<Arc<PageStates>> = Vec::new();
        for s in &table.spans {
            if !v.iter().any(|x| Arc::ptr_eq(x, &s.states)) {
                v.push(Arc::clone(&s.states));
            }
        }
        v
    };
    for st in states {
        let mut i = 0;
        let mut retries = 0;
        while i < st.len() {
            if !fill_may_go_on(shared, target, deadline) {
                return if target.gone.load(Ordering::Relaxed) {
                    FillEnd::Gone
                } else {
                    FillEnd::Stopped
                };
            }
            let table = read(&target.table);
            let Some(span) = table
                .spans
                .iter()
                .find(|s| Arc::ptr_eq(&s.states, &st) && i >= s.first && i < s.index_end())
                .cloned()
            else {
                i += 1;
                continue;
            };
            let batch = ((BATCH_BYTES / span.page_size) as usize).max(1);
            // Stay aligned to the batch so huge-page moves stay possible.
            let hi = ((i / batch + 1) * batch).min(span.index_end());
            match after_chunk(
                fill_chunk(worker, target, table, span, i, hi, None),
                &mut retries,
            ) {
                Next::Gone => return FillEnd::Gone,
                Next::Again => {}
                Next::On => i = hi,
            }
        }
    }
    FillEnd::Done
}

/// False when the fill should stop (shutdown, the target gone, the
/// deadline passed). It never waits for demand faults: they take over any
/// page it claimed (see `PageStates::steal`), and the fill thread runs at a
/// lower priority.
pub(super) fn fill_may_go_on(shared: &Shared, target: &Target, deadline: Option<Instant>) -> bool {
    !shared.stopping()
        && !target.gone.load(Ordering::Relaxed)
        && deadline.is_none_or(|d| Instant::now() < d)
}

/// What to do after a chunk.
enum Next {
    /// The target is gone.
    Gone,
    /// An event overtook the chunk: try it again.
    Again,
    /// On to the next chunk.
    On,
}

/// A chunk an event overtook is tried again, up to 100 times 50 us apart;
/// then (or once it is done) the fill moves on.
fn after_chunk(step: Step, retries: &mut u32) -> Next {
    match step {
        Step::Gone => Next::Gone,
        Step::Defer | Step::Abandoned if *retries < 100 => {
            *retries += 1;
            std::thread::sleep(Duration::from_micros(50));
            Next::Again
        }
        _ => {
            *retries = 0;
            Next::On
        }
    }
}

/// Claims and installs the missing pages `lo..hi` of `span` (found under
/// `table`, which is released before reading the source); with `selected`,
/// only the pages it marks.
pub(super) fn fill_chunk(
    worker: &mut Worker<'_>,
    target: &Target,
    table: std::sync::RwLockReadGuard<'_, Table>,
    span: Span,
    lo: usize,
    hi: usize,
    selected: Option<&[bool]>,
) -> Step {
    worker.claims.clear();
    let mut any = false;
    for i in lo..hi {
        let wanted = selected.is_none_or(|s| s[i - lo]);
        // Removed (ballooned) pages stay unpopulated.
        let c = if wanted {
            span.states.claim_background(i).unwrap_or(0)
        } else {
            0
        };
        any |= c != 0;
        worker.claims.push(c);
    }
    if !any {
        return Step::Done;
    }
    let claim = Claim {
        span,
        generation: table.generation,
        map_now: false,
        demand_hi: lo,
    };
    drop(table);
    let claims = std::mem::take(&mut worker.claims);
    let shared: &Shared = worker.shared;
    let guard = ClaimGuard {
        shared,
        target,
        claim: &claim,
        from: lo,
        claims: &claims,
    };
    let step = if selected.is_some() && shared.source.asynchronous().is_some() {
        // A far source fetches whatever a read spans (whole chunks of an
        // object store): reading first..last of a sparse working set would
        // download the pages between, which a working-set-first snapshot
        // keeps in other chunks. Only the claimed runs, then.
        let mut step = Step::Done;
        let mut i = 0;
        while i < claims.len() {
            if claims[i] == 0 {
                i += 1;
                continue;
            }
            let run = claims[i..]
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(claims.len() - i);
            match worker.fetch_and_install(target, &claim, lo + i, &claims[i..i + run]) {
                Step::Done => {}
                Step::Gone => {
                    step = Step::Gone;
                    break;
                }
                other => step = other,
            }
            i += run;
        }
        step
    } else {
        worker.fetch_and_install(target, &claim, lo, &claims)
    };
    drop(guard);
    worker.claims = claims;
    step
}
