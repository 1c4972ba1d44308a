//! End to end: a separate stand-in VMM process restores through the server
//! exactly as Firecracker does, touches memory from several threads,
//! balloons some pages, and verifies every byte.

mod common;

use std::time::Duration;

use common::*;
use uffd_pager::WorkingSet;
use uffd_serve::engine::PagerEngineConfig;

const MIB: u64 = 1 << 20;

/// A VMM of two regions, four threads and a balloon restores through a
/// server with `config`, every byte verified.
fn restores_across_regions_with_balloon(tag: &str, config: PagerEngineConfig) {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory(tag, 32 * MIB);
    let server = TestServer::start(dir.path("sock"), &mem, config);
    let child = standin(&server.socket, &mem)
        .args(["--regions", "2", "--threads", "4", "--balloon-every", "5"])
        .spawn()
        .unwrap();
    let (ok, out) = finish(child, "the stand-in VMM", Duration::from_secs(120));
    assert!(ok, "stand-in VMM failed: {out}");
    assert!(out.contains("\"mismatched_pages\":0"), "{out}");
    let report = &server.wait_reports(1, Duration::from_secs(10))[0];
    assert_eq!(report.ended, "vmm-exited");
    assert!(
        report.engine.faults >= 8192,
        "every page faults once at least: {report:?}"
    );
    assert!(
        report.engine.removes > 0,
        "the balloon's MADV_DONTNEED must arrive as REMOVE: {report:?}"
    );
    assert!(
        report.engine.zero_pages > 0,
        "zero pages and removed pages are served as zero pages: {report:?}"
    );
    assert_eq!(report.memory_bytes, 32 * MIB);
}

#[test]
fn standin_vmm_restores_every_byte_across_regions_with_balloon() {
    restores_across_regions_with_balloon(
        "e2e",
        PagerEngineConfig {
            threads: 2,
            ..Default::default()
        },
    );
}

#[test]
fn per_cpu_handlers_restore_every_byte_with_balloon() {
    restores_across_regions_with_balloon(
        "e2e-per-cpu",
        PagerEngineConfig {
            handler_per_cpu: true,
            ..Default::default()
        },
    );
}

#[test]
fn standin_vmm_on_2m_hugetlb_pages() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let reservation = match uffd::HugepageReservation::reserve(8) {
        Ok(r) => r,
        Err(e) => {
            uffd_testkit::skip(
                uffd_testkit::Need::Hugetlb,
                format_args!(
                    "cannot reserve 8 huge pages (4 for the guest, 4 for its alias mapping): {e}"
                ),
            );
            return;
        }
    };
    let (dir, mem) = scratch_with_memory("e2e-huge", 8 * MIB);
    let server = TestServer::start(
        dir.path("sock"),
        &mem,
        PagerEngineConfig {
            threads: 2,
            ..Default::default()
        },
    );
    let child = standin(&server.socket, &mem)
        .args(["--hugetlb", "--threads", "3", "--balloon-every", "3"])
        .spawn()
        .unwrap();
    let (ok, out) = finish(child, "the hugetlb stand-in VMM", Duration::from_secs(120));
    assert!(ok, "hugetlb stand-in VMM failed: {out}");
    let report = &server.wait_reports(1, Duration::from_secs(10))[0];
    assert_eq!(report.page_size, 2 * MIB);
    assert!(report.engine.removes > 0, "{report:?}");
    drop(server);
    drop(reservation);
}

#[test]
fn several_vms_are_served_at_once_from_one_file() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("e2e-many", 16 * MIB);
    let server = TestServer::start(
        dir.path("sock"),
        &mem,
        PagerEngineConfig {
            threads: 1,
            ..Default::default()
        },
    );
    let children: Vec<_> = (0..3)
        .map(|i| {
            standin(&server.socket, &mem)
                .args(["--threads", "2", "--balloon-every", &(7 + i).to_string()])
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let (ok, out) = finish(
            child,
            &format!("stand-in VMM {i}"),
            Duration::from_secs(120),
        );
        assert!(ok, "VM {i} failed: {out}");
    }
    let reports = server.wait_reports(3, Duration::from_secs(10));
    let mut pids: Vec<_> = reports.iter().map(|r| r.pid).collect();
    pids.dedup();
    assert_eq!(pids.len(), 3);
}

#[test]
fn recorded_working_set_is_prefetched_on_the_next_restore() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("e2e-ws", 16 * MIB);
    let ws_path = dir.path("ws");
    {
        let server = TestServer::start_with(
            dir.path("sock"),
            &mem,
            PagerEngineConfig {
                threads: 1,
                record: true,
                ..Default::default()
            },
            None,
            Some(ws_path.clone()),
        );
        let child = standin(&server.socket, &mem)
            .args(["--threads", "2", "--touch-percent", "10"])
            .spawn()
            .unwrap();
        let (ok, out) = finish(child, "the recording VM", Duration::from_secs(60));
        assert!(ok, "{out}");
        let report = &server.wait_reports(1, Duration::from_secs(10))[0];
        assert!(report.recorded_pages.unwrap() > 0, "{report:?}");
    }
    let ws = WorkingSet::load(&ws_path, 16 * MIB).unwrap();
    assert_eq!(ws.page_size(), 4096);
    assert!(
        ws.len() >= 400,
        "10% of 4096 pages touched first: {}",
        ws.len()
    );
    let server = TestServer::start(
        dir.path("sock2"),
        &mem,
        PagerEngineConfig {
            threads: 1,
            prefetch: Some(ws),
            background_fill: true,
            ..Default::default()
        },
    );
    // A guest that takes a moment per page (as a real one does between
    // faults), so that the replay runs while it does: a guest that faults
    // every page in a few milliseconds outruns any prefetch.
    let child = standin(&server.socket, &mem)
        .args(["--threads", "2", "--balloon-every", "11", "--pace-us", "50"])
        .spawn()
        .unwrap();
    let (ok, out) = finish(child, "the prefetched VM", Duration::from_secs(60));
    assert!(ok, "{out}");
    let report = &server.wait_reports(1, Duration::from_secs(10))[0];
    assert!(
        report.engine.prefetched_pages > 0,
        "the working set (and the rest, by background fill) is installed ahead of faults: {report:?}"
    );
}

/// The server stops (as on SIGTERM) while a VM that has touched only a tenth
/// of its memory runs on, holding its own copy of the userfaultfd as
/// Firecracker does. The drain installs every other page and unregisters
/// the memory, so the VM then reads every byte correctly with no server at
/// all (a page left missing and registered would hang it: bounded wait).
#[test]
fn shutdown_drains_a_running_vm_which_then_verifies_every_byte_without_the_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("e2e-stop", 8 * MIB);
    let mut server = TestServer::start(
        dir.path("sock"),
        &mem,
        PagerEngineConfig {
            threads: 2,
            ..Default::default()
        },
    );
    let mut child = standin(&server.socket, &mem)
        .args([
            "--threads",
            "2",
            "--touch-percent",
            "10",
            "--balloon-every",
            "13",
            "--pause-before-verify",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = read_line(
        &mut child,
        "the stand-in VMM's touch phase",
        Duration::from_secs(60),
    );
    assert_eq!(line.trim(), "touched");
    server.stop();
    let reports = server.stats.reports();
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report.ended, "shutdown");
    let drain = report.drain.as_ref().expect("a running VM is drained");
    assert_eq!(drain.outcome, "released", "{drain:?}");
    assert!(drain.still_registered.is_empty(), "{drain:?}");
    assert_eq!(drain.unregistered_bytes, 8 * MIB, "{drain:?}");
    assert!(
        drain.installed_pages > 0,
        "nine tenths of the pages were missing: {drain:?}"
    );
    // The server is gone; the VM verifies every byte now.
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"verify\n").unwrap();
    let (ok, out) = finish(
        child,
        "the stand-in VMM after the server stopped",
        Duration::from_secs(60),
    );
    assert!(
        ok,
        "the VM did not read its memory correctly without the server: {out}"
    );
    assert!(out.contains("\"mismatched_pages\":0"), "{out}");
}

/// A guest that reads its memory in order gets large installs from the
/// adaptive readahead: far fewer faults than pages, every byte right.
#[test]
fn readahead_serves_a_sequential_guest_with_few_faults() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("e2e-readahead", 16 * MIB);
    let server = TestServer::start(
        dir.path("sock"),
        &mem,
        PagerEngineConfig {
            readahead: 2 * MIB,
            ..Default::default()
        },
    );
    // One thread touches 1% at random, then verifies every page in order.
    let child = standin(&server.socket, &mem)
        .args(["--threads", "1", "--touch-percent", "1"])
        .spawn()
        .unwrap();
    let (ok, out) = finish(child, "the sequential guest", Duration::from_secs(60));
    assert!(ok && out.contains("\"mismatched_pages\":0"), "{out}");
    let report = &server.wait_reports(1, Duration::from_secs(10))[0];
    let pages = 16 * MIB / 4096;
    assert!(
        report.engine.faults < pages / 4,
        "{} faults for {pages} pages read in order: {report:?}",
        report.engine.faults
    );
}
