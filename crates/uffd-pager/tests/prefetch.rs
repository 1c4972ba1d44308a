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
    let pager = Pager::builder(source)
        .granule(16 << 10)
        .prefetch(Prefetch::Readahead { max_bytes: 1 << 20 })
        .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
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
    let pager = Pager::builder(source)
        .background_fill(true)
        .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
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
        let pager = Pager::builder(Arc::clone(&source))
            .record(true)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
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
    let pager = Pager::builder(source)
        .replay(Some(loaded))
        .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
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
