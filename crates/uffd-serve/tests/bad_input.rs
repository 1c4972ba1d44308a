//! Every kind of bad handshake is refused with the error for its step, the
//! server survives it, and it then serves a good VM (a separate stand-in
//! VMM process that verifies every byte).

mod common;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use uffd_serve::engine::PagerEngineConfig;
use uffd_serve::stats::Refusal;
use uffd_serve::vmm::send_with_fds;

const FILE_LEN: u64 = 4 << 20;

struct Case {
    _dir: Scratch,
    mem: PathBuf,
    server: TestServer,
}

fn setup(name: &str, allow_uid: Option<u32>) -> Option<Case> {
    if !uffd_testkit::vmm_uffd() {
        return None;
    }
    let (dir, mem) = scratch_with_memory(name, FILE_LEN);
    let server = TestServer::start_with(
        dir.path("sock"),
        &mem,
        PagerEngineConfig {
            threads: 1,
            ..Default::default()
        },
        allow_uid,
        None,
    );
    Some(Case {
        _dir: dir,
        mem,
        server,
    })
}

/// A real userfaultfd, as a VMM would send.
fn a_uffd() -> uffd::Uffd {
    uffd::OpenOptions::new()
        .user_mode_only(true)
        .open()
        .unwrap()
}

fn region(base: u64, size: u64, offset: u64, page: u64) -> serde_json::Value {
    serde_json::json!({
        "base_host_virt_addr": base, "size": size, "offset": offset,
        "page_size": page, "page_size_kib": page,
    })
}

/// Sends `message` with `fds`, waits for the refusal, checks its step, then
/// checks that a good VM is still served.
fn refused(case: &Case, message: &[u8], fds: &[BorrowedFd<'_>], step: &str) -> Refusal {
    let stream = UnixStream::connect(&case.server.socket).unwrap();
    send_with_fds(&stream, message, fds).unwrap();
    let refusal = case.server.wait_refusal(1, Duration::from_secs(10));
    drop(stream);
    assert_eq!(refusal.step, step, "{refusal:?}");
    assert_eq!(refusal.pid, Some(std::process::id() as i32));
    good_vm_is_served(&case.server, &case.mem, 0);
    assert_eq!(
        case.server.stats.refusals().len(),
        1,
        "only the bad connection was refused"
    );
    refusal
}

fn json_with_uffd(case: &Case, regions: serde_json::Value, step: &str) -> Refusal {
    let uffd = a_uffd();
    refused(case, regions.to_string().as_bytes(), &[uffd.as_fd()], step)
}

#[test]
fn malformed_json_is_refused() {
    let Some(case) = setup("malformed", None) else {
        return;
    };
    let uffd = a_uffd();
    let r = refused(
        &case,
        br#"{"base_host_virt_addr": 1}"#,
        &[uffd.as_fd()],
        "malformed-json",
    );
    assert!(r.reason.contains("not a JSON array"), "{r:?}");
}

#[test]
fn truncated_json_is_refused() {
    let Some(case) = setup("truncated", None) else {
        return;
    };
    let uffd = a_uffd();
    let full = serde_json::json!([region(0x7f00_0000_0000, 4096, 0, 4096)]).to_string();
    let mut stream = UnixStream::connect(&case.server.socket).unwrap();
    send_with_fds(&stream, &full.as_bytes()[..full.len() / 2], &[uffd.as_fd()]).unwrap();
    stream.flush().unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let refusal = case.server.wait_refusal(1, Duration::from_secs(10));
    assert_eq!(refusal.step, "truncated-json", "{refusal:?}");
    drop(stream);
    good_vm_is_served(&case.server, &case.mem, 0);
}

#[test]
fn silent_peer_times_out() {
    let Some(case) = setup("silent", None) else {
        return;
    };
    let stream = UnixStream::connect(&case.server.socket).unwrap();
    let refusal = case.server.wait_refusal(1, Duration::from_secs(10));
    assert_eq!(refusal.step, "timeout", "{refusal:?}");
    drop(stream);
    good_vm_is_served(&case.server, &case.mem, 0);
}

#[test]
fn message_without_fd_is_refused() {
    let Some(case) = setup("nofd", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x7f00_0000_0000, 4096, 0, 4096)]).to_string();
    refused(&case, msg.as_bytes(), &[], "no-fd");
}

#[test]
fn second_fd_is_refused_and_every_fd_closed() {
    let Some(case) = setup("twofds", None) else {
        return;
    };
    let uffd = a_uffd();
    let (pipe_read, pipe_write) = rustix::pipe::pipe().unwrap();
    let msg = serde_json::json!([region(0x7f00_0000_0000, 4096, 0, 4096)]).to_string();
    let stream = UnixStream::connect(&case.server.socket).unwrap();
    send_with_fds(&stream, msg.as_bytes(), &[uffd.as_fd(), pipe_write.as_fd()]).unwrap();
    drop(pipe_write);
    let refusal = case.server.wait_refusal(1, Duration::from_secs(10));
    assert_eq!(refusal.step, "too-many-fds", "{refusal:?}");
    // The server closed its copy of the pipe: the read end sees hang-up.
    let mut fds = [rustix::event::PollFd::new(
        &pipe_read,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::time::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&ts)).unwrap();
    assert!(
        fds[0].revents().contains(rustix::event::PollFlags::HUP),
        "stuck: the server kept the extra descriptor open"
    );
    drop(stream);
    good_vm_is_served(&case.server, &case.mem, 0);
}

#[test]
fn fd_that_is_not_a_userfaultfd_is_refused() {
    let Some(case) = setup("notuffd", None) else {
        return;
    };
    let file = std::fs::File::open(&case.mem).unwrap();
    let msg = serde_json::json!([region(0x7f00_0000_0000, 4096, 0, 4096)]).to_string();
    let r = refused(&case, msg.as_bytes(), &[file.as_fd()], "not-userfaultfd");
    assert!(r.reason.contains("not a userfaultfd"), "{r:?}");
}

#[test]
fn overlapping_regions_are_refused() {
    let Some(case) = setup("overlap", None) else {
        return;
    };
    let msg = serde_json::json!([
        region(0x7f00_0000_0000, 0x10_0000, 0, 4096),
        region(0x7f00_0008_0000, 0x10_0000, 0x10_0000, 4096),
    ]);
    json_with_uffd(&case, msg, "overlapping-regions");
}

#[test]
fn region_past_the_end_of_the_file_is_refused() {
    let Some(case) = setup("pastend", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x7f00_0000_0000, FILE_LEN, 4096, 4096)]);
    let r = json_with_uffd(&case, msg, "bad-region");
    assert!(
        r.reason.contains("past the end of the memory file"),
        "{r:?}"
    );
}

#[test]
fn unaligned_address_is_refused() {
    let Some(case) = setup("unaligned", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x7f00_0000_0010, 4096, 0, 4096)]);
    let r = json_with_uffd(&case, msg, "bad-region");
    assert!(
        r.reason.contains("base_host_virt_addr is not aligned"),
        "{r:?}"
    );
}

#[test]
fn unaligned_offset_and_size_are_refused() {
    let Some(case) = setup("unaligned-offset", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x7f00_0000_0000, 4096, 100, 4096)]);
    let r = json_with_uffd(&case, msg, "bad-region");
    assert!(r.reason.contains("offset is not aligned"), "{r:?}");
}

#[test]
fn unsupported_page_size_is_refused() {
    let Some(case) = setup("pagesize", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x7f00_0000_0000, 65536, 0, 65536)]);
    let r = json_with_uffd(&case, msg, "bad-region");
    assert!(r.reason.contains("neither 4096 nor 2097152"), "{r:?}");
}

#[test]
fn absurd_size_is_refused() {
    let Some(case) = setup("absurd", None) else {
        return;
    };
    let msg = serde_json::json!([region(0x1000, 1u64 << 60, 0, 4096)]);
    let r = json_with_uffd(&case, msg, "bad-region");
    assert!(r.reason.contains("absurd"), "{r:?}");
}

#[test]
fn empty_region_list_is_refused() {
    let Some(case) = setup("empty", None) else {
        return;
    };
    json_with_uffd(&case, serde_json::json!([]), "no-regions");
}

#[test]
fn peer_of_another_uid_is_refused() {
    // Only root can run a peer as another user.
    if !rustix::process::geteuid().is_root() {
        uffd_testkit::skip(
            uffd_testkit::Need::Root,
            format_args!("needs root to connect as another user"),
        );
        return;
    }
    let Some(case) = setup("uid", Some(0)) else {
        return;
    };
    // Let the other user reach the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&case.server.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = case.server.socket.clone();
    let msg = serde_json::json!([region(0x7f00_0000_0000, 4096, 0, 4096)]).to_string();
    // SAFETY: the child only calls setgid/setuid, connect, send and _exit
    // with data prepared before the fork.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        // SAFETY: plain syscalls in the child.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(3);
            }
        }
        let code = match UnixStream::connect(&socket) {
            Ok(stream) => {
                let _ = send_with_fds(&stream, msg.as_bytes(), &[]);
                // Hold the connection until the server hangs up.
                let mut byte = [0u8; 1];
                let _ = std::io::Read::read(&mut &stream, &mut byte);
                0
            }
            Err(_) => 4,
        };
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let refusal = case.server.wait_refusal(1, Duration::from_secs(10));
    let mut status = 0;
    // SAFETY: reaping the child forked above; the server closed the
    // connection on refusal, so it exits promptly.
    let waited = unsafe { libc::waitpid(child, &mut status, 0) };
    assert_eq!(waited, child);
    assert_eq!(refusal.step, "uid-not-allowed", "{refusal:?}");
    assert!(refusal.reason.contains("uid 65534"), "{refusal:?}");
    assert_eq!(refusal.pid, Some(child));
    good_vm_is_served(&case.server, &case.mem, 0);
}
