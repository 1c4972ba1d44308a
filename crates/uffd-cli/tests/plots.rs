//! `--plot FILE.svg` writes a well-formed SVG that shows what was
//! measured: the panels' titles, one legend entry per case, and one mark
//! per measured round.

use std::path::Path;
use std::process::Command;

use uffd_testkit::Scratch;

/// Runs `uffd args`, which must succeed; returns what it printed.
fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(args)
        .output()
        .expect("running uffd");
    assert!(
        out.status.success(),
        "uffd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("uffd prints UTF-8")
}

/// The SVG's texts (titles, axis labels, legend entries) and how many
/// elements of each kind it has.
fn parse(path: &Path) -> (Vec<String>, std::collections::HashMap<String, usize>) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the plot is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let mut texts = Vec::new();
    let mut kinds = std::collections::HashMap::new();
    for node in doc.descendants().filter(|n| n.is_element()) {
        *kinds.entry(node.tag_name().name().to_string()).or_insert(0) += 1;
        if node.tag_name().name() == "text" {
            texts.push(node.text().unwrap_or("").trim().to_string());
        }
    }
    (texts, kinds)
}

fn has(texts: &[String], wanted: &str) -> bool {
    texts.iter().any(|t| t.contains(wanted))
}

#[test]
fn demo_plot_shows_every_strategy_and_its_timeline() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let dir = Scratch::new("plot-demo");
    let svg = dir.path("demo.svg");
    let report = run(&[
        "demo",
        "--mib",
        "8",
        "--strategy",
        "copy-4k,fill",
        "--dir",
        dir.dir().to_str().unwrap(),
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (texts, kinds) = parse(&svg);
    assert!(has(&texts, "time of one sampled touch"), "{texts:?}");
    assert!(
        has(&texts, "pages installed during each restore"),
        "{texts:?}"
    );
    for label in [
        "copy-4k",
        "fill",
        "kernel (warm page cache)",
        "copy-4k: on demand",
    ] {
        assert!(has(&texts, label), "no legend entry {label:?} in {texts:?}");
    }
    // The background fill's line is there exactly when it installed
    // pages: on a busy machine the faults and readahead can install every
    // page of 8 MiB before the niced fill thread runs.
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let fill = report["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["strategy"] == "fill")
        .expect("the fill strategy ran");
    let filled = fill["stats"]["background_pages"].as_u64().unwrap();
    assert_eq!(
        has(&texts, "fill: replay or fill"),
        filled > 0,
        "{filled} pages filled in the background; legend {texts:?}"
    );
    // Three distributions and three timeline lines, plus legend marks.
    assert!(
        kinds.get("polyline").copied().unwrap_or(0) >= 6,
        "{kinds:?}"
    );
}

#[test]
fn serve_bench_plot_has_a_mark_per_round() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let dir = Scratch::new("plot-serve");
    let svg = dir.path("serve.svg");
    run(&[
        "serve",
        "bench",
        "--mib",
        "8",
        "--rounds",
        "2",
        "--vcpus",
        "1,2",
        "--dir",
        dir.path("work").to_str().unwrap(),
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (texts, kinds) = parse(&svg);
    assert!(has(&texts, "restore-to-done"), "{texts:?}");
    for label in [
        "--prefetch",
        "on demand",
        "Firecracker-example-style handler",
    ] {
        assert!(has(&texts, label), "no legend entry {label:?} in {texts:?}");
    }
    // 3 cases x 2 vCPU counts x 2 rounds.
    assert_eq!(kinds.get("circle").copied().unwrap_or(0), 12, "{kinds:?}");
}

#[test]
fn bench_plot_has_a_panel_per_order() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let dir = Scratch::new("plot-bench");
    let svg = dir.path("bench.svg");
    run(&[
        "bench",
        "--mib",
        "8",
        "--rounds",
        "1",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (texts, _) = parse(&svg);
    assert!(has(&texts, "sequential order"), "{texts:?}");
    assert!(has(&texts, "random order"), "{texts:?}");
    assert!(
        has(&texts, "kernel-random") && has(&texts, "typical-random"),
        "{texts:?}"
    );
}
