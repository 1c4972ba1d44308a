//! `uffd serve` under connection floods: out of file descriptors it backs
//! off and logs a line now and then instead of spinning on accept(2) (the
//! audit saw 3.6 million lines in 6 s), and past --max-connections it
//! refuses at once instead of starting a thread per idle peer.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffd_testkit::Scratch;

fn scratch(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    std::fs::write(dir.path("mem"), vec![1u8; 1 << 20]).unwrap();
    dir
}

/// `uffd serve` with at most 64 open files, idle peers allowed a minute.
fn serve_with_64_fds(dir: &Path, extra: &str) -> Child {
    let cmd = format!(
        "ulimit -n 64 && exec '{}' serve --mem-file '{}' --socket '{}' --handshake-timeout-ms 60000 {extra}",
        env!("CARGO_BIN_EXE_uffd"),
        dir.join("mem").display(),
        dir.join("sock").display()
    );
    let child = Command::new("sh")
        .args(["-c", &cmd])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("sock").exists() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Opens `n` idle connections, holds them for `hold`, stops the server
/// and returns its log.
fn flood(mut server: Child, dir: &Path, n: usize, hold: Duration) -> String {
    let peers: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(dir.join("sock")).expect("connect"))
        .collect();
    std::thread::sleep(hold);
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server died under the flood"
    );
    drop(peers);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&server),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut log = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "serve exited with {status}: {log}");
    log
}

#[test]
fn out_of_file_descriptors_backs_off_and_rate_limits_the_log() {
    let dir = scratch("emfile");
    // A cap above what 64 descriptors allow, so accept(2) runs out first.
    let server = serve_with_64_fds(dir.dir(), "--max-connections 200");
    let log = flood(server, dir.dir(), 80, Duration::from_secs(3));
    let failures = log.matches("accept failed").count();
    assert!(
        (1..=3).contains(&failures),
        "{failures} 'accept failed' lines in 3 s (one per 5 s expected):\n{}",
        &log[..log.len().min(4000)]
    );
    assert!(
        log.contains("ulimit -n"),
        "the log does not say what to do: {log}"
    );
}

#[test]
fn the_default_cap_follows_the_descriptor_limit_and_refuses_the_rest() {
    let dir = scratch("cap");
    let server = serve_with_64_fds(dir.dir(), "");
    let log = flood(server, dir.dir(), 40, Duration::from_secs(2));
    // 64 descriptors: (64 - 32) / 8 = 4 connections at once.
    assert!(log.contains("max_connections=4"), "{log}");
    assert!(
        log.contains("at --max-connections"),
        "no refusal logged: {log}"
    );
    assert!(
        !log.contains("accept failed"),
        "the cap should keep accept(2) from running out: {log}"
    );
    // Refusals are rate-limited too: 36 refused peers, a line or two.
    assert!(log.matches("at --max-connections").count() <= 2, "{log}");
}
