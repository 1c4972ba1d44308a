//! Fetching claimed pages from the source and installing them with the
//! strategy's ioctl; poisoning what cannot be produced; the guard that
//! poisons what a panicking thread held.

#![allow(unsafe_code)]

use super::strategy::{Run, Staged};
use super::*;
use crate::runs::runs;

impl Worker<'_> {
    /// Undoes claims on `from..` and wakes those pages so that any thread
    /// waiting on them faults again.
    pub(super) fn release(&self, target: &Target, claim: &Claim, from: usize, claims: &[u8]) {
        release(target, claim, from, claims);
    }

    /// Reads the claimed pages of `from..from + claims.len()` from the
    /// source and installs them.
    pub(super) fn fetch_and_install(
        &mut self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
    ) -> Step {
        let n = claims.len();
        let Some(first) = claims.iter().position(|&c| c != 0) else {
            return Step::Done;
        };
        let last = claims
            .iter()
            .rposition(|&c| c != 0)
            .expect("one claim exists")
            + 1;
        let (from, claims) = (from + first, &claims[first..last]);
        debug_assert!(claims.len() <= n);
        let span = &claim.span;
        let ps = span.page_size;
        let len = claims.len() as u64 * ps;
        let all_zero_claims = claims.iter().all(|&c| c == state::CLAIMED_ZERO);
        let fetched = if all_zero_claims {
            Ok(Staged {
                content: Content::Zero,
                src: std::ptr::null(),
                from_mapping: false,
            })
        } else {
            self.resolver().stage(self, span, from, len)
        };
        let Staged {
            content,
            src,
            from_mapping,
        } = match fetched {
            Ok(staged) => staged,
            Err(e) if claims.len() > 1 => {
                debug!(error = %e, "batch read failed; retrying page by page");
                let mut step = Step::Done;
                for k in 0..claims.len() {
                    let s = self.fetch_and_install(target, claim, from + k, &claims[k..=k]);
                    if s != Step::Done {
                        step = s;
                    }
                }
                return step;
            }
            Err(e) => return self.poison(target, claim, from, claims, &e),
        };
        let step = self.install_fetched(target, claim, from, claims, content, src, from_mapping);
        self.tell_source(from_mapping.then(|| (span.source_of(from), len as usize)));
        step
    }

    /// Tells the source what the runs [`Worker::install_fetched`] did
    /// since the last call mean for it, in this order: the kernel is done
    /// with `mapped` (bytes [`PageSource::mapped`] gave), then which of its
    /// bytes a target now holds. A source may drop installed bytes only
    /// when nothing copies from them any more.
    pub(super) fn tell_source(&mut self, mapped: Option<(u64, usize)>) {
        let source = &self.shared.source;
        if let Some((offset, len)) = mapped {
            source.mapped_done(offset, len);
        }
        for (offset, len) in self.installed.drain(..) {
            source.installed(offset, len);
        }
    }

    /// Installs the claimed pages of `from..from + claims.len()` (trimmed
    /// to claimed ends) whose bytes are at `src` (`Content::Zero`: none
    /// needed). `from_mapping` says `src` is the source's own mapping,
    /// which only the kernel may read. The source ranges it installed wait
    /// in `self.installed` for [`Worker::tell_source`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install_fetched(
        &mut self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
        content: Content,
        src: *const u8,
        from_mapping: bool,
    ) -> Step {
        let span = &claim.span;
        let ps = span.page_size;
        let len = claims.len() as u64 * ps;
        let offset = span.source_of(from);
        let resolver = self.resolver();
        let in_place = self.shared.config.content_in_place;
        // Per page: zero or data.
        let zero_page = |k: usize| -> bool {
            claims[k] == state::CLAIMED_ZERO
                || content == Content::Zero
                || (self.shared.config.detect_zero_pages
                    && !in_place
                    && if from_mapping {
                        self.shared.source.is_known_zero(offset + k as u64 * ps, ps)
                    } else {
                        // SAFETY: `src` holds `len` readable bytes (the alias
                        // or the staging buffer, both this pager's memory).
                        let page = unsafe {
                            std::slice::from_raw_parts(src.add(k * ps as usize), ps as usize)
                        };
                        is_zero(page)
                    })
        };
        // A whole aligned huge page of data moves with one PMD update only
        // if it moves in one piece: keep its zero pages in it.
        let whole_huge_move = resolver.keeps_huge_pages_whole()
            && content == Content::Data
            && len == BATCH_BYTES
            && span.addr_of(from).is_multiple_of(BATCH_BYTES)
            && claims
                .iter()
                .all(|&c| c == state::CLAIMED || c == state::CLAIMED_BG);
        // Unclaimed pages (present already, or not selected by a sparse
        // replay window) are never scanned.
        let mut kinds: Vec<u8> = (0..claims.len())
            .map(|k| {
                if claims[k] == 0 {
                    0
                } else if !whole_huge_move && zero_page(k) {
                    1
                } else {
                    2
                }
            })
            .collect();
        resolver.prepare(self, span, from, &kinds);

        // Install under the read lock, after checking no event overtook us.
        let table = read(&target.table);
        // A background claim a demand fault took over is that fault's to
        // install: skip it, it does not make the batch stale.
        let stolen = |k: usize| {
            claims[k] == state::CLAIMED_BG
                && matches!(span.states.get(from + k), state::CLAIMED | state::PRESENT)
        };
        let intact = table.generation == claim.generation
            && claims
                .iter()
                .enumerate()
                .all(|(k, &cl)| cl == 0 || span.states.get(from + k) == cl || stolen(k));
        for (k, kind) in kinds.iter_mut().enumerate() {
            if stolen(k) {
                *kind = 0;
            }
        }
        if !intact {
            drop(table);
            self.shared
                .counters
                .abandoned
                .fetch_add(1, Ordering::Relaxed);
            self.release(target, claim, from, claims);
            return Step::Abandoned;
        }
        for (run, kind) in runs(kinds.len(), |k| kinds[k]) {
            if kind == 0 {
                continue;
            }
            let (k, end) = (run.start, run.end);
            let idx = from + k;
            let addr = span.addr_of(idx);
            let run = (end - k) as u64 * ps;
            let map = idx < claim.demand_hi || claim.map_now;
            // SAFETY: `src + k * ps` lies inside the `len` bytes read above.
            let data = unsafe { src.add(k * ps as usize) };
            let result = resolver.install(
                self,
                &target.uffd,
                Run {
                    addr,
                    len: run,
                    page_size: ps,
                    zero: kind == 1,
                    data,
                    map,
                },
            );
            let done = match result {
                Ok(Resolved::Complete {
                    installed,
                    existing,
                }) => {
                    Counters::add(&self.shared.counters.eexist, existing / ps);
                    Counters::add(&self.shared.counters.bytes_installed, installed);
                    let counter = if kind == 1 {
                        Some(&self.shared.counters.pages_zero)
                    } else {
                        resolver.installed(&self.shared.counters, map)
                    };
                    if let Some(counter) = counter {
                        Counters::add(counter, installed / ps);
                    }
                    self.installed.push((span.source_of(idx), run));
                    end - k
                }
                Ok(Resolved::RetryAfterEvents { done }) => {
                    self.shared.counters.eagain.fetch_add(1, Ordering::Relaxed);
                    let done_pages = (done / ps) as usize;
                    self.mark_installed(claim, from + k, done_pages);
                    if done_pages > 0 {
                        self.installed
                            .push((span.source_of(idx), done_pages as u64 * ps));
                    }
                    drop(table);
                    self.release(
                        target,
                        claim,
                        from + k + done_pages,
                        &claims[k + done_pages..],
                    );
                    return Step::Defer;
                }
                Ok(Resolved::TargetGone) => return Step::Gone,
                Err(e) if from_mapping && e.errno() == Some(rustix::io::Errno::FAULT) => {
                    // The kernel could not read the source's mapping: the
                    // file lost these bytes (it shrank). Ask it again the
                    // way that reports why; pages it cannot produce are
                    // poisoned, never left to re-fault forever.
                    drop(table);
                    let rest = &claims[k..];
                    let run_offset = span.source_of(from + k);
                    let buf = self.staging_for(rest.len() as u64 * ps);
                    return match self.read_source(run_offset, buf) {
                        Err(source_error) => {
                            self.poison(target, claim, from + k, rest, &source_error)
                        }
                        Ok(_) => {
                            // Readable again (the file grew back): retry.
                            self.release(target, claim, from + k, rest);
                            Step::Abandoned
                        }
                    };
                }
                Err(e) => {
                    self.shared
                        .counters
                        .failed_installs
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, address = addr, "installing pages failed; waking the waiters");
                    drop(table);
                    self.release(target, claim, from + k, &claims[k..]);
                    return Step::Abandoned;
                }
            };
            self.mark_installed(claim, from + k, done);
        }
        Step::Done
    }

    pub(super) fn mark_installed(&self, claim: &Claim, from: usize, pages: usize) {
        for i in from..from + pages {
            let s = if i < claim.demand_hi {
                state::PRESENT
            } else {
                state::PREFETCHED
            };
            claim.span.states.set(i, s);
        }
        if from + pages > claim.demand_hi {
            let prefetched = from + pages - from.max(claim.demand_hi);
            Counters::add(&self.shared.counters.prefetched_pages, prefetched as u64);
            if !claim.map_now {
                // Only the fill thread's claims leave mapping for later.
                Counters::add(&self.shared.counters.background_pages, prefetched as u64);
            }
        }
        self.shared
            .installed_pages
            .fetch_add(pages as u64, Ordering::Relaxed);
    }

    /// The first `len` bytes of this worker's staging buffer.
    #[allow(clippy::mut_from_ref)]
    pub(super) fn staging_for(&self, len: u64) -> &mut [u8] {
        assert!(len <= BATCH_BYTES, "a claim never exceeds BATCH_BYTES");
        // SAFETY: the staging buffer is this worker's own memory, BATCH_BYTES
        // long; only this worker's thread uses it, one read at a time, and
        // the slice does not outlive the read-and-install it serves.
        unsafe { std::slice::from_raw_parts_mut(self.staging.as_ptr(), len as usize) }
    }

    pub(super) fn read_source(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        self.retrying(offset, buf, |source, offset, buf| {
            source.read_at(offset, buf)
        })
    }

    /// [`PageSource::read_into_page_cache`], retried like [`Worker::read_source`].
    pub(super) fn read_source_into_page_cache(
        &self,
        offset: u64,
        page_cache: &mut [u8],
    ) -> Result<Content, SourceError> {
        self.retrying(offset, page_cache, |source, offset, buf| {
            source.read_into_page_cache(offset, buf)
        })
    }

    fn retrying(
        &self,
        offset: u64,
        buf: &mut [u8],
        read: impl Fn(&dyn PageSource, u64, &mut [u8]) -> Result<Content, SourceError>,
    ) -> Result<Content, SourceError> {
        let mut attempt = 0;
        loop {
            match read(&*self.shared.source, offset, buf) {
                Err(e) if e.is_transient() && attempt < self.shared.config.source_retries => {
                    attempt += 1;
                    self.shared
                        .counters
                        .source_retries
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, attempt, "retrying source read");
                    std::thread::sleep(Duration::from_millis(1 << attempt.min(6)));
                }
                r => return r,
            }
        }
    }

    /// The source cannot produce these pages: poison them so that access
    /// raises SIGBUS instead of reading wrong bytes or hanging.
    pub(super) fn poison(
        &self,
        target: &Target,
        claim: &Claim,
        from: usize,
        claims: &[u8],
        e: &SourceError,
    ) -> Step {
        self.shared
            .poison(target, claim, from, claims, &e.to_string())
    }
}

/// Undoes claims on `from..` and wakes those pages so that any thread
/// waiting on them faults again.
pub(super) fn release(target: &Target, claim: &Claim, from: usize, claims: &[u8]) {
    let mut any = false;
    for (k, &cl) in claims.iter().enumerate() {
        if cl != 0 {
            claim.span.states.release(from + k, cl);
            any = true;
        }
    }
    if !any {
        return;
    }
    let ps = claim.span.page_size;
    let len = claims.len() as u64 * ps;
    let old = claim.span.addr_of(from);
    let _ = target.uffd.wake(old, len);
    // An event may have moved the pages: wake them where they are now.
    let table = read(&target.table);
    if let Some(now) = table.address_of(&claim.span.states, from) {
        if now != old {
            let _ = target.uffd.wake(now, len);
        }
    }
}

/// Holds claimed pages while a thread fetches and installs them. Dropped
/// during a panic (a source, or the engine itself, failed in a way nobody
/// foresaw), it poisons them: the faulting threads get SIGBUS instead of
/// waiting forever on pages nobody will install, and the same failure is
/// not retried in a loop.
pub(super) struct ClaimGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) target: &'a Target,
    pub(super) claim: &'a Claim,
    pub(super) from: usize,
    pub(super) claims: &'a [u8],
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(
                pager = %self.shared.config.name,
                address = format_args!("{:#x}", self.claim.span.addr_of(self.from)),
                pages = self.claims.len(),
                "a panic while serving these pages; poisoning them"
            );
            self.shared.poison(
                self.target,
                self.claim,
                self.from,
                self.claims,
                "the engine panicked while serving the page",
            );
        }
    }
}
