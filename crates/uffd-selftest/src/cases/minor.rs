//! The minor-fault cases: minor, minor-wp, minor-collapse, and this
//! project's CONTINUE cases (EEXIST, fallocated pages, collapse of a
//! partly mapped minor range).

#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use uffd::{
    ContinueMode, Errno, Event, FaultKind, Features, Outcome, RegisterMode, Resolved, Uffd,
};

use crate::cases::DefaultHandler;
use crate::harness::{
    guarded, os_error, smaps_kb, with_handler, CaseResult, Counters, Env, Next, Reserved, Stop,
};
use crate::{ensure, fail, skip};

const MADV_COLLAPSE: libc::c_int = 25;

fn minor_features(env: &Env, wp: bool) -> Features {
    let mut f = Features::MINOR_HUGETLBFS | Features::MINOR_SHMEM;
    if wp {
        f |= Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED | env.kind.wp_features();
    }
    f
}

/// The pattern the minor cases write through the alias.
fn fill_byte(page: usize) -> u8 {
    (page % 255) as u8
}

/// A registered mapping and its unregistered alias: a [`uffd::Mapping`],
/// or for collapse a PMD-aligned pair over one memfd.
struct MinorArea {
    registered: u64,
    alias: u64,
    len: usize,
    _mapping: Option<uffd::Mapping>,
    _aligned: Option<AlignedShmem>,
}

/// A shmem memfd mapped shared twice at PMD-aligned addresses (the
/// collapse cases need whole, aligned PMDs).
struct AlignedShmem {
    _file: OwnedFd,
    _main: Reserved,
    _alias: Reserved,
}

const PMD: usize = 2 << 20;

fn aligned_shmem(len: usize) -> Result<(AlignedShmem, u64, u64), Stop> {
    let file = rustix::fs::memfd_create("uffd-selftest-collapse", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| Stop::Fail(format!("memfd_create: {e}")))?;
    rustix::fs::ftruncate(&file, len as u64).map_err(|e| Stop::Fail(format!("ftruncate: {e}")))?;
    let main = Reserved::new(len, PMD)?;
    let alias = Reserved::new(len, PMD)?;
    for at in [main.addr, alias.addr] {
        use std::os::fd::AsRawFd;
        // SAFETY: maps our memfd over part of a reservation we own.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            fail!("mmap of the memfd at {at:#x}: {}", os_error());
        }
    }
    let (m, a) = (main.addr, alias.addr);
    Ok((
        AlignedShmem {
            _file: file,
            _main: main,
            _alias: alias,
        },
        m,
        a,
    ))
}

impl MinorArea {
    fn new(env: &Env, len: usize, aligned: bool) -> Result<MinorArea, Stop> {
        if aligned {
            let (shmem, registered, alias) = aligned_shmem(len)?;
            return Ok(MinorArea {
                registered,
                alias,
                len,
                _mapping: None,
                _aligned: Some(shmem),
            });
        }
        let m = env.map(len)?;
        let alias = m.alias_ptr().expect("file-backed memory has an alias") as u64;
        Ok(MinorArea {
            registered: m.addr(),
            alias,
            len,
            _mapping: Some(m),
            _aligned: None,
        })
    }

    fn fill(&self, ps: usize, byte: impl Fn(usize) -> u8) {
        for p in 0..self.len / ps {
            // SAFETY: the alias is ours, unregistered, and `len` long.
            unsafe {
                std::ptr::write_bytes((self.alias + (p * ps) as u64) as *mut u8, byte(p), ps)
            };
        }
    }

    /// Checks every page of `base` holds `byte(page)` throughout.
    fn check(
        &self,
        base: u64,
        ps: usize,
        at: &AtomicU64,
        byte: impl Fn(usize) -> u8,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; ps];
        for p in 0..self.len / ps {
            let addr = base + (p * ps) as u64;
            at.store(addr, Ordering::Relaxed);
            // SAFETY: inside one of our two mappings; may fault and wait
            // for the handler.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), ps) };
            let want = byte(p);
            if let Some(i) = buf.iter().position(|&b| b != want) {
                return Err(format!(
                    "page {p} at {addr:#x}: byte {i} is {:#x}, expected {want:#x}",
                    buf[i]
                ));
            }
        }
        Ok(())
    }
}

/// Pages written through the alias fault as MINOR in the registered
/// mapping; the handler flips them through the alias and CONTINUEs.
pub fn minor(env: &Env) -> CaseResult {
    minor_common(env, false, false)
}

/// minor with CONTINUE_MODE_WP.
pub fn minor_wp(env: &Env) -> CaseResult {
    minor_common(env, true, false)
}

/// minor, then MADV_COLLAPSE of the registered range: huge pages mapped,
/// contents unchanged.
pub fn minor_collapse(env: &Env) -> CaseResult {
    minor_common(env, false, true)
}

fn minor_common(env: &Env, wp: bool, collapse: bool) -> CaseResult {
    let features = minor_features(env, wp);
    let uffd = env.open(features)?;
    let ps = env.page_size();
    let pages = env.nr_pages();
    let area = MinorArea::new(env, pages * ps, collapse)?;
    let mut mode = RegisterMode::MINOR;
    if wp {
        mode |= RegisterMode::WP;
    }
    uffd.register(area.registered, area.len as u64, mode)?;
    area.fill(ps, fill_byte);
    let counters = Counters::default();
    let mut handler = DefaultHandler {
        src: 0,
        dst: area.registered,
        alias: Some(area.alias),
        ps: ps as u64,
        apply_wp: wp,
        counters: &counters,
    };
    let at = AtomicU64::new(area.registered);
    let flipped = |p| !fill_byte(p);
    with_handler(
        "minor",
        &uffd,
        &[(area.registered, area.len as u64)],
        &at,
        |u, e| handler.handle(u, e),
        || area.check(area.registered, ps, &at, flipped),
    )?;
    ensure!(
        counters.missing() == 0 && counters.minor() == pages as u64,
        "expected {pages} minor and 0 missing faults, got {} and {}",
        counters.minor(),
        counters.missing()
    );
    if !collapse {
        return Ok(format!(
            "{pages} minor faults resolved by CONTINUE{}",
            if wp { " (MODE_WP)" } else { "" }
        ));
    }
    let huge = collapse_and_count(area.registered, area.len)?;
    ensure!(
        huge == area.len / PMD,
        "after MADV_COLLAPSE {huge} of {} PMDs are mapped huge",
        area.len / PMD
    );
    guarded(
        "reading the collapsed range",
        &uffd,
        &[(area.registered, area.len as u64)],
        &at,
        || area.check(area.registered, ps, &at, flipped),
    )?
    .map_err(Stop::Fail)?;
    Ok(format!(
        "{pages} minor faults, then {huge} PMDs collapsed with contents intact"
    ))
}

/// MADV_COLLAPSE of `len` bytes at `addr`; returns how many PMDs smaps
/// reports mapped huge (ShmemPmdMapped).
fn collapse_and_count(addr: u64, len: usize) -> Result<usize, Stop> {
    // SAFETY: our aligned shmem mapping; collapse only changes its backing.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_COLLAPSE) } != 0 {
        skip!("MADV_COLLAPSE failed: {}", os_error());
    }
    Ok(smaps_kb(addr, "ShmemPmdMapped").map_err(Stop::Fail)? as usize * 1024 / PMD)
}

/// A handler that CONTINUEs minor faults with the range helper, which
/// wakes after EEXIST; counts both.
fn continuing_handler<'a>(
    ps: u64,
    counters: &'a Counters,
) -> impl FnMut(&Uffd, Event) -> Result<Next, String> + Send + 'a {
    move |uffd, event| {
        let Event::Pagefault(fault) = event else {
            return Err(format!("unexpected event {event:?}"));
        };
        if fault.kind() != FaultKind::Minor {
            return Err(format!("unexpected fault {fault:?}"));
        }
        match uffd
            .continue_all(fault.page(ps), ps, ps, ContinueMode::empty())
            .map_err(|e| e.to_string())?
        {
            Resolved::Complete {
                installed,
                existing,
            } => {
                if installed > 0 {
                    counters.minor.fetch_add(1, Ordering::Relaxed);
                }
                if existing > 0 {
                    counters.eexist.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Next::Continue)
            }
            other => Err(format!("CONTINUE of {:#x}: {other:?}", fault.address)),
        }
    }
}

/// (b) CONTINUE on an already-mapped page reports AlreadyPresent
/// (mapped = -EEXIST), and the handler keeps serving faults afterwards,
/// also when racing threads fault on the same page.
pub fn continue_eexist(env: &Env) -> CaseResult {
    let uffd = env.open(minor_features(env, false))?;
    let ps = env.page_size();
    let pages = 4;
    let area = MinorArea::new(env, pages * ps, false)?;
    uffd.register(area.registered, area.len as u64, RegisterMode::MINOR)?;
    let byte = |p: usize| 0x40 + p as u8;
    area.fill(ps, byte);
    let counters = Counters::default();
    let at = AtomicU64::new(area.registered);
    let mut direct = None;
    with_handler(
        "continue-eexist",
        &uffd,
        &[(area.registered, area.len as u64)],
        &at,
        continuing_handler(ps as u64, &counters),
        || {
            // Several threads race on page 0: one CONTINUE maps it, the
            // others' messages meet EEXIST and must still be woken.
            std::thread::scope(|s| {
                for _ in 0..3 {
                    // SAFETY: page 0 of our registered mapping.
                    s.spawn(|| unsafe { (area.registered as *const u8).read_volatile() });
                }
            });
            direct = Some(uffd.continue_(area.registered, ps as u64, ContinueMode::empty()));
            area.check(area.registered, ps, &at, byte)
        },
    )?;
    match direct {
        Some(Ok(Outcome::AlreadyPresent)) => {}
        other => fail!("CONTINUE of a mapped page gave {other:?}, expected AlreadyPresent"),
    }
    // What the kernel itself wrote: errno EEXIST and mapped = -EEXIST.
    let mut raw = uffd::sys::uffdio_continue {
        range: uffd::sys::uffdio_range {
            start: area.registered,
            len: ps as u64,
        },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: UFFDIO_CONTINUE takes one uffdio_continue; the range is our
    // registered, already mapped page.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&uffd),
            uffd::sys::UFFDIO_CONTINUE as libc::c_ulong,
            &raw mut raw,
        )
    };
    let errno = os_error().raw_os_error();
    ensure!(
        ret == -1 && errno == Some(libc::EEXIST) && raw.mapped == -i64::from(libc::EEXIST),
        "raw CONTINUE of a mapped page: ret {ret}, errno {errno:?}, mapped {}; expected -1, EEXIST, -EEXIST",
        raw.mapped
    );
    ensure!(
        counters.minor() == pages as u64,
        "expected {pages} pages continued, got {}",
        counters.minor()
    );
    Ok(format!(
        "mapped = -EEXIST, reported as AlreadyPresent; {} racing messages met EEXIST and were woken; all {pages} pages served",
        counters.eexist()
    ))
}

/// (c) CONTINUE on a shmem page that was fallocated but never written:
/// Linux 6.18 maps it (zeroed); older kernels fail with EFAULT. Either way
/// the outcome must be clear: a page of zeros, or an EFAULT error naming
/// UFFDIO_CONTINUE. A page that is not in the file at all is EFAULT always.
pub fn continue_fallocated(env: &Env) -> CaseResult {
    let uffd = env.open(minor_features(env, false))?;
    let ps = env.page_size();
    let m = env.map(3 * ps)?;
    let file = m.file().expect("shmem has a memfd");
    rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::empty(),
        ps as u64,
        ps as u64,
    )
    .map_err(|e| Stop::Fail(format!("fallocate: {e}")))?;
    uffd.register(m.addr(), m.len() as u64, RegisterMode::MINOR)?;
    let hole = m.addr() + 2 * ps as u64;
    match uffd.continue_(hole, ps as u64, ContinueMode::empty()) {
        Err(e) if e.errno() == Some(Errno::FAULT) && e.to_string().contains("CONTINUE") => {}
        other => fail!("CONTINUE of a hole: expected an EFAULT error, got {other:?}"),
    }
    let fallocated = m.addr() + ps as u64;
    let note = match uffd.continue_(fallocated, ps as u64, ContinueMode::empty()) {
        Ok(Outcome::Complete { bytes }) if bytes == ps as u64 => {
            let mut buf = vec![0xffu8; ps];
            m.read(ps, &mut buf);
            ensure!(
                buf.iter().all(|&b| b == 0),
                "the fallocated page was mapped with non-zero bytes"
            );
            "fallocated page: CONTINUE mapped a zero page (Linux 6.18 behaviour)"
        }
        Err(e) if e.errno() == Some(Errno::FAULT) => {
            ensure!(
                !kernel_at_least(6, 18),
                "CONTINUE of a fallocated page failed with EFAULT ({e}); Linux 6.18 maps it zeroed"
            );
            "fallocated page: CONTINUE failed with EFAULT (behaviour of kernels before 6.18)"
        }
        other => fail!("CONTINUE of a fallocated page: {other:?}"),
    };
    m.write_alias(0, &[9u8; 64]);
    match uffd.continue_(m.addr(), ps as u64, ContinueMode::empty()) {
        Ok(Outcome::Complete { .. }) => {}
        other => fail!("CONTINUE of a written page: {other:?}"),
    }
    ensure!(
        m.read_byte(63) == 9,
        "the written page does not show its contents"
    );
    Ok(format!("hole: EFAULT; {note}; written page: mapped"))
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let got_major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let got_minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (got_major, got_minor) >= (major, minor)
}

/// (d) MADV_COLLAPSE on a minor-registered shmem range where only half the
/// pages were CONTINUEd: the huge page holds exactly the page cache's
/// contents, in the registered mapping and in the alias.
pub fn collapse_contents(env: &Env) -> CaseResult {
    let uffd = env.open(minor_features(env, false))?;
    let ps = env.page_size();
    let len = 2 * PMD;
    let area = MinorArea::new(env, len, true)?;
    uffd.register(area.registered, len as u64, RegisterMode::MINOR)?;
    let byte = |p: usize| (p * 7 % 251) as u8 + 1;
    area.fill(ps, byte);
    for p in (0..len / ps).step_by(2) {
        match uffd.continue_(
            area.registered + (p * ps) as u64,
            ps as u64,
            ContinueMode::empty(),
        )? {
            Outcome::Complete { .. } => {}
            other => fail!("CONTINUE of page {p}: {other:?}"),
        }
    }
    let huge = collapse_and_count(area.registered, len)?;
    let counters = Counters::default();
    let at = AtomicU64::new(area.registered);
    with_handler(
        "collapse-minor-contents",
        &uffd,
        &[(area.registered, len as u64)],
        &at,
        continuing_handler(ps as u64, &counters),
        || {
            area.check(area.registered, ps, &at, byte)?;
            area.check(area.alias, ps, &at, byte)
        },
    )?;
    Ok(format!(
        "{huge} of {} PMDs mapped huge after collapse; contents intact; {} minor faults afterwards",
        len / PMD,
        counters.minor()
    ))
}
