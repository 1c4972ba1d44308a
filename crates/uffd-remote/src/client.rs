//! The destination: [`RemoteSource`], a page source that fetches from a
//! page server over a demand channel (faulting pages, never queued behind
//! anything) and a bulk channel (background reads and the server's push),
//! and survives the connection dropping.

use std::collections::HashMap;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use uffd_pager::{
    AsyncPageSource, Content, Fetched, MappedBytes, ReadDone, ReadFuture, SourceError,
};

use crate::io::{write_frame, FrameReader, LinkError, Read};
use crate::protocol::{request_bytes, Channel, Frame, ProtocolError, MAX_REQUEST};

/// How a destination behaves when the link fails.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// How long to keep reconnecting after a connection drops; past it,
    /// outstanding and new reads fail (the engine poisons those pages).
    pub reconnect_timeout: Duration,
    /// Times a frame that fails its checksum is asked for again before its
    /// pages are given up.
    pub checksum_retries: u32,
    /// Send faulting pages' requests on the bulk channel too, behind the
    /// push: the naive one-connection design, kept as the benchmark's
    /// baseline (never what a destination should run).
    pub single_channel: bool,
    /// Keep every page that arrived in the anonymous landing area for
    /// later reads, instead of giving its memory back once the pager has
    /// installed it in a target. Keeping costs a copy of the image on this
    /// host for as long as the source lives; it saves fetching a page
    /// again when a second target (another VM restored from the same
    /// source) wants it.
    pub keep_installed: bool,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            reconnect_timeout: Duration::from_secs(60),
            checksum_retries: 8,
            single_channel: false,
            keep_installed: false,
        }
    }
}

/// What the destination saw.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Reads served from pushed or earlier fetched bytes, no round trip.
    pub local_hits: AtomicU64,
    /// Reads sent on the demand channel.
    pub demand_requests: AtomicU64,
    /// Pages those demand reads asked for.
    pub demand_pages: AtomicU64,
    /// Reads sent on the bulk channel.
    pub bulk_requests: AtomicU64,
    /// Requests (either channel) the reading thread wrote itself, without
    /// waking the link's thread; the rest went through it.
    pub requests_written_by_reader: AtomicU64,
    /// Pages written into the landing area (or the page cache) from
    /// pushed frames. A page is written once until it is released, so
    /// these three less [`RemoteStats::pages_released`] are the pages in
    /// the landing area.
    pub pages_landed_pushed: AtomicU64,
    /// Pages written from answers on the demand channel.
    pub pages_landed_demand: AtomicU64,
    /// Pages written from answers to background reads on the bulk channel.
    pub pages_landed_bulk: AtomicU64,
    /// Pages of the anonymous landing area whose memory was given back
    /// once the pager had installed them (see
    /// [`RemoteConfig::keep_installed`]).
    pub pages_released: AtomicU64,
    /// Bytes that arrived unasked (push).
    pub pushed_bytes: AtomicU64,
    /// Frames that failed their checksum and were asked for again.
    pub checksum_failures: AtomicU64,
    /// Connections made again after one dropped.
    pub reconnects: AtomicU64,
}

/// A page's state in the [`Landing`]. Each page is written at most once:
/// one writer moves it from `EMPTY` or `DEMANDED` to `WRITING` (a
/// compare-and-swap, so a page pushed and demanded at once is written by
/// whichever frame comes first, and only by it), copies its bytes and
/// publishes it as `ARRIVED` or `ZERO`. Nothing reads a page before that,
/// and nothing writes it after: in the page cache a published page may be
/// mapped already and written by the workload.
///
/// In the anonymous landing area an `ARRIVED` page the pager installed is
/// released: moved to `RELEASING` only while nobody has it pinned (a copy
/// out of it, or a kernel copy from it, in progress), its memory dropped,
/// and then `RELEASED` for good: a VM holds it, and a push arriving later
/// must not land it again (nobody would install it). Another reader of it
/// gets its bytes from the page server, in the answer.
mod page {
    /// No bytes, nobody asked.
    pub const EMPTY: u8 = 0;
    /// A fault asked for it on the demand channel; no bytes yet.
    pub const DEMANDED: u8 = 1;
    /// One writer is copying its bytes in.
    pub const WRITING: u8 = 2;
    /// Its bytes are in place.
    pub const ARRIVED: u8 = 3;
    /// It arrived as all zero and nothing was written: anonymous memory
    /// and a page-cache hole both read as zero.
    pub const ZERO: u8 = 4;
    /// Its memory is being given back; `RELEASED` next.
    pub const RELEASING: u8 = 5;
    /// Installed and its memory given back; never written again.
    pub const RELEASED: u8 = 6;
}

/// Installed pages waiting for their memory to be given back, in runs.
#[derive(Default)]
struct ToRelease {
    runs: Vec<std::ops::Range<u64>>,
    /// Runs queued so far, ever: unchanged between two looks means the
    /// pager installed nothing meanwhile.
    queued: u64,
}

/// The fewest pages released with one `madvise` while the pager is still
/// installing: faults install pages in any order, and a page released
/// alone costs a call and a TLB flush of its own (measured: 24 000
/// calls for a 256 MiB restore, a third slower). Shorter runs wait until
/// their neighbours join them, or until the pager has been idle for
/// [`RELEASE_DELAY`].
const MIN_RELEASE_PAGES: u64 = 64;

/// How long installed pages wait to be released, gathering more.
const RELEASE_DELAY: Duration = Duration::from_millis(50);

/// Where a page's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Push,
    Demand,
    BulkRead,
}

/// Pages that arrived: the destination's landing area. Either private
/// anonymous memory, where they wait to be copied out (the pager installs
/// them with COPY), or the workload's own memfd, written through its alias
/// (the page cache), where they wait to be mapped with CONTINUE.
struct Landing {
    memory: Arc<uffd::Mapping>,
    page_cache: bool,
    states: Vec<AtomicU8>,
    /// Readers of each page's bytes right now; a pinned page is never
    /// released.
    pins: Vec<AtomicU32>,
    /// Installed pages to release, and the wake of the thread that does.
    to_release: Mutex<ToRelease>,
    release_due: tokio::sync::Notify,
    /// Pages published (`ARRIVED` or `ZERO`).
    landed: AtomicU64,
    /// Threads waiting for a page to leave `DEMANDED` or `WRITING`;
    /// writers notify `changed` only when there are any.
    waiters: AtomicUsize,
    changed: (Mutex<()>, Condvar),
}

impl Landing {
    /// An anonymous landing area of `len` bytes.
    fn anonymous(len: u64) -> std::io::Result<Landing> {
        let memory = uffd::Mapping::new(uffd::MemoryKind::Anon, (len as usize).max(4096))?;
        Ok(Landing::over(Arc::new(memory), false, len))
    }

    /// The page cache of `memory`'s memfd, `len` bytes of it, written
    /// through its alias.
    fn page_cache(memory: Arc<uffd::Mapping>, len: u64) -> Landing {
        debug_assert!(memory.alias_ptr().is_some());
        Landing::over(memory, true, len)
    }

    fn over(memory: Arc<uffd::Mapping>, page_cache: bool, len: u64) -> Landing {
        let pages = len.div_ceil(4096).min(memory.len() as u64 / 4096) as usize;
        Landing {
            memory,
            page_cache,
            states: (0..pages).map(|_| AtomicU8::new(page::EMPTY)).collect(),
            pins: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            to_release: Mutex::new(ToRelease::default()),
            release_due: tokio::sync::Notify::new(),
            landed: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            changed: (Mutex::new(()), Condvar::new()),
        }
    }

    fn state(&self, page: u64) -> u8 {
        self.states[page as usize].load(Acquire)
    }

    fn published(state: u8) -> bool {
        state == page::ARRIVED || state == page::ZERO
    }

    /// The pages of `offset..offset + len`, if it is whole pages inside
    /// the landing area.
    fn pages(&self, offset: u64, len: u64) -> Option<std::ops::Range<u64>> {
        let end = offset.checked_add(len)?;
        if !offset.is_multiple_of(4096) || end / 4096 > self.states.len() as u64 {
            return None;
        }
        Some(offset / 4096..end / 4096)
    }

    /// Publishes a page this thread was writing.
    fn publish(&self, page: u64, state: u8) {
        self.states[page as usize].store(state, SeqCst);
        self.landed.fetch_add(1, Relaxed);
        self.notify();
    }

    /// Wakes whoever waits for a page to change state; called after the
    /// change (a SeqCst store or compare-and-swap).
    fn notify(&self) {
        // The change, then a SeqCst load: a waiter that registered before
        // the change is seen here, and one that registers after it sees
        // the new state when it checks under the lock.
        if self.waiters.load(SeqCst) > 0 {
            let _guard = self
                .changed
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.changed.1.notify_all();
        }
    }

    /// Waits (at most `timeout`) for some page's state to change, unless
    /// `done` already holds.
    fn wait_change(&self, timeout: Duration, done: impl Fn() -> bool) {
        let guard = self
            .changed
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, SeqCst);
        if !done() {
            let _ = self
                .changed
                .1
                .wait_timeout(guard, timeout)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.waiters.fetch_sub(1, SeqCst);
    }

    /// Keeps the whole pages of `offset..offset + len` (`None`: all zero)
    /// that nobody wrote yet; returns how many it wrote.
    fn store(&self, offset: u64, len: u32, bytes: Option<&[u8]>) -> u64 {
        let Some(pages) = self.pages(offset, u64::from(len) / 4096 * 4096) else {
            return 0;
        };
        if bytes.is_some_and(|b| (b.len() as u64) < (pages.end - pages.start) * 4096) {
            return 0;
        }
        let mut written = 0;
        for page in pages.clone() {
            let claimed = [page::EMPTY, page::DEMANDED].into_iter().any(|from| {
                self.states[page as usize]
                    .compare_exchange(from, page::WRITING, AcqRel, Acquire)
                    .is_ok()
            });
            if !claimed {
                // Being written or written: by this frame's twin (pushed
                // and demanded at once), never twice.
                continue;
            }
            let state = match bytes {
                Some(b) => {
                    let k = ((page - pages.start) * 4096) as usize;
                    let at = (page * 4096) as usize;
                    let b = &b[k..k + 4096];
                    if self.page_cache {
                        self.memory.write_alias(at, b);
                    } else {
                        self.memory.write(at, b);
                    }
                    page::ARRIVED
                }
                None => page::ZERO,
            };
            self.publish(page, state);
            written += 1;
        }
        written
    }

    /// The range, if every page of it arrived.
    fn fetch(&self, offset: u64, len: usize) -> Option<Fetched> {
        let pages = self.pages(offset, len as u64)?;
        if !len.is_multiple_of(4096) || !self.pin(pages.clone()) {
            return None;
        }
        let fetched = if pages.clone().all(|p| self.state(p) == page::ZERO) {
            Fetched::Zero
        } else {
            let mut buf = vec![0u8; len];
            self.read(offset, &mut buf);
            Fetched::Data(buf)
        };
        self.unpin(pages);
        Some(fetched)
    }

    /// Pins every page of `pages` if every one is published; false, with
    /// none pinned, if one is not. A pinned page keeps its bytes.
    fn pin(&self, pages: std::ops::Range<u64>) -> bool {
        for p in pages.clone() {
            // The pin, then the state, both SeqCst, against the release's
            // state change, then pins: one of the two sees the other.
            self.pins[p as usize].fetch_add(1, SeqCst);
            if !Landing::published(self.states[p as usize].load(SeqCst)) {
                self.unpin(pages.start..p + 1);
                return false;
            }
        }
        true
    }

    fn unpin(&self, pages: std::ops::Range<u64>) {
        for p in pages {
            self.pins[p as usize].fetch_sub(1, SeqCst);
        }
    }

    /// Queues the whole pages of `offset..offset + len`, installed in a
    /// target, for [`Landing::release_queued`].
    fn installed(&self, offset: u64, len: u64) {
        let Some(pages) = self.pages(offset, len / 4096 * 4096) else {
            return;
        };
        if self.page_cache || pages.is_empty() {
            return;
        }
        let first = {
            let mut queue = self
                .to_release
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let first = queue.runs.is_empty();
            queue.queued += 1;
            match queue.runs.last_mut() {
                Some(last) if last.end == pages.start => last.end = pages.end,
                _ => queue.runs.push(pages),
            }
            first
        };
        if first {
            self.release_due.notify_one();
        }
    }

    /// Releases the queued pages that are `ARRIVED` and not pinned, in
    /// runs of at least [`MIN_RELEASE_PAGES`] unless `everything`: their
    /// memory goes back to the kernel and they are `RELEASED`; shorter
    /// runs stay queued. Returns how many it released.
    fn release_queued(&self, everything: bool) -> u64 {
        let mut runs = std::mem::take(
            &mut self
                .to_release
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .runs,
        );
        // Faults install pages in any order: sorted and merged, the runs
        // take one `madvise` (one TLB flush) each, not one per fault.
        runs.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(runs.len());
        for run in runs {
            match merged.last_mut() {
                Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
                _ => merged.push(run),
            }
        }
        let (now, later): (Vec<_>, Vec<_>) = merged
            .into_iter()
            .partition(|r| everything || r.end - r.start >= MIN_RELEASE_PAGES);
        if !later.is_empty() {
            self.to_release
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .runs
                .extend(later);
        }
        let mut released = 0;
        for run in now {
            let mut from = run.start;
            for p in run.clone() {
                let state = &self.states[p as usize];
                let ours = state
                    .compare_exchange(page::ARRIVED, page::RELEASING, SeqCst, SeqCst)
                    .is_ok();
                if ours && self.pins[p as usize].load(SeqCst) != 0 {
                    // Being copied from: it stays, and its reader's own
                    // install queues it again.
                    state.store(page::ARRIVED, SeqCst);
                } else if ours || matches!(state.load(SeqCst), page::ZERO | page::RELEASED) {
                    // Zero and released pages hold no bytes anyone needs
                    // and are never written again: a run may cover them.
                    continue;
                }
                released += self.drop_memory(from..p);
                from = p + 1;
            }
            released += self.drop_memory(from..run.end);
        }
        if released > 0 {
            self.notify();
        }
        released
    }

    /// Gives back the memory of `pages`, each `RELEASING`, `ZERO` or
    /// `RELEASED`, and makes the `RELEASING` ones `RELEASED`; if the kernel
    /// refuses, their bytes are intact and they are `ARRIVED` again.
    /// Returns how many it released.
    fn drop_memory(&self, pages: std::ops::Range<u64>) -> u64 {
        if pages.is_empty() {
            return 0;
        }
        let (at, len) = (pages.start * 4096, (pages.end - pages.start) * 4096);
        let dropped = self
            .memory
            .advise(at as usize, len as usize, rustix::mm::Advice::LinuxDontNeed)
            .is_ok();
        let next = if dropped {
            page::RELEASED
        } else {
            page::ARRIVED
        };
        let mut n = 0;
        for p in pages {
            let state = &self.states[p as usize];
            if state.load(SeqCst) == page::RELEASING {
                state.store(next, SeqCst);
                n += 1;
            }
        }
        if !dropped {
            return 0;
        }
        self.landed.fetch_sub(n, Relaxed);
        n
    }

    /// The bytes of `pages`, every one of them published and pinned, of
    /// the anonymous landing area.
    #[allow(unsafe_code)]
    fn published_bytes(&self, pages: std::ops::Range<u64>) -> &[u8] {
        assert!(!self.page_cache);
        debug_assert!(pages.clone().all(|p| Landing::published(self.state(p))));
        let (offset, len) = (pages.start * 4096, (pages.end - pages.start) * 4096);
        // SAFETY: `pages` lies inside the mapping (`Landing::pages`
        // checked), which lives as long as `self`; published pages of the
        // anonymous landing area are never written again (only held
        // pages are, see `page`) and, pinned, not released until unpinned;
        // nothing else maps them.
        unsafe {
            std::slice::from_raw_parts(self.memory.as_ptr().add(offset as usize), len as usize)
        }
    }

    /// Copies published pages out.
    fn read(&self, offset: u64, buf: &mut [u8]) {
        if self.page_cache {
            self.memory.read_alias(offset as usize, buf);
        } else {
            self.memory.read(offset as usize, buf);
        }
    }

    /// Pages of `pages` that arrived as zero get a page in the page cache
    /// (CONTINUE cannot map a hole). A read through the alias allocates
    /// one, zeroed, and changes nothing: not even a page the workload
    /// mapped and wrote meanwhile.
    fn materialise_zeros(&self, pages: std::ops::Range<u64>) {
        if !self.page_cache {
            return;
        }
        let mut byte = [0u8; 1];
        for p in pages.filter(|&p| self.state(p) == page::ZERO) {
            self.memory.read_alias((p * 4096) as usize, &mut byte);
        }
    }
}

/// Pushed frames are read from the socket straight into the landing area
/// (the page cache, for shmem): their pages are claimed like any writer's,
/// so a page being written or written already is never written again.
#[allow(unsafe_code)]
// SAFETY: `claim` holds only pages it moved to WRITING, which nothing else
// reads or writes until `publish` or `abandon`; `at` points into
// `memory` (its alias for the page cache), mapped while the landing lives,
// one contiguous mapping.
unsafe impl crate::io::Place for Landing {
    fn claim(&self, offset: u64, len: u32) -> Option<crate::io::Claim> {
        if !len.is_multiple_of(4096) {
            return None;
        }
        let pages = self.pages(offset, u64::from(len))?;
        let held = pages
            .map(|page| {
                [page::EMPTY, page::DEMANDED].into_iter().any(|from| {
                    self.states[page as usize]
                        .compare_exchange(from, page::WRITING, AcqRel, Acquire)
                        .is_ok()
                })
            })
            .collect();
        Some(crate::io::Claim { offset, held })
    }

    fn at(&self, offset: u64) -> *mut u8 {
        let base = match self.memory.alias_ptr() {
            Some(alias) if self.page_cache => alias,
            _ => self.memory.as_ptr(),
        };
        base.wrapping_add(offset as usize)
    }

    fn publish(&self, claim: &crate::io::Claim) {
        for (k, _) in claim.held.iter().enumerate().filter(|(_, &h)| h) {
            self.publish(claim.offset / 4096 + k as u64, page::ARRIVED);
        }
    }

    fn abandon(&self, claim: &crate::io::Claim) {
        const ZEROS: [u8; 4096] = [0; 4096];
        for (k, _) in claim.held.iter().enumerate().filter(|(_, &h)| h) {
            let page = claim.offset / 4096 + k as u64;
            // Back to zero, as a page nobody wrote reads: a zero range
            // landing on it later writes nothing.
            let at = (page * 4096) as usize;
            if self.page_cache {
                self.memory.write_alias(at, &ZEROS);
            } else {
                self.memory.write(at, &ZEROS);
            }
            self.states[page as usize].store(page::EMPTY, SeqCst);
        }
        self.notify();
    }
}

struct Pending {
    offset: u64,
    len: u32,
    priority: u8,
    checksum_failures: u32,
    /// Connections that ended in an invalid frame while this was
    /// outstanding.
    broken_links: u32,
    /// The connection (its generation) this was last written on; 0: none.
    sent_on: u64,
    reply: Reply,
}

/// Where a read's answer goes.
enum Reply {
    /// To a task (or a blocked thread) awaiting it.
    Task(oneshot::Sender<Result<Fetched, SourceError>>),
    /// To the engine, called on the link's thread, which installs the
    /// pages there: no other thread woken on the way (see
    /// [`AsyncPageSource::read_direct`]). Never called under a lock of
    /// this source's: the engine may read again from inside it.
    Direct(ReadDone),
}

impl Reply {
    fn send(self, result: Result<Fetched, SourceError>) {
        match self {
            // A receiver that gave up wants nothing.
            Reply::Task(tx) => drop(tx.send(result)),
            // A completion that panics must not take the link's task, and
            // every read still waiting on it, down with it.
            Reply::Direct(done) => {
                let call = std::panic::AssertUnwindSafe(|| done(result));
                if let Err(panic) = std::panic::catch_unwind(call) {
                    tracing::error!(
                        "a read's completion panicked: {}",
                        uffd_pager::panic_message(&*panic)
                    );
                }
            }
        }
    }
}

/// One channel's reads: those outstanding, and the connection's writer
/// while it is up. A reading thread writes its own request there when it
/// can take the writer at once (a wake of the link's thread saved, tens of
/// microseconds on a VM); otherwise it leaves the request to the link. A
/// request is outstanding before it is written, so a connection that fails
/// meanwhile has it sent again on the next one.
struct ChannelState {
    outstanding: Mutex<Outstanding>,
    /// The connection's write half and its generation, while it is up.
    writer: tokio::sync::Mutex<Option<(Writer, u64)>>,
}

struct Outstanding {
    reads: HashMap<u64, Pending>,
    next_id: u64,
}

impl Outstanding {
    /// Makes `p` outstanding under a fresh id.
    fn add(&mut self, p: Pending) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.reads.insert(id, p);
        id
    }
}

impl ChannelState {
    fn new() -> ChannelState {
        ChannelState {
            outstanding: Mutex::new(Outstanding {
                reads: HashMap::new(),
                next_id: 1,
            }),
            writer: tokio::sync::Mutex::new(None),
        }
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, Outstanding> {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes request `id` now if the writer is free and the socket takes
    /// the whole frame without waiting; false leaves it to the link.
    fn try_write_now(&self, id: u64, frame: &[u8], stats: &RemoteStats) -> bool {
        let Ok(mut writer) = self.writer.try_lock() else {
            return false;
        };
        let Some((wr, generation)) = writer.as_mut() else {
            return false;
        };
        match self.outstanding().reads.get(&id) {
            // Answered already, or sent on this connection by the link
            // (which re-sends what is outstanding when it connects).
            None => return true,
            Some(p) if p.sent_on == *generation => return true,
            Some(_) => {}
        }
        match wr.as_ref().try_write(frame) {
            Ok(n) if n == frame.len() => {
                if let Some(p) = self.outstanding().reads.get_mut(&id) {
                    p.sent_on = *generation;
                }
                stats.requests_written_by_reader.fetch_add(1, Relaxed);
                true
            }
            Ok(_) => {
                // Part of a frame is on the wire and nothing may follow
                // it: end this connection; the next one sends every
                // outstanding read again, this one included.
                let _ = rustix::net::shutdown(wr.as_ref(), rustix::net::Shutdown::Both);
                *writer = None;
                true
            }
            Err(_) => false,
        }
    }
}

struct Shared {
    addr: String,
    session: u64,
    image_len: u64,
    identity: u64,
    config: RemoteConfig,
    landing: Arc<Landing>,
    dead: AtomicBool,
    stats: RemoteStats,
    demand: ChannelState,
    bulk: ChannelState,
}

impl Shared {
    /// Writes what a data frame brought into the landing area, counted by
    /// where it came from.
    fn land(&self, origin: Origin, offset: u64, len: u32, bytes: Option<&[u8]>) {
        let written = self.landing.store(offset, len, bytes);
        let counter = match origin {
            Origin::Push => &self.stats.pages_landed_pushed,
            Origin::Demand => &self.stats.pages_landed_demand,
            Origin::BulkRead => &self.stats.pages_landed_bulk,
        };
        if written > 0 {
            counter.fetch_add(written, Relaxed);
        }
    }

    fn channel(&self, channel: Channel) -> &ChannelState {
        match channel {
            Channel::Demand => &self.demand,
            Channel::Bulk => &self.bulk,
        }
    }

    fn failed(&self, offset: u64, len: u64, why: &str) -> SourceError {
        SourceError::Failed {
            offset,
            len,
            source: std::io::Error::other(format!("page server {}: {why}", self.addr)),
        }
    }
}

/// A page source fetching from `uffd page-server` at `tcp://HOST:PORT`.
pub struct RemoteSource {
    shared: Arc<Shared>,
    /// Requests the reading thread could not write itself, by id.
    demand: mpsc::UnboundedSender<u64>,
    bulk: mpsc::UnboundedSender<u64>,
    /// The demand and bulk runtimes, taken in drop.
    runtimes: Vec<tokio::runtime::Runtime>,
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        // Possibly on one of its own runtimes' threads (a completion
        // holding the last reference).
        for runtime in self.runtimes.drain(..) {
            uffd_pager::drop_runtime(runtime);
        }
    }
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("addr", &self.shared.addr)
            .field("image_len", &self.shared.image_len)
            .finish()
    }
}

/// Why a page server could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting or the hello failed.
    #[error("connecting to the page server at {addr}: {source}")]
    Link {
        /// HOST:PORT.
        addr: String,
        /// What failed.
        source: LinkError,
    },
    /// The first frame was not a hello.
    #[error("the peer at {0} did not greet like a page server")]
    NoHello(String),
    /// The landing area or the runtime could not be made.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RemoteSource {
    /// Connects both channels to `addr` (HOST:PORT) and learns the image.
    pub fn connect(addr: &str, config: RemoteConfig) -> Result<RemoteSource, ConnectError> {
        RemoteSource::connect_with(addr, config, Landing::anonymous)
    }

    /// Connects like [`RemoteSource::connect`], landing pages in the page
    /// cache of a new shmem memfd as long as the image, through its alias;
    /// returns that memory too (the workload's, see [`crate::shmem`]).
    pub(crate) fn connect_page_cache(
        addr: &str,
        config: RemoteConfig,
    ) -> Result<(RemoteSource, Arc<uffd::Mapping>), ConnectError> {
        let mut memory = None;
        let remote = RemoteSource::connect_with(addr, config, |len| {
            if len == 0 || len % 4096 != 0 {
                return Err(std::io::Error::other(format!(
                    "the image is {len} bytes, not a whole number of 4 KiB pages: \
                     shmem memory cannot end in part of a page"
                )));
            }
            // The peer names the length: memory larger than this machine
            // has could never be restored, and its page table alone
            // (a byte a page) could exhaust memory.
            let info = rustix::system::sysinfo();
            let ram = u64::from(info.mem_unit).saturating_mul(info.totalram as u64);
            if len > ram {
                return Err(std::io::Error::other(format!(
                    "the image is {len} bytes, more than this machine's {ram} bytes of memory"
                )));
            }
            let len_usize = usize::try_from(len).map_err(std::io::Error::other)?;
            let m = Arc::new(uffd::Mapping::new(uffd::MemoryKind::Shmem, len_usize)?);
            memory = Some(Arc::clone(&m));
            Ok(Landing::page_cache(m, len))
        })?;
        let memory = memory.expect("the landing was made");
        Ok((remote, memory))
    }

    fn connect_with(
        addr: &str,
        config: RemoteConfig,
        landing: impl FnOnce(u64) -> std::io::Result<Landing>,
    ) -> Result<RemoteSource, ConnectError> {
        // One thread per channel, the bulk one niced, so the demand channel
        // never waits for the bulk channel's work.
        let runtime = crate::runtime("uffd-remote-demand", 0)?;
        let bulk_runtime = crate::runtime("uffd-remote-bulk", 10)?;
        let link_err = |source: LinkError| ConnectError::Link {
            addr: addr.to_string(),
            source,
        };
        let hello = runtime.block_on(async {
            let stream = TcpStream::connect(addr).await?;
            let mut reader = FrameReader::new(stream);
            reader.next().await
        });
        let Some(Frame::Hello {
            image_len,
            identity,
            ..
        }) = hello.map_err(link_err)?
        else {
            return Err(ConnectError::NoHello(addr.to_string()));
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            session: nanos ^ (u64::from(std::process::id()) << 40),
            image_len,
            identity,
            config,
            landing: Arc::new(landing(image_len)?),
            dead: AtomicBool::new(false),
            stats: RemoteStats::default(),
            demand: ChannelState::new(),
            bulk: ChannelState::new(),
        });
        let (demand, demand_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        runtime.spawn(link(Arc::clone(&shared), Channel::Demand, demand_rx));
        bulk_runtime.spawn(link(Arc::clone(&shared), Channel::Bulk, bulk_rx));
        if !shared.landing.page_cache && !shared.config.keep_installed {
            bulk_runtime.spawn(release_installed(Arc::clone(&shared)));
        }
        info!(addr, image_len, "page server reached");
        Ok(RemoteSource {
            shared,
            demand,
            bulk,
            runtimes: vec![runtime, bulk_runtime],
        })
    }

    /// The image's length and identity as the page server announced them,
    /// as text (what a successor server must see too).
    pub fn len_and_identity(&self) -> String {
        format!("{}:{:016x}", self.shared.image_len, self.shared.identity)
    }

    /// What the destination saw so far.
    pub fn stats(&self) -> &RemoteStats {
        &self.shared.stats
    }

    fn request(&self, channel: Channel, offset: u64, len: usize) -> ReadFuture<'_> {
        let shared = &self.shared;
        Box::pin(async move {
            if let Some(hit) = shared.landing.fetch(offset, len) {
                shared.stats.local_hits.fetch_add(1, Relaxed);
                return Ok(hit);
            }
            let (reply, answer) = oneshot::channel();
            self.send(channel, offset, len, Reply::Task(reply));
            answer
                .await
                .unwrap_or_else(|_| Err(shared.failed(offset, len as u64, "the link has stopped")))
        })
    }

    /// Sends one read on `channel`; the answer (or why there is none)
    /// goes to `reply`. The calling thread writes the request itself when
    /// the connection's writer is free (see [`ChannelState`]), else the
    /// link's thread does.
    fn send(&self, channel: Channel, offset: u64, len: usize, reply: Reply) {
        let shared = &self.shared;
        let failed = |why: &str| Err(shared.failed(offset, len as u64, why));
        if shared.dead.load(Relaxed) {
            return reply.send(failed("unreachable past the reconnect timeout"));
        }
        if len == 0 || len > MAX_REQUEST as usize {
            return reply.send(failed("a read longer than one request may be"));
        }
        let (tx, counter) = match channel {
            Channel::Demand => {
                let pages = (len as u64).div_ceil(4096);
                shared.stats.demand_pages.fetch_add(pages, Relaxed);
                (&self.demand, &shared.stats.demand_requests)
            }
            Channel::Bulk => (&self.bulk, &shared.stats.bulk_requests),
        };
        counter.fetch_add(1, Relaxed);
        let state = shared.channel(channel);
        let priority = u8::from(channel == Channel::Bulk);
        let id = {
            let mut out = state.outstanding();
            // Under the lock `fail_all` takes: a read is either failed
            // there or refused here, never left behind.
            if shared.dead.load(Relaxed) {
                drop(out);
                return reply.send(failed("unreachable past the reconnect timeout"));
            }
            out.add(Pending {
                offset,
                len: len as u32,
                priority,
                checksum_failures: 0,
                broken_links: 0,
                sent_on: 0,
                reply,
            })
        };
        let frame = request_bytes(id, offset, len as u32, priority);
        if !state.try_write_now(id, &frame, &shared.stats) && tx.send(id).is_err() {
            let pending = state.outstanding().reads.remove(&id);
            if let Some(p) = pending {
                p.reply.send(failed("the link has stopped"));
            }
        }
    }

    /// The channel faulting pages' reads go on.
    fn demand_channel(&self) -> Channel {
        if self.shared.config.single_channel {
            Channel::Bulk
        } else {
            Channel::Demand
        }
    }

    /// Pages whose bytes are in the landing area (or the page cache).
    pub fn landed_pages(&self) -> u64 {
        self.shared.landing.landed.load(Relaxed)
    }

    /// Makes every page of `offset..offset + len` (whole pages) arrive in
    /// the landing area: pages there already cost nothing, pages on their
    /// way (being written, or asked for by another reader) are waited for,
    /// and only the rest are asked for on the demand channel, in runs.
    /// A page of a pushed frame still arriving waits for the frame's end
    /// (its checksum): on loopback a 256 KiB frame is a fraction of a
    /// millisecond, on a slow link a smaller push chunk keeps that short.
    /// Blocks the calling thread, which must not be a runtime's.
    pub(crate) fn ensure_landed(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let shared = &self.shared;
        let landing = &shared.landing;
        let Some(pages) = landing
            .pages(offset, len)
            .filter(|_| len.is_multiple_of(4096))
        else {
            return Err(shared.failed(offset, len, "not whole pages of the image"));
        };
        loop {
            // Claim what nobody has asked for yet; those are ours to ask.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut on_the_way = false;
            for p in pages.clone() {
                let claimed = landing.states[p as usize]
                    .compare_exchange(page::EMPTY, page::DEMANDED, AcqRel, Acquire)
                    .is_ok();
                if claimed {
                    match runs.last_mut() {
                        Some((first, n))
                            if *first + *n == p && *n < u64::from(MAX_REQUEST) / 4096 =>
                        {
                            *n += 1
                        }
                        _ => runs.push((p, 1)),
                    }
                } else if !Landing::published(landing.state(p)) {
                    on_the_way = true;
                }
            }
            if runs.is_empty() && !on_the_way {
                landing.materialise_zeros(pages);
                return Ok(());
            }
            let mut first_error = None;
            let sent: Vec<_> = runs
                .iter()
                .map(|&(p, n)| {
                    let (reply, answer) = oneshot::channel();
                    let len = (n * 4096) as usize;
                    self.send(self.demand_channel(), p * 4096, len, Reply::Task(reply));
                    (p, n, answer)
                })
                .collect();
            for (p, n, answer) in sent {
                let result = answer.blocking_recv().unwrap_or_else(|_| {
                    Err(shared.failed(p * 4096, n * 4096, "the link has stopped"))
                });
                match result {
                    // The link landed the answer already; landing it again
                    // is a no-op unless it could not (then this does).
                    Ok(Fetched::Data(bytes)) => {
                        shared.land(Origin::Demand, p * 4096, (n * 4096) as u32, Some(&bytes))
                    }
                    Ok(Fetched::Zero) => {
                        shared.land(Origin::Demand, p * 4096, (n * 4096) as u32, None)
                    }
                    Err(e) => {
                        // Give the pages back, so that a retry (or another
                        // reader) asks again instead of waiting forever.
                        for q in p..p + n {
                            if landing.states[q as usize]
                                .compare_exchange(page::DEMANDED, page::EMPTY, SeqCst, Acquire)
                                .is_ok()
                            {
                                landing.notify();
                            }
                        }
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if runs.is_empty() {
                if shared.dead.load(Relaxed) {
                    return Err(shared.failed(
                        offset,
                        len,
                        "unreachable past the reconnect timeout",
                    ));
                }
                // Written right now by the other channel, or asked for by
                // another reader: both end in a publish, which wakes us.
                landing.wait_change(Duration::from_millis(20), || {
                    pages.clone().all(|p| Landing::published(landing.state(p)))
                });
            }
        }
    }

    /// Copies published pages out of the landing area.
    pub(crate) fn read_landed(&self, offset: u64, buf: &mut [u8]) {
        self.shared.landing.read(offset, buf);
    }
}

impl AsyncPageSource for RemoteSource {
    fn len(&self) -> u64 {
        self.shared.image_len
    }

    fn read(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        self.request(self.demand_channel(), offset, len)
    }

    fn read_background(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        self.request(Channel::Bulk, offset, len)
    }

    fn read_direct(&self, offset: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        if let Some(hit) = self.shared.landing.fetch(offset, len) {
            self.shared.stats.local_hits.fetch_add(1, Relaxed);
            done(Ok(hit));
        } else {
            self.send(self.demand_channel(), offset, len, Reply::Direct(done));
        }
        Ok(())
    }

    fn is_ready(&self, offset: u64, len: u64) -> bool {
        let landing = &self.shared.landing;
        len.is_multiple_of(4096)
            && landing
                .pages(offset, len)
                .is_some_and(|mut pages| pages.all(|p| Landing::published(landing.state(p))))
    }

    fn read_ready(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Content, SourceError>> {
        let fetched = self.shared.landing.fetch(offset, buf.len())?;
        self.shared.stats.local_hits.fetch_add(1, Relaxed);
        Some(Ok(match fetched {
            Fetched::Zero => Content::Zero,
            Fetched::Data(bytes) => {
                buf.copy_from_slice(&bytes);
                Content::Data
            }
        }))
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        let landing = &self.shared.landing;
        // Published pages of the page cache may be mapped and written by
        // the workload; only the anonymous landing area's stay as landed.
        if landing.page_cache || len == 0 || !len.is_multiple_of(4096) {
            return None;
        }
        let pages = landing.pages(offset, len as u64)?;
        if !landing.pin(pages.clone()) {
            return None;
        }
        Some(MappedBytes::new(landing.published_bytes(pages)))
    }

    fn mapped_done(&self, offset: u64, len: usize) {
        let landing = &self.shared.landing;
        if let Some(pages) = landing.pages(offset, len as u64) {
            if !landing.page_cache && len.is_multiple_of(4096) {
                landing.unpin(pages);
            }
        }
    }

    fn installed(&self, offset: u64, len: u64) {
        if !self.shared.config.keep_installed {
            self.shared.landing.installed(offset, len);
        }
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        let landing = &self.shared.landing;
        landing.pages(offset, len).is_some_and(|mut pages| {
            len.is_multiple_of(4096) && pages.all(|p| landing.state(p) == page::ZERO)
        })
    }

    fn io_size(&self) -> usize {
        1 << 20
    }

    fn describe(&self) -> String {
        format!(
            "page server tcp://{} ({} bytes)",
            self.shared.addr, self.shared.image_len
        )
    }
}

/// Gives back the memory of landed pages the pager installed, in long
/// runs while it installs and all of them once it pauses: one `madvise`
/// for many pages, on the niced bulk thread, never on a fault's path.
async fn release_installed(shared: Arc<Shared>) {
    let landing = &shared.landing;
    let queued = || {
        let queue = landing
            .to_release
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (queue.queued, queue.runs.is_empty())
    };
    loop {
        landing.release_due.notified().await;
        let mut seen = None;
        loop {
            tokio::time::sleep(RELEASE_DELAY).await;
            let (now, _) = queued();
            let idle = seen == Some(now);
            seen = Some(now);
            let released = landing.release_queued(idle);
            shared.stats.pages_released.fetch_add(released, Relaxed);
            if queued().1 {
                break;
            }
        }
    }
}

/// One channel: connects, re-sends what is outstanding after a reconnect,
/// and gives up (failing every read) only past the reconnect timeout.
async fn link(shared: Arc<Shared>, channel: Channel, mut rx: mpsc::UnboundedReceiver<u64>) {
    let state = shared.channel(channel);
    let mut generation = 0u64;
    let mut down_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(10);
    loop {
        match attach(&shared, channel).await {
            Ok((mut reader, wr)) => {
                generation += 1;
                if down_since.take().is_some() {
                    shared.stats.reconnects.fetch_add(1, Relaxed);
                    let outstanding = state.outstanding().reads.len();
                    info!(%channel, outstanding, "reconnected to the page server");
                }
                backoff = Duration::from_millis(10);
                let end = serve_link(&shared, channel, generation, wr, &mut rx, &mut reader).await;
                // Nobody writes on a connection that has ended.
                *state.writer.lock().await = None;
                match end {
                    Ok(()) => return,
                    Err(LinkError::Protocol(e)) => {
                        // A server that keeps answering with invalid
                        // frames must not keep these reads forever.
                        warn!(%channel, error = %e, "the page server sent an invalid frame; reconnecting");
                        give_up_broken(&shared, state, &e.to_string());
                    }
                    Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                        warn!(%channel, error = %e, "the page server answered wrongly; reconnecting");
                        give_up_broken(&shared, state, &e.to_string());
                    }
                    Err(e) => warn!(%channel, error = %e, "page server link lost; reconnecting"),
                }
                down_since = Some(Instant::now());
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= shared.config.reconnect_timeout {
                    warn!(%channel, error = %e, "page server unreachable past the reconnect timeout; failing every read");
                    fail_all(&shared, state, &mut rx);
                    return;
                }
                debug!(%channel, error = %e, "page server not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Connections that may end in an invalid frame while a read is
/// outstanding before that read fails.
const BROKEN_LINKS: u32 = 3;

/// Counts a connection that ended in an invalid frame against every read
/// outstanding, and fails those that have seen [`BROKEN_LINKS`].
fn give_up_broken(shared: &Shared, state: &ChannelState, why: &str) {
    let failed: Vec<Pending> = {
        let mut out = state.outstanding();
        let broken: Vec<u64> = out
            .reads
            .iter_mut()
            .filter_map(|(&id, p)| {
                p.broken_links += 1;
                (p.broken_links >= BROKEN_LINKS).then_some(id)
            })
            .collect();
        broken
            .iter()
            .map(|id| out.reads.remove(id).expect("listed above"))
            .collect()
    };
    // Replies go out unlocked: the engine installs (or reads again) from
    // inside a direct read's reply.
    for p in failed {
        p.reply.send(Err(SourceError::Failed {
            offset: p.offset,
            len: u64::from(p.len),
            source: std::io::Error::other(format!(
                "page server {} answered with invalid frames {BROKEN_LINKS} times: {why}",
                shared.addr
            )),
        }));
    }
}

/// Fails what is outstanding on this channel, and everything asked from
/// now on on either (`dead`, set under this channel's lock, refuses it;
/// the other channel's link fails its own when it gives up too).
fn fail_all(shared: &Shared, state: &ChannelState, rx: &mut mpsc::UnboundedReceiver<u64>) {
    let why = |p: &Pending| SourceError::Failed {
        offset: p.offset,
        len: u64::from(p.len),
        source: std::io::Error::other(format!(
            "page server {} unreachable for {:?}",
            shared.addr, shared.config.reconnect_timeout
        )),
    };
    rx.close();
    let failed: Vec<Pending> = {
        let mut out = state.outstanding();
        shared.dead.store(true, Relaxed);
        out.reads.drain().map(|(_, p)| p).collect()
    };
    for p in failed {
        let e = why(&p);
        p.reply.send(Err(e));
    }
}

type Reader = FrameReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = tokio::net::tcp::OwnedWriteHalf;

async fn attach(shared: &Shared, channel: Channel) -> Result<(Reader, Writer), LinkError> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&shared.addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    match reader.next().await? {
        Some(Frame::Hello {
            image_len,
            identity,
            ..
        }) if image_len == shared.image_len && identity == shared.identity => {}
        Some(Frame::Hello { .. }) => {
            return Err(std::io::Error::other(
                "the page server now serves another image; its pages cannot be mixed with these",
            )
            .into())
        }
        _ => return Err(std::io::Error::other("no hello from the page server").into()),
    }
    write_frame(
        &mut wr,
        &Frame::Attach {
            channel,
            capabilities: crate::protocol::ACCEPTS_LZ4,
            session: shared.session,
        },
    )
    .await?;
    Ok((reader, wr))
}

/// Writes outstanding read `id` on the link's connection unless it went
/// out on this connection already (its reader wrote it, or the link did).
async fn send_outstanding(state: &ChannelState, generation: u64, id: u64) -> std::io::Result<()> {
    let mut writer = state.writer.lock().await;
    let Some((wr, current)) = writer.as_mut() else {
        // The connection ended (a partial write): the next one sends it.
        return Ok(());
    };
    debug_assert_eq!(*current, generation);
    let frame = {
        let mut out = state.outstanding();
        match out.reads.get_mut(&id) {
            Some(p) if p.sent_on != generation => {
                p.sent_on = generation;
                request_bytes(id, p.offset, p.len, p.priority)
            }
            _ => return Ok(()),
        }
    };
    wr.write_all(&frame).await
}

/// Runs one connection until it fails (`Err`) or the source is dropped.
async fn serve_link(
    shared: &Shared,
    channel: Channel,
    generation: u64,
    wr: Writer,
    rx: &mut mpsc::UnboundedReceiver<u64>,
    reader: &mut Reader,
) -> Result<(), LinkError> {
    let state = shared.channel(channel);
    // Pushed frames go straight into the landing area.
    let place: Option<Arc<dyn crate::io::Place>> = (channel == Channel::Bulk)
        .then(|| Arc::clone(&shared.landing) as Arc<dyn crate::io::Place>);
    {
        // What the last connection left unanswered goes out first, before
        // any reader can write here.
        let mut writer = state.writer.lock().await;
        let frames: Vec<_> = {
            let mut out = state.outstanding();
            let mut ids: Vec<u64> = out.reads.keys().copied().collect();
            ids.sort_unstable();
            ids.iter()
                .map(|id| {
                    let p = out.reads.get_mut(id).expect("listed above");
                    p.sent_on = generation;
                    request_bytes(*id, p.offset, p.len, p.priority)
                })
                .collect()
        };
        let (wr, _) = writer.insert((wr, generation));
        for frame in frames {
            wr.write_all(&frame).await?;
        }
    }
    loop {
        tokio::select! {
            id = rx.recv() => {
                let Some(id) = id else { return Ok(()) };
                send_outstanding(state, generation, id).await?;
            }
            read = reader.next_placed(place.as_ref()) => match read {
                Ok(Some(Read::Landed { len, written })) => {
                    // A pushed frame, read into the landing area and
                    // published.
                    if written > 0 {
                        shared.stats.pages_landed_pushed.fetch_add(written, Relaxed);
                    }
                    shared.stats.pushed_bytes.fetch_add(u64::from(len), Relaxed);
                    tokio::task::yield_now().await;
                }
                Ok(Some(Read::Frame(Frame::Data { id, offset, len, bytes }))) => {
                    if id == 0 {
                        shared.land(Origin::Push, offset, len, bytes.as_deref());
                        // After landing: whoever sees the bytes counted
                        // sees them landed too (or dropped as a late copy).
                        shared.stats.pushed_bytes.fetch_add(u64::from(len), Relaxed);
                        if let Some(b) = bytes {
                            reader.recycle(b);
                        }
                        // The push never pauses: give the demand channel
                        // its turn between frames.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let p = {
                        let mut out = state.outstanding();
                        match out.reads.get(&id) {
                            None => continue,
                            Some(p) if p.offset != offset || p.len != len => {
                                let why = format!(
                                    "the answer to {:#x}+{:#x} is {offset:#x}+{len:#x}", p.offset, p.len
                                );
                                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why).into());
                            }
                            Some(_) => out.reads.remove(&id).expect("looked up above"),
                        }
                    };
                    let origin = match channel {
                        Channel::Demand => Origin::Demand,
                        Channel::Bulk => Origin::BulkRead,
                    };
                    shared.land(origin, offset, len, bytes.as_deref());
                    let fetched = match bytes {
                        Some(b) => Fetched::Data(b),
                        None => Fetched::Zero,
                    };
                    p.reply.send(Ok(fetched));
                }
                Ok(Some(Read::Frame(Frame::Error { id, message, .. }))) => {
                    let p = state.outstanding().reads.remove(&id);
                    if let Some(p) = p {
                        p.reply.send(Err(SourceError::Failed {
                            offset: p.offset,
                            len: u64::from(p.len),
                            source: std::io::Error::other(format!("page server: {message}")),
                        }));
                    }
                }
                Ok(Some(Read::Frame(_))) => {
                    return Err(std::io::Error::other("an unexpected frame from the page server").into())
                }
                Ok(None) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Err(LinkError::Protocol(ProtocolError::Checksum { id, .. })) => {
                    // Corrupted in transit: never installed, asked again.
                    shared.stats.checksum_failures.fetch_add(1, Relaxed);
                    let (again, exhausted) = {
                        let mut out = state.outstanding();
                        match out.reads.remove(&id) {
                            None => (None, None),
                            Some(mut p) => {
                                p.checksum_failures += 1;
                                if p.checksum_failures > shared.config.checksum_retries {
                                    (None, Some(p))
                                } else {
                                    p.sent_on = 0;
                                    (Some(out.add(p)), None)
                                }
                            }
                        }
                    };
                    if let Some(p) = exhausted {
                        p.reply.send(Err(SourceError::Failed {
                            offset: p.offset,
                            len: u64::from(p.len),
                            source: std::io::Error::other("every copy of these bytes failed its checksum"),
                        }));
                    }
                    if let Some(id) = again {
                        send_outstanding(state, generation, id).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> Vec<u8> {
        vec![byte; 4096]
    }

    /// A landing of `pages` pages, each written with its index + 1.
    fn landed(pages: u64) -> Landing {
        let landing = Landing::anonymous(pages * 4096).unwrap();
        for p in 0..pages {
            assert_eq!(
                landing.store(p * 4096, 4096, Some(&page_of(p as u8 + 1))),
                1
            );
        }
        landing
    }

    #[test]
    fn an_installed_page_is_released_and_never_lands_again() {
        let landing = landed(4);
        landing.installed(4096, 2 * 4096);
        assert_eq!(landing.release_queued(true), 2);
        assert_eq!(landing.landed.load(Relaxed), 2);
        assert_eq!(landing.state(1), page::RELEASED);
        assert_eq!(landing.state(2), page::RELEASED);
        assert_eq!(
            landing.fetch(4096, 4096),
            None,
            "released pages are not at hand"
        );
        assert_eq!(
            landing.fetch(0, 4096),
            Some(Fetched::Data(page_of(1))),
            "a page not installed stays"
        );
        // Its memory went back: it reads zero.
        let mut buf = page_of(0xff);
        landing.read(4096, &mut buf);
        assert_eq!(buf, page_of(0));
        // A push arriving late writes nothing (its VM has the page).
        assert_eq!(landing.store(0, 4 * 4096, Some(&page_of(9).repeat(4))), 0);
        assert_eq!(landing.state(1), page::RELEASED);
        assert_eq!(
            crate::io::Place::claim(&landing, 4096, 4096).unwrap().held,
            vec![false]
        );
        // Nor is it released twice.
        landing.installed(4096, 4096);
        assert_eq!(landing.release_queued(true), 0);
    }

    #[test]
    fn a_pinned_page_keeps_its_bytes_until_it_is_installed_again() {
        let landing = landed(3);
        assert!(landing.pin(0..2));
        landing.installed(0, 3 * 4096);
        assert_eq!(
            landing.release_queued(true),
            1,
            "only the unpinned page goes"
        );
        assert_eq!(landing.state(0), page::ARRIVED);
        assert_eq!(landing.state(1), page::ARRIVED);
        assert_eq!(landing.state(2), page::RELEASED);
        assert_eq!(
            landing.published_bytes(0..2),
            &[page_of(1), page_of(2)].concat()[..]
        );
        landing.unpin(0..2);
        // The reader's own install queues them again.
        landing.installed(0, 2 * 4096);
        assert_eq!(landing.release_queued(true), 2);
        assert_eq!(landing.landed.load(Relaxed), 0);
    }

    #[test]
    fn runs_installed_in_any_order_are_released_together_across_zero_pages() {
        let landing = Landing::anonymous(6 * 4096).unwrap();
        for p in [0u64, 1, 3, 4] {
            assert_eq!(landing.store(p * 4096, 4096, Some(&page_of(7))), 1);
        }
        assert_eq!(landing.store(2 * 4096, 4096, None), 1);
        for p in [4u64, 0, 3, 1, 2] {
            landing.installed(p * 4096, 4096);
        }
        assert_eq!(landing.release_queued(true), 4);
        assert_eq!(landing.state(2), page::ZERO, "a zero page stays as it was");
        assert!([0, 1, 3, 4]
            .iter()
            .all(|&p| landing.state(p) == page::RELEASED));
        assert_eq!(landing.state(5), page::EMPTY);
        assert_eq!(landing.landed.load(Relaxed), 1);
    }

    #[test]
    fn short_runs_wait_for_their_neighbours_while_the_pager_installs() {
        let pages = MIN_RELEASE_PAGES + 2;
        let landing = landed(pages);
        landing.installed(0, 2 * 4096);
        assert_eq!(landing.release_queued(false), 0, "two pages alone wait");
        assert_eq!(landing.state(0), page::ARRIVED);
        landing.installed(2 * 4096, (MIN_RELEASE_PAGES - 2) * 4096);
        landing.installed((MIN_RELEASE_PAGES + 1) * 4096, 4096);
        assert_eq!(
            landing.release_queued(false),
            MIN_RELEASE_PAGES,
            "joined, they go in one run; the page apart waits"
        );
        assert_eq!(landing.state(MIN_RELEASE_PAGES + 1), page::ARRIVED);
        assert_eq!(
            landing.release_queued(true),
            1,
            "when the pager pauses, all go"
        );
    }

    #[test]
    fn a_pin_fails_on_a_page_that_is_not_there_and_holds_nothing() {
        let landing = landed(2);
        landing.installed(4096, 4096);
        assert_eq!(landing.release_queued(true), 1);
        assert!(!landing.pin(0..2));
        assert_eq!(landing.pins[0].load(SeqCst), 0);
        assert_eq!(landing.pins[1].load(SeqCst), 0);
    }

    #[test]
    fn the_page_cache_is_never_released() {
        let memory = Arc::new(uffd::Mapping::new(uffd::MemoryKind::Shmem, 4096).unwrap());
        let landing = Landing::page_cache(memory, 4096);
        assert_eq!(landing.store(0, 4096, Some(&page_of(5))), 1);
        landing.installed(0, 4096);
        assert_eq!(landing.release_queued(true), 0);
        assert_eq!(landing.state(0), page::ARRIVED);
    }
}
