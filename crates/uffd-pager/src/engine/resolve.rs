//! Serving one fault: what the page's state says, claiming it and its
//! neighbours, the readahead window, reads of asynchronous sources.

use super::*;

impl<'a> Worker<'a> {
    pub(super) fn new(shared: &'a Arc<Shared>) -> std::io::Result<Worker<'a>> {
        let staging = uffd::Mapping::new(uffd::MemoryKind::Anon, BATCH_BYTES as usize)?;
        // MOVE needs source pages that only this process maps: a forked
        // child must not share them.
        staging.advise(0, staging.len(), Advice::LinuxDontFork)?;
        if shared.resolver().keeps_huge_pages_whole() && shared.config.granule == BATCH_BYTES {
            // Whole 2 MiB granules then move as one huge page.
            let _ = staging.advise(0, staging.len(), Advice::LinuxHugepage);
        }
        let zeros = uffd::Mapping::new(uffd::MemoryKind::Anon, BATCH_BYTES as usize)?;
        zeros.advise(0, zeros.len(), Advice::LinuxDontFork)?;
        Ok(Worker {
            shared,
            staging,
            zeros,
            claims: Vec::with_capacity((BATCH_BYTES / 4096) as usize),
            installed: Vec::with_capacity(8),
        })
    }

    /// A worker using scratch an earlier one left ([`Worker::into_scratch`]).
    pub(super) fn with_scratch(shared: &'a Arc<Shared>, scratch: Scratch) -> Worker<'a> {
        let Scratch {
            staging,
            zeros,
            claims,
            installed,
        } = scratch;
        Worker {
            shared,
            staging,
            zeros,
            claims,
            installed,
        }
    }

    pub(super) fn into_scratch(self) -> Scratch {
        Scratch {
            staging: self.staging,
            zeros: self.zeros,
            claims: self.claims,
            installed: self.installed,
        }
    }

    /// This pager's strategy's implementation.
    pub(super) fn resolver(&self) -> &'static dyn Resolver {
        self.shared.resolver()
    }

    pub(super) fn serve(
        &mut self,
        target: &Arc<Target>,
        fault: Pagefault,
        started: Instant,
    ) -> Step {
        if fault.kind() == uffd::FaultKind::WriteProtect {
            return self.serve_wp(target, fault);
        }
        for _ in 0..8 {
            match self.serve_missing(target, fault, started) {
                Step::Abandoned => continue,
                other => return other,
            }
        }
        // Repeatedly overtaken by events: let the thread fault again.
        let _ = target.uffd.wake(fault.page(4096), 4096);
        Step::Done
    }

    pub(super) fn serve_wp(&mut self, target: &Target, fault: Pagefault) -> Step {
        let table = read(&target.table);
        let Some(span) = table.lookup(fault.address) else {
            drop(table);
            let _ = target.uffd.wake(fault.page(4096), 4096);
            return Step::Done;
        };
        let page = fault.page(span.page_size);
        if span.states.mark_dirty(span.index(page)) {
            self.shared
                .counters
                .pages_dirtied
                .fetch_add(1, Ordering::Relaxed);
        }
        match target
            .uffd
            .write_protect(page, span.page_size, WriteProtectMode::empty())
        {
            Ok(uffd::Outcome::RetryAfterEvents) => Step::Defer,
            Ok(uffd::Outcome::TargetGone) => Step::Gone,
            Ok(_) => Step::Done,
            Err(e) => {
                self.shared
                    .counters
                    .failed_unprotects
                    .fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "unprotecting a written page failed");
                let _ = target.uffd.wake(page, span.page_size);
                Step::Done
            }
        }
    }

    pub(super) fn serve_missing(
        &mut self,
        target: &Arc<Target>,
        fault: Pagefault,
        started: Instant,
    ) -> Step {
        let c = &self.shared.counters;
        let table = read(&target.table);
        let Some(span) = table.lookup(fault.address) else {
            drop(table);
            return self.serve_outside(target, fault);
        };
        let p = span.index(fault.address);
        let current = span.states.get(p);
        match current {
            state::CLAIMED | state::CLAIMED_ZERO => {
                c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                return self.resolver().on_claimed();
            }
            state::PREFETCHED | state::PRESENT | state::POISONED => {
                let hit =
                    current == state::PREFETCHED && span.states.cas(p, current, state::PRESENT);
                if hit {
                    c.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                }
                let addr = span.addr_of(p);
                let ps = span.page_size;
                if current != state::POISONED {
                    let mapped = self
                        .resolver()
                        .map_filled(self, target, addr, ps, !hit, started);
                    if let Some(step) = mapped {
                        drop(table);
                        return step;
                    }
                }
                if !hit {
                    c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                }
                if current == state::PRESENT
                    && !target.uffd.features().contains(Features::EVENT_REMOVE)
                    && span.states.cas(p, state::PRESENT, state::MISSING)
                {
                    // Without REMOVE events the page may have been dropped
                    // behind our back: fetch it again (EEXIST if not).
                    drop(table);
                    return Step::Abandoned;
                }
                drop(table);
                let _ = target.uffd.wake(addr, ps);
                return Step::Done;
            }
            _ => {}
        }
        // A page the fill or replay claimed is taken over: this fault is
        // served now, not after the background batch.
        let stolen = current == state::CLAIMED_BG
            && self.resolver().may_steal_background()
            && span.states.steal(p);
        let first_claim = if stolen {
            c.stolen_from_background.fetch_add(1, Ordering::Relaxed);
            state::CLAIMED
        } else {
            match span.states.claim(p) {
                Some(claim) => claim,
                None if current == state::CLAIMED_BG => {
                    // Continue: the fill writes it through the alias and
                    // maps nothing; come back once it is there.
                    c.duplicate_faults.fetch_add(1, Ordering::Relaxed);
                    return Step::Defer;
                }
                None => return Step::Abandoned,
            }
        };
        if first_claim == state::CLAIMED && self.shared.config.record {
            lock(&self.shared.recorded).push(span.source_of(p));
        }
        let (lo, demand_hi, hi) = self.window(target, span, p);
        self.claims.clear();
        for i in lo..hi {
            self.claims.push(if i == p {
                first_claim
            } else {
                span.states.claim(i).unwrap_or(0)
            });
        }
        let claim = Claim {
            span: span.clone(),
            generation: table.generation,
            map_now: true,
            demand_hi,
        };
        drop(table);
        if hi > demand_hi {
            self.shared.source.advise(
                claim.span.source_of(demand_hi),
                ((hi - demand_hi) as u64) * claim.span.page_size,
            );
        }
        if let Some(remote) = self.shared.source.asynchronous() {
            let ps = claim.span.page_size;
            if remote.is_ready(claim.span.source_of(lo), (hi - lo) as u64 * ps) {
                // At hand (a warm cache): served below like a local source,
                // by this thread, with no trip through the runtime.
                Counters::add(&self.shared.counters.async_ready, 1);
            } else if self.resolver().installs_from_any_buffer() {
                let claims = self.claims.clone();
                self.fetch_in_background(remote, target, claim, lo, claims, started);
                return Step::Done;
            }
        }
        let claims = std::mem::take(&mut self.claims);
        let shared: &Shared = self.shared;
        let _guard = ClaimGuard {
            shared,
            target,
            claim: &claim,
            from: lo,
            claims: &claims,
        };
        // Demand part first: its thread wakes before the readahead runs.
        let (demand, ahead) = claims.split_at(demand_hi - lo);
        let mut step = self.fetch_and_install(target, &claim, lo, demand);
        if step == Step::Done {
            c.latency.record(started.elapsed());
            if !ahead.is_empty() {
                let ahead_step = self.fetch_and_install(target, &claim, demand_hi, ahead);
                if ahead_step == Step::Gone {
                    step = Step::Gone;
                }
            }
        } else if !ahead.is_empty() {
            self.release(target, &claim, demand_hi, ahead);
        }
        drop(_guard);
        self.claims = claims;
        step
    }

    /// Starts reading the claimed pages of `from..from + claims.len()` on
    /// the asynchronous source's runtime; a handler thread installs them
    /// when they arrive ([`Worker::finish_fetch`]). The faulting threads
    /// sleep until then; this thread goes back to other faults.
    pub(super) fn fetch_in_background(
        &self,
        remote: &crate::AsyncSource,
        target: &Arc<Target>,
        claim: Claim,
        from: usize,
        claims: Vec<u8>,
        started: Instant,
    ) {
        let (Some(first), Some(last)) = (
            claims.iter().position(|&c| c != 0),
            claims.iter().rposition(|&c| c != 0),
        ) else {
            return;
        };
        let claims = claims[first..=last].to_vec();
        let from = from + first;
        let ps = claim.span.page_size;
        let offset = claim.span.source_of(from);
        let len = claims.len() * ps as usize;
        let shared = Arc::clone(self.shared);
        let target = Arc::clone(target);
        shared.fetches_in_flight.fetch_add(1, Ordering::SeqCst);
        Counters::add(&shared.counters.async_fetches, 1);
        let retries = shared.config.source_retries;
        // Weak: a read still in flight must not keep a stopped pager (and
        // so the runtime it runs on) alive.
        let done_shared = Arc::downgrade(&shared);
        let direct = remote.start(offset, len, retries, move |result, delivery| {
            let Some(done_shared) = done_shared.upgrade() else {
                return;
            };
            Counters::add(
                &done_shared.counters.source_retries,
                u64::from(delivery.retried),
            );
            let done = Completion {
                target,
                claim,
                from,
                claims,
                started,
                result,
            };
            if delivery.on_arrival {
                done_shared.finish_here(done);
            } else {
                done_shared.complete(done);
            }
        });
        if direct {
            Counters::add(&shared.counters.async_direct, 1);
        }
    }

    /// Installs (or poisons) what an asynchronous read brought.
    pub(super) fn finish_fetch(&mut self, done: Completion) {
        let Completion {
            target,
            claim,
            from,
            claims,
            started,
            result,
        } = done;
        let shared: &Shared = self.shared;
        let _guard = ClaimGuard {
            shared,
            target: &target,
            claim: &claim,
            from,
            claims: &claims,
        };
        let step = match result {
            Ok(Fetched::Zero) => self.install_fetched(
                &target,
                &claim,
                from,
                &claims,
                Content::Zero,
                std::ptr::null(),
                false,
            ),
            Ok(Fetched::Data(bytes)) => self.install_fetched(
                &target,
                &claim,
                from,
                &claims,
                Content::Data,
                bytes.as_ptr(),
                false,
            ),
            Err(e) if claims.iter().filter(|&&c| c != 0).count() > 1 => {
                // One bad page must not poison its neighbours: ask again
                // page by page.
                debug!(error = %e, "batch read failed; retrying page by page");
                let remote = self
                    .shared
                    .source
                    .asynchronous()
                    .expect("completions come from an asynchronous source");
                for (k, &c) in claims.iter().enumerate() {
                    if c != 0 {
                        self.fetch_in_background(
                            remote,
                            &target,
                            claim.clone(),
                            from + k,
                            vec![c],
                            started,
                        );
                    }
                }
                Step::Abandoned
            }
            Err(e) => self.poison(&target, &claim, from, &claims, &e),
        };
        self.tell_source(None);
        match step {
            Step::Done => self.shared.counters.latency.record(started.elapsed()),
            Step::Gone => self.shared.mark_gone(&target),
            Step::Abandoned | Step::Defer => {}
        }
    }

    /// A fault outside every region (a range grown by mremap, say): what
    /// the kernel itself would map there, a zero page.
    pub(super) fn serve_outside(&mut self, target: &Target, fault: Pagefault) -> Step {
        self.shared
            .counters
            .faults_outside_regions
            .fetch_add(1, Ordering::Relaxed);
        let page = fault.page(4096);
        match target
            .uffd
            .zeropage_all(page, 4096, 4096, ZeropageMode::empty())
        {
            Ok(Resolved::RetryAfterEvents { .. }) => Step::Defer,
            Ok(Resolved::TargetGone) => Step::Gone,
            Ok(Resolved::Complete { .. }) => Step::Done,
            Err(e) => {
                debug!(error = %e, address = fault.address, "fault outside the regions");
                let _ = target.uffd.wake(page, 4096);
                Step::Done
            }
        }
    }

    /// The pages to claim for a demand fault at `p`: `lo..demand_hi` is
    /// its granule, `demand_hi..hi` the readahead.
    pub(super) fn window(&self, target: &Target, span: &Span, p: usize) -> (usize, usize, usize) {
        let ps = span.page_size;
        let granule = self.shared.config.granule.max(ps);
        let addr = span.addr_of(p);
        let g_start = (addr & !(granule - 1)).max(span.start);
        let g_end = ((addr & !(granule - 1)) + granule).min(span.end());
        let lo = span.index(g_start);
        let demand_hi = span.index(g_end - 1) + 1;
        let Prefetch::Readahead { max_bytes } = self.shared.config.prefetch else {
            return (lo, demand_hi, demand_hi);
        };
        let max_pages = (max_bytes.min(BATCH_BYTES) / ps).max(1) as usize;
        let granule_pages = demand_hi - lo;
        let mut ra = lock(&target.readahead);
        let same = ra.states == Arc::as_ptr(&span.states) as usize;
        let sequential = same && p >= ra.last && p <= ra.next + granule_pages;
        ra.window = if sequential {
            (ra.window * 2).max(granule_pages * 2).min(max_pages)
        } else {
            ra.window / 2
        };
        let hi = (p + ra.window).max(demand_hi).min(span.index_end());
        let hi = hi.min(lo + max_pages.max(granule_pages));
        ra.states = Arc::as_ptr(&span.states) as usize;
        ra.last = p;
        ra.next = hi;
        (lo, demand_hi, hi.max(demand_hi))
    }
}
