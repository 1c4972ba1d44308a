//! `uffd snapshot push/pull/ls/info` and `uffd serve --source s3://...`
//! against a real S3 server (s3s-fs on loopback, started by this test)
//! behind a fault-injecting proxy, with VMs in other processes (the
//! stand-in VMM, which verifies every byte against the memory file).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use uffd_testkit::s3::{aws_env, Proxy, S3Server, BUCKET};
use uffd_testkit::Scratch;

/// The stand-in VMM binary of the uffd-serve package.
fn standin_vmm() -> PathBuf {
    uffd_testkit::standin_vmm(
        env!("CARGO"),
        Path::new(env!("CARGO_BIN_EXE_uffd")),
        env!("CARGO_MANIFEST_DIR"),
    )
}

use uffd_testkit::Reaped;

fn uffd(endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_uffd"));
    c.envs(aws_env(endpoint));
    c
}

fn run_ok(c: &mut Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "stuck: {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` at most `limit`; fails (naming `what`) if it is
/// still running then.
fn wait_exit(child: &mut Child, what: &str, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_for(what, limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

const MIB: u64 = 1 << 20;

struct Setup {
    s3: S3Server,
    proxy: Proxy,
    dir: Scratch,
    mem: PathBuf,
    url: String,
}

/// An 8 MiB memory file pushed in 64 KiB chunks.
fn setup(name: &str) -> Setup {
    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    let dir = Scratch::new(name);
    let mem = dir.path("vm.mem");
    uffd_testkit::snapshot_file(&mem, 8 * MIB);
    let url = format!("s3://{BUCKET}/fleet/vm");
    run_ok(
        uffd(&s3.endpoint())
            .args(["snapshot", "push", "--chunk-size", "64K", "--json"])
            .arg("--mem-file")
            .arg(&mem)
            .args(["--to", &url]),
    );
    Setup {
        s3,
        proxy,
        dir,
        mem,
        url,
    }
}

fn serve(s: &Setup, name: &str, extra: &[&str]) -> (Reaped, PathBuf, PathBuf) {
    let socket = s.dir.path(&format!("{name}.sock"));
    let log = s.dir.path(&format!("{name}.log"));
    let server = Reaped(
        uffd(&s.proxy.endpoint())
            .args(["serve", "--source", &s.url])
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let sock = socket.clone();
    wait_for("the server listening", Duration::from_secs(30), || {
        sock.exists()
    });
    (server, socket, log)
}

fn vm(standin: &Path, socket: &Path, mem: &Path, extra: &[&str]) -> Reaped {
    Reaped(
        uffd_testkit::standin_command(standin, socket, mem)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn report(vm: &mut Reaped) -> serde_json::Value {
    let mut out = String::new();
    std::io::Read::read_to_string(vm.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null)
}

fn chunk_gets(proxy: &Proxy) -> Vec<String> {
    proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.target.contains("/.chunks/") && s.injected.is_none())
        .map(|s| s.target)
        .collect()
}

#[test]
fn push_ls_info_and_pull_round_trip_through_the_cli() {
    let s = setup("cli-snapshot");
    let ep = s.s3.endpoint();
    let info = json(&run_ok(
        uffd(&ep).args(["snapshot", "info", &s.url, "--json"]),
    ));
    assert_eq!(info["image_len"], 8 * MIB);
    assert_eq!(info["chunk_size"], 64 << 10);
    // Every 4th page of the pattern is zero (not stored): the other 1536
    // pages are packed 16 to a 64 KiB chunk.
    assert_eq!(info["chunks"], 96);
    assert_eq!(info["zero_pages"], 512);
    assert_eq!(info["version"], 2);
    let listed = json(&run_ok(uffd(&ep).args([
        "snapshot",
        "ls",
        &format!("s3://{BUCKET}/fleet"),
        "--json",
    ])));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "vm");
    let pulled = s.dir.path("pulled.mem");
    run_ok(
        uffd(&ep)
            .args(["snapshot", "pull", "--from", &s.url, "--to"])
            .arg(&pulled),
    );
    assert!(std::fs::read(&pulled).unwrap() == std::fs::read(&s.mem).unwrap());
    // A second push of the same file uploads nothing but the manifest.
    let again = json(&run_ok(
        uffd(&ep)
            .args(["snapshot", "push", "--chunk-size", "64K", "--json"])
            .arg("--mem-file")
            .arg(&s.mem)
            .args(["--to", &format!("s3://{BUCKET}/fleet/vm-again")]),
    ));
    assert_eq!(again["uploaded_chunks"], 0, "{again}");
    assert_eq!(again["reused_chunks"], again["unique_chunks"]);
    // Unknown snapshot: exit 1 with the reason.
    let out = uffd(&ep)
        .args(["snapshot", "info", &format!("s3://{BUCKET}/fleet/none")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot"));
}

#[test]
fn two_vms_restore_from_s3_every_byte_right_each_chunk_fetched_once_through_5xx() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let s = setup("cli-serve-s3");
    let (mut server, socket, log) = serve(&s, "server", &["--fetch-timeout", "20"]);
    s.proxy.clear();
    s.proxy.fail_next(4);
    let mut vms: Vec<Reaped> = (0..2)
        .map(|_| vm(&standin, &socket, &s.mem, &["--threads", "2"]))
        .collect();
    for (i, v) in vms.iter_mut().enumerate() {
        let status = wait_exit(&mut v.0, "a VM restoring", Duration::from_secs(120));
        let r = report(v);
        assert!(
            status.success(),
            "VM {i}: {status:?} {r} server log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(r["mismatched_pages"], 0);
        assert_eq!(r["verified_pages"], 2048);
    }
    let injected = s
        .proxy
        .seen()
        .iter()
        .filter(|x| x.injected.is_some())
        .count();
    assert_eq!(injected, 4, "the 503s were answered and retried");
    let mut gets = chunk_gets(&s.proxy);
    let all = gets.len();
    gets.sort();
    gets.dedup();
    assert_eq!(gets.len(), 96, "every chunk fetched");
    assert_eq!(all, 96, "each chunk once, for both VMs");
    assert!(server.0.try_wait().unwrap().is_none(), "the server runs on");
}

#[test]
fn an_s3_outage_mid_restore_poisons_the_vm_and_the_server_serves_on() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let s = setup("cli-outage");
    let (mut server, socket, log) = serve(&s, "server", &["--fetch-timeout", "2"]);
    s.proxy.clear();
    let mut first = vm(
        &standin,
        &socket,
        &s.mem,
        &["--threads", "2", "--pace-us", "500"],
    );
    // Down as soon as the first chunk is fetched: most are not yet.
    wait_for("the first chunk fetch", Duration::from_secs(30), || {
        !chunk_gets(&s.proxy).is_empty()
    });
    s.proxy.set_down(true);
    let status = wait_exit(
        &mut first.0,
        "the VM after the outage",
        Duration::from_secs(60),
    );
    let r = report(&mut first);
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(rustix::process::Signal::BUS.as_raw()),
        "the VM touched pages that could not be fetched: SIGBUS, not a hang or a zero page ({status:?} {r}); server log: {server_log}"
    );
    assert!(server_log.contains("poison"), "reported: {server_log}");
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the server survives the outage"
    );
    // Back up: the next VM restores fully from the same server. Fetches
    // started during the outage may still be failing (and a chunk given up
    // on fails at once for a second): let them end first.
    s.proxy.set_down(false);
    std::thread::sleep(Duration::from_secs(4));
    let mut second = vm(&standin, &socket, &s.mem, &["--threads", "2"]);
    let status = wait_exit(
        &mut second.0,
        "the VM after the outage",
        Duration::from_secs(120),
    );
    let r = report(&mut second);
    assert!(
        status.success(),
        "{status:?} {r} server log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(r["mismatched_pages"], 0);
}

#[test]
fn a_restarted_server_restores_from_its_cache_dir_without_fetching_with_fill_and_prefetch() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let s = setup("cli-cache-dir");
    let cache = s.dir.path("cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    let ws = s.dir.path("vm.ws");
    let ws_arg = ws.to_str().unwrap().to_string();
    let flags = ["--cache-dir", cache_arg.as_str()];
    {
        // Recording, and filling in the background besides the faults.
        let (mut server, socket, _log) = serve(
            &s,
            "first",
            &[&flags[..], &["--record", &ws_arg, "--background-fill"]].concat(),
        );
        let mut v = vm(&standin, &socket, &s.mem, &[]);
        let status = wait_exit(&mut v.0, "the first VM", Duration::from_secs(120));
        assert!(status.success(), "{}", report(&mut v));
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(server.0.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let status = wait_exit(
            &mut server.0,
            "the server stopping",
            Duration::from_secs(60),
        );
        assert!(status.success());
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 96);
    assert!(ws.exists(), "the working set was recorded");
    s.proxy.clear();
    let (_server, socket, log) = serve(
        &s,
        "second",
        &[&flags[..], &["--prefetch", &ws_arg]].concat(),
    );
    let mut v = vm(&standin, &socket, &s.mem, &[]);
    let status = wait_exit(
        &mut v.0,
        "the VM from the warm cache",
        Duration::from_secs(120),
    );
    let r = report(&mut v);
    assert!(
        status.success(),
        "{r} {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(r["mismatched_pages"], 0);
    assert!(chunk_gets(&s.proxy).is_empty(), "{:?}", s.proxy.seen());
}

/// Pushes `mem` as `name` with `extra` flags; returns push's JSON report.
fn push_json(s: &Setup, mem: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    json(&run_ok(
        uffd(&s.proxy.endpoint())
            .args(["snapshot", "push", "--chunk-size", "64K", "--json"])
            .arg("--mem-file")
            .arg(mem)
            .args(["--to", &format!("s3://{BUCKET}/fleet/{name}")])
            .args(extra),
    ))
}

/// Serves snapshot `name` and restores one VM from it, whose every page
/// is checked against `mem`; returns the chunk GETs it took.
fn restore_checked(
    s: &Setup,
    standin: &Path,
    name: &str,
    mem: &Path,
    extra: &[&str],
) -> Vec<String> {
    let url = format!("s3://{BUCKET}/fleet/{name}");
    let socket = s.dir.path(&format!("{name}.sock"));
    let log = s.dir.path(&format!("{name}.log"));
    let _server = Reaped(
        uffd(&s.proxy.endpoint())
            .args(["serve", "--source", &url])
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let sock = socket.clone();
    wait_for("the server listening", Duration::from_secs(30), || {
        sock.exists()
    });
    s.proxy.clear();
    let mut v = vm(standin, &socket, mem, &["--threads", "2"]);
    let status = wait_exit(&mut v.0, "a VM restoring", Duration::from_secs(120));
    let r = report(&mut v);
    assert!(
        status.success(),
        "{name}: {status:?} {r} server log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(r["mismatched_pages"], 0, "{name}: {r}");
    assert_eq!(r["verified_pages"], 2048, "{name}: {r}");
    chunk_gets(&s.proxy)
}

#[test]
fn a_push_against_a_parent_and_a_working_set_first_push_restore_every_byte_in_a_vm() {
    let s = setup("cli-parent");
    // 2% of the pages changed, scattered (every 50th page).
    let mut data = std::fs::read(&s.mem).unwrap();
    for page in (0..2048).step_by(50) {
        data[page * 4096 + 200] ^= 0xa5;
    }
    let changed = s.dir.path("vm-2.mem");
    std::fs::write(&changed, &data).unwrap();
    s.proxy.clear();
    let r = push_json(&s, &changed, "vm-2", &["--parent", &s.url]);
    // 41 pages changed (none of them one of the zero 4th pages), packed
    // into 3 chunks of 16; the other 1495 non-zero pages are the parent's.
    assert_eq!(r["new_pages"], 41, "{r}");
    assert_eq!(r["parent_pages"], 1536 - 41, "{r}");
    assert_eq!(r["uploaded_chunks"], 3, "{r}");
    let puts = s.proxy.seen().iter().filter(|x| x.method == "PUT").count();
    assert_eq!(puts, 3 + 2, "three chunks, the index, the manifest");
    let image = data.len() as u64;
    assert!(
        r["uploaded_bytes"].as_u64().unwrap() * 20 < image,
        "under 5% of the image uploaded: {r}"
    );
    assert!(
        chunk_gets(&s.proxy).is_empty(),
        "no chunk downloaded to push"
    );

    // The working set: 200 pages scattered over the image, recorded order.
    let pages: Vec<u64> = (0..200u64).map(|i| (i * 977) % 2048).collect();
    let ws = s.dir.path("vm.ws");
    uffd_pager::WorkingSet::new(4096, pages.iter().map(|p| p * 4096).collect())
        .with_source_len(image)
        .save(&ws)
        .unwrap();
    let w = push_json(
        &s,
        &s.mem,
        "vm-ws",
        &["--working-set", ws.to_str().unwrap()],
    );
    // Every 4th page is zero: 150 of the 200 are stored, first.
    assert_eq!(w["working_set_pages"], 150, "{w}");

    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let once = |mut gets: Vec<String>| {
        let all = gets.len();
        gets.sort();
        gets.dedup();
        assert_eq!(gets.len(), all, "each chunk fetched once");
    };
    once(restore_checked(&s, &standin, "vm-2", &changed, &[]));
    let ws_arg = ws.to_str().unwrap().to_string();
    once(restore_checked(
        &s,
        &standin,
        "vm-ws",
        &s.mem,
        &["--prefetch", &ws_arg, "--background-fill"],
    ));
}
