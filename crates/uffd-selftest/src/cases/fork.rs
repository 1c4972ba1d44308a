//! The cases that fork or take signals (sigbus, events, poison) and the
//! ones that hold a REMOVE event pending (mmap-changing, retry-after-events).
//!
//! Signal handlers and faulting children run in forked children; the
//! handler thread stays in this process and follows the FORK event to the
//! child's userfaultfd, as in the kernel's tests.

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uffd::{
    sys, ContinueMode, CopyMode, Errno, Event, EventBuffer, FaultKind, Features, Ioctls, Mapping,
    MemoryKind, MoveMode, OpenOptions, Outcome, PoisonMode, RegisterMode, Resolved, Uffd,
    ZeropageMode,
};

use crate::cases::DefaultHandler;
use crate::harness::{
    copy_page, in_child, os_error, peek, poke, release_range, with_handler, Areas, CaseResult,
    Counters, Env, Next, Stop, COUNT_OFFSET, STUCK_AFTER,
};
use crate::signals::{self, Answer};
use crate::{ensure, fail};

fn register_mode(wp: bool) -> RegisterMode {
    if wp {
        RegisterMode::MISSING | RegisterMode::WP
    } else {
        RegisterMode::MISSING
    }
}

/// SIGBUS: with the feature, faults raise SIGBUS in the faulting thread,
/// whose handler resolves them with COPY; a forked child's faults raise
/// SIGBUS too (the fork's userfaultfd inherits the feature).
pub fn sigbus(env: &Env) -> CaseResult {
    sigbus_common(env, false)
}

/// sigbus with write-protection: the write-back after each COPY raises a
/// second SIGBUS, answered by unprotecting.
pub fn sigbus_wp(env: &Env) -> CaseResult {
    sigbus_common(env, true)
}

fn sigbus_common(env: &Env, wp: bool) -> CaseResult {
    let mut features = Features::SIGBUS | Features::EVENT_FORK;
    if wp {
        features |= env.kind.wp_features();
    }
    // Opened here first so that a missing privilege SKIPs.
    let uffd = env.open(features)?;
    let pages = env.nr_pages();
    let split = (pages as u64).div_ceil(2);
    let env_copy = *env;
    in_child(
        "sigbus: signal handler resolving in the faulting thread",
        move || {
            let uffd = OpenOptions::new()
                .non_blocking(true)
                .user_mode_only(true)
                .features(features - Features::EVENT_FORK)
                .open()
                .map_err(|e| e.to_string())?;
            let areas = Areas::new(&env_copy, pages).map_err(Stop::into_message)?;
            uffd.register(areas.dst.addr(), areas.len(), register_mode(wp))
                .map_err(|e| e.to_string())?;
            let (src, dst, ps) = (areas.src.addr(), areas.dst.addr(), areas.page_size as u64);
            // SAFETY: this is a forked child that exits after the case.
            unsafe { signals::install(Answer::Resolve, ps, Some(uffd), src, dst, wp) };
            for nr in 0..split {
                let count_at = dst + nr * ps + COUNT_OFFSET as u64;
                // SAFETY: inside dst; SIGBUS is answered by the handler.
                let count = unsafe { peek(count_at) };
                if count != 1 {
                    return Err(format!("page {nr}: count {count}, expected 1"));
                }
                // SAFETY: as above; with wp this write raises a second SIGBUS.
                unsafe { poke(count_at, count) };
            }
            let missing = signals::MISSING_SIGNALS.load(Ordering::SeqCst);
            let wps = signals::WP_SIGNALS.load(Ordering::SeqCst);
            let want_wp = if wp { split } else { 0 };
            if missing != split || wps != want_wp {
                return Err(format!(
                "{missing} SIGBUS resolved by COPY and {wps} by unprotecting; expected {split} and {want_wp}"
            ));
            }
            Ok(())
        },
    )?;

    // Part two: the handler thread follows the FORK; the child's faults
    // must all raise SIGBUS and reach the handler as no message.
    let areas = Areas::new(env, pages)?;
    uffd.register(areas.dst.addr(), areas.len(), register_mode(wp))?;
    let forks = AtomicU64::new(0);
    let at = AtomicU64::new(areas.dst.addr());
    let dst = areas.dst.addr();
    let ps = areas.page_size as u64;
    with_handler(
        "sigbus in a forked child",
        &uffd,
        &[(dst, areas.len())],
        &at,
        |_, event| match event {
            Event::Fork { uffd } => {
                forks.fetch_add(1, Ordering::Relaxed);
                Ok(Next::Switch(uffd))
            }
            other => Err(format!(
                "unexpected message with UFFD_FEATURE_SIGBUS: {other:?}"
            )),
        },
        || {
            in_child("sigbus child", || {
                // SAFETY: a forked child that exits after the case.
                unsafe { signals::install(Answer::Skip, ps, None, 0, 0, false) };
                for nr in 0..split {
                    // SAFETY: inside dst; SIGBUS maps a zero page over it.
                    let count = unsafe { peek(dst + nr * ps + COUNT_OFFSET as u64) };
                    if count != 0 {
                        return Err(format!("page {nr} read {count} instead of raising SIGBUS"));
                    }
                }
                let got = signals::MISSING_SIGNALS.load(Ordering::SeqCst);
                if got != split {
                    return Err(format!("{got} SIGBUS in the child, expected {split}"));
                }
                Ok(())
            })
            .map_err(Stop::into_message)
        },
    )?;
    ensure!(
        forks.load(Ordering::Relaxed) == 1,
        "the handler saw no FORK event"
    );
    Ok(format!(
        "{split} faults answered in the signal handler{}; {split} SIGBUS in a forked child",
        if wp { " (each with a WP SIGBUS)" } else { "" }
    ))
}

/// Non-cooperative events: a forked child faults on every page (served by
/// the parent's handler through the FORK'd userfaultfd), mremaps the area
/// (REMAP: the handler rebases) and releases it (REMOVE: the handler
/// unregisters, after which the pages read zero).
pub fn events(env: &Env) -> CaseResult {
    events_common(env, false)
}

/// events with write-protection: the write-back after each fault takes a
/// WP fault too.
pub fn events_wp(env: &Env) -> CaseResult {
    events_common(env, true)
}

fn events_common(env: &Env, wp: bool) -> CaseResult {
    let mut features = Features::EVENT_FORK | Features::EVENT_REMAP | Features::EVENT_REMOVE;
    if wp {
        features |= env.kind.wp_features();
    }
    let uffd = env.open(features)?;
    let pages = env.nr_pages();
    let areas = Areas::new(env, pages)?;
    uffd.register(areas.dst.addr(), areas.len(), register_mode(wp))?;
    let counters = Counters::default();
    let mut handler = DefaultHandler {
        src: areas.src.addr(),
        dst: areas.dst.addr(),
        alias: None,
        ps: areas.page_size as u64,
        apply_wp: wp,
        counters: &counters,
    };
    let at = AtomicU64::new(areas.dst.addr());
    let kind = env.kind;
    with_handler(
        "events",
        &uffd,
        &[(areas.dst.addr(), areas.len())],
        &at,
        |u, e| handler.handle(u, e),
        || faulting_child(kind, &areas.src, &areas.dst, pages).map_err(Stop::into_message),
    )?;
    ensure!(
        counters.missing() == pages as u64,
        "expected {pages} missing faults, the handler resolved {}",
        counters.missing()
    );
    Ok(format!(
        "{} missing{} faults across FORK, REMAP and REMOVE",
        counters.missing(),
        if wp {
            format!(" and {} WP", counters.wp())
        } else {
            String::new()
        }
    ))
}

/// The kernel's `faulting_process(0, wp)` in a forked child.
fn faulting_child(
    kind: MemoryKind,
    src: &Mapping,
    dst: &Mapping,
    pages: usize,
) -> Result<(), Stop> {
    let ps = kind.page_size() as u64;
    let len = dst.len();
    let split = (pages as u64).div_ceil(2);
    let (src_addr, dst_addr) = (src.addr(), dst.addr());
    let file = dst.file().map(|f| f.as_raw_fd());
    in_child("events child", move || {
        let check = |base: u64, nr: u64| -> Result<(), String> {
            let at = base + nr * ps + COUNT_OFFSET as u64;
            // SAFETY: inside the (possibly moved) dst; faults are served
            // by the parent's handler.
            let count = unsafe { peek(at) };
            if count != 1 {
                return Err(format!("page {nr}: count {count}, expected 1"));
            }
            // SAFETY: as above.
            unsafe { poke(at, count) };
            Ok(())
        };
        for nr in 0..split {
            check(dst_addr, nr)?;
        }
        // SAFETY: moves dst over this child's copy of src (both ours).
        let moved = unsafe {
            libc::mremap(
                dst_addr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                src_addr as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(format!("mremap: {}", os_error()));
        }
        let moved = moved as u64;
        for nr in split..pages as u64 {
            check(moved, nr)?;
        }
        // SAFETY: `file` is the memfd behind dst, still open in this child.
        let file = file.map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
        release_range(kind, moved as *mut u8, len, file).map_err(Stop::into_message)?;
        let mut buf = vec![0xffu8; ps as usize];
        for nr in 0..pages as u64 {
            // SAFETY: the released (now unregistered) area; faults are
            // served by the kernel.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (moved + nr * ps) as *const u8,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                return Err(format!(
                    "page {nr} byte {i} is {:#x} after release, expected 0",
                    buf[i]
                ));
            }
        }
        Ok(())
    })
}

/// POISON: of four faulting pages, the handler COPYs zeros to the odd
/// ones and poisons the even ones, whose access then raises SIGBUS.
pub fn poison(env: &Env) -> CaseResult {
    // The reader is a forked child (it takes SIGBUS), hence EVENT_FORK.
    let uffd = env.open(Features::POISON | Features::EVENT_FORK)?;
    let ps = env.page_size() as u64;
    let areas = Areas::new(env, 4)?;
    let (src, dst) = (areas.src.addr(), areas.dst.addr());
    let ioctls = uffd.register(dst, 4 * ps, RegisterMode::MISSING)?;
    ensure!(
        ioctls.contains(Ioctls::COPY | Ioctls::POISON),
        "registration advertises {ioctls}, without COPY and POISON"
    );
    // SAFETY: src is ours and unregistered; COPY then installs zero pages.
    unsafe { std::ptr::write_bytes(src as *mut u8, 0, 4 * ps as usize) };
    let poisoned = AtomicU64::new(0);
    let at = AtomicU64::new(dst);
    with_handler(
        "poison",
        &uffd,
        &[(dst, 4 * ps)],
        &at,
        |uffd, event| {
            let fault = match event {
                Event::Fork { uffd } => return Ok(Next::Switch(uffd)),
                Event::Pagefault(f) if f.kind() == FaultKind::Missing => f,
                other => return Err(format!("unexpected event {other:?}")),
            };
            let page = fault.page(ps);
            let off = page - dst;
            if off & ps != 0 {
                copy_page(uffd, page, src + off, ps, false)?;
            } else {
                // SAFETY: the page belongs to the forked child, which
                // expects SIGBUS there.
                match unsafe { uffd.poison(page, ps, PoisonMode::empty()) } {
                    Ok(Outcome::Complete { bytes }) if bytes == ps => {
                        poisoned.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return Err(format!("POISON of {page:#x}: {other:?}")),
                }
            }
            Ok(Next::Continue)
        },
        || {
            in_child("poison reader", || {
                // SAFETY: a forked child that exits after the case.
                unsafe { signals::install(Answer::Skip, ps, None, 0, 0, false) };
                let mut buf = vec![0xffu8; ps as usize];
                for nr in 0..4 {
                    // SAFETY: inside dst; poisoned pages raise SIGBUS, which
                    // maps zeros over them.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (dst + nr * ps) as *const u8,
                            buf.as_mut_ptr(),
                            buf.len(),
                        )
                    };
                    if buf.iter().any(|&b| b != 0) {
                        return Err(format!("page {nr} has non-zero bytes"));
                    }
                }
                let got = signals::MISSING_SIGNALS.load(Ordering::SeqCst);
                if got != 2 {
                    return Err(format!("expected 2 SIGBUS (pages 0 and 2), got {got}"));
                }
                Ok(())
            })
            .map_err(Stop::into_message)
        },
    )?;
    ensure!(
        poisoned.load(Ordering::Relaxed) == 2,
        "expected 2 pages poisoned"
    );
    Ok("odd pages served zero, even pages poisoned and raised SIGBUS".into())
}

/// Holds a REMOVE event pending: a thread calls MADV_REMOVE (or
/// DONTNEED) on one page and sleeps until the event is read. Runs `check`
/// meanwhile, then reads the event, releasing the thread.
fn with_pending_remove<T>(
    uffd: &Uffd,
    m: &Mapping,
    check: impl FnOnce() -> Result<T, Stop>,
) -> Result<T, Stop> {
    let tid = AtomicI32::new(0);
    let released = AtomicBool::new(false);
    std::thread::scope(|s| {
        let remover = s.spawn(|| {
            tid.store(
                rustix::thread::gettid().as_raw_nonzero().get(),
                Ordering::SeqCst,
            );
            let advice = if m.kind().is_shared() {
                rustix::mm::Advice::LinuxRemove
            } else {
                rustix::mm::Advice::LinuxDontNeed
            };
            let r = m.advise(0, m.page_size(), advice);
            released.store(true, Ordering::SeqCst);
            r
        });
        let waited = wait_until_blocked(&tid, &released);
        let out = waited.and_then(|()| check());
        // Drain the REMOVE event so the remover returns.
        let deadline = Instant::now() + STUCK_AFTER;
        let mut buf = EventBuffer::new(8);
        let mut drained = false;
        while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
            let _ = uffd.wait_readable(Some(Duration::from_millis(20)));
            if let Ok(events) = uffd.read_events(&mut buf) {
                drained |= events.iter().any(|e| matches!(e, Event::Remove { .. }));
            }
        }
        if !released.load(Ordering::SeqCst) {
            // Leave the thread to the unregister below; report it.
            let _ = uffd.unregister(m.addr(), m.len() as u64);
            fail!("the MADV_REMOVE thread was still blocked after reading events");
        }
        let removed = remover.join().expect("remover panicked");
        if let Err(e) = removed {
            fail!("madvise: {e}");
        }
        ensure!(drained, "no REMOVE event was read");
        out
    })
}

/// Waits until the thread `tid` sleeps in the kernel (state D: the event
/// wait is killable) before it returned.
fn wait_until_blocked(tid: &AtomicI32, released: &AtomicBool) -> Result<(), Stop> {
    let deadline = Instant::now() + STUCK_AFTER;
    while Instant::now() < deadline {
        let t = tid.load(Ordering::SeqCst);
        if released.load(Ordering::SeqCst) {
            fail!("the madvise returned without waiting for its REMOVE event");
        }
        if t != 0 {
            let stat =
                std::fs::read_to_string(format!("/proc/self/task/{t}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            // D, and (where wchan is readable) asleep in the event wait
            // rather than on some lock on the way there.
            let wchan =
                std::fs::read_to_string(format!("/proc/self/task/{t}/wchan")).unwrap_or_default();
            if state == Some('D')
                && (wchan.is_empty() || wchan == "0" || wchan.contains("userfaultfd"))
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    fail!("the MADV_REMOVE thread never blocked on its REMOVE event")
}

fn pending_features() -> Features {
    Features::EVENT_REMOVE | Features::MOVE | Features::POISON | Features::MINOR_SHMEM
}

/// mmap-changing: while a REMOVE event is unread, COPY, ZEROPAGE, MOVE,
/// POISON and CONTINUE fail with EAGAIN before looking at their arguments
/// and write -EAGAIN into their result field (raw ioctls, all-zero args).
pub fn mmap_changing(env: &Env) -> CaseResult {
    let uffd = env.open(pending_features())?;
    let m = env.map(env.nr_pages() * env.page_size())?;
    uffd.register(m.addr(), m.len() as u64, RegisterMode::MISSING)?;
    with_pending_remove(&uffd, &m, || {
        let fd = uffd.as_raw_fd();
        let eagain = -i64::from(Errno::AGAIN.raw_os_error());
        let check = |name: &str,
                     opcode: rustix::ioctl::Opcode,
                     arg: *mut libc::c_void,
                     field: &dyn Fn() -> i64|
         -> Result<(), Stop> {
            // SAFETY: `arg` points at the uAPI struct `opcode` expects; all
            // its addresses are zero, so nothing is read through them.
            let ret = unsafe { libc::ioctl(fd, opcode as libc::c_ulong, arg) };
            let errno = os_error().raw_os_error();
            ensure!(
                ret == -1,
                "{name} succeeded while a REMOVE event was pending"
            );
            ensure!(
                errno == Some(libc::EAGAIN),
                "{name} failed with {errno:?}, not EAGAIN"
            );
            let got = field();
            ensure!(got == eagain, "{name} result field is {got}, not -EAGAIN");
            Ok(())
        };
        let mut copy = sys::uffdio_copy {
            dst: 0,
            src: 0,
            len: 0,
            mode: 0,
            copy: 1,
        };
        check(
            "UFFDIO_COPY",
            sys::UFFDIO_COPY,
            (&raw mut copy).cast(),
            &|| copy.copy,
        )?;
        let mut zero = sys::uffdio_zeropage {
            range: sys::uffdio_range { start: 0, len: 0 },
            mode: 0,
            zeropage: 1,
        };
        check(
            "UFFDIO_ZEROPAGE",
            sys::UFFDIO_ZEROPAGE,
            (&raw mut zero).cast(),
            &|| zero.zeropage,
        )?;
        let mut mv = sys::uffdio_move {
            dst: 0,
            src: 0,
            len: 0,
            mode: 0,
            move_: 1,
        };
        check(
            "UFFDIO_MOVE",
            sys::UFFDIO_MOVE,
            (&raw mut mv).cast(),
            &|| mv.move_,
        )?;
        let mut poison = sys::uffdio_poison {
            range: sys::uffdio_range { start: 0, len: 0 },
            mode: 0,
            updated: 1,
        };
        check(
            "UFFDIO_POISON",
            sys::UFFDIO_POISON,
            (&raw mut poison).cast(),
            &|| poison.updated,
        )?;
        let mut cont = sys::uffdio_continue {
            range: sys::uffdio_range { start: 0, len: 0 },
            mode: 0,
            mapped: 1,
        };
        check(
            "UFFDIO_CONTINUE",
            sys::UFFDIO_CONTINUE,
            (&raw mut cont).cast(),
            &|| cont.mapped,
        )?;
        Ok(())
    })?;
    Ok("COPY, ZEROPAGE, MOVE, POISON and CONTINUE: EAGAIN with -EAGAIN in the result field".into())
}

/// (e) While a REMOVE event is pending, COPY, ZEROPAGE, CONTINUE, POISON
/// and MOVE on real ranges all come back as [`Outcome::RetryAfterEvents`];
/// after the event is drained, the same COPY completes.
pub fn retry_after_events(env: &Env) -> CaseResult {
    let uffd = env.open(pending_features())?;
    let ps = env.page_size();
    let m = env.map(4 * ps)?;
    uffd.register(
        m.addr(),
        m.len() as u64,
        RegisterMode::MISSING | RegisterMode::MINOR,
    )?;
    let source = vec![0x77u8; ps];
    let move_src = Mapping::new(MemoryKind::Anon, ps)?;
    move_src.write(0, &source);
    let page = m.addr() + ps as u64;
    let len = ps as u64;
    with_pending_remove(&uffd, &m, || {
        let outcomes = [
            // SAFETY: `source` is a live buffer; `page` is registered memory.
            ("COPY", unsafe {
                uffd.copy(page, source.as_ptr(), len, CopyMode::empty())
            }),
            ("ZEROPAGE", uffd.zeropage(page, len, ZeropageMode::empty())),
            ("CONTINUE", uffd.continue_(page, len, ContinueMode::empty())),
            // SAFETY: `page` is registered memory nobody references.
            ("POISON", unsafe {
                uffd.poison(page, len, PoisonMode::empty())
            }),
            // SAFETY: `move_src` is our private anonymous page.
            ("MOVE", unsafe {
                uffd.move_(page, move_src.as_ptr(), len, MoveMode::empty())
            }),
        ];
        for (name, outcome) in outcomes {
            match outcome {
                Ok(Outcome::RetryAfterEvents) => {}
                other => fail!(
                    "{name} with a REMOVE event pending: {other:?}, expected RetryAfterEvents"
                ),
            }
        }
        Ok(())
    })?;
    // SAFETY: as above.
    match unsafe { uffd.copy_all(page, source.as_ptr(), len, len, CopyMode::empty()) }? {
        Resolved::Complete { installed, .. } if installed == len => {}
        other => fail!("COPY after draining the event: {other:?}"),
    }
    ensure!(
        m.read_byte(ps + 1) == 0x77,
        "the page COPYed after the event lacks its contents"
    );
    Ok("all five resolving ioctls: RetryAfterEvents; COPY completes after draining".into())
}
