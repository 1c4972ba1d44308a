//! Compaction on real memory and a real userfaultfd: every mode on the
//! memory it supports, many mutators, a write racing the page's
//! compaction, failing and panicking fills, reuse of a heap.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use uffd_compact::{
    CompactError, Compaction, Compactor, FromPages, Guard, Heap, HeapKind, Mode, Options, PAGE,
};

/// Any wait in a test longer than this aborts the process naming the test,
/// instead of hanging the suite.
const LIMIT: Duration = Duration::from_secs(60);

struct Watchdog(Option<mpsc::Sender<()>>);

impl Watchdog {
    fn new(what: &'static str) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(LIMIT) {
                eprintln!("{what}: still running after {LIMIT:?}; a thread is stuck");
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// False (after saying why; a failure under UFFD_REQUIRE=1) when
/// userfaultfd is denied here.
fn uffd_available() -> bool {
    uffd_testkit::user_uffd()
}

const MAGIC: u64 = 0xC0FF_EE00_0000_0000;

/// Word `i` of from-space page `q` before compaction.
fn old_word(q: usize, i: usize) -> u64 {
    ((q as u64) << 20) | i as u64 | 0x5000_0000_0000
}

/// A page-granular compactor: to-space page `p` is from-space page
/// `2p + p % 2` (so half the pages are garbage, and the live ones move),
/// every word XORed with MAGIC (so a page installed unfilled, or the wrong
/// page, is caught). Counts fills per page; fails or panics where told.
struct Shuffle {
    pages: usize,
    fills: Vec<AtomicU8>,
    fail: Option<usize>,
    panic: Option<usize>,
    /// (page, started signal, how long to hold the fill)
    slow: Option<(usize, mpsc::SyncSender<()>, Duration)>,
    /// (page, its fill waits for a message here)
    block: Option<(usize, std::sync::Mutex<mpsc::Receiver<()>>)>,
}

impl Shuffle {
    fn new(pages: usize) -> Shuffle {
        Shuffle {
            pages,
            fills: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            fail: None,
            panic: None,
            slow: None,
            block: None,
        }
    }

    fn src(p: usize) -> usize {
        2 * p + p % 2
    }

    fn expected(p: usize, i: usize) -> u64 {
        old_word(Self::src(p), i) ^ MAGIC
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the test's compactor refuses page {0}")]
struct Refused(usize);

impl Compactor for Shuffle {
    type Error = Refused;

    fn live_pages(&self) -> usize {
        self.pages / 2 - 1
    }

    fn sources(&self, page: usize) -> Range<usize> {
        Self::src(page)..Self::src(page) + 1
    }

    fn fill(&self, page: usize, from: &FromPages<'_>, dst: &mut [u8]) -> Result<(), Refused> {
        self.fills[page].fetch_add(1, Ordering::SeqCst);
        if let Some((slow, started, hold)) = &self.slow {
            if *slow == page {
                let _ = started.try_send(());
                std::thread::sleep(*hold);
            }
        }
        if let Some((blocked, rx)) = &self.block {
            if *blocked == page {
                let _ = rx.lock().unwrap().recv_timeout(LIMIT);
            }
        }
        if self.fail == Some(page) {
            return Err(Refused(page));
        }
        if self.panic == Some(page) {
            panic!("the test's compactor panics on page {page}");
        }
        let q = Self::src(page);
        for (i, w) in dst.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(from.load(q * PAGE + i * 8) ^ MAGIC).to_ne_bytes());
        }
        Ok(())
    }
}

fn heap(kind: HeapKind, pages: usize) -> Arc<Heap> {
    let heap = Arc::new(Heap::new(kind, pages * PAGE).expect("map heap"));
    for q in 0..pages {
        for i in 0..PAGE / 8 {
            heap.store(q * PAGE + i * 8, old_word(q, i));
        }
    }
    heap
}

fn check_page(heap: &Heap, live: usize, p: usize) {
    for i in (0..PAGE / 8).step_by(61) {
        let want = if p < live { Shuffle::expected(p, i) } else { 0 };
        assert_eq!(heap.load(p * PAGE + i * 8), want, "page {p} word {i}");
    }
}

/// Compacts with `mutators` threads touching random pages meanwhile, and
/// checks every page and that each live page was filled exactly once.
fn compact_with_mutators(mode: Mode, pages: usize, mutators: usize, gc_threads: usize) {
    compact_with_mutators_opts(Options::new(mode).threads(gc_threads), pages, mutators)
}

fn compact_with_mutators_opts(options: Options, pages: usize, mutators: usize) {
    let mode = options.mode();
    let heap = heap(mode.heap_kind(), pages);
    let compactor = Arc::new(Shuffle::new(pages));
    let live = compactor.live_pages();
    let prepared = Compaction::prepare(&heap, options, Arc::clone(&compactor)).expect("prepare");
    let running = prepared.start().expect("start");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for m in 0..mutators {
            let (heap, done) = (&heap, &done);
            s.spawn(move || {
                let mut x = 0x9E37_79B9_u64 + m as u64;
                let mut seen = 0;
                while !done.load(Ordering::Acquire) || seen < 64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    check_page(heap, live, (x % pages as u64) as usize);
                    seen += 1;
                }
            });
        }
        let report = running.finish().expect("finish");
        done.store(true, Ordering::Release);
        assert_eq!(report.live_pages, live);
        let installed = report.copied + report.moved + report.continued + report.written;
        assert_eq!(installed, live, "{report:?}");
        assert_eq!(report.zeroed, pages - live, "{report:?}");
        match mode {
            Mode::Copy => assert_eq!(report.copied, live),
            Mode::Minor => assert_eq!(report.continued, live),
            Mode::StopTheWorld => assert_eq!(report.written, live),
            // MOVE starts with the garbage pages; with this many mutators
            // faulting pages in, most windows split into runs short enough
            // to copy (the window tests below check what is moved).
            Mode::Move => assert!(report.pool_seeded > 0, "{report:?}"),
        }
    });
    for p in 0..pages {
        check_page(&heap, live, p);
    }
    for (p, n) in compactor.fills.iter().enumerate() {
        let want = u8::from(p < live);
        assert_eq!(
            n.load(Ordering::SeqCst),
            want,
            "page {p} filled {} times",
            n.load(Ordering::SeqCst)
        );
    }
}

#[test]
fn copy_on_anon_with_mutators() {
    let _w = Watchdog::new("copy_on_anon_with_mutators");
    if uffd_available() {
        compact_with_mutators(Mode::Copy, 2048, 4, 1);
    }
}

#[test]
fn move_on_anon_with_mutators() {
    let _w = Watchdog::new("move_on_anon_with_mutators");
    if uffd_available() {
        compact_with_mutators(Mode::Move, 2048, 4, 1);
    }
}

#[test]
fn minor_on_shmem_with_mutators() {
    let _w = Watchdog::new("minor_on_shmem_with_mutators");
    if uffd_available() {
        compact_with_mutators(Mode::Minor, 2048, 4, 1);
    }
}

#[test]
fn stop_the_world_needs_no_userfaultfd() {
    let _w = Watchdog::new("stop_the_world_needs_no_userfaultfd");
    for kind in [HeapKind::Anon, HeapKind::Shmem] {
        let heap = heap(kind, 512);
        let compactor = Arc::new(Shuffle::new(512));
        let report = Compaction::prepare(
            &heap,
            Options::new(Mode::StopTheWorld).threads(2),
            compactor,
        )
        .expect("prepare")
        .start()
        .expect("start")
        .finish()
        .expect("finish");
        assert_eq!(report.written, 255);
        for p in 0..512 {
            check_page(&heap, 255, p);
        }
    }
}

#[test]
fn many_mutators_and_compactors_fill_each_page_once() {
    let _w = Watchdog::new("many_mutators_and_compactors_fill_each_page_once");
    if !uffd_available() {
        return;
    }
    for mode in [Mode::Copy, Mode::Move, Mode::Minor] {
        compact_with_mutators(mode, 4096, 12, 3);
    }
}

/// A mutator writes into a page while the page's fill is running: the
/// write must land after the page is installed and survive.
fn write_during_fill(mode: Mode) {
    write_during_fill_opts(Options::new(mode))
}

fn write_during_fill_opts(options: Options) {
    let mode = options.mode();
    let pages = 64;
    let heap = heap(mode.heap_kind(), pages);
    let (tx, rx) = mpsc::sync_channel(1);
    let target = 5;
    let mut compactor = Shuffle::new(pages);
    compactor.slow = Some((target, tx, Duration::from_millis(200)));
    let compactor = Arc::new(compactor);
    let live = compactor.live_pages();
    let running = Compaction::prepare(&heap, options, Arc::clone(&compactor))
        .expect("prepare")
        .start()
        .expect("start");
    rx.recv_timeout(LIMIT)
        .expect("the fill of the target page never started");
    let offset = target * PAGE + 8 * 100;
    std::thread::scope(|s| {
        // This store faults on a page being filled right now and waits.
        s.spawn(|| heap.store(offset, 0xAB));
    });
    let report = running.finish().expect("finish");
    assert_eq!(
        heap.load(offset),
        0xAB,
        "the mutator's write was lost: {report:?}"
    );
    assert_eq!(heap.load(offset + 8), Shuffle::expected(target, 101));
    assert_eq!(compactor.fills[target].load(Ordering::SeqCst), 1);
    for p in (0..pages).filter(|&p| p != target) {
        check_page(&heap, live, p);
    }
}

#[test]
fn write_during_fill_copy() {
    let _w = Watchdog::new("write_during_fill_copy");
    if uffd_available() {
        write_during_fill(Mode::Copy);
    }
}

#[test]
fn write_during_fill_move() {
    let _w = Watchdog::new("write_during_fill_move");
    if uffd_available() {
        write_during_fill(Mode::Move);
    }
}

#[test]
fn write_during_fill_minor() {
    let _w = Watchdog::new("write_during_fill_minor");
    if uffd_available() {
        write_during_fill(Mode::Minor);
    }
}

/// Whether the kernel refuses to read `addr` for us (a poisoned or
/// protected page), instead of handing out silent data.
fn kernel_read_fails(addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open("/proc/self/mem").expect("open /proc/self/mem");
    let mut buf = [0u8; 8];
    mem.read_exact_at(&mut buf, addr).is_err()
}

/// One page's fill fails, another's panics: `finish` names both, they are
/// poisoned, every other page is right, and nothing hangs.
fn failing_fills(mode: Mode) {
    failing_fills_opts(Options::new(mode))
}

fn failing_fills_opts(options: Options) {
    let mode = options.mode();
    let pages = 256;
    let heap = heap(mode.heap_kind(), pages);
    let mut compactor = Shuffle::new(pages);
    compactor.fail = Some(7);
    compactor.panic = Some(40);
    let compactor = Arc::new(compactor);
    let live = compactor.live_pages();
    let running = Compaction::prepare(&heap, options, compactor)
        .expect("prepare")
        .start()
        .expect("start");
    let good = [0usize, 6, 8, 39, 41, 100];
    std::thread::scope(|s| {
        for &p in &good {
            let heap = &heap;
            s.spawn(move || check_page(heap, live, p));
        }
    });
    let err = running.finish().expect_err("two fills failed");
    let text = err.to_string();
    let CompactError::Pages { failures, report } = err else {
        panic!("expected CompactError::Pages, got {text}");
    };
    let failed: Vec<usize> = failures.iter().map(|f| f.page).collect();
    let poison = uffd::probe()
        .expect("probe")
        .features
        .contains(uffd::Features::POISON);
    let want = if poison {
        Guard::Poisoned
    } else {
        Guard::Protected
    };
    assert_eq!(failed, vec![7, 40], "{text}");
    assert!(text.contains("refuses page 7"), "{text}");
    assert!(
        failures[1].error.to_string().contains("panicked"),
        "{}",
        failures[1]
    );
    for f in &failures {
        // POISON (6.6) works on anonymous MISSING and shmem MINOR
        // registrations alike; older kernels get PROT_NONE instead.
        assert_eq!(f.guard, want, "{f}");
        assert!(
            kernel_read_fails(heap.addr() + (f.page * PAGE) as u64),
            "page {} reads silently",
            f.page
        );
    }
    assert_eq!(report.copied + report.moved + report.continued, live - 2);
    for p in (0..pages).filter(|p| !failed.contains(p)) {
        check_page(&heap, live, p);
    }
}

#[test]
fn failing_fill_copy() {
    let _w = Watchdog::new("failing_fill_copy");
    if uffd_available() {
        failing_fills(Mode::Copy);
    }
}

#[test]
fn failing_fill_move() {
    let _w = Watchdog::new("failing_fill_move");
    if uffd_available() {
        failing_fills(Mode::Move);
    }
}

#[test]
fn failing_fill_minor() {
    let _w = Watchdog::new("failing_fill_minor");
    if uffd_available() {
        failing_fills(Mode::Minor);
    }
}

#[test]
fn a_heap_compacts_again() {
    let _w = Watchdog::new("a_heap_compacts_again");
    if !uffd_available() {
        return;
    }
    for mode in [Mode::Move, Mode::Minor] {
        let pages = 128;
        let heap = heap(mode.heap_kind(), pages);
        // First: the identity (every page live, nothing moves).
        struct Identity(usize);
        impl Compactor for Identity {
            type Error = std::convert::Infallible;
            fn live_pages(&self) -> usize {
                self.0
            }
            fn sources(&self, page: usize) -> Range<usize> {
                page..page + 1
            }
            fn fill(
                &self,
                page: usize,
                from: &FromPages<'_>,
                dst: &mut [u8],
            ) -> Result<(), Self::Error> {
                dst.copy_from_slice(from.bytes(page * PAGE, PAGE));
                Ok(())
            }
        }
        Compaction::prepare(&heap, Options::new(mode), Arc::new(Identity(pages)))
            .expect("prepare")
            .start()
            .expect("start")
            .finish()
            .expect("first compaction");
        for q in [0, 77, 127] {
            assert_eq!(
                heap.load(q * PAGE + 8),
                old_word(q, 1),
                "{mode} identity, page {q}"
            );
        }
        // Then the shuffle, on the memory the first compaction left.
        let compactor = Arc::new(Shuffle::new(pages));
        let live = compactor.live_pages();
        Compaction::prepare(&heap, Options::new(mode), compactor)
            .expect("prepare again")
            .start()
            .expect("start again")
            .finish()
            .expect("second compaction");
        for p in 0..pages {
            check_page(&heap, live, p);
        }
    }
}

#[test]
fn dropping_a_compaction_leaves_the_heap_whole() {
    let _w = Watchdog::new("dropping_a_compaction_leaves_the_heap_whole");
    if !uffd_available() {
        return;
    }
    let pages = 128;
    let heap = heap(HeapKind::Anon, pages);
    let prepared = Compaction::prepare(
        &heap,
        Options::new(Mode::Copy),
        Arc::new(Shuffle::new(pages)),
    )
    .expect("prepare");
    assert!(matches!(
        Compaction::prepare(
            &heap,
            Options::new(Mode::Copy),
            Arc::new(Shuffle::new(pages))
        ),
        Err(CompactError::Busy)
    ));
    drop(prepared);
    // Not started: the heap is untouched and free again.
    assert_eq!(heap.load(3 * PAGE), old_word(3, 0));
    let running = Compaction::prepare(
        &heap,
        Options::new(Mode::Copy),
        Arc::new(Shuffle::new(pages)),
    )
    .expect("prepare after drop")
    .start()
    .expect("start");
    drop(running); // waits for every page
    for p in 0..pages {
        check_page(&heap, pages / 2 - 1, p);
    }
}

#[test]
fn wrong_memory_and_bad_sources_are_refused() {
    let anon = heap(HeapKind::Anon, 16);
    let shmem = heap(HeapKind::Shmem, 16);
    let e = Compaction::prepare(&anon, Options::new(Mode::Minor), Arc::new(Shuffle::new(16)))
        .unwrap_err();
    assert!(
        matches!(e, CompactError::Unsupported { .. }) && e.to_string().contains("Shmem"),
        "{e}"
    );
    let e = Compaction::prepare(&shmem, Options::new(Mode::Copy), Arc::new(Shuffle::new(16)))
        .unwrap_err();
    assert!(e.to_string().contains("Mode::Minor"), "{e}");
    // A compactor that claims more live pages than the heap has, and one
    // whose sources run past its end.
    let e = Compaction::prepare(
        &anon,
        Options::new(Mode::StopTheWorld),
        Arc::new(Shuffle::new(40)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            CompactError::TooManyLivePages {
                live: 19,
                pages: 16
            }
        ),
        "{e}"
    );
    let e = Compaction::prepare(
        &anon,
        Options::new(Mode::StopTheWorld),
        Arc::new(Shuffle::new(24)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            CompactError::BadSources {
                page: 8,
                start: 16,
                end: 17,
                pages: 16
            }
        ),
        "{e}"
    );
    // Refusals leave the heap free.
    Compaction::prepare(
        &anon,
        Options::new(Mode::StopTheWorld),
        Arc::new(Shuffle::new(16)),
    )
    .expect("prepare after refusals")
    .start()
    .expect("start")
    .finish()
    .expect("finish");
    check_page(&anon, 7, 3);
}

#[test]
fn sigbus_path_copy_and_move_with_mutators() {
    let _w = Watchdog::new("sigbus_path_copy_and_move_with_mutators");
    if !uffd_available() {
        return;
    }
    for mode in [Mode::Copy, Mode::Move, Mode::Minor] {
        compact_with_mutators_opts(Options::new(mode).sigbus(true), 2048, 6);
        compact_with_mutators_opts(Options::new(mode).sigbus(true).threads(2), 4096, 12);
    }
}

#[test]
fn sigbus_path_write_during_fill() {
    let _w = Watchdog::new("sigbus_path_write_during_fill");
    if uffd_available() {
        write_during_fill_opts(Options::new(Mode::Copy).sigbus(true));
        write_during_fill_opts(Options::new(Mode::Move).sigbus(true));
        write_during_fill_opts(Options::new(Mode::Minor).sigbus(true));
    }
}

#[test]
fn sigbus_path_failing_fill() {
    let _w = Watchdog::new("sigbus_path_failing_fill");
    if uffd_available() {
        failing_fills_opts(Options::new(Mode::Copy).sigbus(true));
        failing_fills_opts(Options::new(Mode::Minor).sigbus(true));
    }
}

#[test]
fn sigbus_path_is_refused_for_stop_the_world() {
    let anon = heap(HeapKind::Anon, 16);
    let e = Compaction::prepare(
        &anon,
        Options::new(Mode::StopTheWorld).sigbus(true),
        Arc::new(Shuffle::new(16)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("SIGBUS"), "{e}");
}

/// MOVE windows on 2048 pages (1023 live, so windows 0..512 and
/// 512..1023): the first finds no run of 512 free pool pages (the garbage
/// pages come in pairs) and is copied; by the second, the first's sources
/// are free too, and the window is filled into them and moved. `slow`
/// holds one page's fill while `touch` runs against the heap; every page
/// but `written` (one `touch` writes) is checked afterwards.
fn move_windows(
    sigbus: bool,
    slow: Option<usize>,
    touch: impl Fn(&Heap) + Sync,
    written: Option<usize>,
) -> (uffd_compact::Report, Arc<Heap>) {
    let pages = 2048;
    let heap = heap(HeapKind::Anon, pages);
    let (tx, rx) = mpsc::sync_channel(1);
    let mut compactor = Shuffle::new(pages);
    if let Some(page) = slow {
        compactor.slow = Some((page, tx, Duration::from_millis(300)));
    }
    let compactor = Arc::new(compactor);
    let live = compactor.live_pages();
    let options = Options::new(Mode::Move).threads(1).sigbus(sigbus);
    let running = Compaction::prepare(&heap, options, Arc::clone(&compactor))
        .expect("prepare")
        .start()
        .expect("start");
    if slow.is_some() {
        rx.recv_timeout(LIMIT).expect("the slow fill never started");
        std::thread::scope(|s| {
            s.spawn(|| touch(&heap));
        });
    }
    let report = running.finish().expect("finish");
    for p in (0..pages).filter(|&p| Some(p) != written) {
        check_page(&heap, live, p);
    }
    for (p, n) in compactor.fills.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), u8::from(p < live), "page {p}");
    }
    assert_eq!(report.copied + report.moved, live, "{report:?}");
    (report, heap)
}

#[test]
fn move_windows_move_whole_runs() {
    let _w = Watchdog::new("move_windows_move_whole_runs");
    if !uffd_available() {
        return;
    }
    let (report, _) = move_windows(false, None, |_| {}, None);
    assert_eq!((report.copied, report.moved), (512, 511), "{report:?}");
    assert_eq!(report.staged_taken, 0);
}

/// Page 900's fill is held, so pages 512..900 are filled and staged; a
/// touch of page 600 takes its staged page and copies it, and the window
/// moves the runs on either side.
#[test]
fn a_fault_takes_a_staged_page_from_its_move_window() {
    let _w = Watchdog::new("a_fault_takes_a_staged_page_from_its_move_window");
    if !uffd_available() {
        return;
    }
    for sigbus in [false, true] {
        let touch = |heap: &Heap| {
            assert_eq!(heap.load(600 * PAGE + 8 * 7), Shuffle::expected(600, 7));
        };
        let (report, _) = move_windows(sigbus, Some(900), touch, None);
        assert_eq!(report.staged_taken, 1, "sigbus {sigbus}: {report:?}");
        assert_eq!((report.copied, report.moved), (513, 510), "{report:?}");
    }
}

/// A write to page 700 while its fill in a MOVE window runs waits for the
/// fill, lands once the page is copied in, and the runs around it move.
#[test]
fn a_write_during_its_fill_in_a_move_window_lands() {
    let _w = Watchdog::new("a_write_during_its_fill_in_a_move_window_lands");
    if !uffd_available() {
        return;
    }
    let offset = 700 * PAGE + 8 * 100;
    for sigbus in [false, true] {
        let touch = |heap: &Heap| heap.store(offset, 0xAB);
        let (report, heap) = move_windows(sigbus, Some(700), touch, Some(700));
        assert_eq!(heap.load(offset), 0xAB, "the write was lost: {report:?}");
        assert_eq!(heap.load(offset + 8), Shuffle::expected(700, 101));
        assert_eq!((report.copied, report.moved), (513, 510), "{report:?}");
        assert_eq!(report.staged_taken, 0);
    }
}

/// Holds the background thread in page `blocked`'s fill, touches each of
/// `touched` (every touch must complete with `blocked` still held), then
/// releases it; checks every page and that each live page was filled once.
fn touches_while_background_is_stuck(
    options: Options,
    blocked: usize,
    touched: &[usize],
) -> uffd_compact::Report {
    let pages = 64;
    let heap = heap(options.mode().heap_kind(), pages);
    let (tx, rx) = mpsc::channel();
    let mut compactor = Shuffle::new(pages);
    compactor.block = Some((blocked, std::sync::Mutex::new(rx)));
    let compactor = Arc::new(compactor);
    let live = compactor.live_pages();
    let running = Compaction::prepare(&heap, options.threads(1), Arc::clone(&compactor))
        .expect("prepare")
        .start()
        .expect("start");
    while compactor.fills[blocked].load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    for &p in touched {
        check_page(&heap, live, p);
    }
    tx.send(()).expect("release the held fill");
    let report = running.finish().expect("finish");
    for p in 0..pages {
        check_page(&heap, live, p);
        assert_eq!(
            compactor.fills[p].load(Ordering::SeqCst),
            u8::from(p < live),
            "page {p}"
        );
    }
    report
}

/// The background thread is stuck in page 9's fill, in the middle of its
/// batch (pages 0..16): a touch of page 3, filled and staged before it,
/// takes the staged page, and a touch of page 12, not reached yet, is
/// compacted on demand. Neither waits for page 9 (a batch that claimed all
/// its pages up front held them until the watchdog fired).
#[test]
fn a_batch_holds_up_no_fault_but_on_the_page_it_is_filling() {
    let _w = Watchdog::new("a_batch_holds_up_no_fault_but_on_the_page_it_is_filling");
    if !uffd_available() {
        return;
    }
    for sigbus in [false, true] {
        for mode in [Mode::Copy, Mode::Move, Mode::Minor] {
            let report =
                touches_while_background_is_stuck(Options::new(mode).sigbus(sigbus), 9, &[3, 12]);
            assert_eq!(report.staged_taken, 1, "{mode:?}: {report:?}");
            assert!(report.on_demand >= 2, "{report:?}");
        }
    }
}

/// The background thread is stuck in page 0's fill; a mutator touching
/// pages 20 and 21 can only get them from on-demand compaction (the fault
/// handler, or the SIGBUS path in the mutator itself).
fn on_demand_while_background_is_stuck(options: Options) {
    let report = touches_while_background_is_stuck(options, 0, &[20, 21]);
    assert!(report.on_demand >= 2, "{report:?}");
}

#[test]
fn on_demand_serves_touches_while_background_is_stuck() {
    let _w = Watchdog::new("on_demand_serves_touches_while_background_is_stuck");
    if !uffd_available() {
        return;
    }
    for mode in [Mode::Copy, Mode::Move, Mode::Minor] {
        on_demand_while_background_is_stuck(Options::new(mode));
    }
    for mode in [Mode::Copy, Mode::Move, Mode::Minor] {
        on_demand_while_background_is_stuck(Options::new(mode).sigbus(true));
    }
}
