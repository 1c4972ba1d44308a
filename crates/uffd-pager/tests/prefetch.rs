//! Prefetch policies: readahead, background fill, working-set record and replay.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use uffd::Features;
use uffd_pager::{Pager, Prefetch, Region, WorkingSet};

const LEN: usize = 8 << 20;

#[test]
fn sequential_readahead_needs_fewer_faults_than_pages() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, 61);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .granule(16 << 10)
            .prefetch(Prefetch::Readahead { max_bytes: 1 << 20 })
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert_same(&read_all(&memory, "sequential read"), &bytes, "readahead");
    let stats = pager.shutdown();
    assert!(stats.prefetched_pages > 0, "{stats:?}");
    // Each fault installs at least a 16 KiB granule; the window grows to 1 MiB.
    assert!(
        stats.faults_missing < (LEN / (16 << 10)) as u64,
        "{stats:?}"
    );
}

#[test]
fn background_fill_installs_everything() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, 67);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .background_fill(true)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert!(pager.wait_filled(LIMIT), "the fill did not finish");
    let progress = pager.progress();
    assert_eq!(progress.installed_pages, progress.total_pages);
    let before = pager.stats().faults_missing;
    assert_same(&read_all(&memory, "reading filled memory"), &bytes, "fill");
    let stats = pager.shutdown();
    // Everything was present already: reading faulted no more.
    assert_eq!(stats.faults_missing, before, "{stats:?}");
    assert_eq!(
        stats.prefetched_pages,
        (LEN / 4096) as u64 - before,
        "{stats:?}"
    );
}

#[test]
fn working_set_is_recorded_saved_and_replayed() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (source, bytes) = pattern_source(LEN, 71);
    let touched = [7usize, 3, 1000, 1001, 1002, 42];
    // Record.
    let recorded = {
        let uffd = open(Features::EVENT_REMOVE);
        let memory = anon_registered(&uffd, LEN);
        // SAFETY: the regions are a mapping this test touches only through raw
        // pointers; no Rust reference covers it.
        let pager = unsafe {
            Pager::builder(Arc::clone(&source))
                .record(true)
                .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
        }
        .unwrap();
        let m = Arc::clone(&memory);
        bounded("touching the working set", move || {
            for p in touched {
                m.read_byte(p * 4096);
            }
        });
        let ws = pager.working_set();
        pager.shutdown();
        ws
    };
    let want: Vec<u64> = touched.iter().map(|&p| (p * 4096) as u64).collect();
    assert_eq!(recorded.pages(), &want[..]);
    let path = std::env::temp_dir().join(format!("uffd-pager-ws-{}", std::process::id()));
    recorded.save(&path).unwrap();
    let loaded = WorkingSet::load(&path, LEN as u64).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded, recorded);
    // Replay into a restore at another address.
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .replay(Some(loaded))
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert!(
        pager.wait_filled(Duration::from_secs(30)),
        "replay did not finish"
    );
    let m = Arc::clone(&memory);
    let got = bounded("reading the replayed pages", move || {
        touched.map(|p| m.read_byte(p * 4096 + 9))
    });
    for (v, p) in got.iter().zip(touched) {
        assert_eq!(*v, bytes[p * 4096 + 9]);
    }
    let stats = pager.shutdown();
    assert_eq!(
        stats.faults_missing, 0,
        "replayed pages must not fault: {stats:?}"
    );
    assert_eq!(stats.prefetched_pages, touched.len() as u64, "{stats:?}");
}

/// Pages hold 0x5A; reads of more than one page (the fill's batches) wait
/// until `release`, single pages pass at once.
#[derive(Debug, Default)]
struct BlockedBatches {
    batches_started: std::sync::atomic::AtomicU64,
    released: std::sync::atomic::AtomicBool,
}

impl uffd_pager::PageSource for BlockedBatches {
    fn len(&self) -> u64 {
        (4 << 20) as u64
    }
    fn read_at(
        &self,
        _offset: u64,
        buf: &mut [u8],
    ) -> Result<uffd_pager::Content, uffd_pager::SourceError> {
        use std::sync::atomic::Ordering::SeqCst;
        if buf.len() > 4096 {
            self.batches_started.fetch_add(1, SeqCst);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !self.released.load(SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        buf.fill(0x5A);
        Ok(uffd_pager::Content::Data)
    }
    fn describe(&self) -> String {
        "blocked batches".into()
    }
}

#[test]
fn a_fault_on_a_page_the_fill_claimed_is_served_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    if !uffd_testkit::user_uffd() {
        return;
    }
    let len = 4 << 20;
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, len);
    let source = Arc::new(BlockedBatches::default());
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::clone(&source) as Arc<dyn uffd_pager::PageSource>)
            .background_fill(true)
            .start(uffd, vec![Region::new(memory.addr(), len as u64, 0, 4096)])
    }
    .unwrap();
    // The fill claims the first 2 MiB and waits in its read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while source.batches_started.load(SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fill never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // A fault inside that batch is served now, not after it.
    let m = Arc::clone(&memory);
    let got = bounded("a fault behind a blocked fill batch", move || {
        m.read_byte(5 * 4096 + 1)
    });
    assert_eq!(got, 0x5A);
    assert_eq!(
        pager.stats().stolen_from_background,
        1,
        "{:?}",
        pager.stats()
    );
    source.released.store(true, SeqCst);
    assert!(pager.wait_filled(std::time::Duration::from_secs(30)));
    let all = read_all(&memory, "after the fill");
    assert!(all.iter().all(|&b| b == 0x5A));
    pager.shutdown();
}
