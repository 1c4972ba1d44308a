//! Every ioctl against the running kernel: each resolves (or, for WAKE and
//! UNREGISTER, affects) a real fault. Skips with the reason when
//! userfaultfd is denied to this process.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use uffd::{
    ContinueMode, CopyMode, Errno, Error, Event, EventBuffer, FaultKind, Features, Ioctls, Mapping,
    MemoryKind, MoveMode, OpenMethod, OpenOptions, OpenPath, Outcome, PoisonMode, RegisterMode,
    Resolved, Uffd, WriteProtectMode, ZeropageMode, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;
/// Long enough for a slow VM, short enough that a bug fails instead of hanging.
const BOUND: Duration = Duration::from_secs(10);

/// Opens a userfaultfd with `features`, or explains why the test is skipped.
/// User-mode-only: the tests touch their memory from user space only, and
/// so run without privilege too.
fn open(features: Features) -> Option<Uffd> {
    let options = OpenOptions::new()
        .non_blocking(true)
        .user_mode_only(true)
        .features(features);
    match options.open() {
        Ok(uffd) => Some(uffd),
        Err(e) if e.is_denied() => {
            uffd_testkit::skip(
                uffd_testkit::Need::Userfaultfd,
                format_args!("userfaultfd denied here: {e}"),
            );
            None
        }
        Err(e) => panic!("opening a userfaultfd: {e}"),
    }
}

/// Waits for the next page fault, failing after `BOUND`.
fn next_fault(uffd: &Uffd, buf: &mut EventBuffer) -> uffd::Pagefault {
    let deadline = Instant::now() + BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            uffd.wait_readable(Some(left)).unwrap(),
            "no page fault arrived within {BOUND:?}"
        );
        let events = uffd.read_events(buf).unwrap();
        assert!(events.len() <= 1, "expected one fault, got {events:?}");
        if let Some(event) = events.pop() {
            match event {
                Event::Pagefault(fault) => return fault,
                other => panic!("expected a page fault, got {other:?}"),
            }
        }
    }
}

/// Runs `access` on another thread and returns a receiver for its result.
fn in_thread<T: Send + 'static>(access: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(access());
    });
    rx
}

/// A mapping of `pages` pages, shareable with a faulting thread.
fn shared(kind: MemoryKind, pages: usize) -> Arc<Mapping> {
    Arc::new(Mapping::new(kind, pages * PAGE_SIZE).expect("mapping memory"))
}

/// Registers all of `mem` in `mode`, starts a thread reading the byte at
/// `offset`, and returns that thread's result channel and the fault it
/// raised (the thread stays blocked until the test resolves it).
fn blocked_read(
    uffd: &Uffd,
    mem: &Arc<Mapping>,
    mode: RegisterMode,
    offset: usize,
) -> (mpsc::Receiver<u8>, uffd::Pagefault) {
    uffd.register(mem.addr(), mem.len() as u64, mode).unwrap();
    let reader = Arc::clone(mem);
    let done = in_thread(move || reader.read_byte(offset));
    let fault = next_fault(uffd, &mut EventBuffer::default());
    (done, fault)
}

#[test]
fn polling_a_blocking_fd_is_explained() {
    let uffd = match OpenOptions::new().open() {
        Ok(uffd) => uffd,
        Err(e) if e.is_denied() => return uffd_testkit::skip(uffd_testkit::Need::KernelFaults, e),
        Err(e) => panic!("{e}"),
    };
    let err = uffd.wait_readable(Some(Duration::ZERO)).unwrap_err();
    assert!(matches!(err, Error::PollNeedsNonBlocking), "{err}");
}

#[test]
fn opens_through_the_syscall_and_the_device() {
    let Some(_) = open(Features::empty()) else {
        return;
    };
    for (method, path) in [
        (OpenMethod::Syscall, OpenPath::Syscall),
        (OpenMethod::DevNode, OpenPath::DevNode),
    ] {
        match OpenOptions::new().method(method).non_blocking(true).open() {
            Ok(uffd) => {
                assert_eq!(uffd.open_path(), Some(path));
                assert!(uffd
                    .api_ioctls()
                    .contains(Ioctls::REGISTER | Ioctls::UNREGISTER));
                assert!(uffd::is_userfaultfd(&uffd));
            }
            Err(e) if e.is_denied() => {
                uffd_testkit::skip(uffd_testkit::Need::Userfaultfd, format_args!("{path}: {e}"))
            }
            Err(e) => panic!("{path}: {e}"),
        }
    }
}

#[test]
fn userfaultfds_are_told_apart_from_other_fds_without_proc_too() {
    use std::os::fd::AsFd;
    let (Some(ready), Ok(fresh)) = (
        open(Features::empty()),
        uffd::open_with(OpenPath::Syscall, 1 | rustix::fs::OFlags::CLOEXEC.bits()),
    ) else {
        return uffd_testkit::skip(
            uffd_testkit::Need::Userfaultfd,
            format_args!("userfaultfd denied here"),
        );
    };
    // Both the /proc answer and the ioctl answer, for a handshaken and a
    // fresh userfaultfd, and for fds that are not one.
    for fd in [ready.as_fd(), fresh.as_fd()] {
        assert!(uffd::is_userfaultfd(fd));
        assert!(uffd::answers_like_userfaultfd(fd));
    }
    let (r, w) = rustix::pipe::pipe().unwrap();
    let event = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let file = std::fs::File::open("/proc/self/status").unwrap();
    for fd in [r.as_fd(), w.as_fd(), event.as_fd(), file.as_fd()] {
        assert!(!uffd::is_userfaultfd(fd));
        assert!(!uffd::answers_like_userfaultfd(fd));
    }
}

#[test]
fn probe_reports_features_and_missing_ones_by_name() {
    let info = match uffd::probe() {
        Ok(info) => info,
        Err(e) if e.is_denied() => return uffd_testkit::skip(uffd_testkit::Need::KernelFaults, e),
        Err(e) => panic!("{e}"),
    };
    assert!(info.ioctls.contains(Ioctls::API | Ioctls::REGISTER));
    // Every kernel this crate targets has the 4.11 events.
    assert!(info
        .features
        .contains(Features::EVENT_REMOVE | Features::EVENT_UNMAP));
    let unknown = Features::from_bits_retain(1 << 40);
    match OpenOptions::new()
        .features(unknown | Features::EVENT_REMOVE)
        .open()
    {
        Err(Error::MissingFeatures { missing, .. }) => assert_eq!(missing, unknown),
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
}

#[test]
fn handshake_rejects_bad_api_unknown_bits_and_a_second_call() {
    let Some(_) = open(Features::empty()) else {
        return;
    };
    for path in [OpenPath::Syscall, OpenPath::DevNode] {
        let flags = rustix::fs::OFlags::CLOEXEC.bits();
        let fd = match uffd::open_with(path, flags) {
            Ok(fd) => fd,
            Err(e) => {
                uffd_testkit::skip(
                    uffd_testkit::Need::Userfaultfd,
                    format_args!("{path}: {e:?}"),
                );
                continue;
            }
        };
        let mut arg = uffd::sys::uffdio_api {
            api: 0xAB,
            features: 0,
            ioctls: 0,
        };
        assert_eq!(
            uffd::raw_api(&fd, &mut arg),
            Err(Errno::INVAL),
            "{path}: api 0xAB"
        );
        let fd = uffd::open_with(path, flags).unwrap();
        let mut arg = uffd::sys::uffdio_api {
            api: 0xAA,
            features: 1 << 63,
            ioctls: 0,
        };
        assert_eq!(
            uffd::raw_api(&fd, &mut arg),
            Err(Errno::INVAL),
            "{path}: bit 63"
        );
        let fd = uffd::open_with(path, flags).unwrap();
        let info = uffd::api(&fd, Features::empty()).expect("normal handshake");
        assert!(info.ioctls.contains(Ioctls::REGISTER));
        assert!(
            matches!(uffd::api(&fd, Features::empty()), Err(Error::Api { .. })),
            "{path}: a second handshake must fail"
        );
    }
}

#[test]
fn register_reports_the_ioctls_of_anon_and_shmem() {
    let Some(uffd) = open(Features::MISSING_SHMEM | Features::MINOR_SHMEM) else {
        return;
    };
    let anon = Mapping::new(MemoryKind::Anon, PAGE_SIZE).unwrap();
    let ioctls = uffd
        .register(anon.addr(), PAGE, RegisterMode::MISSING)
        .unwrap();
    assert!(ioctls.contains(Ioctls::WAKE | Ioctls::COPY | Ioctls::ZEROPAGE));
    assert!(!ioctls.contains(Ioctls::CONTINUE));
    uffd.unregister(anon.addr(), PAGE).unwrap();

    let shmem = Mapping::new(MemoryKind::Shmem, PAGE_SIZE).unwrap();
    let ioctls = uffd
        .register(shmem.addr(), PAGE, RegisterMode::MINOR)
        .unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE | Ioctls::WAKE));

    let err = uffd
        .register(anon.addr(), PAGE, RegisterMode::MINOR)
        .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::INVAL), "MINOR on anon: {err}");
    assert!(matches!(
        uffd.register(anon.addr() + 1, PAGE, RegisterMode::MISSING),
        Err(Error::InvalidRange { .. })
    ));
}

#[test]
fn copy_resolves_a_missing_fault_and_eexist_is_reported() {
    let Some(uffd) = open(Features::THREAD_ID) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 2);
    let (done, fault) = blocked_read(&uffd, &mem, RegisterMode::MISSING, PAGE_SIZE + 100);
    assert_eq!(fault.kind(), FaultKind::Missing);
    assert!(!fault.is_write());
    assert_eq!(fault.page(PAGE), mem.addr() + PAGE);
    assert!(fault.thread_id.is_some_and(|tid| tid > 0));
    let src = [0x5Au8; PAGE_SIZE];
    // SAFETY: `src` is live for the call; the destination is registered
    // memory that no reference covers.
    let outcome = unsafe { uffd.copy(fault.page(PAGE), src.as_ptr(), PAGE, CopyMode::empty()) };
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 0x5A);

    // SAFETY: as above.
    let again = unsafe { uffd.copy(fault.page(PAGE), src.as_ptr(), PAGE, CopyMode::empty()) };
    assert_eq!(again.unwrap(), Outcome::AlreadyPresent);
    // The range helper skips the present page and fills the other.
    // SAFETY: as above.
    let all = unsafe {
        uffd.copy_all(
            mem.addr(),
            src.as_ptr().cast(),
            PAGE,
            PAGE,
            CopyMode::empty(),
        )
    };
    assert_eq!(
        all.unwrap(),
        Resolved::Complete {
            installed: PAGE,
            existing: 0
        }
    );
    let src2 = [1u8; 2 * PAGE_SIZE];
    // SAFETY: as above.
    let all =
        unsafe { uffd.copy_all(mem.addr(), src2.as_ptr(), 2 * PAGE, PAGE, CopyMode::empty()) };
    assert_eq!(
        all.unwrap(),
        Resolved::Complete {
            installed: 0,
            existing: 2 * PAGE
        }
    );
}

#[test]
fn zeropage_resolves_a_fault_with_zeros() {
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 1);
    let (done, fault) = blocked_read(&uffd, &mem, RegisterMode::MISSING, 7);
    let outcome = uffd.zeropage(fault.page(PAGE), PAGE, ZeropageMode::empty());
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 0);
}

#[test]
fn writeprotect_catches_a_write_and_unprotect_lets_it_finish() {
    let Some(uffd) = open(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 1);
    mem.write_byte(0, 1);
    let ioctls = uffd
        .register(mem.addr(), PAGE, RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    let protect = uffd.write_protect(mem.addr(), PAGE, WriteProtectMode::WP);
    assert_eq!(protect.unwrap(), Outcome::Complete { bytes: PAGE });
    let writer = Arc::clone(&mem);
    let done = in_thread(move || writer.write_byte(9, 42));
    let fault = next_fault(&uffd, &mut EventBuffer::default());
    assert_eq!(fault.kind(), FaultKind::WriteProtect);
    assert!(fault.is_write());
    let unprotect = uffd.write_protect(fault.page(PAGE), PAGE, WriteProtectMode::empty());
    assert_eq!(unprotect.unwrap(), Outcome::Complete { bytes: PAGE });
    done.recv_timeout(BOUND).unwrap();
    assert_eq!(mem.read_byte(9), 42);
    assert_eq!(mem.read_byte(0), 1);
}

#[test]
fn continue_maps_a_page_cache_page_written_through_the_alias() {
    let Some(uffd) = open(Features::MINOR_SHMEM) else {
        return;
    };
    let mem = shared(MemoryKind::Shmem, 1);
    mem.write_alias(0, &[3u8; PAGE_SIZE]);
    let (done, fault) = blocked_read(&uffd, &mem, RegisterMode::MINOR, 11);
    assert_eq!(fault.kind(), FaultKind::Minor);
    // Fix the content through the alias before mapping it.
    mem.write_alias(11, &[77]);
    let outcome = uffd.continue_(fault.page(PAGE), PAGE, ContinueMode::empty());
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 77);
    let again = uffd.continue_(fault.page(PAGE), PAGE, ContinueMode::empty());
    assert_eq!(again.unwrap(), Outcome::AlreadyPresent);
}

#[test]
fn move_resolves_a_fault_without_copying() {
    let Some(uffd) = open(Features::MOVE) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 1);
    let staging = Mapping::new(MemoryKind::Anon, PAGE_SIZE).unwrap();
    staging
        .advise(0, PAGE_SIZE, rustix::mm::Advice::LinuxDontFork)
        .unwrap();
    staging.write(0, &[0xC3; PAGE_SIZE]);
    let (done, fault) = blocked_read(&uffd, &mem, RegisterMode::MISSING, 4095);
    // SAFETY: the staging page is ours, exclusive, and not referenced; after
    // the move it is only read through `read_byte`, which tolerates holes.
    let outcome =
        unsafe { uffd.move_(fault.page(PAGE), staging.as_ptr(), PAGE, MoveMode::empty()) };
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 0xC3);
    // The source page went away with the move.
    assert_eq!(staging.read_byte(0), 0);
    // A hole in the source is an error without ALLOW_SRC_HOLES...
    let mem2 = Mapping::new(MemoryKind::Anon, PAGE_SIZE).unwrap();
    uffd.register(mem2.addr(), PAGE, RegisterMode::MISSING)
        .unwrap();
    let hole = Mapping::new(MemoryKind::Anon, PAGE_SIZE).unwrap();
    // SAFETY: `hole` is ours and never populated.
    let err = unsafe { uffd.move_(mem2.addr(), hole.as_ptr(), PAGE, MoveMode::empty()) };
    assert_eq!(err.unwrap_err().errno(), Some(Errno::NOENT));
    // ...and is skipped with it.
    // SAFETY: as above.
    let ok = unsafe { uffd.move_(mem2.addr(), hole.as_ptr(), PAGE, MoveMode::ALLOW_SRC_HOLES) };
    assert_eq!(ok.unwrap(), Outcome::Complete { bytes: PAGE });
}

#[test]
fn poison_and_move_work_on_a_fd_that_did_not_request_them() {
    // What an adopted fd (e.g. Firecracker's, which asks only for
    // EVENT_REMOVE) may do: the kernel gates these on its own support.
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let kernel = uffd::probe().unwrap().features;
    if !kernel.contains(Features::POISON | Features::MOVE) {
        return uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("kernel lacks POISON or MOVE: {kernel}"),
        );
    }
    let mem = Mapping::new(MemoryKind::Anon, 2 * PAGE_SIZE).unwrap();
    uffd.register(mem.addr(), 2 * PAGE, RegisterMode::MISSING)
        .unwrap();
    // SAFETY: the poisoned page is never touched by this process.
    let poisoned = unsafe { uffd.poison(mem.addr(), PAGE, PoisonMode::empty()) };
    assert_eq!(poisoned.unwrap(), Outcome::Complete { bytes: PAGE });
    let src = Mapping::new(MemoryKind::Anon, PAGE_SIZE).unwrap();
    src.write_byte(0, 9);
    // SAFETY: `src` is ours, exclusive and referenced by nothing.
    let moved = unsafe { uffd.move_(mem.addr() + PAGE, src.as_ptr(), PAGE, MoveMode::empty()) };
    assert_eq!(moved.unwrap(), Outcome::Complete { bytes: PAGE });
    assert_eq!(mem.read_byte(PAGE_SIZE), 9);
}

#[test]
fn dontwake_leaves_the_thread_asleep_until_wake() {
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 1);
    let (done, fault) = blocked_read(&uffd, &mem, RegisterMode::MISSING, 0);
    let outcome = uffd.zeropage(fault.page(PAGE), PAGE, ZeropageMode::DONTWAKE);
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
    assert!(
        done.recv_timeout(Duration::from_millis(200)).is_err(),
        "a DONTWAKE resolve must not wake the faulting thread"
    );
    uffd.wake(fault.page(PAGE), PAGE).unwrap();
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 0);
}

#[test]
fn unregister_releases_a_waiting_thread_to_the_kernel() {
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 1);
    let (done, _fault) = blocked_read(&uffd, &mem, RegisterMode::MISSING, 5);
    uffd.unregister(mem.addr(), PAGE).unwrap();
    // UNREGISTER wakes the waiter, which retries and gets the kernel's zero page.
    assert_eq!(done.recv_timeout(BOUND).unwrap(), 0);
}

#[test]
fn poison_makes_the_faulting_access_raise_sigbus() {
    let Some(_) = open(Features::POISON) else {
        return;
    };
    // The faulting thread must die of SIGBUS, so it lives in a child process.
    // SAFETY: the child only runs code that does not depend on other threads
    // of the parent (it allocates, which is fine under nextest's one test per
    // process), and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(|| {
            let uffd = OpenOptions::new()
                .non_blocking(true)
                .user_mode_only(true)
                .features(Features::POISON)
                .open()
                .unwrap();
            let mem = shared(MemoryKind::Anon, 1);
            uffd.register(mem.addr(), PAGE, RegisterMode::MISSING)
                .unwrap();
            let handler = thread::spawn(move || {
                let fault = next_fault(&uffd, &mut EventBuffer::default());
                // SAFETY: the page is only accessed by the reader below,
                // which is meant to die of SIGBUS.
                let outcome = unsafe { uffd.poison(fault.page(PAGE), PAGE, PoisonMode::empty()) };
                assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
                thread::sleep(BOUND);
            });
            mem.read_byte(0);
            drop(handler);
        });
        // Reaching here means the access did not raise SIGBUS.
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if code.is_ok() { 3 } else { 4 }) };
    }
    let status = wait_child(pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "the child should die of SIGBUS, status {status:#x}"
    );
}

/// Waits for a child, killing it if it outlives `BOUND`.
fn wait_child(pid: libc::pid_t) -> libc::c_int {
    let deadline = Instant::now() + BOUND;
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        if Instant::now() > deadline {
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("child {pid} did not finish within {BOUND:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pending_remove_event_makes_resolves_retry_after_events() {
    let Some(uffd) = open(Features::EVENT_REMOVE) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 2);
    mem.write_byte(0, 1);
    uffd.register(mem.addr(), 2 * PAGE, RegisterMode::MISSING)
        .unwrap();
    // MADV_DONTNEED blocks until the REMOVE event is read; meanwhile every
    // resolve must come back as "drain events, then retry".
    let advisor = Arc::clone(&mem);
    let advised = in_thread(move || {
        advisor
            .advise(0, PAGE_SIZE, rustix::mm::Advice::LinuxDontNeed)
            .map_err(|e| e.to_string())
    });
    assert!(uffd.wait_readable(Some(BOUND)).unwrap(), "no REMOVE event");
    let outcome = uffd.zeropage(mem.addr() + PAGE, PAGE, ZeropageMode::empty());
    assert_eq!(outcome.unwrap(), Outcome::RetryAfterEvents);
    let resolved = uffd.zeropage_all(mem.addr() + PAGE, PAGE, PAGE, ZeropageMode::empty());
    assert_eq!(resolved.unwrap(), Resolved::RetryAfterEvents { done: 0 });
    let mut buf = EventBuffer::default();
    let events = uffd.read_events(&mut buf).unwrap();
    assert!(
        matches!(events.as_slice(), [Event::Remove { start, end }] if *start == mem.addr() && *end == mem.addr() + PAGE),
        "{events:?}"
    );
    advised.recv_timeout(BOUND).unwrap().unwrap();
    let outcome = uffd.zeropage(mem.addr() + PAGE, PAGE, ZeropageMode::empty());
    assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
}

#[test]
fn unmap_and_remap_events_are_decoded() {
    // The mapping is declared before the uffd so that it is dropped after it:
    // with EVENT_UNMAP, munmap waits until someone reads the UNMAP event.
    let mem = Mapping::new(MemoryKind::Anon, 4 * PAGE_SIZE).unwrap();
    let Some(uffd) = open(Features::EVENT_UNMAP | Features::EVENT_REMAP) else {
        return;
    };
    let base = mem.addr();
    uffd.register(base, 4 * PAGE, RegisterMode::MISSING)
        .unwrap();
    let addr = base as usize;
    let unmapper = in_thread(move || {
        // SAFETY: unmapping the last page of a mapping nothing references;
        // `mem`'s drop later unmaps the whole range, which is harmless.
        unsafe { rustix::mm::munmap((addr + 3 * PAGE_SIZE) as *mut _, PAGE_SIZE) }.is_ok()
    });
    let mut buf = EventBuffer::default();
    let seen = next_events(&uffd, &mut buf, "UNMAP");
    assert!(unmapper.recv_timeout(BOUND).unwrap());
    assert!(
        matches!(seen.as_slice(), [Event::Unmap { start, end }] if *start == base + 3 * PAGE && *end == base + 4 * PAGE),
        "{seen:?}"
    );
    // Growing the first page cannot happen in place (the second page is
    // mapped), so the kernel moves it and says where with a REMAP event.
    let remapper = in_thread(move || {
        // SAFETY: moving a page of our own mapping to a kernel-chosen place.
        unsafe {
            rustix::mm::mremap(
                addr as *mut _,
                PAGE_SIZE,
                2 * PAGE_SIZE,
                rustix::mm::MremapFlags::MAYMOVE,
            )
        }
        .map(|p| p as u64)
        .ok()
    });
    // mremap may wait for more than one event to be read; read until it returns.
    let mut seen = Vec::new();
    let deadline = Instant::now() + BOUND;
    let new = loop {
        if let Ok(new) = remapper.try_recv() {
            break new.expect("mremap");
        }
        assert!(
            Instant::now() < deadline,
            "mremap still waiting; events so far {seen:?}"
        );
        if uffd.wait_readable(Some(Duration::from_millis(50))).unwrap() {
            seen.append(uffd.read_events(&mut buf).unwrap());
        }
    };
    seen.append(uffd.read_events(&mut buf).unwrap());
    // The kernel reports the move, then (6.18, with EVENT_UNMAP too) the
    // unmapping of the old range.
    match seen.as_slice() {
        [Event::Remap { from, to, len }, rest @ ..] => {
            assert_eq!((*from, *to, *len), (base, new, PAGE));
            assert!(
                rest.iter().all(
                    |e| matches!(e, Event::Unmap { start, end } if *start == base && *end == base + PAGE)
                ),
                "{seen:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(uffd);
    // SAFETY: the moved pages are ours and referenced by nothing.
    unsafe { rustix::mm::munmap(new as *mut _, 2 * PAGE_SIZE) }.unwrap();
}

/// Reads until at least one event arrives, failing after `BOUND`.
fn next_events(uffd: &Uffd, buf: &mut EventBuffer, what: &str) -> Vec<Event> {
    let mut seen = Vec::new();
    while seen.is_empty() {
        assert!(uffd.wait_readable(Some(BOUND)).unwrap(), "no {what} event");
        seen.append(uffd.read_events(buf).unwrap());
    }
    seen
}

#[test]
fn many_faults_are_read_with_one_read() {
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let mem = shared(MemoryKind::Anon, 4);
    uffd.register(mem.addr(), 4 * PAGE, RegisterMode::MISSING)
        .unwrap();
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let m = Arc::clone(&mem);
            in_thread(move || m.read_byte(i * PAGE_SIZE))
        })
        .collect();
    let mut buf = EventBuffer::new(16);
    let mut pages = std::collections::BTreeSet::new();
    let deadline = Instant::now() + BOUND;
    while pages.len() < 4 && Instant::now() < deadline {
        uffd.wait_readable(Some(BOUND)).unwrap();
        // Give the other threads a moment to queue their faults too, so one
        // read can return several (not required for correctness).
        thread::sleep(Duration::from_millis(20));
        for event in uffd.read_events(&mut buf).unwrap().drain(..) {
            if let Event::Pagefault(f) = event {
                pages.insert(f.page(PAGE));
            }
        }
    }
    assert_eq!(pages.len(), 4, "every faulting thread reported");
    let resolved = uffd.zeropage_all(mem.addr(), 4 * PAGE, PAGE, ZeropageMode::empty());
    assert_eq!(
        resolved.unwrap(),
        Resolved::Complete {
            installed: 4 * PAGE,
            existing: 0
        }
    );
    for r in readers {
        assert_eq!(r.recv_timeout(BOUND).unwrap(), 0);
    }
}

#[cfg(feature = "tokio")]
#[test]
fn async_stream_delivers_faults() {
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    drop(uffd);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A blocking fd is refused with the remedy, not a bare errno.
        let blocking = OpenOptions::new().user_mode_only(true).open().unwrap();
        let refused = uffd::AsyncUffd::new(blocking).unwrap_err();
        assert!(
            matches!(refused, uffd::Error::NeedsNonBlocking { .. })
                && refused.to_string().contains("non_blocking(true)"),
            "{refused}"
        );
        let uffd = uffd::AsyncUffd::new(
            OpenOptions::new()
                .non_blocking(true)
                .user_mode_only(true)
                .open()
                .unwrap(),
        )
        .unwrap();
        let mem = shared(MemoryKind::Anon, 1);
        uffd.get_ref()
            .register(mem.addr(), PAGE, RegisterMode::MISSING)
            .unwrap();
        let reader = Arc::clone(&mem);
        let done = in_thread(move || reader.read_byte(1));
        let mut events = uffd.events(8);
        let event = tokio::time::timeout(BOUND, events.next())
            .await
            .unwrap()
            .unwrap();
        let Event::Pagefault(fault) = event else {
            panic!("{event:?}")
        };
        let outcome = uffd
            .get_ref()
            .zeropage(fault.page(PAGE), PAGE, ZeropageMode::empty());
        assert_eq!(outcome.unwrap(), Outcome::Complete { bytes: PAGE });
        assert_eq!(done.recv_timeout(BOUND).unwrap(), 0);
    });
}
