//! The runner's selection, report lines and summary, without running cases.

use uffd::MemoryKind;
use uffd_selftest::{reproduce, selected, CaseReport, Plan, Status, Summary};

#[test]
fn filter_and_memory_types_select_pairs_in_kernel_order() {
    let plan = Plan {
        filter: Some("minor".into()),
        kinds: vec![MemoryKind::Hugetlb, MemoryKind::Shmem],
        ..Plan::default()
    };
    let names: Vec<String> = selected(&plan)
        .iter()
        .map(|(c, k)| format!("{}/{}", c.name, k.map_or("any", MemoryKind::name)))
        .collect();
    assert_eq!(
        names,
        [
            "minor/shmem",
            "minor/hugetlb",
            "minor-wp/shmem",
            "minor-wp/hugetlb",
            "minor-collapse/shmem",
            "collapse-minor-contents/shmem"
        ]
    );
}

#[test]
fn stress_only_selects_the_stress_case() {
    let plan = Plan {
        stress_only: true,
        kinds: vec![MemoryKind::Anon],
        ..Plan::default()
    };
    let picked = selected(&plan);
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0].0.name, "stress");
}

#[test]
fn report_lines_and_summary() {
    let mut summary = Summary::default();
    for (status, reason) in [
        (Status::Pass, "ok"),
        (Status::Fail, "bad"),
        (Status::Skip, "no"),
    ] {
        let r = CaseReport {
            name: "zeropage".into(),
            mem: "anon".into(),
            status,
            reason: reason.into(),
            ms: 1,
        };
        summary.add(&r);
        assert_eq!(
            r.line(),
            format!("{} zeropage/anon ({reason})", status.as_str())
        );
    }
    assert_eq!(summary.line(), "1 passed, 1 failed, 1 skipped");
    assert_eq!(
        reproduce("minor", Some(MemoryKind::ShmemPrivate), 7),
        "uffd selftest --filter minor --mem shmem-private --seed 7"
    );
}
