//! The write-protect cases: wp-fork (with and without EVENT_FORK, with
//! and without a long-term pin), wp-unpopulated and WP_ASYNC with
//! PAGEMAP_SCAN (uffd-wp-mremap's matrix is in `mremap`).

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use uffd::{Event, EventBuffer, Features, Mapping, Pagemap, RegisterMode, Uffd, WriteProtectMode};

use crate::harness::{guarded, in_child, os_error, wp_bit, CaseResult, Env, Stop, STUCK_AFTER};
use crate::{ensure, fail, skip};

/// The uffd-wp bit of a written, protected page survives a zap, and is
/// inherited by a fork only with EVENT_FORK.
pub fn fork(env: &Env) -> CaseResult {
    wp_fork(env, false, false)
}

/// wp-fork with EVENT_FORK: the child keeps the bit.
pub fn fork_with_event(env: &Env) -> CaseResult {
    wp_fork(env, true, false)
}

/// wp-fork with the page long-term pinned (gup_test), before the fork and
/// in the child.
pub fn fork_pin(env: &Env) -> CaseResult {
    wp_fork(env, false, true)
}

/// wp-fork-pin with EVENT_FORK.
pub fn fork_pin_with_event(env: &Env) -> CaseResult {
    wp_fork(env, true, true)
}

fn wp_fork(env: &Env, with_event: bool, pin: bool) -> CaseResult {
    let mut features = env.kind.wp_features();
    if with_event {
        features |= Features::EVENT_FORK;
    }
    env.require(features)?;
    let gup = if pin { Some(GupTest::open()?) } else { None };
    let uffd = env.open(features)?;
    let ps = env.page_size();
    let pages = if pin { 1 } else { env.nr_pages() };
    let dst = env.map(pages * ps)?;
    uffd.register(dst.addr(), dst.len() as u64, RegisterMode::WP)?;
    dst.write_byte(0, 1);
    protect(&uffd, dst.addr(), ps as u64, true)?;
    ensure!(
        wp_bit(dst.addr()).map_err(Stop::Fail)?,
        "the uffd-wp bit is not set after WRITEPROTECT"
    );
    let addr = dst.addr();
    if let Some(gup) = &gup {
        gup.pin(addr, ps as u64).map_err(Stop::Fail)?;
        let early = fork_check(
            &uffd,
            addr,
            with_event,
            None,
            "in early CoW of fork() of a pinned page",
        );
        gup.unpin();
        early?;
        fork_check(
            &uffd,
            addr,
            with_event,
            Some(gup),
            "when the child takes a RO pin",
        )?;
        uffd.unregister(addr, dst.len() as u64)?;
        return Ok(
            "uffd-wp bit right in the child with the page pinned and when the child pins it".into(),
        );
    }
    fork_check(&uffd, addr, with_event, None, "in a present pte")?;
    // Zap the page: a marker (or a swap entry) must keep the bit.
    let advice = if env.kind.is_shared() {
        libc::MADV_DONTNEED
    } else {
        libc::MADV_PAGEOUT
    };
    // SAFETY: our mapping; the page reads back from the file or as missing.
    let r = unsafe { libc::madvise(dst.as_ptr().cast(), ps, advice) };
    if r != 0 && advice == libc::MADV_DONTNEED {
        fail!("MADV_DONTNEED: {}", os_error());
    }
    ensure!(
        wp_bit(addr).map_err(Stop::Fail)?,
        "the uffd-wp bit was lost when the page was zapped"
    );
    fork_check(&uffd, addr, with_event, None, "in a zapped pte")?;
    protect(&uffd, addr, ps as u64, false)?;
    ensure!(
        !wp_bit(addr).map_err(Stop::Fail)?,
        "the uffd-wp bit is still set after unprotecting"
    );
    guarded(
        "wp-fork write after unprotect",
        &uffd,
        &[(addr, dst.len() as u64)],
        &AtomicU64::new(addr),
        || dst.write_byte(0, 2),
    )?;
    ensure!(
        !wp_bit(addr).map_err(Stop::Fail)?,
        "the uffd-wp bit is set after a write"
    );
    uffd.unregister(addr, dst.len() as u64)?;
    Ok(format!(
        "the child {} the uffd-wp bit (present and zapped pte)",
        if with_event { "keeps" } else { "drops" }
    ))
}

/// WRITEPROTECT (`on`) or unprotect a range, FAILing unless it completes.
pub(crate) fn protect(uffd: &Uffd, start: u64, len: u64, on: bool) -> Result<(), Stop> {
    let mode = if on {
        WriteProtectMode::WP
    } else {
        WriteProtectMode::empty()
    };
    match uffd.write_protect(start, len, mode)? {
        uffd::Outcome::Complete { .. } => Ok(()),
        other => fail!("WRITEPROTECT({on}) of {start:#x}: {other:?}"),
    }
}

/// Forks; the child checks that its pagemap shows the uffd-wp bit exactly
/// when EVENT_FORK was asked for (optionally pinning the page first). With
/// EVENT_FORK, a thread reads the FORK event, which fork() waits for.
fn fork_check(
    uffd: &Uffd,
    addr: u64,
    with_event: bool,
    child_pin: Option<&GupTest>,
    when: &str,
) -> Result<(), Stop> {
    let child = || {
        if let Some(gup) = child_pin {
            gup.pin(addr, 4096)?;
        }
        let bit = wp_bit(addr)?;
        if let Some(gup) = child_pin {
            gup.unpin();
        }
        if bit != with_event {
            return Err(format!(
                "{} uffd-wp bit in the child {when}",
                if with_event { "missing" } else { "stale" }
            ));
        }
        Ok(())
    };
    if !with_event {
        return in_child("wp-fork child", child);
    }
    let ready = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The child's userfaultfd stays open until the child has looked:
        // closing it unregisters the child's ranges, clearing the bits.
        let consumer = s.spawn(|| -> Result<Uffd, String> {
            let deadline = Instant::now() + STUCK_AFTER;
            let mut buf = EventBuffer::new(4);
            // From here on nothing allocates until the FORK event is read
            // (the forking thread holds malloc's locks meanwhile).
            ready.store(true, Ordering::SeqCst);
            while Instant::now() < deadline {
                if !uffd
                    .wait_readable(Some(std::time::Duration::from_millis(50)))
                    .map_err(|e| e.to_string())?
                {
                    continue;
                }
                let first = uffd
                    .read_events(&mut buf)
                    .map_err(|e| e.to_string())?
                    .drain(..)
                    .next();
                match first {
                    Some(Event::Fork { uffd: child }) => return Ok(child),
                    Some(other) => return Err(format!("expected a FORK event, got {other:?}")),
                    None => {}
                }
            }
            Err("no FORK event arrived".into())
        });
        let start = Instant::now();
        while !ready.load(Ordering::SeqCst) && start.elapsed() < STUCK_AFTER {
            std::thread::yield_now();
        }
        let forked = in_child("wp-fork child", child);
        let consumed = consumer
            .join()
            .unwrap_or_else(|_| Err("consumer panicked".into()));
        let child_uffd = consumed.map_err(Stop::Fail)?;
        forked?;
        drop(child_uffd);
        Ok(())
    })
}

/// `/sys/kernel/debug/gup_test`: long-term pins on demand (CONFIG_GUP_TEST).
struct GupTest {
    file: std::fs::File,
}

/// `_IOW('g', 7, struct pin_longterm_test)`.
const PIN_LONGTERM_TEST_START: libc::c_ulong = 0x4018_6707;
/// `_IO('g', 8)`.
const PIN_LONGTERM_TEST_STOP: libc::c_ulong = 0x6708;
const GUP_TEST: &str = "/sys/kernel/debug/gup_test";

#[repr(C)]
struct PinLongtermTest {
    addr: u64,
    size: u64,
    flags: u32,
}

impl GupTest {
    /// Opens gup_test, mounting debugfs first if we are root and it is not
    /// mounted (and unmounting it again if gup_test is absent anyway).
    fn open() -> Result<GupTest, Stop> {
        let mut mounted_here = false;
        if !std::path::Path::new(GUP_TEST).exists() && !debugfs_mounted() {
            // SAFETY: plain mount(2) of debugfs at its standard place.
            let r = unsafe {
                libc::mount(
                    c"debugfs".as_ptr(),
                    c"/sys/kernel/debug".as_ptr(),
                    c"debugfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            mounted_here = r == 0;
            if r != 0 {
                skip!(
                    "needs {GUP_TEST} (CONFIG_GUP_TEST): debugfs is not mounted and mounting it failed: {}",
                    os_error()
                );
            }
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(GUP_TEST)
        {
            Ok(file) => Ok(GupTest { file }),
            Err(e) => {
                if mounted_here {
                    // SAFETY: undoes our own mount.
                    unsafe { libc::umount(c"/sys/kernel/debug".as_ptr()) };
                }
                skip!("needs {GUP_TEST} to pin pages: {e} (the kernel is built without CONFIG_GUP_TEST, or unprivileged)")
            }
        }
    }

    fn pin(&self, addr: u64, size: u64) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let mut arg = PinLongtermTest {
            addr,
            size,
            flags: 0,
        };
        // SAFETY: PIN_LONGTERM_TEST_START reads one pin_longterm_test.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), PIN_LONGTERM_TEST_START, &mut arg) };
        if r != 0 {
            return Err(format!("PIN_LONGTERM_TEST_START: {}", os_error()));
        }
        Ok(())
    }

    fn unpin(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: PIN_LONGTERM_TEST_STOP takes no argument.
        unsafe { libc::ioctl(self.file.as_raw_fd(), PIN_LONGTERM_TEST_STOP) };
    }
}

fn debugfs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some("/sys/kernel/debug"))
        })
        .unwrap_or(false)
}

/// With WP_UNPOPULATED, protecting an empty anon page leaves a marker
/// (bit set); unprotecting or zapping removes it; a read of a protected
/// empty page maps the zero page without a fault message.
pub fn unpopulated(env: &Env) -> CaseResult {
    let features = Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED;
    let uffd = env.open(features)?;
    let ps = env.page_size();
    let dst = env.map(env.nr_pages() * ps)?;
    let addr = dst.addr();
    let len = dst.len() as u64;
    uffd.register(addr, len, RegisterMode::WP)?;
    let bit = |what: &str, want: bool| -> Result<(), Stop> {
        let got = wp_bit(addr).map_err(Stop::Fail)?;
        ensure!(
            got == want,
            "uffd-wp bit {} {what}",
            if want { "clear" } else { "set" }
        );
        Ok(())
    };
    let zap = || -> Result<(), Stop> {
        dst.advise(0, ps, rustix::mm::Advice::LinuxDontNeed)?;
        Ok(())
    };
    protect(&uffd, addr, ps as u64, true)?;
    bit("after protecting an unpopulated page", true)?;
    protect(&uffd, addr, ps as u64, false)?;
    bit("after unprotecting it", false)?;
    protect(&uffd, addr, ps as u64, true)?;
    zap()?;
    bit("after zapping the marker", false)?;
    let at = AtomicU64::new(addr);
    guarded(
        "write after the marker was zapped",
        &uffd,
        &[(addr, len)],
        &at,
        || dst.write_byte(0, 1),
    )?;
    bit("after a write to an unprotected page", false)?;
    zap()?;
    protect(&uffd, addr, ps as u64, true)?;
    guarded(
        "read of a protected unpopulated page",
        &uffd,
        &[(addr, len)],
        &at,
        || dst.read_byte(0),
    )?;
    zap()?;
    let mut buf = EventBuffer::new(4);
    let stray = uffd.read_events(&mut buf)?.len();
    ensure!(stray == 0, "{stray} unexpected messages");
    Ok("markers set, cleared and zapped as expected; reading a marker maps the zero page".into())
}

/// WP_ASYNC: writes to protected pages complete without messages, and
/// PAGEMAP_SCAN reports exactly the written pages and re-protects them.
pub fn wp_async(env: &Env) -> CaseResult {
    let mut features = Features::WP_ASYNC | Features::WP_UNPOPULATED;
    if env.kind != uffd::MemoryKind::Anon {
        features |= Features::WP_HUGETLBFS_SHMEM;
    }
    let uffd = env.open(features)?;
    let ps = env.page_size();
    let pages = if env.kind.is_hugetlb() { 6 } else { 16 };
    let m = env.map(pages * ps)?;
    let (start, end) = (m.addr(), m.addr() + m.len() as u64);
    uffd.register(start, m.len() as u64, RegisterMode::WP)?;
    protect(&uffd, start, m.len() as u64, true)?;
    let pagemap = Pagemap::open_self()?;
    let written = |m: &Mapping| -> Result<Vec<usize>, Stop> {
        let ranges = pagemap.written(start, end, true)?;
        let mut pages = Vec::new();
        for (s, e) in ranges {
            let mut p = s;
            while p < e {
                pages.push(((p - m.addr()) / ps as u64) as usize);
                p += ps as u64;
            }
        }
        Ok(pages)
    };
    let first = written(&m)?;
    ensure!(
        first.is_empty(),
        "pages {first:?} reported written before any write"
    );
    let at = AtomicU64::new(start);
    let touched = [1, 3, pages - 1];
    guarded(
        "writes to WP_ASYNC-protected pages",
        &uffd,
        &[(start, m.len() as u64)],
        &at,
        || {
            for p in touched {
                at.store(start + (p * ps) as u64, Ordering::Relaxed);
                m.write_byte(p * ps + 7, 0x5a);
            }
        },
    )?;
    let got = written(&m)?;
    ensure!(
        got == touched,
        "PAGEMAP_SCAN reported pages {got:?} written, expected {touched:?}"
    );
    let again = written(&m)?;
    ensure!(
        again.is_empty(),
        "pages {again:?} still reported written after re-protecting"
    );
    guarded(
        "a write after re-protecting",
        &uffd,
        &[(start, m.len() as u64)],
        &at,
        || m.write_byte(2 * ps, 1),
    )?;
    let last = written(&m)?;
    ensure!(
        last == [2],
        "PAGEMAP_SCAN reported {last:?} after writing page 2"
    );
    let mut buf = EventBuffer::new(4);
    let stray = uffd.read_events(&mut buf)?.len();
    ensure!(stray == 0, "{stray} messages on a WP_ASYNC userfaultfd");
    Ok("written pages reported and re-protected; no messages".into())
}
