//! A memory file that shrinks while it is served must cost the server
//! nothing: the VM that touches the lost bytes gets SIGBUS for exactly
//! those pages (they are poisoned, never served as zeros), and the server
//! goes on serving every other VM. Before, the default mmap mode killed the
//! whole server with SIGBUS and left every VM it served hanging.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use uffd_pager::FileMode;
use uffd_serve::engine::PagerEngineConfig;

const LEN: u64 = 8 << 20;

fn shrunk_file_poisons_lost_pages(mode: FileMode) {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory(&format!("shrink-{mode:?}"), LEN);
    let server = TestServer::start_in_mode(
        dir.path("sock"),
        &mem,
        mode,
        PagerEngineConfig::default(),
        None,
        None,
    );
    // The file loses its second half after the server opened it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(LEN / 2)
        .unwrap();
    // The stand-in touches every page of all 8 MiB: the lost half must
    // raise SIGBUS in the VM, not hang it and not read as zeros.
    let child = standin(&server.socket, &mem)
        .args(["--size", &LEN.to_string(), "--threads", "2"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut child = child;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("stuck: the VM {pid} neither finished nor got SIGBUS");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "{mode:?}: the VM should die of SIGBUS on a lost page, got {status}"
    );
    let report = server.wait_reports(1, Duration::from_secs(20)).remove(0);
    assert!(
        report.engine.poisoned > 0,
        "{mode:?}: no page was poisoned: {report:?}"
    );
    // The server is alive and serves the half that still exists.
    good_vm_is_served(&server, &mem, 1);
}

#[test]
fn shrunk_file_in_mmap_mode_poisons_lost_pages_and_server_lives() {
    shrunk_file_poisons_lost_pages(FileMode::Mmap);
}

#[test]
fn shrunk_file_in_pread_mode_poisons_lost_pages_and_server_lives() {
    shrunk_file_poisons_lost_pages(FileMode::Pread);
}
