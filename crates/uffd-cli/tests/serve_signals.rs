//! `uffd serve` under real signals: SIGUSR1 writes the working set, SIGTERM
//! drains a VM that is still running and exits 0; the VM (a separate
//! stand-in VMM process that keeps its own userfaultfd, as Firecracker does)
//! then reads every byte of its memory correctly with no server at all.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

fn standin_vmm() -> PathBuf {
    uffd_testkit::standin_vmm(
        env!("CARGO"),
        Path::new(env!("CARGO_BIN_EXE_uffd")),
        env!("CARGO_MANIFEST_DIR"),
    )
}

/// Polls `done` every 20 ms; fails naming `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "stuck: {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

use uffd_testkit::Reaped;

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, signal).unwrap();
}

/// A stand-in VMM of `mem` on `socket` that touches its memory as `args`
/// (its flags, separated by spaces) say, prints "touched", and waits for
/// "verify" on its stdin before it reads every page back (stdin, stdout
/// and stderr piped).
fn waiting_vm(standin: &Path, socket: &Path, mem: &Path, args: &str) -> Reaped {
    Reaped(
        uffd_testkit::standin_command(standin, socket, mem)
            .args(args.split_whitespace())
            .arg("--pause-before-verify")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
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
    let mut vm = waiting_vm(
        &standin,
        &socket,
        &mem,
        "--threads 2 --touch-percent 10 --balloon-every 17",
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

/// A `uffd serve` of `mem` on `socket` logging to `log`, with `extra` args
/// and environment.
fn serve(mem: &Path, socket: &Path, log: &Path, extra: &[&str], env: &[(&str, &str)]) -> Reaped {
    Reaped(
        Command::new(env!("CARGO_BIN_EXE_uffd"))
            .arg("serve")
            .arg("--mem-file")
            .arg(mem)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits (bounded) for the child to exit; its status.
fn exit_of(child: &mut Reaped, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    wait_for(what, Duration::from_secs(60), || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// True when process `pid` is stopped (state T in /proc/PID/stat).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// Where the old server is stopped before it is killed, or none.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    Never,
    At(&'static str),
}

/// Three VMs fault through a takeover; `kill` says whether the old server
/// is SIGKILLed at a step after the new one holds the userfaultfds. Every
/// VM must verify every byte (ballooned pages zero), and the new server
/// must serve a fresh VM afterwards and hand everything on again.
fn takeover_while_vms_fault(kill: Kill) {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let dir =
        uffd_testkit::Scratch::new(&format!("takeover-{kill:?}").replace([' ', '(', ')', '"'], ""));
    let (mem, socket) = (dir.path("mem"), dir.path("sock"));
    uffd_testkit::snapshot_file(&mem, 16 << 20);
    let env: Vec<(&str, &str)> = match kill {
        Kill::Never => vec![],
        Kill::At(step) => vec![("UFFD_TAKEOVER_PAUSE_AT", step)],
    };
    let (old_log, new_log, third_log) = (
        dir.path("old.log"),
        dir.path("new.log"),
        dir.path("third.log"),
    );
    // A failure anywhere below shows what the three servers logged.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        takeover_steps(
            kill,
            &standin,
            &mem,
            &socket,
            &env,
            [&old_log, &new_log, &third_log],
        )
    }));
    if let Err(panic) = run {
        for (name, log) in [("old", &old_log), ("new", &new_log), ("third", &third_log)] {
            eprintln!("--- {name} server log ---\n{}", log_of(log));
        }
        std::panic::resume_unwind(panic);
    }
}

fn takeover_steps(
    kill: Kill,
    standin: &Path,
    mem: &Path,
    socket: &Path,
    env: &[(&str, &str)],
    [old_log, new_log, third_log]: [&Path; 3],
) {
    let (old_log, new_log, third_log) = (
        old_log.to_path_buf(),
        new_log.to_path_buf(),
        third_log.to_path_buf(),
    );
    let (mem, socket) = (mem.to_path_buf(), socket.to_path_buf());
    let mut old = serve(&mem, &socket, &old_log, &["--threads", "1"], env);
    wait_for(
        "the first server listening",
        Duration::from_secs(30),
        || socket.exists(),
    );
    // Each VM touches half its pages (paced, so it is still faulting when
    // the takeover starts on a quiet machine), then waits: it verifies, and
    // so faults the other half, only once the test lets it, after the
    // takeover, so every VM is served by the new server however slow the
    // machine is.
    let vm = |pace: &str| {
        waiting_vm(
            standin,
            &socket,
            &mem,
            &format!("--threads 2 --pace-us {pace} --balloon-every 9 --touch-percent 50"),
        )
    };
    let verify = |vm: &mut Reaped| {
        use std::io::Write;
        vm.0.stdin.take().unwrap().write_all(b"verify\n").unwrap();
    };
    // 2,048 touches each on 2 threads, 400 us apart: about half a second.
    let mut vms: Vec<Reaped> = (0..3).map(|_| vm("400")).collect();
    wait_for(
        "the first server serving 3 VMs",
        Duration::from_secs(30),
        || {
            for vm in &mut vms {
                if let Some(status) = vm.0.try_wait().unwrap() {
                    let mut err = String::new();
                    let _ = std::io::Read::read_to_string(vm.0.stderr.as_mut().unwrap(), &mut err);
                    panic!("a VM ended before it was served: {status:?} {err}");
                }
            }
            log_of(&old_log).matches("serving VM").count() == 3
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut new = serve(
        &mem,
        &socket,
        &new_log,
        &["--takeover", "--threads", "2"],
        &[],
    );
    match kill {
        Kill::Never => {
            let status = exit_of(&mut old, "the old server exiting after the takeover");
            assert!(status.success(), "{status:?}: {}", log_of(&old_log));
        }
        Kill::At(step) => {
            let pid = old.0.id();
            wait_for(
                &format!("the old server stopping at {step}"),
                Duration::from_secs(30),
                || is_stopped(pid),
            );
            signal(&old.0, Signal::KILL);
            let _ = exit_of(&mut old, "the old server dying of SIGKILL");
        }
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        verify(vm);
        let status = exit_of(vm, &format!("VM {i} finishing through the takeover"));
        let mut out = String::new();
        std::io::Read::read_to_string(vm.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(
            status.success() && out.contains("\"mismatched_pages\":0"),
            "VM {i}: {status:?} {out}\nold: {}\nnew: {}",
            log_of(&old_log),
            log_of(&new_log)
        );
    }
    // Each VM's report follows its exit by up to a poll period.
    wait_for(
        "the new server reporting the 3 VMs",
        Duration::from_secs(30),
        || log_of(&new_log).matches("VM done").count() >= 3,
    );
    let new_text = log_of(&new_log);
    assert!(
        new_text.contains("took over") && new_text.contains("vms=3"),
        "{new_text}"
    );
    // The VMs were still faulting: the new server served each of them.
    let served_here = new_text
        .lines()
        .filter(|l| l.contains("VM done"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("faults="))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
        .count();
    assert_eq!(
        served_here, 3,
        "not every VM faulted after the takeover:\n{new_text}"
    );
    // The VMM socket is the new server's now: a fresh VM is served.
    let mut fresh = vm("0");
    verify(&mut fresh);
    let status = exit_of(&mut fresh, "a VM started after the takeover");
    assert!(status.success(), "{}", log_of(&new_log));
    // And the new server can be taken over in turn.
    wait_for(
        "the new server's takeover socket",
        Duration::from_secs(30),
        || log_of(&new_log).contains("taking over from this one is possible now"),
    );
    let mut third = Reaped(
        Command::new(env!("CARGO_BIN_EXE_uffd"))
            .args(["serve", "--takeover"])
            .arg("--mem-file")
            .arg(&mem)
            .arg("--socket")
            .arg(&socket)
            .stderr(std::fs::File::create(&third_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = exit_of(&mut new, "the second server handing over to a third");
    assert!(
        status.success(),
        "{}\n{}",
        log_of(&new_log),
        log_of(&third_log)
    );
    signal(&third.0, Signal::TERM);
    let status = exit_of(&mut third, "the third server stopping");
    assert!(status.success(), "{}", log_of(&third_log));
    assert!(!socket.exists(), "the last server left its socket behind");
}

#[test]
fn takeover_hands_every_faulting_vm_to_the_new_server() {
    takeover_while_vms_fault(Kill::Never);
}

#[test]
fn old_server_killed_after_sending_every_vm_leaves_no_vm_hung() {
    takeover_while_vms_fault(Kill::At("sent-all"));
}

#[test]
fn old_server_killed_after_the_new_one_adopted_leaves_no_vm_hung() {
    takeover_while_vms_fault(Kill::At("adopted"));
}

/// SIGTERM to a server that is still receiving VMs in a takeover: it
/// finishes taking them on and then drains the one it got, rather than
/// dying with its userfaultfd (the VM would then read zeros for its
/// memory). The old server stops after sending one of two VMs and is then
/// killed, so the takeover ends early.
#[test]
fn sigterm_during_a_takeover_drains_the_vms_already_taken_on() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let dir = uffd_testkit::Scratch::new("takeover-sigterm");
    let (mem, socket) = (dir.path("mem"), dir.path("sock"));
    let (old_log, new_log) = (dir.path("old.log"), dir.path("new.log"));
    uffd_testkit::snapshot_file(&mem, 16 << 20);
    let run = std::panic::catch_unwind(|| {
        let mut old = serve(
            &mem,
            &socket,
            &old_log,
            &[],
            &[("UFFD_TAKEOVER_PAUSE_AT", "sent-one")],
        );
        wait_for(
            "the first server listening",
            Duration::from_secs(30),
            || socket.exists(),
        );
        let mut vms: Vec<Reaped> = (0..2)
            .map(|_| {
                waiting_vm(
                    &standin,
                    &socket,
                    &mem,
                    "--threads 2 --balloon-every 9 --touch-percent 50",
                )
            })
            .collect();
        // Each VM says "touched" once half its memory is in.
        for vm in &mut vms {
            let mut line = String::new();
            BufReader::new(vm.0.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            if line.trim() != "touched" {
                let _ = vm.0.kill();
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(vm.0.stderr.as_mut().unwrap(), &mut err);
                panic!("a VM did not touch its memory: {line:?} {err}");
            }
        }
        let mut new = serve(&mem, &socket, &new_log, &["--takeover"], &[]);
        let pid = old.0.id();
        wait_for(
            "the old server stopping after sending one VM",
            Duration::from_secs(30),
            || is_stopped(pid),
        );
        wait_for(
            "the new server taking the VM on",
            Duration::from_secs(30),
            || log_of(&new_log).contains("serving a handed-over VM"),
        );
        signal(&new.0, Signal::TERM);
        wait_for(
            "the new server noting the stop",
            Duration::from_secs(30),
            || log_of(&new_log).contains("stop requested"),
        );
        assert!(new.0.try_wait().unwrap().is_none(), "{}", log_of(&new_log));
        signal(&old.0, Signal::KILL);
        let _ = exit_of(&mut old, "the old server dying of SIGKILL");
        let status = exit_of(&mut new, "the new server draining and exiting");
        let text = log_of(&new_log);
        assert!(status.success(), "{status:?}: {text}");
        assert!(text.contains("draining VMs vms=1"), "{text}");
        assert_eq!(text.matches("released: every page").count(), 1, "{text}");
        // The VM the new server took on reads every byte right with no
        // server at all; the other one lost its handler with the old server
        // and is killed (Reaped) when the test ends.
        let adopted_pid: u32 = text
            .lines()
            .find(|l| l.contains("serving a handed-over VM"))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("pid=")))
            .and_then(|p| p.parse().ok())
            .expect("the adopted VM's pid in the log");
        let vm = vms
            .iter_mut()
            .find(|vm| vm.0.id() == adopted_pid)
            .expect("the adopted VM is one of ours");
        vm.0.stdin.take().unwrap().write_all(b"verify\n").unwrap();
        let status = exit_of(vm, "the adopted VM verifying with no server");
        let mut out = String::new();
        std::io::Read::read_to_string(vm.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(
            status.success() && out.contains("\"mismatched_pages\":0"),
            "{status:?} {out}"
        );
        assert!(!socket.exists(), "the server left its socket behind");
    });
    if let Err(panic) = run {
        for (name, log) in [("old", &old_log), ("new", &new_log)] {
            eprintln!("--- {name} server log ---\n{}", log_of(log));
        }
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn takeover_of_another_memory_file_is_refused_and_changes_nothing() {
    let dir = uffd_testkit::Scratch::new("takeover-other");
    let (mem, other, socket) = (dir.path("mem"), dir.path("other"), dir.path("sock"));
    uffd_testkit::snapshot_file(&mem, 1 << 20);
    uffd_testkit::snapshot_file(&other, 1 << 20);
    let mut old = serve(&mem, &socket, &dir.path("old.log"), &[], &[]);
    wait_for("the server listening", Duration::from_secs(30), || {
        socket.exists()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["serve", "--takeover"])
        .arg("--mem-file")
        .arg(&other)
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another memory file"), "{err}");
    assert!(
        old.0.try_wait().unwrap().is_none(),
        "the running server stopped"
    );
    // Nothing to take over from: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["serve", "--takeover"])
        .arg("--mem-file")
        .arg(&mem)
        .arg("--socket")
        .arg(dir.path("nobody"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server to take over"));
    signal(&old.0, Signal::TERM);
    assert!(exit_of(&mut old, "the server stopping").success());
}
