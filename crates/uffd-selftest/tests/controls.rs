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
