//! One test per (case, memory type), each calling the same case function
//! as `uffd selftest`. A failure names the case, the memory type and the
//! seed, with the command that replays it; set `UFFD_SELFTEST_SEED` to
//! change the seed. Cases that cannot run here (no userfaultfd, a missing
//! kernel feature, no huge pages) print the reason and return, or fail
//! under `UFFD_REQUIRE=1` (see uffd-testkit).

use uffd::MemoryKind;
use uffd_selftest::{run_one, Status};

fn seed() -> u64 {
    std::env::var("UFFD_SELFTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn check(name: &str, kind: Option<MemoryKind>) {
    let report = run_one(name, kind, seed());
    match report.status {
        Status::Pass => eprintln!("{}", report.line()),
        // Under UFFD_REQUIRE=1 a skip fails, unless UFFD_ALLOW_SKIP names
        // what it lacked (this kernel may have no gup_test, for instance).
        Status::Skip => {
            let need = if report.line().contains("gup_test") {
                uffd_testkit::Need::GupTest
            } else {
                uffd_testkit::Need::Feature
            };
            uffd_testkit::skip(need, report.line())
        }
        Status::Fail => panic!("{} (seed {})", report.line(), seed()),
    }
}

macro_rules! kind {
    (any) => {
        None
    };
    (anon) => {
        Some(::uffd::MemoryKind::Anon)
    };
    (shmem) => {
        Some(::uffd::MemoryKind::Shmem)
    };
    (shmem_private) => {
        Some(::uffd::MemoryKind::ShmemPrivate)
    };
    (hugetlb) => {
        Some(::uffd::MemoryKind::Hugetlb)
    };
    (hugetlb_private) => {
        Some(::uffd::MemoryKind::HugetlbPrivate)
    };
}

macro_rules! cases {
    ($($module:ident = $name:literal: [$($kind:ident),*];)*) => {
        $(
            mod $module {
                $(
                    #[test]
                    fn $kind() {
                        super::check($name, kind!($kind));
                    }
                )*
            }
        )*

        /// Every (case, memory type) with a test above.
        const COVERED: &[(&str, Option<MemoryKind>)] = &[$($(($name, kind!($kind)),)*)*];
    };
}

cases! {
    api_syscall = "api-syscall": [any];
    api_dev = "api-dev": [any];
    register_ioctls = "register-ioctls": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    zeropage = "zeropage": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    move_pages = "move": [anon];
    move_pmd = "move-pmd": [anon];
    move_pmd_split = "move-pmd-split": [anon];
    wp_fork = "wp-fork": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wp_fork_with_event = "wp-fork-with-event": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wp_fork_pin = "wp-fork-pin": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wp_fork_pin_with_event = "wp-fork-pin-with-event": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wp_unpopulated = "wp-unpopulated": [anon];
    minor = "minor": [shmem, shmem_private, hugetlb];
    minor_wp = "minor-wp": [shmem, shmem_private, hugetlb];
    minor_collapse = "minor-collapse": [shmem];
    sigbus = "sigbus": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    sigbus_wp = "sigbus-wp": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    events = "events": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    events_wp = "events-wp": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    poison = "poison": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    mmap_changing = "mmap-changing": [shmem];
    wp_mremap = "wp-mremap": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wp_async = "wp-async": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
    wake_after_copy_failure = "wake-after-copy-failure": [anon, shmem, shmem_private];
    continue_eexist = "continue-eexist": [shmem, hugetlb];
    continue_fallocated = "continue-fallocated": [shmem];
    collapse_minor_contents = "collapse-minor-contents": [shmem];
    retry_after_events = "retry-after-events": [shmem];
    stress = "stress": [anon, shmem, shmem_private, hugetlb, hugetlb_private];
}

#[test]
fn every_case_and_memory_type_has_a_test() {
    let all = uffd_selftest::selected(&uffd_selftest::Plan::default());
    for (case, kind) in &all {
        assert!(
            COVERED.contains(&(case.name, *kind)),
            "{}/{:?} has no #[test] in tests/cases.rs",
            case.name,
            kind
        );
    }
    assert_eq!(
        all.len(),
        COVERED.len(),
        "tests/cases.rs lists cases that do not exist"
    );
}
