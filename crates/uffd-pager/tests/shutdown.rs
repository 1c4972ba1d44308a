//! Shutdown while threads are blocked on faults wakes every one of them.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uffd::Features;
use uffd_pager::{Content, PageSource, Pager, Region, SourceError};

/// A source that holds every read until it is released (or 10 s pass), so
/// faults stay pending while the test shuts the pager down.
#[derive(Debug, Default)]
struct GatedSource {
    open: AtomicBool,
}

impl PageSource for GatedSource {
    fn len(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        for _ in 0..10_000 {
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        buf.fill(0x5A);
        Ok(Content::Data)
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[test]
fn shutdown_wakes_every_waiter() {
    if !uffd_available() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, 1 << 20);
    let source = Arc::new(GatedSource::default());
    let pager = Pager::builder(Arc::clone(&source) as Arc<dyn PageSource>)
        .threads(2)
        .start(uffd, vec![Region::new(memory.addr(), 1 << 20, 0, 4096)])
        .unwrap();
    let readers: Vec<_> = (0..6)
        .map(|t| {
            let m = Arc::clone(&memory);
            std::thread::spawn(move || m.read_byte(t * 8 * 4096))
        })
        .collect();
    // Wait (bounded) until the pager has seen the faults.
    let mut seen = false;
    for _ in 0..10_000 {
        if pager.stats().faults_missing >= 2 {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        seen,
        "the readers' faults never reached the pager: {:?}",
        pager.stats()
    );
    // Shut down from another thread's handle, with faults still pending;
    // the gate opens so the reads in progress can finish.
    let handle = pager.shutdown_handle();
    handle.request();
    assert!(handle.is_requested());
    source.open.store(true, Ordering::SeqCst);
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
