//! Shutdown while threads are blocked on faults wakes every one of them.

mod common;

use std::sync::Arc;

use common::*;
use uffd::Features;
use uffd_pager::{PageSource, Pager, Region};

#[test]
fn shutdown_wakes_every_waiter() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, 1 << 20);
    let source = Arc::new(GatedSource::new(1 << 20, 0));
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::clone(&source) as Arc<dyn PageSource>)
            .threads(2)
            .start(uffd, vec![Region::new(memory.addr(), 1 << 20, 0, 4096)])
    }
    .unwrap();
    let readers: Vec<_> = (0..6)
        .map(|t| {
            let m = Arc::clone(&memory);
            std::thread::spawn(move || m.read_byte(t * 8 * 4096))
        })
        .collect();
    // Wait (bounded) until the pager has seen the faults.
    wait_for_missing_faults(&pager, 2);
    // Shut down from another thread's handle, with faults still pending;
    // the gate opens so the reads in progress can finish.
    let handle = pager.shutdown_handle();
    handle.request();
    assert!(handle.is_requested());
    source.open();
    bounded("shutdown with pending faults", move || pager.shutdown());
    let values = bounded("readers after shutdown", move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Served by the pager before it stopped, or by the kernel (zero) after
    // the userfaultfd closed: never stuck.
    for v in values {
        assert!(v == 0x5A || v == 0, "unexpected byte {v:#x}");
    }
}
