//! `uffd bench`: the pager's strategies side by side with the baselines
//! (the kernel's file-backed fault-in, the Firecracker-example-style
//! handler), all in this process, on one snapshot file. In-process: the
//! memory being restored is this process's own, so these figures are a
//! second opinion to `uffd serve bench`, whose VMM is another process.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uffd::{CopyMode, Features, Mapping, MemoryKind, Outcome, RegisterMode, Uffd};
use uffd_pager::{FileMode, FileSource, PageSource, Pager, Prefetch, Region, Strategy, WaitMode};

use crate::baselines::{
    kernel_anon_first_write, kernel_fault_in, spawn_fault_handler, typical_handler, whole, Served,
};
use crate::demo::start_sigbus;
use crate::fixtures::make_snapshot;
use crate::report::median;
use crate::workload::{
    count_differing, in_process_uffd, snapshot_chunk, start_plan, touch, verify, Order,
    PhaseResult, Plan, ProgressLine, PLANS, SPIN,
};
use crate::BoxError;

/// What `uffd bench` measures.
#[derive(Debug, Clone)]
pub struct Config {
    /// Size of the snapshot and of each mapping, in MiB.
    pub mib: u64,
    /// Percentage of zero pages in the snapshot.
    pub zero_percent: u8,
    /// Rounds of every case, interleaved.
    pub rounds: u32,
}

/// One case's figures (per round, or the medians over the rounds).
#[derive(Debug, Serialize, Clone)]
pub struct Case {
    /// The case's name.
    pub name: String,
    /// MiB touched.
    pub mib: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Throughput, MB/s.
    pub mb_per_s: f64,
    /// Median sampled touch, µs.
    pub p50_us: f64,
    /// 99th percentile sampled touch, µs.
    pub p99_us: f64,
    /// MB/s over the kernel's fault-in in the same order.
    pub ratio_vs_kernel: f64,
    /// MB/s over the baseline handler in the same order.
    pub ratio_vs_typical: f64,
    /// MB/s over the COPY case it is compared with, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_copy: Option<f64>,
    #[serde(skip)]
    order: Order,
    /// The sampled touches of every round, for `--plot`.
    #[serde(skip)]
    pub latency: Vec<uffd_pager::Bucket>,
}

fn case(name: &str, mib: u64, order: Order, p: &PhaseResult) -> Case {
    Case {
        name: name.to_string(),
        mib,
        seconds: p.seconds,
        mb_per_s: p.mb_per_s,
        p50_us: p.p50_us,
        p99_us: p.p99_us,
        ratio_vs_kernel: 0.0,
        ratio_vs_typical: 0.0,
        ratio_vs_copy: None,
        order,
        latency: p.latency.clone(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recycle {
    /// Fault: write the content into the staging page the eviction left
    /// there, UFFDIO_MOVE it in. Evict: UFFDIO_MOVE every page back into
    /// the staging pool. No page is allocated or freed in steady state.
    Move,
    /// As `Move`, but evict with MADV_DONTNEED and refill the staging pool
    /// with MADV_POPULATE_WRITE (fresh pages, allocated in one batch off
    /// the fault path).
    MovePopulated,
    /// Fault: UFFDIO_COPY (allocates a page). Evict: MADV_DONTNEED (frees it).
    Copy,
}

/// Pages a fill installs per ioctl in [`recycled_cycle`] (64 KiB).
const FILL_RUN_PAGES: usize = 16;

/// One steady-state cycle of a region whose pages come and go: every page
/// is installed, then the region is evicted. With `faults`, the workload
/// faults every page in (random order) and a handler thread serves each
/// fault with one 4 KiB ioctl; without, this thread fills the region
/// itself in 64 KiB runs (no waiting thread: the install cost alone, as in
/// a background fill). A first cycle (not timed) reaches the steady state;
/// the second is timed, install plus eviction, and verified.
fn recycled_cycle(
    mode: Recycle,
    faults: bool,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let uffd = Arc::new(
        in_process_uffd()
            .non_blocking(true)
            .features(Features::MOVE)
            .open()?,
    );
    let target = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    let pool = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    for m in [&target, &pool] {
        // 4 KiB pages throughout; MOVE needs pages no child shares.
        m.advise(0, m.len(), rustix::mm::Advice::LinuxNoHugepage)?;
        m.advise(0, m.len(), rustix::mm::Advice::LinuxDontFork)?;
    }
    if mode != Recycle::Copy {
        pool.advise(0, pool.len(), rustix::mm::Advice::LinuxPopulateWrite)?;
        // UFFDIO_MOVE's destination must be registered on the same uffd
        // (mm/userfaultfd.c, validate_move_areas): the pool is, for the
        // evictions. It is never touched while it has holes.
        uffd.register(pool.addr(), len, RegisterMode::MISSING)?;
    }
    uffd.register(target.addr(), len, RegisterMode::MISSING)?;
    let pages = (len / 4096) as usize;
    // Staging slots holding a page (slot i serves target page i).
    let full = Arc::new(
        (0..pages)
            .map(|_| AtomicBool::new(mode != Recycle::Copy))
            .collect::<Vec<_>>(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let full = Arc::clone(&full);
        let (tbase, pbase) = (target.addr(), pool.addr());
        let served = Arc::new(Served::default());
        spawn_fault_handler(
            &uffd,
            whole(tbase, len),
            source.clone(),
            64,
            &stop,
            &served,
            move |uffd, page, bytes| {
                let index = ((page - tbase) / 4096) as usize;
                if mode == Recycle::Copy {
                    // SAFETY: 4 KiB of the read-only snapshot mapping into
                    // registered memory nobody references.
                    unsafe { uffd.copy(page, bytes.as_ptr(), 4096, CopyMode::empty()) }
                } else if full[index].swap(false, Ordering::Relaxed) {
                    let slot = (pbase + index as u64 * 4096) as *mut u8;
                    // SAFETY: the slot is a present page of our staging
                    // pool (never a hole: `full` says so), not aliased; the
                    // snapshot is this benchmark's own file, which nothing
                    // truncates, so reading its mapping cannot fault.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot, 4096) };
                    // SAFETY: moving our own exclusive staging page into
                    // registered memory nobody references.
                    unsafe { uffd.move_(page, slot, 4096, uffd::MoveMode::empty()) }
                } else {
                    Ok(Outcome::AlreadyPresent)
                }
            },
        )?
    };
    let label = format!(
        "{mode:?} recycled, {}",
        if faults { "faults" } else { "fill" }
    );
    let mut timed = None;
    for cycle in 0..2 {
        let result = if faults {
            touch(target.as_ptr(), 0, pages as u64, Order::Random, |n| {
                progress.update(&label, n, pages as u64)
            })
        } else {
            fill_recycled(mode, &uffd, &target, &pool, source, len)?
        };
        if cycle == 1 {
            let bad = verify(&target, source, len);
            if bad != 0 {
                stop.store(true, Ordering::Relaxed);
                return Err(format!("{label}: {bad} pages differ from the snapshot").into());
            }
        }
        let evict = Instant::now();
        match mode {
            Recycle::Move => {
                // SAFETY: every target page is present and ours; the pool
                // is registered and empty (every slot moved out).
                let r = unsafe {
                    uffd.move_all(
                        pool.addr(),
                        target.as_ptr(),
                        len,
                        4096,
                        uffd::MoveMode::empty(),
                    )?
                };
                if !matches!(r, uffd::Resolved::Complete { .. }) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(format!("{label}: evicting with MOVE: {r:?}").into());
                }
            }
            Recycle::MovePopulated => {
                target.advise(0, target.len(), rustix::mm::Advice::LinuxDontNeed)?;
                // Populating registered holes would raise missing faults
                // for this handler to serve: unregister around it.
                uffd.unregister(pool.addr(), len)?;
                pool.advise(0, pool.len(), rustix::mm::Advice::LinuxPopulateWrite)?;
                uffd.register(pool.addr(), len, RegisterMode::MISSING)?;
            }
            Recycle::Copy => target.advise(0, target.len(), rustix::mm::Advice::LinuxDontNeed)?,
        }
        let evict_seconds = evict.elapsed().as_secs_f64();
        for f in full.iter() {
            f.store(mode != Recycle::Copy, Ordering::Relaxed);
        }
        if cycle == 1 {
            let mut r = result.clone();
            r.seconds += evict_seconds;
            r.mb_per_s = len as f64 / 1e6 / r.seconds;
            timed = Some((r, result.mb_per_s, evict_seconds));
        }
    }
    stop.store(true, Ordering::Relaxed);
    handler
        .join()
        .map_err(|_| "the recycled-page handler panicked")??;
    let (result, fault_in, evict_seconds) = timed.expect("two cycles ran");
    progress.done(&format!(
        "{label:<32} {:>8.0} MB/s per cycle (fault-in {fault_in:.0} MB/s, eviction {:.1} ms)",
        result.mb_per_s,
        evict_seconds * 1e3
    ));
    Ok(result)
}

/// Installs every page of `target` from this thread in runs of
/// [`FILL_RUN_PAGES`]: COPY from the snapshot, or (MOVE modes) write the
/// run into its staging slots and move them in.
fn fill_recycled(
    mode: Recycle,
    uffd: &uffd::Uffd,
    target: &uffd::Mapping,
    pool: &uffd::Mapping,
    source: &FileSource,
    len: u64,
) -> Result<PhaseResult, BoxError> {
    let run = (FILL_RUN_PAGES * 4096) as u64;
    let start = Instant::now();
    let mut offset = 0;
    while offset < len {
        let n = run.min(len - offset);
        let bytes = source
            .mapped(offset, n as usize)
            .ok_or("the snapshot is mapped")?;
        let r = if mode == Recycle::Copy {
            // SAFETY: `n` bytes of the read-only snapshot mapping into
            // registered memory nobody references.
            unsafe {
                uffd.copy_all(
                    target.addr() + offset,
                    bytes.as_ptr(),
                    n,
                    4096,
                    CopyMode::empty(),
                )?
            }
        } else {
            // SAFETY: the slots are present pages of our staging pool (the
            // previous eviction or population left them), not aliased.
            let slots = unsafe { pool.as_ptr().add(offset as usize) };
            // SAFETY: as above; `n` bytes fit in the pool.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), slots, n as usize) };
            // SAFETY: moving our own exclusive staging pages into
            // registered memory nobody references.
            unsafe {
                uffd.move_all(
                    target.addr() + offset,
                    slots,
                    n,
                    4096,
                    uffd::MoveMode::empty(),
                )?
            }
        };
        if !matches!(r, uffd::Resolved::Complete { .. }) {
            return Err(format!("{mode:?} fill: {r:?}").into());
        }
        offset += n;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(PhaseResult::untimed(len / 4096, seconds))
}

/// SIGBUS mode: the touching thread serves its own faults in a signal
/// handler, `granule` bytes per fault; verified like the others.
fn pager_sigbus(
    name: &str,
    granule: u64,
    order: Order,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let target = uffd::Mapping::new(uffd::MemoryKind::Anon, len as usize)?;
    let pager = start_sigbus(&target, source, granule)?;
    let pages = len / 4096;
    let result = touch(target.as_ptr(), 0, pages, order, |n| {
        progress.update(name, n, pages)
    });
    let stats = pager.shutdown();
    let bad = verify(&target, source, len);
    let detail = format!(
        "{} faults, handler p50 {:.1} µs",
        stats.faults, stats.latency.p50_us
    );
    checked(
        name,
        result,
        bad,
        (stats.failed, "faults failed"),
        &detail,
        progress,
    )
}

/// The end of a case: an error naming the damage if any page differs or
/// `failed.0` is not zero; otherwise the progress line with `detail`.
fn checked(
    name: &str,
    result: PhaseResult,
    bad: u64,
    failed: (u64, &str),
    detail: &str,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    if bad != 0 || failed.0 != 0 {
        return Err(format!(
            "{name}: {bad} pages differ from the snapshot, {} {}",
            failed.0, failed.1
        )
        .into());
    }
    progress.done(&format!(
        "{name:<32} {:>8.0} MB/s  ({detail})",
        result.mb_per_s
    ));
    Ok(result)
}

/// Runs `plan` with `order` into anonymous memory, verifies it.
fn pager_anon(
    name: &str,
    plan: Plan,
    order: Order,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let (target, pager, start) = start_plan(name, plan, source, len, 1)?;
    let pages = len / 4096;
    let mut result = touch(target.as_ptr(), 0, pages, order, |n| {
        progress.update(name, n, pages)
    });
    if plan.fill {
        // Full restore: done when every page is present.
        while pager.progress().installed_pages < pages
            && !pager.wait_filled(Duration::from_millis(20))
        {
            let p = pager.progress();
            progress.update(&format!("{name} fill"), p.installed_pages, p.total_pages);
        }
        result.seconds = start.elapsed().as_secs_f64();
        result.mb_per_s = len as f64 / 1e6 / result.seconds;
    }
    let stats = pager.shutdown();
    let bad = verify(&target, source, len);
    if bad != 0 {
        return Err(format!("{name}: {bad} pages differ from the snapshot").into());
    }
    progress.done(&format!(
        "{name:<32} {:>8.0} MB/s  ({} faults, {} prefetched)",
        result.mb_per_s, stats.faults_missing, stats.prefetched_pages
    ));
    Ok(result)
}

/// The shmem CONTINUE cases' userfaultfd (MINOR_SHMEM, EVENT_REMOVE) and a
/// shmem mapping of `len` bytes, not registered yet.
fn shmem_minor(len: u64) -> Result<(Uffd, Mapping), BoxError> {
    let uffd = in_process_uffd()
        .non_blocking(true)
        .features(Features::MINOR_SHMEM | Features::EVENT_REMOVE)
        .open()?;
    let memory = Mapping::new(MemoryKind::Shmem, len as usize)?;
    Ok((uffd, memory))
}

/// Registers the first `len` bytes of the shmem `memory` MINOR on `uffd` and starts a
/// CONTINUE pager over it that writes through its alias, or with
/// `content_in_place` only maps what the page cache holds.
///
/// # Safety
/// `memory` must outlive the returned pager (shut it down first), and
/// nothing else may reference the alias while the pager runs.
unsafe fn start_continue(
    name: &str,
    plan: Plan,
    source: &Arc<FileSource>,
    uffd: Uffd,
    memory: &Mapping,
    len: u64,
    content_in_place: bool,
) -> Result<Pager, BoxError> {
    uffd.register(memory.addr(), len, RegisterMode::MINOR)?;
    let alias = memory.alias_ptr().ok_or("shmem has an alias")?;
    // SAFETY: the caller keeps `memory` (and so its alias) alive until the
    // pager is shut down, and nothing else references the alias meanwhile.
    let region = unsafe { Region::new(memory.addr(), len, 0, 4096).with_alias(alias) };
    // SAFETY: the target is a mapping the bench touches only through raw
    // pointers; no Rust reference covers it.
    Ok(unsafe {
        Pager::builder(Arc::clone(source) as Arc<dyn PageSource>)
            .name(name)
            .strategy(Strategy::Continue)
            .content_in_place(content_in_place)
            .granule(plan.granule)
            .prefetch(plan.prefetch)
            .wait(WaitMode::Spin(SPIN))
            .start(uffd, vec![region])
    }?)
}

/// MINOR + CONTINUE on shmem: the pager writes each granule through the
/// alias and maps it.
fn pager_shmem_continue(
    name: &str,
    plan: Plan,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let (uffd, memory) = shmem_minor(len)?;
    let file = memory.file().ok_or("shmem has a file")?;
    // Every page in the page cache: each first access is a minor fault.
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)?;
    // SAFETY: `memory` outlives the pager (shut down below), and nothing
    // else references its alias meanwhile.
    let pager = unsafe { start_continue(name, plan, source, uffd, &memory, len, false)? };
    let pages = len / 4096;
    let result = touch(memory.as_ptr(), 0, pages, Order::Sequential, |n| {
        progress.update(name, n, pages)
    });
    let stats = pager.shutdown();
    let bad = count_differing(source, len, |offset, got| memory.read(offset as usize, got))?;
    let detail = format!("{} minor faults", stats.faults_minor);
    checked(
        name,
        result,
        bad,
        (stats.poisoned, "poisoned"),
        &detail,
        progress,
    )
}

/// Zero-copy sequential restore from tmpfs: the snapshot is already in the
/// page cache of a memfd (copied there before the timing, every page
/// resident), the target is a shared mapping of that memfd registered
/// MINOR, and the pager maps each granule and readahead window with
/// `UFFDIO_CONTINUE` only (`content_in_place`): no byte is copied. The
/// counterpart of the kernel baseline mapping warm page-cache pages of the
/// file; unlike the anonymous-memory cases, the restored memory *is* the
/// tmpfs file (shared with it), not a private copy.
fn pager_tmpfs_continue(
    name: &str,
    plan: Plan,
    source: &Arc<FileSource>,
    len: u64,
    progress: &ProgressLine,
) -> Result<PhaseResult, BoxError> {
    let (uffd, memory) = shmem_minor(len)?;
    let mut chunk = vec![0u8; 2 << 20];
    for offset in (0..len).step_by(2 << 20) {
        let n = (2u64 << 20).min(len - offset) as usize;
        memory.write_alias(
            offset as usize,
            snapshot_chunk(source, offset, &mut chunk[..n])?,
        );
    }
    // SAFETY: `memory` outlives the pager (shut down below), and nothing
    // else references its alias meanwhile.
    let pager = unsafe { start_continue(name, plan, source, uffd, &memory, len, true)? };
    let pages = len / 4096;
    let result = touch(memory.as_ptr(), 0, pages, Order::Sequential, |n| {
        progress.update(name, n, pages)
    });
    // Verified through the registered mapping while the pager still serves it.
    let bad = count_differing(source, len, |offset, got| memory.read(offset as usize, got))?;
    let stats = pager.shutdown();
    let detail = format!(
        "{} minor faults, {} pages mapped, 0 copied",
        stats.faults_minor, stats.pages_continued
    );
    checked(
        name,
        result,
        bad,
        (stats.poisoned, "poisoned"),
        &detail,
        progress,
    )
}

/// Per case, the median of every figure over the rounds. Ratios are the
/// medians of each round's own ratios, so drift between rounds (other
/// load on the machine) cancels out.
fn medians(rounds: &[Vec<Case>]) -> Vec<Case> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|c| {
            let same: Vec<&Case> = rounds
                .iter()
                .filter_map(|r| r.iter().find(|x| x.name == c.name))
                .collect();
            let m = |f: &dyn Fn(&Case) -> f64| median(same.iter().map(|x| f(x)).collect());
            Case {
                name: c.name.clone(),
                mib: c.mib,
                seconds: m(&|x| x.seconds),
                mb_per_s: m(&|x| x.mb_per_s),
                p50_us: m(&|x| x.p50_us),
                p99_us: m(&|x| x.p99_us),
                ratio_vs_kernel: m(&|x| x.ratio_vs_kernel),
                ratio_vs_typical: m(&|x| x.ratio_vs_typical),
                ratio_vs_copy: c
                    .ratio_vs_copy
                    .map(|_| m(&|x| x.ratio_vs_copy.unwrap_or(0.0))),
                order: c.order,
                latency: crate::plot::merge(
                    &same
                        .iter()
                        .map(|x| x.latency.as_slice())
                        .collect::<Vec<_>>(),
                ),
            }
        })
        .collect()
}

/// One round of every case, baselines first.
fn bench_round(
    path: &std::path::Path,
    source: &Arc<FileSource>,
    len: u64,
    mib: u64,
    have_move: bool,
    progress: &ProgressLine,
) -> Result<Vec<Case>, BoxError> {
    let plan = |name: &str| *PLANS.iter().find(|p| p.name == name).expect("known plan");
    let mut cases = Vec::new();
    // The kernel faults in the whole file in the same order as the cases
    // compared with it (the page cache is warm: the caller populated it).
    let kernel_seq = kernel_fault_in(path, len, Order::Sequential)?;
    let kernel_rand = kernel_fault_in(path, len, Order::Random)?;
    progress.done(&format!(
        "{:<32} {:>8.0} MB/s sequential, {:.0} MB/s random",
        "kernel fault-in", kernel_seq.mb_per_s, kernel_rand.mb_per_s
    ));
    cases.push(case(
        "kernel-sequential",
        mib,
        Order::Sequential,
        &kernel_seq,
    ));
    cases.push(case("kernel-random", mib, Order::Random, &kernel_rand));
    // What any private copy of restored memory costs at least: the kernel
    // allocating and zeroing fresh anonymous pages, no userfaultfd involved.
    let anon = kernel_anon_first_write(len)?;
    progress.done(&format!(
        "{:<32} {:>8.0} MB/s",
        "kernel anon first write", anon.mb_per_s
    ));
    cases.push(case(
        "kernel-anon-first-write",
        mib,
        Order::Sequential,
        &anon,
    ));

    let typical_seq = typical_handler(source, len, Order::Sequential, progress)?;
    cases.push(case(
        "typical-sequential",
        mib,
        Order::Sequential,
        &typical_seq,
    ));
    let typical_rand = typical_handler(source, len, Order::Random, progress)?;
    cases.push(case("typical-random", mib, Order::Random, &typical_rand));

    let r = pager_anon(
        "random-4k",
        plan("copy-4k"),
        Order::Random,
        source,
        len,
        progress,
    )?;
    cases.push(case("random-4k", mib, Order::Random, &r));
    let r = pager_sigbus(
        "random-4k-sigbus",
        4096,
        Order::Random,
        source,
        len,
        progress,
    )?;
    cases.push(case("random-4k-sigbus", mib, Order::Random, &r));
    let r = pager_anon(
        "sequential-readahead",
        plan("readahead"),
        Order::Sequential,
        source,
        len,
        progress,
    )?;
    let copy_anon_64k = r.clone();
    cases.push(case("sequential-readahead", mib, Order::Sequential, &r));
    let r = pager_tmpfs_continue(
        "sequential-continue-tmpfs",
        plan("readahead"),
        source,
        len,
        progress,
    )?;
    cases.push(case(
        "sequential-continue-tmpfs",
        mib,
        Order::Sequential,
        &r,
    ));
    let r = pager_anon(
        "full-restore",
        plan("fill"),
        Order::Random,
        source,
        len,
        progress,
    )?;
    cases.push(case("full-restore", mib, Order::Random, &r));

    let copy_2m = Plan {
        name: "copy-2m",
        strategy: Strategy::Copy,
        granule: 2 << 20,
        prefetch: Prefetch::None,
        fill: false,
        sigbus: false,
    };
    let copy = pager_anon("copy-2m", copy_2m, Order::Sequential, source, len, progress)?;
    cases.push(case("copy-2m", mib, Order::Sequential, &copy));
    if have_move {
        let mv = pager_anon(
            "move-2m-fresh-vs-copy",
            plan("move-2m"),
            Order::Sequential,
            source,
            len,
            progress,
        )?;
        let mut c = case("move-2m-fresh-vs-copy", mib, Order::Sequential, &mv);
        c.ratio_vs_copy = Some(mv.mb_per_s / copy.mb_per_s.max(1e-9));
        cases.push(c);
    } else {
        progress.done("MOVE cases: skipped, this kernel has no UFFDIO_MOVE");
    }
    if have_move {
        for (faults, kind) in [(true, "faults"), (false, "fill")] {
            // A fault costs tens of µs when the handler's wake-up is slow:
            // an eighth of the file keeps the run short.
            let (order, len, mib) = if faults {
                (Order::Random, (len / 8).max(1 << 20), (mib / 8).max(1))
            } else {
                (Order::Sequential, len, mib)
            };
            let copy = recycled_cycle(Recycle::Copy, faults, source, len, progress)?;
            cases.push(case(&format!("copy-recycled-{kind}"), mib, order, &copy));
            for (name, mode) in [
                ("move-recycled", Recycle::Move),
                ("move-populated", Recycle::MovePopulated),
            ] {
                let mv = recycled_cycle(mode, faults, source, len, progress)?;
                // The MOVE target is the recycled design without
                // fault waits (the install cost itself): that is
                // `move-vs-copy`.
                let name = match (mode, faults) {
                    (Recycle::Move, false) => "move-vs-copy".to_string(),
                    _ => format!("{name}-{kind}"),
                };
                let mut c = case(&name, mib, order, &mv);
                c.ratio_vs_copy = Some(mv.mb_per_s / copy.mb_per_s.max(1e-9));
                cases.push(c);
            }
        }
    }
    let minor = pager_shmem_continue(
        "minor-continue-shmem",
        plan("readahead"),
        source,
        len,
        progress,
    )?;
    let mut c = case("minor-continue-shmem", mib, Order::Sequential, &minor);
    c.ratio_vs_copy = Some(minor.mb_per_s / copy_anon_64k.mb_per_s.max(1e-9));
    cases.push(c);
    Ok(cases)
}

/// Runs every case `config.rounds` times, interleaved, and returns each
/// case's medians. Progress goes to `progress`.
pub fn run(config: &Config, progress: &ProgressLine) -> Result<Vec<Case>, BoxError> {
    let have_move = uffd::probe()?.features.contains(Features::MOVE);
    let len = config.mib << 20;
    let snapshot = make_snapshot(&std::env::temp_dir(), len, config.zero_percent)?;
    progress.done(&format!(
        "snapshot: {} MiB at {}",
        config.mib,
        snapshot.path.display()
    ));
    let source = Arc::new(FileSource::open(&snapshot.path, FileMode::Mmap)?);
    // A restore server maps its snapshot once for all VMs: pay that here,
    // outside the timings.
    source.populate()?;
    let mib = config.mib;

    let mut rounds: Vec<Vec<Case>> = Vec::new();
    for round in 0..config.rounds {
        progress.done(&format!("round {} of {}", round + 1, config.rounds));
        let mut cases = bench_round(&snapshot.path, &source, len, mib, have_move, progress)?;
        let find = |cases: &[Case], name: &str| {
            cases
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.mb_per_s)
                .unwrap_or(0.0)
        };
        let kernel_seq = find(&cases, "kernel-sequential");
        let kernel_rand = find(&cases, "kernel-random");
        let typical_seq = find(&cases, "typical-sequential");
        let typical_rand = find(&cases, "typical-random");
        for c in &mut cases {
            let (k, t) = match c.order {
                Order::Sequential => (kernel_seq, typical_seq),
                Order::Random => (kernel_rand, typical_rand),
            };
            c.ratio_vs_kernel = c.mb_per_s / k.max(1e-9);
            c.ratio_vs_typical = c.mb_per_s / t.max(1e-9);
        }
        rounds.push(cases);
    }
    Ok(medians(&rounds))
}

/// `uffd bench`'s plot: the sampled touches of each case, one panel per
/// touch order (cases without timed touches are left out).
pub fn plot_panels(cases: &[Case]) -> Vec<crate::plot::Panel> {
    [Order::Sequential, Order::Random]
        .into_iter()
        .filter_map(|order| {
            let series: Vec<_> = cases
                .iter()
                .filter(|c| c.order == order && !c.latency.is_empty())
                .map(|c| crate::plot::Distribution {
                    label: c.name.clone(),
                    buckets: c.latency.clone(),
                })
                .collect();
            (!series.is_empty()).then(|| crate::plot::Panel::Latency {
                title: format!(
                    "time of one sampled touch, {} order, as the touching thread saw it (all rounds)",
                    order.name()
                ),
                series,
            })
        })
        .collect()
}
