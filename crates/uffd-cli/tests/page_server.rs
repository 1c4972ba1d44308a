//! Post-copy across a network: a VMM in another process restores through
//! `uffd serve --source tcp://...` from `uffd page-server`, every byte
//! verified; the page server restarted mid-restore (nothing lost), gone
//! for good (SIGBUS on what never arrived, no hang, the server lives on),
//! and a link that corrupts and cuts frames (caught, asked again); a
//! stderr nobody reads (full or closed) never stops the page server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uffd_remote::protocol::{Header, HEADER};
use uffd_testkit::Scratch;

const LEN: u64 = 16 << 20;

fn standin_vmm() -> PathBuf {
    uffd_testkit::standin_vmm(
        env!("CARGO"),
        Path::new(env!("CARGO_BIN_EXE_uffd")),
        env!("CARGO_MANIFEST_DIR"),
    )
}

use uffd_testkit::Reaped;

/// Starts `uffd page-server` on `listen` and returns it with its address.
fn page_server(mem: &Path, listen: &str, push: bool) -> (Reaped, String) {
    page_server_with(mem, listen, if push { &["--push"] } else { &[] })
}

fn page_server_with(mem: &Path, listen: &str, flags: &[&str]) -> (Reaped, String) {
    let (read_end, write_end) = rustix::pipe::pipe().expect("a pipe");
    let (server, addr, mut err) = page_server_logging_to(mem, listen, flags, write_end, read_end);
    // Keep draining its log so that a full pipe never costs it a line.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (server, addr)
}

/// Starts `uffd page-server` with its stderr into the pipe `write_end`
/// (whose read end is `read_end`); returns it, its address (read from its
/// first line) and the rest of its log.
fn page_server_logging_to(
    mem: &Path,
    listen: &str,
    flags: &[&str],
    write_end: OwnedFd,
    read_end: OwnedFd,
) -> (Reaped, String, BufReader<std::fs::File>) {
    let child = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["page-server", "--mem-file"])
        .arg(mem)
        .args(["--listen", listen])
        .args(flags)
        .stderr(Stdio::from(write_end))
        .spawn()
        .expect("starting uffd page-server");
    let child = Reaped(child);
    let mut err = BufReader::new(std::fs::File::from(read_end));
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = uffd_bench::remote::serving_address(&line)
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr, err)
}

fn serve(source: &str, socket: &Path, extra: &[&str]) -> Reaped {
    let child = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["serve", "--source", source, "--socket"])
        .arg(socket)
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .expect("starting uffd serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "uffd serve never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    Reaped(child)
}

fn vmm(socket: &Path, mem: &Path, extra: &[&str]) -> Child {
    uffd_testkit::standin_command(&standin_vmm(), socket, mem)
        .args(["--size", &LEN.to_string(), "--threads", "4"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the stand-in VMM")
}

/// Waits for the VMM; fails past `limit` (never leaves it blocked).
fn finish(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return (status, out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the VMM did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn snapshot(dir: &Scratch) -> PathBuf {
    let mem = dir.path("mem");
    uffd_testkit::snapshot_file(&mem, LEN);
    mem
}

fn verified(out: &str) -> bool {
    out.contains("\"mismatched_pages\":0")
        && out.contains(&format!("\"verified_pages\":{}", LEN / 4096))
}

#[test]
fn restores_over_tcp_with_and_without_push() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    for push in [false, true] {
        let dir = Scratch::new("pg-restore");
        let mem = snapshot(&dir);
        let (_ps, addr) = page_server(&mem, "127.0.0.1:0", push);
        let socket = dir.path("sock");
        let _server = serve(&format!("tcp://{addr}"), &socket, &[]);
        let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
        assert!(
            status.success() && verified(&out),
            "push {push}: {status:?} {out}"
        );
    }
}

/// The destination holds the image once, in the VM: `uffd serve` gives
/// back each page's memory once the VM has it, and holds a copy of its
/// own only with --keep-landed.
#[test]
fn the_destination_gives_back_the_pages_a_vm_holds_unless_told_to_keep_them() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("pg-release");
    let mem = snapshot(&dir);
    let (_ps, addr) = page_server(&mem, "127.0.0.1:0", true);
    let mut held = Vec::new();
    for flags in [&["--keep-landed"][..], &[]] {
        let socket = dir.path("sock");
        let _ = std::fs::remove_file(&socket);
        let server = serve(&format!("tcp://{addr}"), &socket, flags);
        let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
        assert!(
            status.success() && verified(&out),
            "{flags:?}: {status:?} {out}"
        );
        // Releases follow the installs within a fraction of a second.
        let deadline = Instant::now() + Duration::from_secs(5);
        let kib = loop {
            let kib = uffd_testkit::rss_anon_kib(server.0.id());
            let kept = held.first().copied();
            if kept.is_none_or(|k: u64| kib + LEN / 1024 * 3 / 4 < k) || Instant::now() > deadline {
                break kib;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        held.push(kib);
    }
    let (kept, released) = (held[0], held[1]);
    assert!(
        kept >= LEN / 1024,
        "with --keep-landed uffd serve holds the image: {kept} KiB"
    );
    assert!(
        released + LEN / 1024 * 3 / 4 < kept,
        "released {released} KiB against {kept} KiB kept, for a {} KiB image",
        LEN / 1024
    );
}

#[test]
fn keep_landed_is_refused_for_a_source_that_lands_nothing() {
    let dir = Scratch::new("pg-keep-file");
    let mem = snapshot(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["serve", "--keep-landed", "--socket"])
        .arg(dir.path("sock"))
        .arg("--mem-file")
        .arg(&mem)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--keep-landed is for a tcp:// source"),
        "{err}"
    );
}

#[test]
fn a_page_server_restarted_mid_restore_loses_nothing() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("pg-restart");
    let mem = snapshot(&dir);
    let (ps, addr) = page_server(&mem, "127.0.0.1:0", false);
    let socket = dir.path("sock");
    let _server = serve(&format!("tcp://{addr}"), &socket, &[]);
    // 4096 pages at 200 µs apart on 4 threads: about 0.2 s of faults.
    let guest = vmm(&socket, &mem, &["--pace-us", "200"]);
    std::thread::sleep(Duration::from_millis(60));
    drop(ps); // SIGKILL: connections cut mid-restore
    std::thread::sleep(Duration::from_millis(300));
    let (_ps, again) = page_server(&mem, &addr, false);
    assert_eq!(again, addr);
    let (status, out) = finish(guest, Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
}

#[test]
fn a_page_server_gone_for_good_poisons_what_never_arrived() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("pg-gone");
    let mem = snapshot(&dir);
    let (ps, addr) = page_server(&mem, "127.0.0.1:0", false);
    let socket = dir.path("sock");
    let mut server = serve(
        &format!("tcp://{addr}"),
        &socket,
        &["--reconnect-timeout", "500ms"],
    );
    let guest = vmm(&socket, &mem, &["--pace-us", "500"]);
    std::thread::sleep(Duration::from_millis(50));
    drop(ps);
    let (status, out) = finish(guest, Duration::from_secs(30));
    assert_eq!(
        status.signal(),
        Some(libc_sigbus()),
        "the VMM should die of SIGBUS on a page that never arrived, not {status:?} {out}"
    );
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "uffd serve must outlive its page server"
    );
}

fn libc_sigbus() -> i32 {
    7
}

/// A link that corrupts one data frame in seven (a flipped byte in its
/// bytes) and cuts the connection in the middle of a frame once.
fn corrupting_proxy(upstream: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut cut_once = true;
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                return;
            };
            let (mut c2s_from, mut c2s_to) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c2s_from, &mut c2s_to));
            let cut = std::mem::take(&mut cut_once);
            std::thread::spawn(move || relay_corrupting(server, client, cut));
        }
    });
    addr
}

fn relay_corrupting(mut from: TcpStream, mut to: TcpStream, cut: bool) {
    let mut frames = 0u64;
    loop {
        let mut h = [0u8; HEADER];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let Ok(header) = Header::decode(&h) else {
            break;
        };
        let mut payload = vec![0u8; header.payload as usize];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        frames += 1;
        let is_data_with_bytes = h[6] == 4 && payload.len() > 16;
        if is_data_with_bytes && frames.is_multiple_of(7) {
            let i = 16 + (frames as usize * 31) % (payload.len() - 16);
            payload[i] ^= 0x5a;
        }
        if cut && frames == 40 {
            let _ = to.write_all(&h);
            let _ = to.write_all(&payload[..payload.len() / 2]);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
            return;
        }
        if to.write_all(&h).is_err() || to.write_all(&payload).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn compressed_frames_restore_every_byte() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("pg-lz4");
    let mem = snapshot(&dir);
    // The test pattern shrinks under LZ4, so frames really are compressed.
    let mut page = vec![0u8; 4096];
    uffd_testkit::page_pattern(1, &mut page);
    assert!(uffd_remote::protocol::compressed_data(1, 4096, 4096, &page).is_some());
    let (_ps, addr) = page_server_with(&mem, "127.0.0.1:0", &["--push", "--compress"]);
    let socket = dir.path("sock");
    let _server = serve(&format!("tcp://{addr}"), &socket, &[]);
    let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
}

#[test]
fn corrupted_and_cut_frames_are_caught_and_asked_again() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    for flags in [&["--push"][..], &["--push", "--compress"][..]] {
        corrupted_and_cut(flags);
    }
}

fn corrupted_and_cut(flags: &[&str]) {
    let dir = Scratch::new("pg-corrupt");
    let mem = snapshot(&dir);
    let (_ps, addr) = page_server_with(&mem, "127.0.0.1:0", flags);
    let proxy = corrupting_proxy(addr);
    let socket = dir.path("sock");
    let _server = serve(&format!("tcp://{proxy}"), &socket, &[]);
    let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
}

/// The bench restores a VM too (`uffd serve` and the stand-in VMM): false,
/// having said why, when this process may not serve one; otherwise the
/// stand-in is built, beside the `uffd` binary the bench looks beside.
fn bench_can_restore_a_vm() -> bool {
    if !uffd_testkit::vmm_uffd() {
        return false;
    }
    standin_vmm();
    true
}

#[test]
fn the_bench_reports_every_figure_it_promises() {
    if !bench_can_restore_a_vm() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args([
            "page-server",
            "bench",
            "--mib",
            "8",
            "--samples",
            "10",
            "--delays-ms",
            "0,1",
            "--rounds",
            "2",
            "--hiccup-ms",
            "200",
            "--json",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let case = &report["cases"][0];
    for key in [
        "delay_ms",
        "demand_p50_us",
        "demand_p99_idle_us",
        "demand_p99_push_us",
        "naive_p99_push_us",
        "bulk_mb_s",
        "raw_tcp_mb_s",
        "raw_tcp_to_memory_mb_s",
        "link_rtt_p50_us",
        "reads_under_push",
        "naive_reads_under_push",
        "vm_fault_p50_us",
        "vm_fault_p99_us",
        "vm_server_switches_per_fault",
    ] {
        assert!(
            case[key].as_f64().is_some_and(|v| v >= 0.0),
            "{key} in {case}"
        );
    }
    // Whole counts of at most --samples; a push of 8 MiB is over in a few
    // milliseconds, so one round may time none, but not all four.
    let mut timed = 0.0;
    for r in report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["rounds"].as_array().unwrap())
    {
        // The VM's faults crossed the link: none beats its round trip,
        // and each woke the server at least once.
        let (p50, p99) = (
            r["vm_fault_p50_us"].as_f64().unwrap(),
            r["vm_fault_p99_us"].as_f64().unwrap(),
        );
        assert!(p50 > r["added_rtt_us"].as_f64().unwrap(), "{r}");
        assert!(p50 <= p99, "{r}");
        assert!(
            r["vm_server_switches_per_fault"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        let reads = r["reads_under_push"].as_f64().unwrap();
        assert!(reads <= 10.0 && reads.fract() == 0.0, "{r}");
        timed += reads;
    }
    assert!(timed >= 1.0, "no read was timed under any push");
    assert!(case["bulk_mb_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["rounds"], 2);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "one case per delay");
    for (case, delay) in cases.iter().zip([0, 1]) {
        assert_eq!(case["delay_ms"], delay);
        let rounds = case["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{case}");
        assert!(rounds.iter().all(|r| r["delay_ms"] == delay));
        // The ratios are the rounds' own, so they lie between the rounds'.
        let ratio = |r: &serde_json::Value| {
            r["demand_p99_push_us"].as_f64().unwrap() / r["demand_p99_idle_us"].as_f64().unwrap()
        };
        let (lo, hi) = (
            ratio(&rounds[0]).min(ratio(&rounds[1])),
            ratio(&rounds[0]).max(ratio(&rounds[1])),
        );
        let s = &case["p99_push_over_idle"];
        assert!(
            (s["min"].as_f64().unwrap() - lo).abs() < 1e-9,
            "{s} vs {lo}"
        );
        assert!(
            (s["max"].as_f64().unwrap() - hi).abs() < 1e-9,
            "{s} vs {hi}"
        );
        for key in [
            "bulk_over_raw_to_memory",
            "bulk_over_raw",
            "p50_over_link_rtt_us",
            "vm_p50_over_link_rtt_us",
        ] {
            let s = &case[key];
            assert!(
                s["min"].as_f64().unwrap() <= s["median"].as_f64().unwrap(),
                "{key}: {s}"
            );
            assert!(
                s["median"].as_f64().unwrap() <= s["max"].as_f64().unwrap(),
                "{key}: {s}"
            );
        }
    }
    assert!(report["loadavg_before"]["one"].as_f64().is_some());
    assert!(report["link_mb_s"].is_null(), "unlimited unless asked");
    let first = report["first_page"].as_array().unwrap();
    assert_eq!(first.len(), 2);
    for f in first {
        for key in ["first_page_ms", "vm_first_page_ms"] {
            assert!(f[key].as_f64().is_some_and(|ms| ms > 0.0), "{key}: {f}");
        }
    }
    let h = &report["hiccups"];
    assert_eq!(h["seconds"].as_f64(), Some(0.2), "{h}");
    assert!(h["cpus"].as_u64().is_some_and(|c| c >= 1), "{h}");
    assert!(h["over_1ms"].as_u64().unwrap() <= h["over_100us"].as_u64().unwrap());
}

/// Processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| {
            let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

#[test]
fn an_interrupted_bench_stops_what_it_started_and_removes_its_files() {
    if !bench_can_restore_a_vm() {
        return;
    }
    let dir = Scratch::new("interrupted-bench");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(["page-server", "bench", "--mib", "8", "--samples", "50"])
        .args(["--delays-ms", "0,5", "--rounds", "50", "--hiccup-ms", "0"])
        .arg("--dir")
        .arg(dir.dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(bench.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("under push") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the bench ended early"
        );
    }
    // Its page server is up (or about to be: one phase's ends before the
    // next one's starts), and its image on disk.
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_naming(dir.dir()).is_empty() {
        assert!(Instant::now() < deadline, "no page server came up");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(std::fs::read_dir(dir.dir()).unwrap().count() > 0);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&bench),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let status = bench.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{rest}");
    // How many it stopped depends on the moment: between two phases, one
    // server may be gone and the next not started.
    assert!(rest.contains("interrupted; stopped "), "{rest}");
    let left: Vec<_> = std::fs::read_dir(dir.dir()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // SIGKILLed, they are gone within moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_naming(dir.dir()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes_naming(dir.dir()), Vec::<String>::new());
}

#[test]
fn the_bench_splits_the_cpus_between_the_two_sides_when_asked() {
    if !bench_can_restore_a_vm() {
        return;
    }
    let run = |cpus: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
            .args(["page-server", "bench", "--mib", "8", "--samples", "10"])
            .args([
                "--delays-ms",
                "0",
                "--rounds",
                "1",
                "--json",
                "--cpus",
                cpus,
                "--hiccup-ms",
                "0",
            ])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (out.status.success(), out)
    };
    let (ok, out) = run("split");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!ok && err.contains("two CPUs"), "{err}");
        return;
    }
    assert!(ok, "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cpus"], "split");
    assert!(report["hiccups"].is_null(), "--hiccup-ms 0 watches nothing");
    assert!(report["cases"][0]["bulk_mb_s"].as_f64().unwrap() > 0.0);
    let (ok, out) = run("shared");
    assert!(ok);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cpus"], "shared");
    let (ok, out) = run("both");
    assert!(!ok, "an unknown --cpus is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shared, split"));
}

#[test]
fn the_bench_holds_its_link_to_the_rate_asked_for() {
    if !bench_can_restore_a_vm() {
        return;
    }
    let run = |rate: &str| {
        Command::new(env!("CARGO_BIN_EXE_uffd"))
            .args(["page-server", "bench", "--mib", "8", "--samples", "10"])
            .args(["--delays-ms", "0", "--rounds", "1", "--hiccup-ms", "0"])
            .args(["--json", "--link-mb-s", rate])
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let out = run("40");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["link_mb_s"], 40);
    let case = &report["cases"][0];
    // The raw copy sends every byte through the link; the push sends the
    // image's zero pages (a tenth) as ranges without bytes.
    let raw = case["raw_tcp_mb_s"].as_f64().unwrap();
    let raw_to_memory = case["raw_tcp_to_memory_mb_s"].as_f64().unwrap();
    let push = case["bulk_mb_s"].as_f64().unwrap();
    assert!(
        raw > 0.0 && raw <= 40.0,
        "raw copy at {raw} MB/s over a 40 MB/s link"
    );
    assert!(raw_to_memory <= 40.0, "{raw_to_memory}");
    assert!(
        push > 0.0 && push <= 40.0 / 0.89,
        "push at {push} MB/s over a 40 MB/s link"
    );
    let out = run("0");
    assert!(
        !out.status.success(),
        "a link that carries nothing is refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--link-mb-s"));
}

/// Two network namespaces joined by a veth pair, with `tbf` limiting the
/// source side's bandwidth; removed when dropped.
struct Hosts {
    source: String,
    dest: String,
}

impl Hosts {
    fn new(tag: &str, rate: &str) -> Option<Hosts> {
        if !uffd_testkit::root("create network namespaces") {
            return None;
        }
        let id = std::process::id() % 10_000;
        let hosts = Hosts {
            source: format!("uffd-{tag}-src-{id}"),
            dest: format!("uffd-{tag}-dst-{id}"),
        };
        let (va, vb) = (format!("us{id}"), format!("ud{id}"));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output();
            match out {
                Ok(o) if o.status.success() => true,
                Ok(o) => panic!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => panic!("running ip: {e}"),
            }
        };
        if Command::new("ip").arg("-V").output().is_err() {
            uffd_testkit::skip(uffd_testkit::Need::Tool, "needs iproute2's ip");
            return None;
        }
        ip(&["netns", "add", &hosts.source]);
        ip(&["netns", "add", &hosts.dest]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &hosts.source]);
        ip(&["link", "set", &vb, "netns", &hosts.dest]);
        for (ns, dev, addr) in [
            (&hosts.source, &va, "10.77.0.1/24"),
            (&hosts.dest, &vb, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let tc = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.source,
                "tc",
                "qdisc",
                "add",
                "dev",
                &va,
                "root",
                "tbf",
            ])
            .args(["rate", rate, "burst", "256kb", "latency", "50ms"])
            .output()
            .expect("running tc");
        assert!(
            tc.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&tc.stderr)
        );
        Some(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair and so both.
        for ns in [&self.source, &self.dest] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn restores_between_two_network_namespaces_over_a_limited_link() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let Some(hosts) = Hosts::new("veth", "200mbit") else {
        return;
    };
    let dir = Scratch::new("pg-netns");
    let mem = snapshot(&dir);
    let uffd = env!("CARGO_BIN_EXE_uffd");
    let mut ps = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.source,
            uffd,
            "page-server",
            "--mem-file",
        ])
        .arg(&mem)
        .args(["--listen", "10.77.0.1:7100", "--push"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(ps.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("10.77.0.1:7100"), "{line}");
    // Keep draining its log so it never writes to a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let _ps = Reaped(ps);
    let socket = dir.path("sock");
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.dest,
            uffd,
            "serve",
            "--source",
            "tcp://10.77.0.1:7100",
            "--socket",
        ])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Reaped(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "uffd serve never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VMM talks to the server over a Unix socket: any namespace.
    let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
    drop(hosts);
}

#[test]
fn restores_over_a_link_with_5_ms_of_delay_each_way() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("pg-delay");
    let mem = snapshot(&dir);
    let (_ps, addr) = page_server(&mem, "127.0.0.1:0", true);
    let link = uffd_bench::remote::delay_link(addr, Duration::from_millis(5)).unwrap();
    let socket = dir.path("sock");
    let _server = serve(&format!("tcp://{link}"), &socket, &["--background-fill"]);
    let (status, out) = finish(vmm(&socket, &mem, &[]), Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
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

fn restores_through(addr: &str, mem: &Path, dir: &Scratch) {
    let socket = dir.path("sock");
    let _ = std::fs::remove_file(&socket);
    let _server = serve(&format!("tcp://{addr}"), &socket, &[]);
    let (status, out) = finish(vmm(&socket, mem, &[]), Duration::from_secs(60));
    assert!(status.success() && verified(&out), "{status:?} {out}");
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

/// A server's log must never stop it: with its stderr a pipe nobody reads
/// any more, `uffd page-server` still serves restores and stops on SIGTERM.
#[test]
fn a_full_stderr_pipe_does_not_stop_the_page_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("ps-full-log");
    let mem = snapshot(&dir);
    let (read_end, write_end) = rustix::pipe::pipe().expect("a pipe");
    let ours = write_end.try_clone().expect("dup of the write end");
    let (server, addr, _log) =
        page_server_logging_to(&mem, "127.0.0.1:0", &[], write_end, read_end);
    fill(ours);
    // Each destination's connections are logged: with a blocking log the
    // server's runtime would stop at the first of them.
    restores_through(&addr, &mem, &dir);
    restores_through(&addr, &mem, &dir);
    stops_on_sigterm(server);
}

/// The same with its stderr's reader gone.
#[test]
fn a_closed_stderr_does_not_stop_the_page_server() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("ps-closed-log");
    let mem = snapshot(&dir);
    let (read_end, write_end) = rustix::pipe::pipe().expect("a pipe");
    let (server, addr, log) = page_server_logging_to(&mem, "127.0.0.1:0", &[], write_end, read_end);
    drop(log);
    restores_through(&addr, &mem, &dir);
    // "stopping" goes to the closed pipe too.
    stops_on_sigterm(server);
}

/// Whoever stops the server as soon as it has said where it listens (a
/// supervisor, a script) gets the clean stop its help promises, not death
/// by the signal: the handlers are in before that line is written.
#[test]
fn a_sigterm_right_after_the_address_line_is_a_clean_stop() {
    let dir = Scratch::new("ps-early-sigterm");
    let mem = snapshot(&dir);
    for _ in 0..5 {
        let (server, _addr) = page_server(&mem, "127.0.0.1:0", false);
        stops_on_sigterm(server);
    }
}
