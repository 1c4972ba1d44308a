//! `uffd serve` under real signals: SIGUSR1 writes the working set, SIGTERM
//! drains a VM that is still running and exits 0; the VM (a separate
//! stand-in VMM process that keeps its own userfaultfd, as Firecracker does)
//! then reads every byte of its memory correctly with no server at all.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// The stand-in VMM binary of the uffd-serve package. Cargo exposes
/// `CARGO_BIN_EXE_*` only for this package's own binaries, so it is built
/// (a no-op when up to date) with the cargo that builds this test, in the
/// same target directory and profile, and located from cargo's report.
fn standin_vmm() -> PathBuf {
    let uffd = Path::new(env!("CARGO_BIN_EXE_uffd"));
    let mut build = Command::new(env!("CARGO"));
    build.args([
        "build",
        "--quiet",
        "-p",
        "uffd-serve",
        "--bin",
        "uffd-standin-vmm",
        "--message-format=json",
    ]);
    if uffd.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    let out = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo to build uffd-standin-vmm");
    assert!(out.status.success(), "building uffd-standin-vmm failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "uffd-standin-vmm")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no uffd-standin-vmm executable")
}

/// Polls `done` every 20 ms; fails naming `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "stuck: {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child on drop (a failed assertion must not leave it behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, signal).unwrap();
}

#[test]
fn sigusr1_records_and_sigterm_drains_a_running_vm_which_runs_on_without_the_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let dir = std::env::temp_dir().join(format!("uffd-serve-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mem, socket, stats, log) = (
        dir.join("mem"),
        dir.join("sock"),
        dir.join("stats.json"),
        dir.join("server.log"),
    );
    uffd_testkit::snapshot_file(&mem, 8 << 20);
    let mut server = Reaped(
        Command::new(env!("CARGO_BIN_EXE_uffd"))
            .arg("serve")
            .arg("--mem-file")
            .arg(&mem)
            .arg("--socket")
            .arg(&socket)
            .arg("--stats-json")
            .arg(&stats)
            .arg("--record")
            .arg(dir.join("vm-{vm}.ws"))
            .args(["--drain-timeout", "30"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let server_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the server listening", Duration::from_secs(30), || {
        socket.exists()
    });
    let mut vm = Reaped(
        Command::new(&standin)
            .arg("--socket")
            .arg(&socket)
            .arg("--mem-file")
            .arg(&mem)
            .args(["--threads", "2", "--touch-percent", "10"])
            .args(["--balloon-every", "17", "--pause-before-verify"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The VM's touch phase (bounded: read on another thread).
    let stdout = vm.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line.clone());
        // The rest: the verification report.
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        let _ = tx.send(rest);
    });
    let touched = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("stuck: the VM's touch phase did not finish within 60 s");
    assert_eq!(touched.trim(), "touched", "server log: {}", server_log());

    signal(&server.0, Signal::USR1);
    let working_set = dir.join("vm-1.ws");
    wait_for(
        "the working set written on SIGUSR1",
        Duration::from_secs(30),
        || working_set.exists(),
    );
    let ws = uffd_pager::WorkingSet::load(&working_set, 8 << 20).unwrap();
    assert!(!ws.is_empty(), "the VM touched pages before SIGUSR1");

    signal(&server.0, Signal::TERM);
    let mut status = None;
    wait_for(
        "the server exiting after SIGTERM",
        Duration::from_secs(60),
        || {
            status = server.0.try_wait().unwrap();
            status.is_some()
        },
    );
    let status = status.unwrap();
    let log_text = server_log();
    assert!(status.success(), "{status:?}; server log: {log_text}");
    assert!(log_text.contains("released"), "{log_text}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let vms = report["vms"].as_array().expect("vms array");
    assert_eq!(vms.len(), 1, "{report}");
    assert_eq!(vms[0]["pid"], vm.0.id(), "{report}");
    assert_eq!(vms[0]["ended"], "shutdown", "{report}");
    assert_eq!(vms[0]["drain"]["outcome"], "released", "{report}");
    assert_eq!(vms[0]["drain"]["unregistered_bytes"], 8 << 20, "{report}");

    // The server is gone: the VM verifies every byte on its own.
    vm.0.stdin.take().unwrap().write_all(b"verify\n").unwrap();
    let mut vm_status = None;
    wait_for(
        "the VM verifying its memory after the server exited",
        Duration::from_secs(60),
        || {
            vm_status = vm.0.try_wait().unwrap();
            vm_status.is_some()
        },
    );
    let out = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    assert!(vm_status.unwrap().success(), "{out}");
    assert!(out.contains("\"mismatched_pages\":0"), "{out}");
    drop(vm);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
