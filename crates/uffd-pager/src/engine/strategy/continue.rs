//! CONTINUE (MINOR faults on shmem or hugetlbfs): the content is written
//! into the page cache through an unregistered alias mapping, then mapped
//! with `UFFDIO_CONTINUE`. Background work only writes; the first touch of
//! a page costs a CONTINUE. With content in place the page cache holds the
//! content already and nothing is written.

use super::*;

/// [`Strategy::Continue`].
#[derive(Debug)]
pub(in crate::engine) struct Continue;

impl Resolver for Continue {
    fn stage(
        &self,
        worker: &Worker<'_>,
        span: &Span,
        from: usize,
        len: u64,
    ) -> Result<Staged, SourceError> {
        let alias = span
            .alias_of(from)
            .expect("validated: Continue has an alias");
        if worker.shared.config.content_in_place {
            return Ok(Staged {
                content: Content::Data,
                src: alias.cast_const(),
                from_mapping: false,
            });
        }
        // SAFETY: the alias maps the claimed pages of the region; the
        // caller of `Region::with_alias` vouched that nothing else
        // references it, and we own these pages' claims.
        let buf = unsafe { std::slice::from_raw_parts_mut(alias, len as usize) };
        let content = worker.read_source_into_page_cache(span.source_of(from), buf)?;
        Ok(Staged {
            content,
            src: alias.cast_const(),
            from_mapping: false,
        })
    }

    fn prepare(&self, worker: &Worker<'_>, span: &Span, from: usize, kinds: &[u8]) {
        // Zero pages must read as zero through the alias too.
        for (k, &kind) in kinds.iter().enumerate() {
            if kind == 1 {
                let alias = span.alias_of(from + k).expect("validated");
                // SAFETY: a claimed page of the alias, as in `stage`.
                let page =
                    unsafe { std::slice::from_raw_parts_mut(alias, span.page_size as usize) };
                if !is_zero(page) {
                    page.fill(0);
                }
            }
        }
        if !worker.shared.config.content_in_place {
            Counters::add(
                &worker.shared.counters.pages_written_through_alias,
                kinds.iter().filter(|&&k| k == 2).count() as u64,
            );
        }
    }

    fn install(&self, worker: &Worker<'_>, uffd: &Uffd, run: Run) -> Result<Resolved, uffd::Error> {
        let Run {
            addr,
            len,
            page_size: ps,
            data,
            map,
            ..
        } = run;
        if !map {
            // Background: the page cache has the content now; the first
            // touch costs only a CONTINUE.
            return Ok(Resolved::Complete {
                installed: len,
                existing: 0,
            });
        }
        let result = uffd.continue_all(addr, len, ps, ContinueMode::empty());
        let hole = matches!(
            result,
            Err(uffd::Error::Ioctl {
                errno: uffd::Errno::FAULT,
                ..
            })
        );
        if !(hole && worker.shared.config.content_in_place) {
            return result;
        }
        // Content in place, but the run has holes (pages not in the page
        // cache: CONTINUE fails with EFAULT). A hole reads as zeros:
        // allocate it as such by faulting the run in for reading through
        // the alias (a read fault on a shmem or hugetlbfs hole allocates a
        // zeroed page; pages that exist are left as they are), then map
        // the run again. Never by an access the compiler may drop: an
        // atomic OR of zero whose result is unused is removed in release
        // builds, and the fault then came back forever.
        populate_for_reading(data, len, ps);
        uffd.continue_all(addr, len, ps, ContinueMode::empty())
    }

    fn installed<'c>(&self, counters: &'c Counters, mapped: bool) -> Option<&'c AtomicU64> {
        // Background writes are counted as written through the alias.
        mapped.then_some(&counters.pages_continued)
    }

    fn check(&self, _uffd: &Uffd, regions: &[Region]) -> Result<(), ConfigError> {
        if regions.iter().any(|r| r.alias().is_none()) {
            return Err(ConfigError::ContinueNeedsAlias);
        }
        Ok(())
    }

    fn installs_from_any_buffer(&self) -> bool {
        // The bytes must land in the page cache, through the alias.
        false
    }

    fn on_claimed(&self) -> Step {
        // The fill thread writes through the alias without an ioctl, so
        // nobody would map this page: come back.
        Step::Defer
    }

    fn map_filled(
        &self,
        worker: &Worker<'_>,
        target: &Target,
        addr: u64,
        ps: u64,
        counts_latency: bool,
        started: Instant,
    ) -> Option<Step> {
        // The content is in the page cache; map it.
        let c = &worker.shared.counters;
        let r = target
            .uffd
            .continue_all(addr, ps, ps, ContinueMode::empty());
        Some(match r {
            Ok(Resolved::Complete {
                installed,
                existing,
            }) => {
                Counters::add(&c.pages_continued, installed / ps);
                Counters::add(&c.eexist, existing / ps);
                if counts_latency {
                    c.latency.record(started.elapsed());
                }
                Step::Done
            }
            Ok(Resolved::RetryAfterEvents { .. }) => Step::Defer,
            Ok(Resolved::TargetGone) => Step::Gone,
            Err(e) => {
                c.failed_installs.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "CONTINUE failed");
                let _ = target.uffd.wake(addr, ps);
                Step::Done
            }
        })
    }

    fn may_steal_background(&self) -> bool {
        // The fill writes such a page through the alias and maps nothing;
        // the fault comes back once it is there.
        false
    }

    fn remove_makes_missing(&self) -> bool {
        // Shared file mappings keep their page cache contents.
        false
    }
}

/// Faults `len` bytes of the alias at `alias` in for reading:
/// `MADV_POPULATE_READ`, or where the kernel predates it (5.14), one
/// atomic load a page, each kept with `black_box`.
fn populate_for_reading(alias: *const u8, len: u64, ps: u64) {
    // SAFETY: in place, `alias` is the run's alias address, mapped for
    // the pager's life by `Region::with_alias`'s contract; populating
    // only reads it.
    let populated = unsafe {
        rustix::mm::madvise(
            alias.cast_mut().cast(),
            len as usize,
            Advice::LinuxPopulateRead,
        )
    };
    if populated.is_err() {
        read_each_page(alias, len, ps);
    }
}

/// The fallback of [`populate_for_reading`].
fn read_each_page(alias: *const u8, len: u64, ps: u64) {
    for page in 0..(len / ps) as usize {
        // SAFETY: as above; an atomic load races with no writer.
        let byte = unsafe {
            std::sync::atomic::AtomicU8::from_ptr(alias.cast_mut().add(page * ps as usize))
        };
        std::hint::black_box(byte.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether page `page` of `memory`'s file is in its page cache (not a
    /// hole).
    fn allocated(memory: &uffd::Mapping, page: u64) -> bool {
        let fd = memory.file().expect("shmem has a file");
        rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(page * 4096))
            .is_ok_and(|at| at == page * 4096)
    }

    #[test]
    fn holes_are_allocated_by_either_way_of_reading_them_in() {
        type ReadIn = fn(*const u8, u64, u64);
        let ways: [(&str, ReadIn); 2] = [
            ("populate_for_reading", populate_for_reading),
            ("read_each_page", read_each_page),
        ];
        for (name, read_in) in ways {
            let memory = uffd::Mapping::new(uffd::MemoryKind::Shmem, 16 * 4096).unwrap();
            let alias = memory.alias_ptr().expect("shmem has an alias");
            assert!(!allocated(&memory, 5), "a new memfd has no pages");
            // Pages 4..8 only: the pages around stay holes.
            read_in(alias.wrapping_add(4 * 4096), 4 * 4096, 4096);
            for page in 0..16 {
                assert_eq!(
                    allocated(&memory, page),
                    (4..8).contains(&page),
                    "{name}: page {page}"
                );
            }
        }
    }
}
