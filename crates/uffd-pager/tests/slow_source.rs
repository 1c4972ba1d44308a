//! A source that takes 10 ms per read must not stall the faults behind it:
//! the engine keeps the reads in flight on the source's runtime (no thread
//! per read), so 64 threads faulting 64 distinct pages all wait about one
//! read, not 64.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use uffd::Features;
use uffd_pager::{
    AsyncPageSource, AsyncSource, Content, Fetched, Pager, ReadFuture, Region, SourceError,
};

const PAGES: usize = 64;
/// Far enough apart that no two faults share a granule or a readahead.
const STRIDE: usize = 16;
const LEN: usize = PAGES * STRIDE * 4096;

/// Every page holds its index; each read sleeps `delay` first.
#[derive(Debug)]
struct SlowSource {
    delay: Duration,
    reads: AtomicU64,
    fail_page: Option<u64>,
    /// Bytes below this offset are at hand (a warm cache).
    ready_below: u64,
    ready_reads: AtomicU64,
    /// Every range read asynchronously.
    ranges: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl SlowSource {
    /// Each read sleeps `delay`; reads covering `fail_page` fail; bytes
    /// below `ready_below` are at hand.
    fn new(delay: Duration, fail_page: Option<u64>, ready_below: u64) -> Arc<SlowSource> {
        Arc::new(SlowSource {
            delay,
            reads: AtomicU64::new(0),
            fail_page,
            ready_below,
            ready_reads: AtomicU64::new(0),
            ranges: Default::default(),
        })
    }
}

fn fill_pages(offset: u64, buf: &mut [u8]) {
    let first = offset / 4096;
    for (i, page) in buf.chunks_mut(4096).enumerate() {
        page.fill((first as usize + i) as u8 | 1);
    }
}

impl AsyncPageSource for SlowSource {
    fn len(&self) -> u64 {
        LEN as u64
    }

    fn read(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.ranges.lock().unwrap().push((offset, len));
            tokio::time::sleep(self.delay).await;
            let first = offset / 4096;
            if let Some(bad) = self.fail_page {
                if (first..first + (len / 4096) as u64).contains(&bad) {
                    return Err(SourceError::Failed {
                        offset,
                        len: len as u64,
                        source: std::io::Error::from_raw_os_error(5),
                    });
                }
            }
            let mut bytes = vec![0u8; len];
            fill_pages(offset, &mut bytes);
            Ok(Fetched::Data(bytes))
        })
    }

    fn is_ready(&self, offset: u64, len: u64) -> bool {
        offset + len <= self.ready_below
    }

    fn read_ready(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Content, SourceError>> {
        if offset + buf.len() as u64 > self.ready_below {
            return None;
        }
        self.ready_reads.fetch_add(1, Ordering::SeqCst);
        fill_pages(offset, buf);
        Some(Ok(Content::Data))
    }

    fn describe(&self) -> String {
        format!("slow ({:?} per read)", self.delay)
    }
}

/// Reads a byte of each of the `PAGES` pages `STRIDE` apart, each from a
/// thread of its own (bounded), and checks it.
fn touch_every_page(memory: &Arc<uffd::Mapping>, what: &str) {
    let readers: Vec<_> = (0..PAGES)
        .map(|i| {
            let m = Arc::clone(memory);
            std::thread::spawn(move || m.read_byte(i * STRIDE * 4096 + 100))
        })
        .collect();
    let got: Vec<u8> = bounded(what, move || {
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, &b) in got.iter().enumerate() {
        assert_eq!(b, (i * STRIDE) as u8 | 1, "page {i}");
    }
}

#[test]
fn sixty_four_faults_on_a_10ms_source_wait_for_about_one_read() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    let slow = SlowSource::new(Duration::from_millis(10), None, 0);
    let source = Arc::new(AsyncSource::new(slow.clone()).unwrap());
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .threads(1)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let started = Instant::now();
    touch_every_page(&memory, "64 readers of a 10 ms source");
    let elapsed = started.elapsed();
    let stats = pager.shutdown();
    assert_eq!(stats.async_fetches, PAGES as u64, "{stats:?}");
    assert_eq!(slow.reads.load(Ordering::SeqCst), PAGES as u64);
    // Answered on the runtime: the handler installs them.
    assert_eq!(stats.async_direct, 0, "{stats:?}");
    assert_eq!(stats.async_installed_on_arrival, 0, "{stats:?}");
    // The reads overlapped: one handler thread serving them one at a time
    // would never have more than one in flight.
    assert!(
        stats.async_in_flight_max >= 8,
        "at most {} reads were in flight ({elapsed:?} in all): {stats:?}",
        stats.async_in_flight_max
    );
    // A generous bound, far under 64 x 10 ms: it fails only if reads run
    // one after another.
    assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
}

#[test]
fn a_failing_read_poisons_only_its_page() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, 64 * 4096);
    let slow = SlowSource::new(Duration::from_millis(1), Some(40), 0);
    let source = Arc::new(AsyncSource::new(slow).unwrap());
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .granule(64 << 10)
            .start(uffd, vec![Region::new(memory.addr(), 64 * 4096, 0, 4096)])
    }
    .unwrap();
    // A neighbour sharing the bad page's 64 KiB granule (granules are
    // aligned by address, and where the mapping lands varies): the batch
    // read fails, then each page is asked for alone.
    let granule_of = |page: usize| (memory.addr() as usize + page * 4096) & !0xFFFF;
    let neighbour = if granule_of(41) == granule_of(40) {
        41
    } else {
        39
    };
    assert_eq!(granule_of(neighbour), granule_of(40));
    assert_eq!(
        bounded("reading the bad page's neighbour", {
            let m = Arc::clone(&memory);
            move || m.read_byte(neighbour * 4096)
        }),
        neighbour as u8 | 1
    );
    // Page 40's own read fails a moment later, on the runtime.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pager.poisoned().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let poisoned = pager.poisoned();
    assert_eq!(poisoned.len(), 1, "{poisoned:?}; {:?}", pager.stats());
    assert_eq!(poisoned[0].source_offset, 40 * 4096);
    pager.shutdown();
}

#[test]
fn pages_at_hand_are_served_by_the_handler_thread_without_an_asynchronous_read() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    // The first half of the image is "cached"; the second half takes 10 ms.
    let half = (LEN / 2) as u64;
    let slow = SlowSource::new(Duration::from_millis(10), None, half);
    let source = Arc::new(AsyncSource::new(slow.clone()).unwrap());
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .threads(1)
            .granule(4096)
            .prefetch(uffd_pager::Prefetch::None)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    touch_every_page(&memory, "readers of a half-cached source");
    let stats = pager.shutdown();
    let cached = PAGES as u64 / 2;
    assert_eq!(stats.async_ready, cached, "{stats:?}");
    assert_eq!(slow.ready_reads.load(Ordering::SeqCst), cached);
    assert_eq!(stats.async_fetches, PAGES as u64 - cached, "{stats:?}");
    assert_eq!(slow.reads.load(Ordering::SeqCst), PAGES as u64 - cached);
}

#[test]
fn a_replay_from_an_asynchronous_source_reads_only_the_recorded_pages() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    let slow = SlowSource::new(Duration::from_millis(1), None, 0);
    // Every third page, and a run of four: sparse inside each 2 MiB window.
    let mut recorded: Vec<u64> = (0..(LEN / 4096) as u64).step_by(3).collect();
    recorded.extend(100..104);
    recorded.sort_unstable();
    recorded.dedup();
    let ws = uffd_pager::WorkingSet::new(4096, recorded.iter().map(|p| p * 4096).collect());
    let source = Arc::new(AsyncSource::new(slow.clone()).unwrap());
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .replay(Some(ws))
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert!(
        pager.wait_filled(Duration::from_secs(60)),
        "replay did not finish"
    );
    let stats = pager.shutdown();
    let wanted: std::collections::HashSet<u64> = recorded.iter().copied().collect();
    let ranges = slow.ranges.lock().unwrap().clone();
    assert!(!ranges.is_empty());
    for &(offset, len) in &ranges {
        for p in offset / 4096..(offset + len as u64) / 4096 {
            assert!(
                wanted.contains(&p),
                "page {p} was read but not recorded: {ranges:?}"
            );
        }
    }
    let read: u64 = ranges.iter().map(|&(_, len)| len as u64 / 4096).sum();
    assert_eq!(read, recorded.len() as u64, "{stats:?}");
}

/// A read handed to whoever answers a [`ChannelSource`].
type Request = (u64, usize, uffd_pager::ReadDone);

/// A source answered off the engine's threads, as a network link is:
/// every read goes, with its `done`, to the receiver [`ChannelSource::new`]
/// returns, and whoever holds that answers it.
#[derive(Debug)]
struct ChannelSource {
    requests: std::sync::Mutex<std::sync::mpsc::Sender<Request>>,
}

impl ChannelSource {
    fn new() -> (Arc<ChannelSource>, std::sync::mpsc::Receiver<Request>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let source = ChannelSource {
            requests: std::sync::Mutex::new(tx),
        };
        (Arc::new(source), rx)
    }
}

impl AsyncPageSource for ChannelSource {
    fn len(&self) -> u64 {
        LEN as u64
    }

    fn read(&self, _offset: u64, _len: usize) -> ReadFuture<'_> {
        Box::pin(async { panic!("every read of this source goes through read_direct") })
    }

    fn read_direct(
        &self,
        offset: u64,
        len: usize,
        done: uffd_pager::ReadDone,
    ) -> Result<(), uffd_pager::ReadDone> {
        self.requests
            .lock()
            .unwrap()
            .send((offset, len, done))
            .map_err(|e| e.0 .2)
    }

    fn describe(&self) -> String {
        "answered through a channel".into()
    }
}

/// What a link thread answering a [`ChannelSource`] did.
#[derive(Debug)]
struct Answered {
    reads: u64,
    on: std::collections::HashSet<std::thread::ThreadId>,
}

/// Answers every request on a thread of its own, the first read of each
/// range with a transient error; returns that thread's id, and what it
/// did once the source is gone.
fn answer_on_a_link_thread(
    requests: std::sync::mpsc::Receiver<Request>,
) -> (std::thread::ThreadId, std::thread::JoinHandle<Answered>) {
    let link = std::thread::spawn(move || {
        let mut answered = Answered {
            reads: 0,
            on: Default::default(),
        };
        let mut failed_once = std::collections::HashSet::new();
        for (offset, len, done) in requests {
            answered.reads += 1;
            answered.on.insert(std::thread::current().id());
            if failed_once.insert(offset) {
                done(Err(SourceError::Transient {
                    offset,
                    len: len as u64,
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                }));
            } else {
                let mut bytes = vec![0u8; len];
                fill_pages(offset, &mut bytes);
                done(Ok(Fetched::Data(bytes)));
            }
        }
        answered
    });
    (link.thread().id(), link)
}

/// A pager of one handler thread that never spins (it sleeps whenever it
/// has nothing to do), serving `memory` page by page from `source`.
fn one_sleeping_handler(
    uffd: uffd::Uffd,
    memory: &uffd::Mapping,
    source: Arc<AsyncSource>,
) -> Pager {
    // SAFETY: the tests' regions are mappings they touch only through raw
    // pointers; no Rust reference covers them.
    unsafe {
        Pager::builder(source)
            .threads(1)
            .granule(4096)
            .prefetch(uffd_pager::Prefetch::None)
            .wait(uffd_pager::WaitMode::Block)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap()
}

/// A source that answers on its own thread gets its reads from the
/// handler thread and hands the bytes back from there: no read runs on
/// the runtime, and a transient failure is retried the same way.
#[test]
fn reads_answered_on_the_sources_own_thread_skip_the_runtime_and_are_retried() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    let (linked, requests) = ChannelSource::new();
    let (link_thread, link) = answer_on_a_link_thread(requests);
    let source = Arc::new(AsyncSource::new(linked).unwrap());
    let pager = one_sleeping_handler(uffd, &memory, source);
    touch_every_page(&memory, "readers of a source with its own thread");
    let stats = pager.shutdown();
    assert_eq!(stats.async_fetches, PAGES as u64, "{stats:?}");
    assert_eq!(stats.async_direct, PAGES as u64, "{stats:?}");
    assert_eq!(stats.poisoned, 0, "{stats:?}");
    assert_eq!(stats.source_retries, PAGES as u64, "one retry a range");
    // The handler never spins, and the retries' backoff leaves it asleep
    // when most answers come: the source's thread installs those.
    assert!(stats.async_installed_on_arrival > 0, "{stats:?}");
    // The pager (and with it the source) is gone: the link thread ends.
    let answered = bounded("the link thread's end", move || link.join().unwrap());
    // Each range twice: failed once, retried, answered.
    assert_eq!(answered.reads, 2 * PAGES as u64);
    assert_eq!(answered.on, [link_thread].into());
}

/// An answer that arrives on the source's thread after the pager stopped
/// is not installed there, and nothing waits on anything: the stop does
/// not wait for the answer, the answer's delivery returns at once, and the
/// faulting thread goes on once the pager is gone.
#[test]
fn an_answer_after_the_stop_is_not_installed_and_nothing_hangs() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    // Answers wait for the test.
    let (held, rx) = ChannelSource::new();
    let source = Arc::new(AsyncSource::new(held).unwrap());
    let pager = one_sleeping_handler(uffd, &memory, source);
    let reader = {
        let m = Arc::clone(&memory);
        std::thread::spawn(move || m.read_byte(100))
    };
    let (offset, len, done) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the fault's read reached the source");
    assert_eq!((offset, len), (0, 4096));
    let stats = bounded("stopping with an answer outstanding", move || {
        pager.shutdown()
    });
    assert_eq!(stats.async_direct, 1, "{stats:?}");
    bounded("delivering an answer after the stop", move || {
        let mut bytes = vec![0u8; len];
        fill_pages(offset, &mut bytes);
        done(Ok(Fetched::Data(bytes)));
    });
    // The pager and, with the answer's last reference, its userfaultfd
    // are gone: the kernel maps a zero page; the answer's bytes (1 on
    // this page) were never installed.
    let byte = bounded("the faulting thread after the stop", move || {
        reader.join().unwrap()
    });
    assert_eq!(byte, 0);
}
