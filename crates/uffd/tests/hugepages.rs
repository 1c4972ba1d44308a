//! Growing a hugetlb pool and giving it back, against the running kernel.
//! Skips with the reason where the pool cannot be grown (not root, no such
//! page size, not enough contiguous memory).

use uffd::{free_hugepages_of, nr_hugepages_of, HugepageReservation, SettingLock};

/// 1 GiB pages: no other test in the workspace keeps that pool for long,
/// and a pool of them is empty unless someone asked for one.
const GIB: usize = 1 << 30;

#[test]
fn a_reservation_grows_the_pool_and_restores_it_on_drop() {
    let wanted = free_hugepages_of(GIB) + 1;
    let reservation = match HugepageReservation::reserve_sized(GIB, wanted) {
        Ok(r) => r,
        Err(e) => {
            uffd_testkit::skip(
                uffd_testkit::Need::Hugetlb1G,
                format_args!("cannot grow the 1 GiB pool: {e}"),
            );
            return;
        }
    };
    assert!(free_hugepages_of(GIB) >= wanted);
    assert_eq!(reservation.page_size(), GIB);
    let before = reservation
        .grown_from()
        .expect("one more page than was free needs the pool to grow");
    drop(reservation);
    // Under the pool's lock, so that no other process is between growing
    // and restoring it while we look.
    let _lock = SettingLock::acquire("hugepages-1048576kB").unwrap();
    assert_eq!(
        nr_hugepages_of(GIB),
        before,
        "the pool was not set back after the reservation was dropped"
    );
}

/// Set in the child of the test below: it grows the pool, says so and
/// waits to be killed.
const DYING_HOLDER: &str = "UFFD_TEST_DYING_HOLDER";

#[test]
fn a_pool_a_killed_holder_grew_is_set_back_by_the_next_reservation() {
    use std::io::BufRead;
    const MIB2: usize = 2 << 20;
    if std::env::var_os(DYING_HOLDER).is_some() {
        let held = HugepageReservation::reserve(free_hugepages_of(MIB2) + 2);
        match &held {
            Ok(r) => println!("grown from {:?}", r.grown_from()),
            Err(e) => println!("cannot: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(held);
        return;
    }
    let before = {
        let _lock = SettingLock::acquire("hugepages").unwrap();
        nr_hugepages_of(MIB2)
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_pool_a_killed_holder_grew_is_set_back_by_the_next_reservation",
            "--nocapture",
        ])
        .env(DYING_HOLDER, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    while !said.starts_with("grown") && !said.starts_with("cannot") {
        said.clear();
        if out.read_line(&mut said).unwrap() == 0 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    if !said.starts_with("grown") {
        uffd_testkit::skip(
            uffd_testkit::Need::Hugetlb,
            format_args!("the child could not grow the 2 MiB pool: {said}"),
        );
        return;
    }
    // Killed before its drop: the pool stays grown, its old size written
    // down.
    let journal = std::path::Path::new("/tmp/uffd-hugepages.restore");
    {
        let _lock = SettingLock::acquire("hugepages").unwrap();
        assert!(
            nr_hugepages_of(MIB2) > before,
            "the child's pool was given back"
        );
        assert!(journal.exists(), "the child wrote no journal");
    }
    drop(HugepageReservation::reserve(0).unwrap());
    let _lock = SettingLock::acquire("hugepages").unwrap();
    assert_eq!(nr_hugepages_of(MIB2), before, "the pool was not set back");
    assert!(!journal.exists(), "the journal outlived its repair");
}
