//! The compaction bench, tiny enough for CI: 16 MiB, one round, every mode.
//! Checks what the bench reports is complete and every checksum matched;
//! never the timings.

use uffd_bench::compact::{run, BenchConfig};
use uffd_compact::Mode;

#[test]
fn bench_smoke_every_mode_keeps_the_graph() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let mut cfg = BenchConfig::new(16, 1);
    cfg.warmup_ms = 20;
    cfg.mutators = 3;
    cfg.hiccup_ms = 100;
    let mut seen = 0;
    let result = run(&cfg, |_| seen += 1).expect("bench");
    assert_eq!(seen, Mode::ALL.len());
    for mode in Mode::ALL {
        let m = result
            .mode(mode)
            .unwrap_or_else(|| panic!("{mode} missing"));
        assert_eq!(m.runs.len(), 1);
        let c = &m.runs[0];
        assert!(
            c.checksum_ok,
            "{mode}: {} != {}",
            c.checksum_before, c.checksum_after
        );
        assert_eq!(
            c.live, result.modes[0].runs[0].live,
            "same heap in every mode"
        );
        let installed = c.copied + c.moved + c.continued + c.written;
        assert_eq!(installed, c.live.div_ceil(64), "{mode}: {c:?}");
    }
    let json = serde_json::to_value(&result).expect("serialise");
    for key in [
        "mode",
        "checksum_ok",
        "compaction_ms",
        "max_stall_us",
        "p99_stall_us",
        "mutator_ops_per_s",
    ] {
        assert!(
            json["modes"][0]["runs"][0].get(key).is_some(),
            "no {key} in {json}"
        );
    }
    assert!(result.move_over_copy.is_some());
    let h = result
        .hiccups
        .expect("the machine watched before the rounds");
    assert_eq!(h.seconds, 0.1);
    assert!(h.cpus >= 1 && h.over_1ms <= h.over_100us, "{h:?}");
    assert!(json["hiccups"]["longest_us"].as_f64().is_some(), "{json}");
}
