//! register-ioctls, zeropage and the move family.

use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mm::Advice;
use uffd::{
    Errno, Event, FaultKind, Features, Ioctls, MemoryKind, MoveMode, Outcome, RegisterMode,
    ZeropageMode,
};

use crate::harness::{peek, with_handler, Areas, CaseResult, Counters, Env, Next, COUNT_OFFSET};
use crate::{ensure, fail, skip};

/// Every combination of MISSING, WP and MINOR: MINOR on anon and the empty
/// mode are refused with EINVAL; the rest succeed and advertise at least
/// WAKE plus COPY, WRITEPROTECT and CONTINUE for the modes asked.
pub fn register_ioctls(env: &Env) -> CaseResult {
    let features = Features::MISSING_HUGETLBFS
        | Features::MISSING_SHMEM
        | Features::PAGEFAULT_FLAG_WP
        | Features::WP_HUGETLBFS_SHMEM
        | Features::MINOR_HUGETLBFS
        | Features::MINOR_SHMEM;
    let uffd = env.open(features)?;
    let ps = env.page_size() as u64;
    let dst = env.map(ps as usize)?;
    let mut seen = Vec::new();
    for bits in 0..8u64 {
        let mode = RegisterMode::from_bits_retain(bits);
        let minor = mode.contains(RegisterMode::MINOR);
        let result = uffd.register(dst.addr(), ps, mode);
        if (minor && env.kind == MemoryKind::Anon) || mode.is_empty() {
            match result {
                Err(e) if e.errno() == Some(Errno::INVAL) => continue,
                other => fail!(
                    "REGISTER {mode} on {}: expected EINVAL, got {other:?}",
                    env.kind
                ),
            }
        }
        let ioctls = match result {
            Ok(ioctls) => ioctls,
            Err(e) => fail!("REGISTER {mode}: {e}"),
        };
        let mut expected = Ioctls::WAKE;
        if mode.contains(RegisterMode::MISSING) {
            expected |= Ioctls::COPY;
        }
        if mode.contains(RegisterMode::WP) {
            expected |= Ioctls::WRITEPROTECT;
        }
        if minor {
            expected |= Ioctls::CONTINUE;
        }
        ensure!(
            ioctls.contains(expected),
            "REGISTER {mode}: advertised {ioctls}, expected at least {expected}"
        );
        uffd.unregister(dst.addr(), ps)?;
        seen.push(mode.to_string());
    }
    Ok(format!("registered {}", seen.join(", ")))
}

/// ZEROPAGE maps a zero page once (a retry reports EEXIST, through the
/// alias for shared memory); on hugetlb, which has no ZEROPAGE, it fails
/// with EINVAL.
pub fn zeropage(env: &Env) -> CaseResult {
    let uffd = env.open(Features::empty())?;
    let ps = env.page_size() as u64;
    let dst = env.map(ps as usize)?;
    let ioctls = uffd.register(dst.addr(), ps, RegisterMode::MISSING)?;
    let has_zeropage = ioctls.contains(Ioctls::ZEROPAGE);
    // The EEXIST retry of shared memory goes through the alias, which
    // must be registered too or the kernel answers ENOENT.
    let retry_at = match dst.alias_ptr() {
        Some(alias) if env.kind.is_shared() => {
            uffd.register(alias as u64, ps, RegisterMode::MISSING)?;
            alias as u64
        }
        _ => dst.addr(),
    };
    let result = uffd.zeropage(dst.addr(), ps, ZeropageMode::empty());
    if !has_zeropage {
        match result {
            Err(e) if e.errno() == Some(Errno::INVAL) => {
                return Ok("no ZEROPAGE advertised; the ioctl fails with EINVAL".into())
            }
            other => fail!("ZEROPAGE without the ioctl advertised: expected EINVAL, got {other:?}"),
        }
    }
    ensure!(
        result? == Outcome::Complete { bytes: ps },
        "ZEROPAGE did not map the whole page"
    );
    match uffd.zeropage(retry_at, ps, ZeropageMode::empty()) {
        Ok(Outcome::AlreadyPresent) => {}
        other => fail!("ZEROPAGE retry at {retry_at:#x}: expected AlreadyPresent, got {other:?}"),
    }
    let mut page = vec![0xffu8; ps as usize];
    dst.read(0, &mut page);
    ensure!(page.iter().all(|&b| b == 0), "the zero page is not zero");
    Ok("zero page mapped, retry gave EEXIST".into())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MoveChunk {
    Page,
    Pmd,
    PmdSplit,
}

/// MOVE one page per fault.
pub fn move_pages(env: &Env) -> CaseResult {
    move_common(env, MoveChunk::Page)
}

/// MOVE a whole PMD (a transparent huge page) per fault.
pub fn move_pmd(env: &Env) -> CaseResult {
    move_common(env, MoveChunk::Pmd)
}

/// MOVE a PMD into a destination that refuses huge pages, so the kernel
/// splits it.
pub fn move_pmd_split(env: &Env) -> CaseResult {
    move_common(env, MoveChunk::PmdSplit)
}

fn pmd_size() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2 << 20)
}

fn move_common(env: &Env, chunk_kind: MoveChunk) -> CaseResult {
    env.require(Features::MOVE)?;
    let ps = env.page_size() as u64;
    let src_advice = match chunk_kind {
        MoveChunk::Page => Advice::LinuxNoHugepage,
        _ => Advice::LinuxHugepage,
    };
    let areas = Areas::with_src_advice(env, env.nr_pages(), Some(src_advice))?;
    let dst_advice = match chunk_kind {
        MoveChunk::Pmd => Some(Advice::LinuxHugepage),
        MoveChunk::PmdSplit => Some(Advice::LinuxNoHugepage),
        MoveChunk::Page => None,
    };
    if let Some(advice) = dst_advice {
        areas.dst.advise(0, areas.dst.len(), advice)?;
    }
    // MOVE needs source pages exclusive to this process.
    areas
        .src
        .advise(0, areas.src.len(), Advice::LinuxDontFork)?;
    let uffd = env.open(Features::MOVE)?;
    uffd.register(areas.dst.addr(), areas.len(), RegisterMode::MISSING)?;

    let chunk = if chunk_kind == MoveChunk::Page {
        ps
    } else {
        pmd_size()
    };
    let src = areas.src.addr().next_multiple_of(chunk);
    let dst = areas.dst.addr().next_multiple_of(chunk);
    let mut steps = areas.len() / chunk;
    if src != areas.src.addr() || dst != areas.dst.addr() {
        steps = steps.saturating_sub(1);
    }
    if steps == 0 {
        skip!(
            "an area of {} KiB holds no whole, aligned {} KiB chunk (use a larger --mib)",
            areas.len() >> 10,
            chunk >> 10
        );
    }
    let counters = Counters::default();
    let at = AtomicU64::new(0);
    let on_event = |uffd: &uffd::Uffd, event: Event| {
        let Event::Pagefault(fault) = event else {
            return Err(format!("unexpected event {event:?}"));
        };
        if fault.kind() != FaultKind::Missing || fault.is_write() {
            return Err(format!(
                "unexpected fault {fault:?}: expected a missing read"
            ));
        }
        let off = (fault.address - dst) & !(chunk - 1);
        // SAFETY: the source chunk is ours, exclusive (MADV_DONTFORK) and
        // not referenced; the destination is registered memory.
        match unsafe {
            uffd.move_(
                dst + off,
                (src + off) as *mut u8,
                chunk,
                MoveMode::ALLOW_SRC_HOLES,
            )
        } {
            Ok(Outcome::Complete { .. }) => {
                counters.missing.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Outcome::AlreadyPresent) => {
                uffd.wake(dst + off, chunk).map_err(|e| e.to_string())?
            }
            other => return Err(format!("MOVE of {:#x}: {other:?}", dst + off)),
        }
        Ok(Next::Continue)
    };
    let pages_per_chunk = chunk / ps;
    with_handler(
        "move",
        &uffd,
        &[(areas.dst.addr(), areas.len())],
        &at,
        on_event,
        || {
            for step in 0..steps {
                for (base, want, what) in [
                    (src, 1, "source"),
                    (dst, 1, "destination"),
                    (src, 0, "moved-out source"),
                ] {
                    for i in 0..pages_per_chunk {
                        let page = base + step * chunk + i * ps;
                        at.store(page, Ordering::Relaxed);
                        // SAFETY: inside src or dst, both live for the scope.
                        let count = unsafe { peek(page + COUNT_OFFSET as u64) };
                        if count != want {
                            return Err(format!(
                                "{what} page {page:#x}: count {count}, expected {want}"
                            ));
                        }
                    }
                }
            }
            Ok(())
        },
    )?;
    ensure!(
        counters.missing() == steps && counters.minor() == 0,
        "expected {steps} moves, the handler made {}",
        counters.missing()
    );
    Ok(format!(
        "{steps} faults resolved by MOVE of {} KiB each",
        chunk >> 10
    ))
}
