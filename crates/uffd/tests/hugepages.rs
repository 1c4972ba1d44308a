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
