//! The shmem destination over loopback against a real page server (and a
//! scripted one for the races): every byte verified; pushed pages are
//! mapped with one CONTINUE each and never asked for; a page pushed and
//! demanded at once lands once, with the right bytes, and a late pushed
//! copy never overwrites what the workload wrote.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{Features, Mapping};
use uffd_pager::{MemorySource, PageSource, Stats};
use uffd_remote::protocol::{Channel, Frame, HEADER};
use uffd_remote::{
    PageServer, PageServerConfig, PageServerHandle, RemoteStats, ShmemDestination, ShmemOptions,
};

const PAGES: usize = 512;

/// True when this process may catch MISSING and MINOR faults on shmem.
fn available() -> bool {
    if !uffd_testkit::user_uffd() {
        return false;
    }
    let needed = Features::MISSING_SHMEM | Features::MINOR_SHMEM;
    let supported = uffd::probe().expect("probed above").features;
    if !supported.contains(needed) {
        uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("no MISSING_SHMEM|MINOR_SHMEM (Linux 5.14)"),
        );
        return false;
    }
    true
}

/// The testkit's page pattern (every fourth page zero), with pages
/// 64..128 all zero too: one whole push chunk, which travels as a zero
/// range without bytes.
fn image(pages: usize) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    for (i, page) in data.chunks_mut(4096).enumerate() {
        if !(64..128).contains(&i) {
            uffd_testkit::page_pattern(i, page);
        }
    }
    data
}

/// A page server on loopback in a thread of this process, stopped and
/// joined on drop.
struct Served {
    addr: String,
    stop: PageServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    fn start(image: &[u8], config: PageServerConfig) -> Served {
        let source: Arc<dyn PageSource> = Arc::new(MemorySource::new(image.to_vec()));
        let server = PageServer::bind("127.0.0.1:0", source, 7, config).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let stop = server.handle();
        let thread = std::thread::spawn(move || {
            server.run().expect("the page server");
        });
        Served {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The link's counters, read before the destination is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    demand_requests: u64,
    demand_pages: u64,
    pushed: u64,
    demand: u64,
    bulk: u64,
}

impl Link {
    fn of(r: &RemoteStats) -> Link {
        Link {
            demand_requests: r.demand_requests.load(Relaxed),
            demand_pages: r.demand_pages.load(Relaxed),
            pushed: r.pages_landed_pushed.load(Relaxed),
            demand: r.pages_landed_demand.load(Relaxed),
            bulk: r.pages_landed_bulk.load(Relaxed),
        }
    }

    fn landed(&self) -> u64 {
        self.pushed + self.demand + self.bulk
    }
}

/// Runs `work` on the destination's memory in a thread of its own.
fn touch<T: Send + 'static>(
    dest: &ShmemDestination,
    work: impl FnOnce(&Mapping) -> T + Send + 'static,
) -> JoinHandle<T> {
    let memory = Arc::clone(dest.memory());
    std::thread::spawn(move || work(&memory))
}

/// Waits up to a minute for `toucher`, then shuts the destination down.
/// A toucher still blocked on a fault is freed by the shutdown (the kernel
/// serves its faults once the userfaultfd is closed) and the test fails:
/// nothing is left waiting.
fn finish<T>(dest: ShmemDestination, toucher: JoinHandle<T>) -> (T, Link, Stats) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !toucher.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let finished = toucher.is_finished();
    let link = Link::of(dest.remote_stats());
    let stats = dest.shutdown();
    let value = toucher
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert!(
        finished,
        "the workload was still waiting on a fault after a minute; {link:?} {stats:?}"
    );
    (value, link, stats)
}

fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn assert_pages(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(p) = (0..want.len() / 4096)
        .find(|&p| got[p * 4096..(p + 1) * 4096] != want[p * 4096..(p + 1) * 4096])
    {
        panic!("{what}: page {p} differs");
    }
}

#[test]
fn pushed_pages_are_mapped_with_one_continue_and_never_asked_for() {
    if !available() {
        return;
    }
    let image = image(PAGES);
    let server = Served::start(
        &image,
        PageServerConfig {
            push: true,
            ..PageServerConfig::default()
        },
    );
    let dest = ShmemDestination::start(&server.addr, ShmemOptions::default()).unwrap();
    let arrived = wait_for("the whole push", Duration::from_secs(30), || {
        dest.landed_pages() == PAGES as u64
    });
    let toucher = touch(&dest, |memory| {
        let mut all = vec![0u8; memory.len()];
        memory.read(0, &mut all);
        all
    });
    let (all, link, stats) = finish(dest, toucher);
    arrived.unwrap();
    assert_pages(&all, &image, "read back");
    assert_eq!(link.demand_requests, 0, "{link:?}");
    assert_eq!(link.demand_pages, 0, "{link:?}");
    assert_eq!(link.pushed, PAGES as u64, "{link:?}");
    assert_eq!(link.landed(), PAGES as u64, "{link:?}");
    // Every page with bytes was in the page cache when touched: a MINOR
    // fault each. The zero chunk came as a range without bytes and stays
    // a hole until touched (a MISSING fault); either way one CONTINUE
    // (counted as continued, or zero for all-zero pages) maps a page.
    assert_eq!(stats.faults_minor, PAGES as u64 - 64, "{stats:?}");
    assert_eq!(stats.faults_missing, 64, "{stats:?}");
    assert_eq!(
        stats.pages_continued + stats.pages_zero,
        PAGES as u64,
        "{stats:?}"
    );
    assert!(stats.pages_zero >= 64, "the zero chunk: {stats:?}");
    assert_eq!(stats.eexist, 0, "{stats:?}");
    assert_eq!(stats.failed_installs, 0, "{stats:?}");
    assert_eq!(stats.poisoned, 0, "{stats:?}");
}

#[test]
fn without_a_push_only_touched_pages_travel_and_each_once() {
    if !available() {
        return;
    }
    let image = image(PAGES);
    let server = Served::start(&image, PageServerConfig::default());
    let dest = ShmemDestination::start(&server.addr, ShmemOptions::default()).unwrap();
    let touched: Vec<usize> = (0..PAGES).rev().step_by(3).collect();
    let pages = touched.clone();
    let toucher = touch(&dest, move |memory| {
        let mut got = Vec::new();
        // Twice: the second pass finds every page mapped.
        for _ in 0..2 {
            for &p in &pages {
                let mut page = vec![0u8; 4096];
                memory.read(p * 4096, &mut page);
                got.push((p, page));
            }
        }
        got
    });
    let (got, link, stats) = finish(dest, toucher);
    for (p, page) in got {
        assert_pages(
            &page,
            &image[p * 4096..(p + 1) * 4096],
            &format!("page {p}"),
        );
    }
    let n = touched.len() as u64;
    assert_eq!(link.demand_pages, n, "{link:?}");
    assert_eq!(link.demand, n, "{link:?}");
    assert_eq!(link.pushed, 0, "{link:?}");
    // Nothing in the page cache before its fault: MISSING faults only.
    assert_eq!(stats.faults_missing, n, "{stats:?}");
    assert_eq!(stats.faults_minor, 0, "{stats:?}");
    assert_eq!(stats.pages_continued + stats.pages_zero, n, "{stats:?}");
    assert_eq!(stats.eexist, 0, "{stats:?}");
}

#[test]
fn racing_the_push_every_page_lands_once_and_keeps_the_workloads_writes() {
    if !available() {
        return;
    }
    let image = Arc::new(image(PAGES));
    // Small frames: many of them, so the push and the faults interleave.
    let server = Served::start(
        &image,
        PageServerConfig {
            push: true,
            push_chunk: 16 << 10,
            ..PageServerConfig::default()
        },
    );
    let dest = ShmemDestination::start(
        &server.addr,
        ShmemOptions {
            threads: 3,
            ..ShmemOptions::default()
        },
    )
    .unwrap();
    let want = Arc::clone(&image);
    // Four threads, each its own pages, from the end (the push starts at
    // the front): each reads a page, checks it and writes its mark.
    let toucher = touch(&dest, move |memory| {
        std::thread::scope(|s| {
            for t in 0..4usize {
                let want = &want;
                s.spawn(move || {
                    for p in (0..PAGES).rev().filter(|p| p % 4 == t) {
                        let mut page = vec![0u8; 4096];
                        memory.read(p * 4096, &mut page);
                        assert_pages(&page, &want[p * 4096..(p + 1) * 4096], "first read");
                        memory.write(p * 4096, &mark(p));
                    }
                });
            }
        });
    });
    let landed = wait_for("the rest of the push", Duration::from_secs(30), || {
        dest.landed_pages() == PAGES as u64
    });
    // What the push brought after the marks were written must not have
    // replaced them.
    let memory = Arc::clone(dest.memory());
    let ((), link, stats) = finish(dest, toucher);
    landed.unwrap();
    let mut all = vec![0u8; PAGES * 4096];
    memory.read(0, &mut all);
    for p in 0..PAGES {
        let page = &all[p * 4096..(p + 1) * 4096];
        assert_eq!(page[..8], mark(p), "page {p} lost the workload's write");
        assert_eq!(page[8..], image[p * 4096 + 8..(p + 1) * 4096], "page {p}");
    }
    // Each page written into the page cache exactly once, mapped exactly
    // once.
    assert_eq!(link.landed(), PAGES as u64, "{link:?}");
    assert!(link.demand <= link.demand_pages, "{link:?}");
    assert_eq!(
        stats.pages_continued + stats.pages_zero,
        PAGES as u64,
        "{stats:?}"
    );
    assert_eq!(stats.eexist, 0, "{stats:?}");
    assert_eq!(stats.failed_installs, 0, "{stats:?}");
    eprintln!("landed by push {}, by demand {}", link.pushed, link.demand);
}

fn mark(p: usize) -> [u8; 8] {
    (!(p as u64)).to_le_bytes()
}

/// A page server whose demand answers and pushes the test sends, in the
/// order it chooses: the races, made deterministic.
struct Scripted {
    addr: String,
    image: Arc<Vec<u8>>,
    requests: mpsc::Receiver<(u64, u64, u32)>,
    demand: Arc<Mutex<Option<TcpStream>>>,
    bulk: Arc<Mutex<Option<TcpStream>>>,
}

fn read_frame(conn: &mut TcpStream) -> Option<Frame> {
    let mut buf = vec![0u8; HEADER];
    conn.read_exact(&mut buf).ok()?;
    let len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
    assert!(len <= 64, "a destination sends small frames only");
    buf.resize(HEADER + len, 0);
    conn.read_exact(&mut buf[HEADER..]).ok()?;
    uffd_remote::protocol::decode(&buf).ok()?.map(|(f, _)| f)
}

impl Scripted {
    fn start(image: Vec<u8>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let image_len = image.len() as u64;
        let (tx, requests) = mpsc::channel();
        let demand: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let bulk: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let (d, b) = (Arc::clone(&demand), Arc::clone(&bulk));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut hello = Vec::new();
                Frame::Hello {
                    page_size: 4096,
                    image_len,
                    identity: 1,
                }
                .encode(&mut hello);
                if conn.write_all(&hello).is_err() {
                    continue;
                }
                let Some(Frame::Attach { channel, .. }) = read_frame(&mut conn) else {
                    continue;
                };
                let slot = if channel == Channel::Demand { &d } else { &b };
                *slot.lock().unwrap() = Some(conn.try_clone().unwrap());
                let tx = tx.clone();
                std::thread::spawn(move || {
                    while let Some(frame) = read_frame(&mut conn) {
                        if let Frame::Request {
                            id, offset, len, ..
                        } = frame
                        {
                            if tx.send((id, offset, len)).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            image: Arc::new(image),
            requests,
            demand,
            bulk,
        }
    }

    fn send(&self, on: &Mutex<Option<TcpStream>>, id: u64, offset: u64, len: u32) {
        let (o, l) = (offset as usize, len as usize);
        let mut frame = Vec::new();
        Frame::Data {
            id,
            offset,
            len,
            bytes: Some(self.image[o..o + l].to_vec()),
        }
        .encode(&mut frame);
        self.send_raw(on, &frame);
    }

    fn send_raw(&self, on: &Mutex<Option<TcpStream>>, frame: &[u8]) {
        // Both channels connect at once; give the other one a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while on.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut conn = on.lock().unwrap();
        conn.as_mut().expect("connected").write_all(frame).unwrap();
    }

    /// Pushes `offset..offset + len` with one byte flipped in transit.
    fn push_corrupt(&self, offset: u64, len: u32) {
        let (o, l) = (offset as usize, len as usize);
        let mut frame = Vec::new();
        Frame::Data {
            id: 0,
            offset,
            len,
            bytes: Some(self.image[o..o + l].to_vec()),
        }
        .encode(&mut frame);
        let last = frame.len() - 100;
        frame[last] ^= 0x20;
        self.send_raw(&self.bulk, &frame);
    }

    fn answer(&self, id: u64, offset: u64, len: u32) {
        self.send(&self.demand, id, offset, len);
    }

    fn push(&self, offset: u64, len: u32) {
        self.send(&self.bulk, 0, offset, len);
    }
}

fn scripted_image() -> Vec<u8> {
    let mut data = vec![0u8; 16 * 4096];
    for (i, page) in data.chunks_mut(4096).enumerate() {
        uffd_testkit::page_pattern(i, page);
    }
    data
}

#[test]
fn a_page_pushed_while_it_is_demanded_is_written_once_by_the_push() {
    if !available() {
        return;
    }
    let server = Scripted::start(scripted_image());
    let dest = ShmemDestination::start(&server.addr, ShmemOptions::default()).unwrap();
    let toucher = touch(&dest, |memory| {
        let mut page = vec![0u8; 4096];
        memory.read(5 * 4096, &mut page);
        page
    });
    let script = (|| {
        let (id, offset, len) = server
            .requests
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("no demand request: {e}"))?;
        if (offset, len) != (5 * 4096, 4096) {
            return Err(format!("asked for {offset:#x}+{len:#x}"));
        }
        // The push of the same page while the fault's read is out...
        server.push(offset, len);
        let pushed = wait_for("the pushed copy to land", Duration::from_secs(20), || {
            dest.remote_stats().pages_landed_pushed.load(Relaxed) == 1
        });
        // ...and the answer after it, which must then change nothing.
        server.answer(id, offset, len);
        pushed
    })();
    let (page, link, stats) = finish(dest, toucher);
    script.unwrap();
    assert_pages(&page, &server.image[5 * 4096..6 * 4096], "page 5");
    assert_eq!(link.demand_pages, 1, "{link:?}");
    assert_eq!(link.pushed, 1, "{link:?}");
    assert_eq!(link.demand, 0, "the answer was written too: {link:?}");
    assert_eq!(stats.pages_continued, 1, "{stats:?}");
    assert_eq!(stats.eexist, 0, "{stats:?}");
}

#[test]
fn a_page_pushed_after_its_answer_never_replaces_the_workloads_write() {
    if !available() {
        return;
    }
    let server = Scripted::start(scripted_image());
    let dest = ShmemDestination::start(&server.addr, ShmemOptions::default()).unwrap();
    let (written_tx, written) = mpsc::channel();
    let (checked_tx, check) = mpsc::channel::<()>();
    let toucher = touch(&dest, move |memory| {
        let mut page = vec![0u8; 4096];
        memory.read(6 * 4096, &mut page);
        memory.write(6 * 4096, b"the workload's");
        let _ = written_tx.send(());
        // Read again once the late pushed copy has come.
        let _ = check.recv_timeout(Duration::from_secs(30));
        let mut after = vec![0u8; 4096];
        memory.read(6 * 4096, &mut after);
        (page, after)
    });
    let script = (|| {
        let (id, offset, len) = server
            .requests
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("no demand request: {e}"))?;
        server.answer(id, offset, len);
        written
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("the workload did not write: {e}"))?;
        server.push(offset, len);
        let r = wait_for("the late push to arrive", Duration::from_secs(20), || {
            dest.remote_stats().pushed_bytes.load(Relaxed) >= 4096
        });
        let _ = checked_tx.send(());
        r
    })();
    let ((page, after), link, stats) = finish(dest, toucher);
    script.unwrap();
    let want = &server.image[6 * 4096..7 * 4096];
    assert_pages(&page, want, "page 6");
    assert_eq!(&after[..14], b"the workload's");
    assert_eq!(after[14..], want[14..]);
    assert_eq!(link.demand, 1, "{link:?}");
    assert_eq!(link.pushed, 0, "the late copy was written: {link:?}");
    assert_eq!(stats.pages_continued, 1, "{stats:?}");
}

#[test]
fn a_pushed_frame_that_fails_its_checksum_lands_nothing_and_its_pages_are_asked_for() {
    if !available() {
        return;
    }
    let server = Scripted::start(scripted_image());
    let dest = ShmemDestination::start(&server.addr, ShmemOptions::default()).unwrap();
    // Four pages, read from the socket straight into the page cache, then
    // found corrupt: not one of them may be mapped with those bytes.
    server.push_corrupt(0, 4 * 4096);
    let seen = wait_for("the checksum failure", Duration::from_secs(20), || {
        dest.remote_stats().checksum_failures.load(Relaxed) == 1
    });
    let toucher = touch(&dest, |memory| {
        let mut page = vec![0u8; 4096];
        memory.read(4096, &mut page);
        page
    });
    let script = (|| {
        seen?;
        let (id, offset, len) = server
            .requests
            .recv_timeout(Duration::from_secs(20))
            .map_err(|e| format!("no demand request: {e}"))?;
        if (offset, len) != (4096, 4096) {
            return Err(format!("asked for {offset:#x}+{len:#x}"));
        }
        server.answer(id, offset, len);
        Ok(())
    })();
    let (page, link, stats) = finish(dest, toucher);
    script.unwrap();
    assert_pages(&page, &server.image[4096..8192], "page 1");
    assert_eq!(link.pushed, 0, "{link:?}");
    assert_eq!(link.demand, 1, "{link:?}");
    assert_eq!(stats.pages_continued, 1, "{stats:?}");
}

/// On an idle link a faulting thread writes its own demand request (no
/// wake of the link's thread on the way out), and every answer is right.
#[test]
fn an_idle_links_requests_are_written_by_the_reading_thread() {
    let image = image(PAGES);
    let server = Served::start(&image, PageServerConfig::default());
    let remote =
        uffd_remote::RemoteSource::connect(&server.addr, uffd_remote::RemoteConfig::default())
            .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reads = 32u64;
    for page in 0..reads {
        let got = runtime
            .block_on(uffd_pager::AsyncPageSource::read(
                &remote,
                page * 4096,
                4096,
            ))
            .unwrap();
        let want = &image[page as usize * 4096..][..4096];
        match got {
            uffd_pager::Fetched::Data(bytes) => assert_eq!(&bytes[..], want, "page {page}"),
            uffd_pager::Fetched::Zero => assert!(want.iter().all(|&b| b == 0), "page {page}"),
        }
        // Idle between reads, as a guest's faults are.
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = remote.stats();
    let (sent, direct) = (
        stats.demand_requests.load(Relaxed),
        stats.requests_written_by_reader.load(Relaxed),
    );
    assert_eq!(sent, reads);
    // Only a read racing the link's own writes (it re-sends what is
    // outstanding when it connects) goes through the link's thread.
    assert!(
        direct >= reads - 1,
        "{direct} of {sent} written by the reader"
    );
}

/// The anonymous destination shares the landing area's rules: pushed
/// frames read straight into it, each page landed once, every byte right
/// when the pager copies them out, straight from the landing area.
#[test]
fn the_anonymous_destination_lands_each_pushed_page_once() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let image = image(PAGES);
    let (_server, remote) = pushing_to_anonymous(&image);
    let pushed = wait_for("the whole push", Duration::from_secs(30), || {
        remote.landed_pages() == PAGES as u64
    });
    let link = Link::of(remote.stats());
    let (all, stats) = restore_anonymous(&remote, PAGES, 1);
    pushed.unwrap();
    assert_pages(&all, &image, "read back");
    assert_eq!(link.pushed, PAGES as u64, "{link:?}");
    assert_eq!(link.landed(), PAGES as u64, "{link:?}");
    assert_eq!(remote.stats().demand_requests.load(Relaxed), 0);
    // Every page was there: each was installed from the landing area by
    // the faulting page's handler thread (COPY, or a zero page), with no
    // read on the source's runtime.
    assert_eq!(stats.async_fetches, 0, "{stats:?}");
    assert!(stats.async_ready > 0, "{stats:?}");
    assert_eq!(
        stats.pages_copied + stats.pages_zero,
        PAGES as u64,
        "{stats:?}"
    );
    assert_eq!(stats.poisoned, 0, "{stats:?}");
}

/// With nothing pushed, every fault's read is sent by the handler thread
/// that read the fault, and its answer is installed by the link's thread
/// that received it: no trip through the source's runtime either way, and
/// no handler woken for the answer.
#[test]
fn a_faults_read_goes_out_from_its_handler_and_its_answer_comes_back_from_the_link() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let image = image(PAGES);
    let server = Served::start(&image, PageServerConfig::default());
    let remote = Arc::new(
        uffd_remote::RemoteSource::connect(&server.addr, uffd_remote::RemoteConfig::default())
            .unwrap(),
    );
    // Handlers that never spin sleep while a read is out, so the link's
    // thread installs the answer.
    let (all, stats) = restore_anonymous_with(&remote, PAGES, 1, Some(uffd_pager::WaitMode::Block));
    assert_pages(&all, &image, "read back");
    assert!(stats.async_fetches > 0, "{stats:?}");
    assert_eq!(stats.async_direct, stats.async_fetches, "{stats:?}");
    // Not every one: an answer that comes back before its handler has
    // gone back to sleep is left to that handler.
    assert!(stats.async_installed_on_arrival > 0, "{stats:?}");
    assert!(
        stats.async_installed_on_arrival <= stats.async_fetches,
        "{stats:?}"
    );
    let link = remote.stats();
    let (sent, by_reader) = (
        link.demand_requests.load(Relaxed),
        link.requests_written_by_reader.load(Relaxed),
    );
    assert_eq!(sent, stats.async_fetches, "one request a read");
    // The link writes only those whose handler found the writer taken
    // (by the other handler thread, at that moment): a few.
    assert!(by_reader > sent / 2, "{by_reader} of {sent} by the reader");
}

/// A page server pushing `image` in 64 KiB frames, and an anonymous
/// destination connected to it.
fn pushing_to_anonymous(image: &[u8]) -> (Served, Arc<uffd_remote::RemoteSource>) {
    let server = Served::start(
        image,
        PageServerConfig {
            push: true,
            push_chunk: 64 << 10,
            ..PageServerConfig::default()
        },
    );
    let remote = Arc::new(
        uffd_remote::RemoteSource::connect(&server.addr, uffd_remote::RemoteConfig::default())
            .unwrap(),
    );
    (server, remote)
}

/// Restores `pages` pages from `remote` into new anonymous memory, as a
/// VM's would be: a pager of two handler threads, the memory read by
/// `readers` threads at once (each from its own starting page, so that
/// their faults interleave). Returns the memory's bytes and the pager's
/// statistics.
fn restore_anonymous(
    remote: &Arc<uffd_remote::RemoteSource>,
    pages: usize,
    readers: usize,
) -> (Vec<u8>, Stats) {
    restore_anonymous_with(remote, pages, readers, None)
}

/// [`restore_anonymous`], its handlers waiting for faults as `wait` says
/// (`None`: the pager's default).
fn restore_anonymous_with(
    remote: &Arc<uffd_remote::RemoteSource>,
    pages: usize,
    readers: usize,
    wait: Option<uffd_pager::WaitMode>,
) -> (Vec<u8>, Stats) {
    let source: Arc<dyn PageSource> =
        Arc::new(uffd_pager::AsyncSource::new(Arc::clone(remote) as _).unwrap());
    let memory = Arc::new(Mapping::new(uffd::MemoryKind::Anon, pages * 4096).unwrap());
    let uffd = uffd::OpenOptions::new()
        .user_mode_only(true)
        .open()
        .unwrap();
    let regions = vec![uffd_pager::Region::new(
        memory.addr(),
        memory.len() as u64,
        0,
        4096,
    )];
    uffd_pager::register(&uffd, &regions, uffd::RegisterMode::MISSING).unwrap();
    let mut builder = uffd_pager::Pager::builder(source).threads(2);
    if let Some(wait) = wait {
        builder = builder.wait(wait);
    }
    // SAFETY: `memory` is touched only through raw copies (Mapping hands
    // out no references), so nothing relies on what its missing pages hold.
    let pager = unsafe { builder.start(uffd, regions) }.unwrap();
    let threads: Vec<_> = (0..readers)
        .map(|r| {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || {
                let mut page = [0u8; 4096];
                for k in 0..pages {
                    let p = (k + r * pages / readers) % pages;
                    memory.read(p * 4096, &mut page);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut all = vec![0u8; pages * 4096];
    memory.read(0, &mut all);
    let stats = pager.shutdown();
    assert_eq!(stats.poisoned, 0, "{stats:?}");
    (all, stats)
}

/// Once the pager has installed a page in its target, the anonymous
/// landing area gives that page's memory back (RSS falls by about the
/// image), unless told to keep it; a second target restored from the
/// same source then fetches the pages again, every byte right.
#[test]
fn the_anonymous_destination_gives_back_installed_pages_unless_told_to_keep_them() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    const IMAGE_PAGES: usize = 8192;
    let image = image(IMAGE_PAGES);
    let data_pages = (0..IMAGE_PAGES)
        .filter(|&p| image[p * 4096..(p + 1) * 4096].iter().any(|&b| b != 0))
        .count() as u64;
    let server = Served::start(
        &image,
        PageServerConfig {
            push: true,
            ..PageServerConfig::default()
        },
    );
    for keep in [false, true] {
        let remote = Arc::new(
            uffd_remote::RemoteSource::connect(
                &server.addr,
                uffd_remote::RemoteConfig {
                    keep_installed: keep,
                    ..uffd_remote::RemoteConfig::default()
                },
            )
            .unwrap(),
        );
        wait_for("the whole push", Duration::from_secs(30), || {
            remote.landed_pages() == IMAGE_PAGES as u64
        })
        .unwrap();
        let landed_kib = uffd_testkit::rss_anon_kib(std::process::id());
        let (first, _) = restore_anonymous(&remote, IMAGE_PAGES, 1);
        assert_pages(&first, &image, "the first target");
        let stats = remote.stats();
        if keep {
            assert_eq!(remote.landed_pages(), IMAGE_PAGES as u64);
            assert_eq!(stats.pages_released.load(Relaxed), 0);
        } else {
            // Every page that arrived with bytes goes (zero pages among
            // them); a zero range arrived without any and stays.
            wait_for("the releases", Duration::from_secs(10), || {
                stats.pages_released.load(Relaxed) >= data_pages
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: {} released, {} landed, {data_pages} data pages",
                    stats.pages_released.load(Relaxed),
                    remote.landed_pages()
                )
            });
            assert_eq!(
                remote.landed_pages(),
                IMAGE_PAGES as u64 - stats.pages_released.load(Relaxed)
            );
        }
        // The target is unmapped by now; `first`, the image's size, is
        // what was added, less the landing's copy if that went.
        let grew_kib = uffd_testkit::rss_anon_kib(std::process::id()).saturating_sub(landed_kib);
        let image_kib = (IMAGE_PAGES * 4) as u64;
        if keep {
            assert!(
                grew_kib > image_kib * 3 / 4,
                "kept: RSS grew {grew_kib} KiB"
            );
        } else {
            assert!(
                grew_kib < image_kib / 4,
                "released: RSS grew {grew_kib} KiB"
            );
        }
        let asked = stats.demand_pages.load(Relaxed) + stats.bulk_requests.load(Relaxed);
        let (second, _) = restore_anonymous(&remote, IMAGE_PAGES, 1);
        assert_pages(&second, &image, "the second target");
        let asked_again = stats.demand_pages.load(Relaxed) + stats.bulk_requests.load(Relaxed);
        if keep {
            assert_eq!(asked_again, asked, "kept pages are not fetched again");
        } else {
            assert!(asked_again > asked, "released pages are fetched again");
        }
    }
}

/// Targets restored at once from one source, each read by several threads
/// while the landing area releases what either installed: a page is never
/// released while a copy from it is in progress, so every byte of every
/// target is right, round after round.
#[test]
fn targets_restored_at_once_get_every_byte_while_pages_are_released() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    const IMAGE_PAGES: usize = 2048;
    let image = image(IMAGE_PAGES);
    let (_server, remote) = pushing_to_anonymous(&image);
    for round in 0..4 {
        let targets: Vec<_> = (0..3)
            .map(|_| {
                let remote = Arc::clone(&remote);
                std::thread::spawn(move || restore_anonymous(&remote, IMAGE_PAGES, 3).0)
            })
            .collect();
        for (t, target) in targets.into_iter().enumerate() {
            let got = target.join().unwrap();
            assert_pages(&got, &image, &format!("round {round}, target {t}"));
        }
    }
    assert!(remote.stats().pages_released.load(Relaxed) > 0);
}

/// A read's completion runs on the link's thread, and may be the last
/// holder of the page source above it (a pager that stopped meanwhile): it
/// drops that source, runtime and all, there. Neither that nor a
/// completion that panics may take the link down: the next read is
/// answered.
#[test]
fn a_completion_that_drops_the_last_source_or_panics_leaves_the_link_up() {
    use uffd_pager::AsyncPageSource;
    let image = image(PAGES);
    let server = Served::start(&image, PageServerConfig::default());
    let remote = Arc::new(
        uffd_remote::RemoteSource::connect(&server.addr, uffd_remote::RemoteConfig::default())
            .unwrap(),
    );
    let read = |page: u64, done: uffd_pager::ReadDone| {
        remote
            .read_direct(page * 4096, 4096, done)
            .map_err(|_| "the read did not go out directly")
            .unwrap()
    };
    let answered = |rx: &mpsc::Receiver<bool>, what: &str| {
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true), "{what}");
    };
    let (tx, rx) = mpsc::channel();
    let above = uffd_pager::AsyncSource::new(Arc::clone(&remote) as _).unwrap();
    let sent = tx.clone();
    read(
        1,
        Box::new(move |r| {
            drop(above);
            sent.send(r.is_ok()).unwrap();
        }),
    );
    answered(&rx, "the read whose completion dropped the source above");
    read(2, Box::new(|_| panic!("a completion that panics")));
    read(3, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    answered(&rx, "the read after a completion that panicked");
}
