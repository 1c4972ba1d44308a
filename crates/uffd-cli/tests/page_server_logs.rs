//! A server's log must never stop it: `uffd page-server` whose stderr is a
//! pipe nobody reads any more (full), or whose reader has gone (closed),
//! still serves a restore and still stops on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffd_testkit::{Reaped, Scratch};

const LEN: u64 = 8 << 20;

fn standin_vmm() -> PathBuf {
    uffd_testkit::standin_vmm(
        env!("CARGO"),
        Path::new(env!("CARGO_BIN_EXE_uffd")),
        env!("CARGO_MANIFEST_DIR"),
    )
}

/// Starts `uffd page-server` with stderr into a pipe of ours; returns it,
/// its address, the pipe's read end (after the address line) and a second
/// write end of the same pipe.
fn page_server(mem: &Path) -> (Reaped, String, BufReader<std::fs::File>, OwnedFd) {
    let (read_end, write_end) = rustix::pipe::pipe().expect("a pipe");
    let ours = write_end.try_clone().expect("dup of the write end");
    let child = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["page-server", "--mem-file"])
        .arg(mem)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::from(write_end))
        .spawn()
        .expect("starting uffd page-server");
    let child = Reaped(child);
    let mut err = BufReader::new(std::fs::File::from(read_end));
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split([',', '\n']).next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim()
        .to_string();
    (child, addr, err, ours)
}

/// Fills the pipe behind `write_end` to the brim, so that the next write
/// to it would block.
fn fill(write_end: OwnedFd) {
    let capacity = rustix::pipe::fcntl_getpipe_size(&write_end).expect("F_GETPIPE_SZ");
    let mut file = std::fs::File::from(write_end);
    // A thread of its own: should the server write meanwhile, this write
    // would block on the last bytes; the pipe is full either way.
    std::thread::spawn(move || {
        let _ = file.write_all(&vec![b'.'; capacity]);
        // Hold the write end open: a reader would see EOF otherwise.
        std::thread::sleep(Duration::from_secs(3600));
    });
    std::thread::sleep(Duration::from_millis(200));
}

fn restore_through(addr: &str, mem: &Path, dir: &Scratch) {
    let socket = dir.path("sock");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_uffd"));
    serve
        .args(["serve", "--source", &format!("tcp://{addr}"), "--socket"])
        .arg(&socket)
        .stderr(Stdio::null());
    let _serve = Reaped(serve.spawn().expect("starting uffd serve"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "uffd serve never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let vmm = Command::new(standin_vmm())
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(mem)
        .args(["--size", &LEN.to_string(), "--threads", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the stand-in VMM");
    let (status, out) = finish(vmm, Duration::from_secs(30));
    assert!(
        status.success()
            && out.contains("\"mismatched_pages\":0")
            && out.contains(&format!("\"verified_pages\":{}", LEN / 4096)),
        "{status:?} {out}"
    );
}

/// Waits for `child`; kills it and fails past `limit`.
fn finish(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                stdout.read_to_string(&mut out).unwrap();
            }
            return (status, out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not finish within {limit:?}: a log write blocked it?");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stops_on_sigterm(mut server: Reaped) {
    let pid = rustix::process::Pid::from_raw(server.0.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "page-server still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "page-server after SIGTERM: {status:?}");
}

#[test]
fn a_full_stderr_pipe_does_not_stop_the_page_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("ps-full-log");
    let mem = dir.path("mem");
    uffd_testkit::snapshot_file(&mem, LEN);
    let (server, addr, _read_end, ours) = page_server(&mem);
    fill(ours);
    // Each destination's connections are logged: with a blocking log the
    // server's runtime would stop at the first of them.
    restore_through(&addr, &mem, &dir);
    restore_through(&addr, &mem, &dir);
    stops_on_sigterm(server);
}

#[test]
fn a_closed_stderr_does_not_stop_the_page_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("ps-closed-log");
    let mem = dir.path("mem");
    uffd_testkit::snapshot_file(&mem, LEN);
    let (server, addr, read_end, ours) = page_server(&mem);
    drop(read_end);
    drop(ours);
    restore_through(&addr, &mem, &dir);
    // "stopping" goes to the closed pipe too.
    stops_on_sigterm(server);
}
