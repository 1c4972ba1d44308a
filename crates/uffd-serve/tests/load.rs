//! Load and soak: many VMs at once and a long run of VMs one after another
//! against one server, every byte verified by each VM (a separate
//! stand-in VMM process), and the server's file descriptors, threads and
//! anonymous memory back where they started afterwards.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use uffd_serve::engine::PagerEngineConfig;

const VM_BYTES: u64 = 1 << 20;

/// Open descriptors, threads and anonymous RSS (KiB) of this process.
fn usage() -> (usize, usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let field = |name: &str| -> u64 {
        uffd_testkit::proc_status_number("/proc/self/status", name)
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (fds, field("Threads") as usize, field("RssAnon"))
}

/// Waits (bounded) until the server is back to `start`'s descriptors and
/// threads: workers and pagers finish a moment after their report.
fn settles_to(start: (usize, usize, u64)) -> (usize, usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = usage();
        if (now.0, now.1) == (start.0, start.1) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vm(server: &TestServer, mem: &std::path::Path) -> Child {
    standin(&server.socket, mem)
        .args([
            "--size",
            &VM_BYTES.to_string(),
            "--threads",
            "1",
            "--balloon-every",
            "7",
        ])
        .spawn()
        .unwrap()
}

fn check_all_verified(children: Vec<Child>) {
    for (i, child) in children.into_iter().enumerate() {
        let (ok, out) = finish(child, &format!("VM {i}"), Duration::from_secs(120));
        assert!(ok, "VM {i} was not served correctly: {out}");
        assert!(out.contains("\"mismatched_pages\":0"), "VM {i}: {out}");
    }
}

#[test]
fn sixty_four_vms_at_once() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("load-64", VM_BYTES);
    let server = TestServer::start(dir.path("sock"), &mem, PagerEngineConfig::default());
    let start = usage();
    let children: Vec<Child> = (0..64).map(|_| vm(&server, &mem)).collect();
    check_all_verified(children);
    let reports = server.wait_reports(64, Duration::from_secs(60));
    assert!(reports
        .iter()
        .all(|r| r.engine.faults > 0 && r.engine.poisoned == 0));
    let end = settles_to(start);
    assert_eq!(
        (end.0, end.1),
        (start.0, start.1),
        "descriptors and threads (start {start:?}, end {end:?})"
    );
}

#[test]
fn a_thousand_vms_one_after_another() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("soak-1000", VM_BYTES);
    let server = TestServer::start(dir.path("sock"), &mem, PagerEngineConfig::default());
    // The first VMs warm what the server keeps for good (the log ring's
    // first entries, allocator arenas): measure from there.
    check_all_verified(vec![vm(&server, &mem), vm(&server, &mem)]);
    server.wait_reports(2, Duration::from_secs(30));
    let start = settles_to(usage());
    let total = 1000;
    // A few at a time, so the run stays short on two cores; each VM
    // still starts after an earlier one ended.
    let mut done = 2;
    while done < total + 2 {
        let batch = 4.min(total + 2 - done);
        check_all_verified((0..batch).map(|_| vm(&server, &mem)).collect());
        done += batch;
    }
    let totals = {
        server.wait_reports(done, Duration::from_secs(60));
        server.stats.totals()
    };
    assert_eq!(totals.vms, done as u64);
    assert_eq!(totals.poisoned_pages, 0);
    assert_eq!(totals.refused, 0, "{totals:?}");
    assert!(server.stats.reports().len() <= uffd_serve::stats::KEPT_REPORTS);
    let end = settles_to(start);
    assert_eq!(
        (end.0, end.1),
        (start.0, start.1),
        "descriptors and threads after {total} VMs (start {start:?}, end {end:?})"
    );
    // Anonymous memory: a thousand VMs leave at most a few MiB behind.
    assert!(
        end.2 <= start.2 + 16 * 1024,
        "anonymous RSS grew from {} KiB to {} KiB over {total} VMs",
        start.2,
        end.2
    );
}
