//! `Pager::hand_over` and `PagerBuilder::resume`: a second pager carries on
//! where the first stopped, with no fault lost, no present page installed
//! again and removed (ballooned) pages still reading as zero.

mod common;

use std::sync::Arc;

use common::*;
use uffd::Features;
use uffd_pager::{PageKind, Pager, PagerState, Region, SpanState};

const LEN: usize = 1 << 20;
const PAGES: usize = LEN / 4096;

#[test]
fn a_resumed_pager_keeps_present_removed_and_recorded_pages() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, 71);
    let regions = vec![Region::new(memory.addr(), LEN as u64, 0, 4096)];
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let first = unsafe {
        Pager::builder(Arc::clone(&source))
            .record(true)
            .start(uffd, regions)
    }
    .unwrap();
    // The first pager serves the first half; a balloon removes 8 pages of it
    // and 8 pages of the second half, which nobody touched yet.
    // Page by page, so that pages fault in address order: one copy of the
    // whole half may touch its last page early (memmove loads both ends
    // first), and the recording below keeps the order of first touches.
    let mut half = vec![0u8; LEN / 2];
    for (p, page) in half.chunks_mut(4096).enumerate() {
        memory.read(p * 4096, page);
    }
    assert_same(&half, &bytes[..LEN / 2], "first half, first pager");
    memory
        .advise(16 * 4096, 8 * 4096, rustix::mm::Advice::LinuxDontNeed)
        .unwrap();
    memory
        .advise(200 * 4096, 8 * 4096, rustix::mm::Advice::LinuxDontNeed)
        .unwrap();
    let uffd_pager::HandedOver { uffd, state, .. } = first.hand_over().unwrap();
    assert_eq!(
        state.count(PageKind::Present),
        (PAGES / 2 - 8) as u64,
        "{state:?}"
    );
    assert_eq!(state.count(PageKind::Removed), 16, "{state:?}");
    assert_eq!(state.recorded.len(), PAGES / 2);

    // The state survives the wire (the server sends it as JSON).
    let state: PagerState = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let second = unsafe { Pager::builder(source).record(true).resume(uffd, state) }.unwrap();
    let mut want = bytes.clone();
    want[16 * 4096..24 * 4096].fill(0);
    want[200 * 4096..208 * 4096].fill(0);
    assert_same(
        &read_all(&memory, "read through the second pager"),
        &want,
        "after resume",
    );
    let ws = second.working_set();
    let stats = second.shutdown();
    // Only what the first pager never installed: the second half (less
    // its removed pages, served as zero pages) and the removed pages of
    // the first half.
    assert_eq!(stats.pages_copied, (PAGES / 2 - 8) as u64, "{stats:?}");
    assert_eq!(stats.pages_zero, 16, "{stats:?}");
    // The recording carries on: every page first touched for its data,
    // which the second half's removed pages never were.
    assert_eq!(ws.len(), PAGES - 8);
    assert_eq!(
        &ws.pages()[..PAGES / 2],
        &(0..PAGES as u64 / 2).map(|p| p * 4096).collect::<Vec<_>>()[..]
    );
}

#[test]
fn a_fault_waiting_during_the_hand_over_is_served_by_the_next_pager() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    // Reads of the second half wait at the gate: a fault stays pending in
    // the first pager while it hands over.
    let gated = Arc::new(GatedSource::new(LEN as u64, (LEN / 2) as u64));
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let first = unsafe {
        Pager::builder(Arc::clone(&gated) as _)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let m = Arc::clone(&memory);
    let reader = std::thread::spawn(move || m.read_byte(LEN / 2 + 5));
    wait_for_missing_faults(&first, 1);
    // hand_over joins the handler, which waits for the gate: open it from
    // another thread meanwhile, as a slow source would answer eventually.
    let opener = {
        let gated = Arc::clone(&gated);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            gated.open();
        })
    };
    let uffd_pager::HandedOver { uffd, state, .. } = first.hand_over().unwrap();
    opener.join().unwrap();
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let second = unsafe { Pager::builder(gated).resume(uffd, state) }.unwrap();
    let got = bounded("the reader", move || reader.join().unwrap());
    assert_eq!(got, 0x5A);
    second.shutdown();
}

#[test]
fn a_state_that_does_not_cover_its_span_is_refused() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    let (source, _) = pattern_source(LEN, 73);
    let state = PagerState {
        spans: vec![SpanState {
            start: memory.addr(),
            len: LEN as u64,
            offset: 0,
            page_size: 4096,
            runs: vec![(PageKind::Present, PAGES as u64 - 1)],
        }],
        recorded: Vec::new(),
    };
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let e = unsafe { Pager::builder(source).resume(uffd, state) }.unwrap_err();
    assert!(e.to_string().contains("do not cover"), "{e}");
}
