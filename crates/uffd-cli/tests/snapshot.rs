//! `uffd snapshot`: the live demo's verdicts, `merge`, and a restore of a
//! base plus layers by `uffd serve --layer` into a stand-in VMM in another
//! process, which checks every byte against the merged file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uffd_snapshot::delta::encode;
use uffd_testkit::{skip, Need, Scratch};

fn uffd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_uffd"))
}

/// The stand-in VMM of the uffd-serve package (the testkit builds it).
fn standin_vmm() -> PathBuf {
    uffd_testkit::standin_vmm(
        env!("CARGO"),
        Path::new(env!("CARGO_BIN_EXE_uffd")),
        env!("CARGO_MANIFEST_DIR"),
    )
}

use uffd_testkit::Reaped;

#[test]
fn live_demo_json_reports_consistent_images_on_every_memory_type() {
    for mem in ["anon", "shmem", "hugetlb"] {
        let out = uffd()
            .args([
                "snapshot",
                "live-demo",
                "--mib",
                "8",
                "--threads",
                "3",
                "--rounds",
                "2",
            ])
            .args(["--round-ms", "30", "--json", "--mem", mem])
            .output()
            .expect("run uffd");
        if out.status.code() == Some(2) {
            let why = String::from_utf8_lossy(&out.stderr).to_string();
            let need = if why.contains("huge pages") {
                Need::Hugetlb
            } else {
                Need::KernelFaults
            };
            skip(need, format_args!("{mem}: {why}"));
            continue;
        }
        assert!(
            out.status.success(),
            "{mem}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(v["consistent"], true, "{mem}: {v}");
        assert_eq!(v["layers_consistent"], true, "{mem}: {v}");
        assert_eq!(v["merged_consistent"], true, "{mem}: {v}");
        assert_eq!(v["rounds"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["tracked"]["consistent"], true, "{mem}: {v}");
        for key in [
            "protect_ms",
            "snapshot_ms",
            "longest_stall_ms",
            "writer_ops_per_s",
            "pagemap_scan_ms",
            "first_write_us",
        ] {
            assert!(v[key].is_number(), "{key} in {v}");
        }
        // Linux's /proc/stat has had the steal column since 2.6.11.
        for steal in [
            &v["host_steal_ms"],
            &v["tracked"]["host_steal_ms"],
            &v["stop_the_world"]["host_steal_ms"],
        ] {
            assert!(
                steal.as_f64().is_some_and(|s| s >= 0.0),
                "host_steal_ms in {v}"
            );
        }
    }
}

/// Base: the testkit's pattern file. d1 overrides pages 1-2 with data and
/// 5 with zero; d2 overrides page 2 again and zeroes page 9.
fn layers(dir: &Scratch, pages: u64) -> (PathBuf, Vec<PathBuf>, Vec<u8>) {
    let base = dir.path("base.mem");
    uffd_testkit::snapshot_file(&base, pages * 4096);
    let mut expected = std::fs::read(&base).unwrap();
    let page = |b: u8| vec![b; 4096];
    let d1 = encode(
        4096,
        pages * 4096,
        &[
            (4096, Some(page(0x11))),
            (2 * 4096, Some(page(0x12))),
            (5 * 4096, None),
        ],
    );
    let d2 = encode(
        4096,
        pages * 4096,
        &[(2 * 4096, Some(page(0x22))), (9 * 4096, None)],
    );
    for (p, b) in [(1usize, 0x11u8), (2, 0x22), (5, 0), (9, 0)] {
        expected[p * 4096..(p + 1) * 4096].fill(b);
    }
    let (p1, p2) = (dir.path("d1"), dir.path("d2"));
    std::fs::write(&p1, d1).unwrap();
    std::fs::write(&p2, d2).unwrap();
    (base, vec![p1, p2], expected)
}

#[test]
fn merge_writes_base_with_layers_applied_in_order() {
    let dir = Scratch::new("merge");
    let (base, layers, expected) = layers(&dir, 64);
    let out = dir.path("merged.mem");
    let run = uffd()
        .args(["snapshot", "merge", "--base"])
        .arg(&base)
        .arg("--layer")
        .arg(&layers[0])
        .arg("--layer")
        .arg(&layers[1])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "merged file differs from base + d1 + d2"
    );
}

#[test]
fn merge_refuses_a_damaged_delta_and_writes_nothing() {
    let dir = Scratch::new("merge-bad");
    let (base, layers, _) = layers(&dir, 64);
    let mut bytes = std::fs::read(&layers[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // in d2's data
    std::fs::write(&layers[1], bytes).unwrap();
    let out = dir.path("merged.mem");
    let run = uffd()
        .args(["snapshot", "merge", "--base"])
        .arg(&base)
        .arg("--layer")
        .arg(&layers[0])
        .arg("--layer")
        .arg(&layers[1])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("checksum") && err.contains("d2"), "{err}");
    assert!(!out.exists());
}

#[test]
fn serve_restores_base_plus_layers_into_a_vmm_in_another_process() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let standin = standin_vmm();
    let dir = Scratch::new("serve-layers");
    let pages = 2048; // 8 MiB
    let (base, layers, expected) = layers(&dir, pages);
    let merged = dir.path("merged.mem");
    std::fs::write(&merged, &expected).unwrap();
    let socket = dir.path("sock");
    let log = dir.path("server.log");
    let _server = Reaped(
        uffd()
            .arg("serve")
            .arg("--mem-file")
            .arg(&base)
            .arg("--layer")
            .arg(&layers[0])
            .arg("--layer")
            .arg(&layers[1])
            .arg("--socket")
            .arg(&socket)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the server did not listen: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VMM checks every page it sees against the merged file.
    let mut vm = Reaped(
        uffd_testkit::standin_command(&standin, &socket, &merged)
            .args(["--threads", "2", "--regions", "2"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "stuck: the VMM did not finish within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut report = String::new();
    std::io::Read::read_to_string(&mut vm.0.stdout.take().unwrap(), &mut report).unwrap();
    assert!(
        status.success(),
        "the VMM saw memory other than base + layers ({status}): {report}\nserver: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn serve_refuses_a_layer_of_another_image() {
    let dir = Scratch::new("serve-bad-layer");
    let base = dir.path("base.mem");
    uffd_testkit::snapshot_file(&base, 16 * 4096);
    let d = dir.path("d");
    std::fs::write(&d, encode(4096, 32 * 4096, &[(0, None)])).unwrap();
    let run = uffd()
        .arg("serve")
        .arg("--mem-file")
        .arg(&base)
        .arg("--layer")
        .arg(&d)
        .arg("--socket")
        .arg(dir.path("sock"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("--layer") && err.contains("another snapshot"),
        "{err}"
    );
}
