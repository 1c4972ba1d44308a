//! Sources whose reads wait on something far away (a network peer, object
//! storage): many reads in flight, no thread per read.
//!
//! Such a source implements [`AsyncPageSource`] and is wrapped in an
//! [`AsyncSource`], which owns a small tokio runtime. The engine claims a
//! faulting page, starts its read on the runtime and goes back to reading
//! faults; when the bytes arrive, a handler thread installs them and the
//! kernel wakes the faulting thread. A page that is present is served
//! without asking the source, and a page being fetched is fetched once,
//! however many faults want it (the engine's per-page claims).
//!
//! Why a runtime and not threads: a read that takes 10-100 ms costs a task
//! (a few hundred bytes) instead of a thread per read, so hundreds can be
//! in flight; the network and object-store clients this is for are async
//! already.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::{check_bounds, Content, MappedBytes, PageSource, SourceError};

/// What an asynchronous read produced: the bytes, or the knowledge that
/// they are all zero (then no bytes travel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Exactly the bytes asked for.
    Data(Vec<u8>),
    /// The whole range is zero.
    Zero,
}

/// A read in progress.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, SourceError>> + Send + 'a>>;

/// Where a read started with [`AsyncPageSource::read_direct`] delivers
/// its result, on whichever thread has it.
pub type ReadDone = Box<dyn FnOnce(Result<Fetched, SourceError>) + Send>;

/// Where page contents come from, when getting them means waiting.
///
/// Offsets are source offsets, as for [`PageSource`]. `read` must produce
/// exactly `len` bytes or an error; transient errors are retried by the
/// engine with backoff, others poison the pages.
pub trait AsyncPageSource: Send + Sync + fmt::Debug {
    /// The number of bytes the source can provide.
    fn len(&self) -> u64;

    /// True when the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `offset..offset + len`.
    fn read(&self, offset: u64, len: usize) -> ReadFuture<'_>;

    /// Starts reading `offset..offset + len` on the calling thread, with
    /// no runtime: a source whose answers arrive on a thread of its own (a
    /// network link) sends the request here and calls `done` there, once.
    /// A fault then costs that thread's wake-up and the handler's, not two
    /// more of the runtime's in between (`uffd page-server bench` counts
    /// them in its VM case). `Err(done)` hands `done` back untouched,
    /// and the engine reads with [`AsyncPageSource::read`] on its runtime:
    /// the default, for sources whose reads need a runtime to make
    /// progress. Must not block.
    fn read_direct(&self, offset: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        let _ = (offset, len);
        Err(done)
    }

    /// Reads `offset..offset + len` for background work (replay, fill),
    /// which nothing waits on yet: a source with a separate path for such
    /// reads (a bulk channel) keeps them off the one faults use. The
    /// default is [`AsyncPageSource::read`].
    fn read_background(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        self.read(offset, len)
    }

    /// True when `offset..offset + len` is at hand now (in memory: a cache
    /// hit), so that [`AsyncPageSource::read_ready`] will most likely
    /// produce it without waiting. Must be cheap: the engine asks for
    /// every fault. The default: never.
    fn is_ready(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// Copies `offset..offset + buf.len()` into `buf` if it is at hand
    /// now, without waiting for anything (no await, no I/O beyond memory);
    /// `None` when it is not, and the engine then reads it with
    /// [`AsyncPageSource::read`]. The handler thread calls this itself, so
    /// a warm cache serves a fault as a local file does, with no trip
    /// through the runtime. The default: never at hand.
    fn read_ready(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Content, SourceError>> {
        let _ = (offset, buf);
        None
    }

    /// Bytes at hand (see [`AsyncPageSource::is_ready`]) that are also
    /// mapped in this process (pages a push brought): strategies that
    /// install from a source's mapping (COPY) then take them from there,
    /// with no copy into a buffer first. The contract of
    /// [`PageSource::mapped`]; the default has none.
    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        let _ = (offset, len);
        None
    }

    /// As [`PageSource::mapped_done`].
    fn mapped_done(&self, offset: u64, len: usize) {
        let _ = (offset, len);
    }

    /// As [`PageSource::installed`].
    fn installed(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// As [`PageSource::is_known_zero`], for the bytes
    /// [`AsyncPageSource::mapped`] offers.
    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// The read size this source works best with (see
    /// [`PageSource::io_size`]).
    fn io_size(&self) -> usize {
        2 << 20
    }

    /// A short description for logs and reports.
    fn describe(&self) -> String;
}

/// Reads in flight at once per source, by default.
pub const DEFAULT_IN_FLIGHT: usize = 512;

/// An [`AsyncPageSource`] made usable by the engine: it owns the runtime
/// the reads run on, bounds how many are in flight, and offers the
/// blocking [`PageSource`] interface too (for background fill and replay,
/// which wait on their reads anyway).
pub struct AsyncSource {
    inner: Arc<dyn AsyncPageSource>,
    handle: tokio::runtime::Handle,
    /// Taken in drop (see [`drop_runtime`]).
    runtime: Option<tokio::runtime::Runtime>,
    in_flight: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl fmt::Debug for AsyncSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncSource")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Drop for AsyncSource {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            drop_runtime(runtime);
        }
    }
}

/// Drops `runtime` wherever the last holder of its owner happens to be.
/// That may be a read's completion running on another runtime's thread
/// (the transport's): dropping a runtime there panics, which would take
/// the transport's task down with every read still waiting on it. There
/// the runtime is shut down without waiting for its tasks; elsewhere it
/// is dropped as usual, waiting for them.
pub fn drop_runtime(runtime: tokio::runtime::Runtime) {
    if tokio::runtime::Handle::try_current().is_ok() {
        runtime.shutdown_background();
    } else {
        drop(runtime);
    }
}

impl AsyncSource {
    /// Wraps `inner`, with at most [`DEFAULT_IN_FLIGHT`] reads in flight.
    pub fn new(inner: Arc<dyn AsyncPageSource>) -> std::io::Result<AsyncSource> {
        AsyncSource::with_limit(inner, DEFAULT_IN_FLIGHT)
    }

    /// Wraps `inner`, with at most `limit` reads in flight (at least one);
    /// more wait for a place, without holding a buffer.
    pub fn with_limit(
        inner: Arc<dyn AsyncPageSource>,
        limit: usize,
    ) -> std::io::Result<AsyncSource> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("uffd-source-io")
            .enable_all()
            .build()?;
        let limit = limit.max(1);
        Ok(AsyncSource {
            inner,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            in_flight: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        })
    }

    /// The source it wraps.
    pub fn inner(&self) -> &Arc<dyn AsyncPageSource> {
        &self.inner
    }

    /// [`AsyncPageSource::is_ready`], within bounds.
    pub(crate) fn is_ready(&self, offset: u64, len: u64) -> bool {
        check_bounds(offset, len, self.inner.len()).is_ok() && self.inner.is_ready(offset, len)
    }

    /// Starts reading `offset..offset + len` and calls `done` with the
    /// result, on the thread that has it, and how it came ([`Delivery`]).
    /// Transient failures are retried up to `retries` times with
    /// exponential backoff from 2 ms. Returns true when the read went out
    /// from this thread directly (no runtime on its path).
    pub(crate) fn start(
        &self,
        offset: u64,
        len: usize,
        retries: u32,
        done: impl FnOnce(Result<Fetched, SourceError>, Delivery) + Send + 'static,
    ) -> bool {
        let read = Read {
            inner: Arc::clone(&self.inner),
            runtime: self.handle.clone(),
            offset,
            len,
            attempt: 0,
            retries,
            done: DoneOnce {
                done: Some(Box::new(done)),
                offset,
                len: len as u64,
            },
        };
        match Arc::clone(&self.in_flight).try_acquire_owned() {
            Ok(place) => read.begin(place),
            Err(_) => {
                let places = Arc::clone(&self.in_flight);
                self.handle.spawn(async move {
                    // Never closed, so this waits for a place.
                    if let Ok(place) = places.acquire_owned().await {
                        read.begin(place);
                    }
                });
                false
            }
        }
    }
}

/// How an engine read's result came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// On the thread the source answered on
    /// ([`AsyncPageSource::read_direct`]); false: a runtime thread, or
    /// the bounds check.
    pub on_arrival: bool,
    /// Transient failures retried on the way.
    pub retried: u32,
}

thread_local! {
    /// Set while the engine's runtime hands a read's result to its
    /// `finish`: a result that came any other way came on the thread the
    /// source answered on. A flag per thread, not one per read, so that
    /// starting a read allocates nothing to say where it ended.
    static DELIVERING_FROM_RUNTIME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`DELIVERING_FROM_RUNTIME`] for as long as this lives, also when the
/// delivery panics.
struct DeliveringFromRuntime;

impl DeliveringFromRuntime {
    fn start() -> DeliveringFromRuntime {
        DELIVERING_FROM_RUNTIME.set(true);
        DeliveringFromRuntime
    }
}

impl Drop for DeliveringFromRuntime {
    fn drop(&mut self) {
        DELIVERING_FROM_RUNTIME.set(false);
    }
}

/// One engine read of an asynchronous source, from its start to its
/// result, across retries.
struct Read {
    inner: Arc<dyn AsyncPageSource>,
    runtime: tokio::runtime::Handle,
    offset: u64,
    len: usize,
    attempt: u32,
    retries: u32,
    done: DoneOnce,
}

impl Read {
    /// Sends the read: directly if the source can, else on the runtime.
    /// `place` (one of the reads in flight) is held until the result.
    /// True when it went directly.
    fn begin(self, place: tokio::sync::OwnedSemaphorePermit) -> bool {
        let (inner, runtime, offset, len) = (
            Arc::clone(&self.inner),
            self.runtime.clone(),
            self.offset,
            self.len,
        );
        if let Err(e) = check_bounds(offset, len as u64, inner.len()) {
            self.finish(Err(e), place, false);
            return false;
        }
        let finish: ReadDone = Box::new(move |result| {
            let on_arrival = !DELIVERING_FROM_RUNTIME.get();
            self.finish(result, place, on_arrival)
        });
        match inner.read_direct(offset, len, finish) {
            Ok(()) => true,
            Err(finish) => {
                runtime.spawn(async move {
                    let result = inner.read(offset, len).await;
                    let _delivering = DeliveringFromRuntime::start();
                    finish(result);
                });
                false
            }
        }
    }

    fn finish(
        mut self,
        result: Result<Fetched, SourceError>,
        place: tokio::sync::OwnedSemaphorePermit,
        on_arrival: bool,
    ) {
        let delivery = Delivery {
            on_arrival,
            retried: self.attempt,
        };
        match result {
            Err(e) if e.is_transient() && self.attempt < self.retries => {
                self.attempt += 1;
                let backoff = std::time::Duration::from_millis(1 << self.attempt.min(8));
                let runtime = self.runtime.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    self.begin(place);
                });
            }
            Ok(Fetched::Data(bytes)) if bytes.len() != self.len => {
                let (offset, len) = (self.offset, self.len);
                self.done
                    .call(Err(wrong_length(offset, len, bytes.len())), delivery);
            }
            result => self.done.call(result, delivery),
        }
    }
}

fn wrong_length(offset: u64, len: usize, got: usize) -> SourceError {
    SourceError::Failed {
        offset,
        len: len as u64,
        source: std::io::Error::other(format!(
            "the source returned {got} bytes for a read of {len}"
        )),
    }
}

type Done = Box<dyn FnOnce(Result<Fetched, SourceError>, Delivery) + Send>;

/// A read's completion, called exactly once: with the result, or with an
/// error if the read's future is dropped first (it panicked, or the
/// runtime shut down), so that the claimed pages never wait forever.
struct DoneOnce {
    done: Option<Done>,
    offset: u64,
    len: u64,
}

impl DoneOnce {
    fn call(&mut self, result: Result<Fetched, SourceError>, delivery: Delivery) {
        if let Some(done) = self.done.take() {
            done(result, delivery);
        }
    }
}

impl Drop for DoneOnce {
    fn drop(&mut self) {
        let (offset, len) = (self.offset, self.len);
        self.call(
            Err(SourceError::Failed {
                offset,
                len,
                source: std::io::Error::other(
                    "the read was abandoned (its source panicked or stopped)",
                ),
            }),
            Delivery::default(),
        );
    }
}

impl PageSource for AsyncSource {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        check_bounds(offset, buf.len() as u64, self.inner.len())?;
        if let Some(ready) = self.inner.read_ready(offset, buf) {
            return ready;
        }
        // The blocking path is the background policies' (and that of
        // strategies that stage bytes themselves), and a fault's whose
        // bytes were at hand a moment ago and no longer are.
        let result = self
            .handle
            .block_on(self.inner.read_background(offset, buf.len()))?;
        Ok(match result {
            Fetched::Zero => Content::Zero,
            Fetched::Data(bytes) if bytes.len() != buf.len() => {
                return Err(wrong_length(offset, buf.len(), bytes.len()))
            }
            Fetched::Data(bytes) => {
                buf.copy_from_slice(&bytes);
                Content::Data
            }
        })
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        self.inner.mapped(offset, len)
    }

    fn mapped_done(&self, offset: u64, len: usize) {
        self.inner.mapped_done(offset, len);
    }

    fn installed(&self, offset: u64, len: u64) {
        self.inner.installed(offset, len);
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        self.inner.is_known_zero(offset, len)
    }

    fn io_size(&self) -> usize {
        self.inner.io_size()
    }

    fn asynchronous(&self) -> Option<&AsyncSource> {
        Some(self)
    }

    fn describe(&self) -> String {
        format!(
            "{} (async, {} in flight at most)",
            self.inner.describe(),
            self.limit
        )
    }
}
