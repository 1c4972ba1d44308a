//! `uffd compact demo`: its JSON, its exit status, its help.

use std::process::Command;

fn uffd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_uffd"))
}

#[test]
fn demo_json_reports_a_matching_checksum() {
    for mode in ["copy", "move", "minor", "stw"] {
        let out = uffd()
            .args([
                "compact",
                "demo",
                "--mib",
                "8",
                "--threads",
                "3",
                "--json",
                "--mode",
                mode,
            ])
            .output()
            .expect("run uffd");
        if out.status.code() == Some(2) {
            eprintln!("SKIP: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(v["mode"], mode);
        assert_eq!(v["checksum_ok"], true);
        for key in [
            "compaction_ms",
            "max_stall_us",
            "p99_stall_us",
            "mutator_ops_per_s",
        ] {
            assert!(v[key].is_number(), "{key} in {v}");
        }
    }
}

#[test]
fn help_explains_flags_output_and_exit_status() {
    let out = uffd()
        .args(["compact", "demo", "--help"])
        .output()
        .expect("run uffd");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--mib",
        "--mode",
        "--threads",
        "--json",
        "Exit status",
        "checksum",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    assert!(
        uffd()
            .args(["compact", "demo", "--mode", "nope"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(2)
    );
}
