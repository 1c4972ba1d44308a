//! Negative controls: the checks that turn a broken handler into a FAIL
//! really fire.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use uffd::{Mapping, MemoryKind, OpenOptions, RegisterMode};
use uffd_selftest::harness::{guarded_within, Stop};
use uffd_selftest::stress::{self, StressOptions};

fn usable() -> bool {
    match uffd::probe() {
        Ok(_) => true,
        Err(e) if e.is_denied() => {
            eprintln!("skipped: userfaultfd is not permitted here: {e}");
            false
        }
        Err(e) => panic!("probing userfaultfd: {e}"),
    }
}

#[test]
fn stress_reports_corruption_when_a_handler_loses_data() {
    if !usable() {
        return;
    }
    let opts = StressOptions {
        kind: MemoryKind::Anon,
        pages: 512,
        bounces: 16,
        seed: 1,
        toggle_wp: false,
        racing_only: false,
        progress: false,
        sabotage_zero_fill: true,
    };
    match stress::run(&opts) {
        Err(Stop::Fail(msg)) => assert!(msg.contains("corruption"), "{msg}"),
        other => panic!("a zero-filling handler went unnoticed: {other:?}"),
    }
}

#[test]
fn watchdog_names_a_fault_nobody_resolves() {
    if !usable() {
        return;
    }
    // User-mode-only, like the selftest cases: no privilege needed.
    let uffd = OpenOptions::new().user_mode_only(true).open().unwrap();
    let m = Mapping::new(MemoryKind::Anon, 4096).unwrap();
    uffd.register(m.addr(), 4096, RegisterMode::MISSING)
        .unwrap();
    let at = AtomicU64::new(m.addr());
    let r = guarded_within(
        Duration::from_millis(200),
        "unserved read",
        &uffd,
        &[(m.addr(), 4096)],
        &at,
        || m.read_byte(0),
    );
    match r {
        Err(Stop::Fail(msg)) => assert!(msg.contains(&format!("{:#x}", m.addr())), "{msg}"),
        other => panic!("a read nobody resolved was not reported: {other:?}"),
    }
}

#[test]
fn wp_mremap_check_fails_when_the_moved_range_keeps_its_bits() {
    use uffd::{Event, EventBuffer, Features, WriteProtectMode};
    use uffd_selftest::cases::mremap::check_uffd_wp;
    if !usable() {
        return;
    }
    // With EVENT_REMAP the kernel keeps the uffd-wp bits across mremap (a
    // handler follows the move), so the matrix's "clear after mremap"
    // check must fail on exactly this range.
    let uffd = OpenOptions::new()
        .user_mode_only(true)
        .non_blocking(true)
        .features(Features::PAGEFAULT_FLAG_WP | Features::EVENT_REMAP)
        .open()
        .unwrap();
    let m = Mapping::new(MemoryKind::Anon, 4096).unwrap();
    m.write_byte(0, 1);
    uffd.register(m.addr(), 4096, RegisterMode::WP).unwrap();
    let protected = uffd
        .write_protect(m.addr(), 4096, WriteProtectMode::WP)
        .unwrap();
    assert!(matches!(protected, uffd::Outcome::Complete { .. }));
    let target = uffd_selftest::harness::Reserved::new(4096, 4096).unwrap();
    let moved = std::thread::scope(|s| {
        // mremap waits until the REMAP event is read.
        let reader = s.spawn(|| {
            let mut buf = EventBuffer::new(4);
            assert!(uffd.wait_readable(Some(Duration::from_secs(10))).unwrap());
            let events = uffd.read_events(&mut buf).unwrap();
            assert!(
                matches!(events.first(), Some(Event::Remap { .. })),
                "{events:?}"
            );
        });
        // SAFETY: moves our one-page mapping onto our own reservation; no
        // reference covers either.
        let p = unsafe {
            libc::mremap(
                m.as_ptr().cast(),
                4096,
                4096,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.addr as *mut libc::c_void,
            )
        };
        reader.join().unwrap();
        p
    });
    assert_ne!(moved, libc::MAP_FAILED);
    // The mapping now lives in `target`, which unmaps it.
    std::mem::forget(m);
    match check_uffd_wp(moved as u64, 1, false, "after mremap") {
        Err(Stop::Fail(msg)) => assert!(msg.contains("not clear for pte 0"), "{msg}"),
        other => panic!("a uffd-wp bit kept by EVENT_REMAP went unnoticed: {other:?}"),
    }
    check_uffd_wp(moved as u64, 1, true, "after mremap with EVENT_REMAP").unwrap();
}
