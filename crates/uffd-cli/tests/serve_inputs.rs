//! `uffd serve` refuses bad paths before it touches anything: a `--socket`
//! that names a regular file (a mistyped snapshot path) or a directory is
//! left exactly as it was, and a memory file that cannot be served is
//! refused at start with a message naming it.

use std::os::unix::net::UnixListener;
use std::process::{Command, Output};

use uffd_testkit::Scratch;

fn serve(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uffd"))
        .arg("serve")
        .args(args)
        .output()
        .expect("running uffd serve")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn socket_path_naming_the_snapshot_never_deletes_it() {
    let dir = Scratch::new("victim");
    let victim = dir.path("victim.bin");
    let content: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&victim, &content).unwrap();
    let out = serve(&[
        "--mem-file".as_ref(),
        victim.as_os_str(),
        "--socket".as_ref(),
        victim.as_os_str(),
    ]);
    assert!(
        !out.status.success(),
        "serve accepted a regular file as its socket"
    );
    let err = stderr(&out);
    assert!(
        err.contains("not a socket") && err.contains("regular file"),
        "unclear error: {err}"
    );
    assert_eq!(
        std::fs::read(&victim).expect("the snapshot is gone"),
        content,
        "the snapshot changed"
    );
}

#[test]
fn socket_path_naming_a_directory_is_refused_and_kept() {
    let dir = Scratch::new("sockdir");
    let mem = dir.path("mem");
    std::fs::write(&mem, vec![1u8; 8192]).unwrap();
    let sock = dir.path("sock");
    std::fs::create_dir(&sock).unwrap();
    std::fs::write(sock.join("inside"), b"keep").unwrap();
    let out = serve(&[
        "--mem-file".as_ref(),
        mem.as_os_str(),
        "--socket".as_ref(),
        sock.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a directory"), "{}", stderr(&out));
    assert_eq!(std::fs::read(sock.join("inside")).unwrap(), b"keep");
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = Scratch::new("stale");
    let mem = dir.path("mem");
    std::fs::write(&mem, vec![1u8; 8192]).unwrap();
    let sock = dir.path("sock");
    // A live listener: refused, left in place.
    let live = UnixListener::bind(&sock).unwrap();
    let out = serve(&[
        "--mem-file".as_ref(),
        mem.as_os_str(),
        "--socket".as_ref(),
        sock.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    assert!(sock.exists());
    // The same socket file with nobody listening is stale: replaced. The
    // server then runs until SIGTERM.
    drop(live);
    let mut child = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .arg("serve")
        .arg("--mem-file")
        .arg(&mem)
        .arg("--socket")
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not take over the stale socket"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited early with {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(!sock.exists(), "the server left its socket behind");
}

#[test]
fn memory_file_that_cannot_be_served_is_refused_at_start() {
    let dir = Scratch::new("badmem");
    let sock = dir.path("sock");
    let empty = dir.path("empty");
    std::fs::write(&empty, b"").unwrap();
    let subdir = dir.path("subdir");
    std::fs::create_dir(&subdir).unwrap();
    for (mem, expect) in [
        (&empty, "is empty"),
        (&subdir, "not a regular file"),
        (&dir.path("missing"), "No such file"),
    ] {
        for mode in ["mmap", "pread"] {
            let out = serve(&[
                "--mem-file".as_ref(),
                mem.as_os_str(),
                "--socket".as_ref(),
                sock.as_os_str(),
                "--file-mode".as_ref(),
                mode.as_ref(),
            ]);
            assert!(
                !out.status.success(),
                "{} accepted in {mode} mode",
                mem.display()
            );
            let err = stderr(&out);
            assert!(
                err.contains(expect) && err.contains(&*mem.to_string_lossy()),
                "{mode}: unclear error for {}: {err}",
                mem.display()
            );
            assert!(!sock.exists(), "bound a socket for a file it cannot serve");
        }
    }
}
