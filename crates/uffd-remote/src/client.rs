//! The destination: [`RemoteSource`], a page source that fetches from a
//! page server over a demand channel (faulting pages, never queued behind
//! anything) and a bulk channel (background reads and the server's push),
//! and survives the connection dropping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use uffd_pager::{AsyncPageSource, Fetched, ReadFuture, SourceError};

use crate::io::{write_frame, FrameReader, LinkError};
use crate::protocol::{Channel, Frame, ProtocolError, MAX_REQUEST};

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
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            reconnect_timeout: Duration::from_secs(60),
            checksum_retries: 8,
            single_channel: false,
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
    /// Reads sent on the bulk channel.
    pub bulk_requests: AtomicU64,
    /// Bytes that arrived unasked (push).
    pub pushed_bytes: AtomicU64,
    /// Frames that failed their checksum and were asked for again.
    pub checksum_failures: AtomicU64,
    /// Connections made again after one dropped.
    pub reconnects: AtomicU64,
}

/// Pages that arrived, kept until read: the destination's landing area.
struct Landing {
    memory: uffd::Mapping,
    /// One bit per page: arrived.
    present: Vec<AtomicU64>,
}

impl Landing {
    fn new(len: u64) -> std::io::Result<Landing> {
        let pages = len.div_ceil(4096) as usize;
        Ok(Landing {
            memory: uffd::Mapping::new(uffd::MemoryKind::Anon, (len as usize).max(4096))?,
            present: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn has(&self, page: u64) -> bool {
        let p = page as usize;
        self.present[p / 64].load(Relaxed) & (1 << (p % 64)) != 0
    }

    /// Keeps whole pages of `offset..offset + len` (`None`: all zero).
    fn store(&self, offset: u64, len: u32, bytes: Option<&[u8]>) {
        if offset % 4096 != 0 || offset + u64::from(len) > self.memory.len() as u64 {
            return;
        }
        let pages = u64::from(len) / 4096;
        if let Some(b) = bytes {
            self.memory
                .write(offset as usize, &b[..(pages * 4096) as usize]);
        }
        // Anonymous memory reads as zero already: zero pages only need
        // their bit, and a zero page never overwrites data that arrived.
        for page in offset / 4096..offset / 4096 + pages {
            let p = page as usize;
            self.present[p / 64].fetch_or(1 << (p % 64), Relaxed);
        }
    }

    /// The range, if every page of it arrived.
    fn fetch(&self, offset: u64, len: usize) -> Option<Fetched> {
        if offset % 4096 != 0 || len % 4096 != 0 {
            return None;
        }
        let first = offset / 4096;
        if !(first..first + len as u64 / 4096).all(|p| self.has(p)) {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.memory.read(offset as usize, &mut buf);
        Some(Fetched::Data(buf))
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
    reply: oneshot::Sender<Result<Fetched, SourceError>>,
}

struct Shared {
    addr: String,
    session: u64,
    image_len: u64,
    identity: u64,
    config: RemoteConfig,
    landing: Landing,
    dead: AtomicBool,
    stats: RemoteStats,
}

/// A page source fetching from `uffd page-server` at `tcp://HOST:PORT`.
pub struct RemoteSource {
    shared: Arc<Shared>,
    demand: mpsc::UnboundedSender<Pending>,
    bulk: mpsc::UnboundedSender<Pending>,
    _runtimes: [tokio::runtime::Runtime; 2],
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
            landing: Landing::new(image_len)?,
            dead: AtomicBool::new(false),
            stats: RemoteStats::default(),
        });
        let (demand, demand_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        runtime.spawn(link(Arc::clone(&shared), Channel::Demand, demand_rx));
        bulk_runtime.spawn(link(Arc::clone(&shared), Channel::Bulk, bulk_rx));
        info!(addr, image_len, "page server reached");
        Ok(RemoteSource {
            shared,
            demand,
            bulk,
            _runtimes: [runtime, bulk_runtime],
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
        let tx = match channel {
            Channel::Demand => &self.demand,
            Channel::Bulk => &self.bulk,
        };
        Box::pin(async move {
            if let Some(hit) = shared.landing.fetch(offset, len) {
                shared.stats.local_hits.fetch_add(1, Relaxed);
                return Ok(hit);
            }
            let failed = |why: &str| SourceError::Failed {
                offset,
                len: len as u64,
                source: std::io::Error::other(format!("page server {}: {why}", shared.addr)),
            };
            if shared.dead.load(Relaxed) {
                return Err(failed("unreachable past the reconnect timeout"));
            }
            if len == 0 || len > MAX_REQUEST as usize {
                return Err(failed("a read longer than one request may be"));
            }
            let (reply, answer) = oneshot::channel();
            let counter = match channel {
                Channel::Demand => &shared.stats.demand_requests,
                Channel::Bulk => &shared.stats.bulk_requests,
            };
            counter.fetch_add(1, Relaxed);
            tx.send(Pending {
                offset,
                len: len as u32,
                priority: u8::from(channel == Channel::Bulk),
                checksum_failures: 0,
                broken_links: 0,
                reply,
            })
            .map_err(|_| failed("the link has stopped"))?;
            answer
                .await
                .unwrap_or_else(|_| Err(failed("the link has stopped")))
        })
    }
}

impl AsyncPageSource for RemoteSource {
    fn len(&self) -> u64 {
        self.shared.image_len
    }

    fn read(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        let channel = if self.shared.config.single_channel {
            Channel::Bulk
        } else {
            Channel::Demand
        };
        self.request(channel, offset, len)
    }

    fn read_background(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        self.request(Channel::Bulk, offset, len)
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

/// One channel: connects, re-sends what is outstanding after a reconnect,
/// and gives up (failing every read) only past the reconnect timeout.
async fn link(shared: Arc<Shared>, channel: Channel, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 1u64;
    let mut down_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(10);
    loop {
        match attach(&shared, channel).await {
            Ok((mut reader, mut wr)) => {
                if down_since.take().is_some() {
                    shared.stats.reconnects.fetch_add(1, Relaxed);
                    info!(%channel, outstanding = pending.len(), "reconnected to the page server");
                }
                backoff = Duration::from_millis(10);
                let end = serve_link(
                    &shared,
                    &mut pending,
                    &mut next_id,
                    &mut rx,
                    &mut reader,
                    &mut wr,
                )
                .await;
                match end {
                    Ok(()) => return,
                    Err(LinkError::Protocol(e)) => {
                        // A server that keeps answering with invalid
                        // frames must not keep these reads forever.
                        warn!(%channel, error = %e, "the page server sent an invalid frame; reconnecting");
                        give_up_broken(&shared, &mut pending, &e.to_string());
                    }
                    Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                        warn!(%channel, error = %e, "the page server answered wrongly; reconnecting");
                        give_up_broken(&shared, &mut pending, &e.to_string());
                    }
                    Err(e) => warn!(%channel, error = %e, "page server link lost; reconnecting"),
                }
                down_since = Some(Instant::now());
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= shared.config.reconnect_timeout {
                    warn!(%channel, error = %e, "page server unreachable past the reconnect timeout; failing every read");
                    shared.dead.store(true, Relaxed);
                    fail_all(&shared, &mut pending, &mut rx);
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
fn give_up_broken(shared: &Shared, pending: &mut HashMap<u64, Pending>, why: &str) {
    let broken: Vec<u64> = pending
        .iter_mut()
        .filter_map(|(&id, p)| {
            p.broken_links += 1;
            (p.broken_links >= BROKEN_LINKS).then_some(id)
        })
        .collect();
    for id in broken {
        let p = pending.remove(&id).expect("listed above");
        let _ = p.reply.send(Err(SourceError::Failed {
            offset: p.offset,
            len: u64::from(p.len),
            source: std::io::Error::other(format!(
                "page server {} answered with invalid frames {BROKEN_LINKS} times: {why}",
                shared.addr
            )),
        }));
    }
}

/// Fails what is outstanding and everything sent from now on.
fn fail_all(
    shared: &Shared,
    pending: &mut HashMap<u64, Pending>,
    rx: &mut mpsc::UnboundedReceiver<Pending>,
) {
    let why = |p: &Pending| SourceError::Failed {
        offset: p.offset,
        len: u64::from(p.len),
        source: std::io::Error::other(format!(
            "page server {} unreachable for {:?}",
            shared.addr, shared.config.reconnect_timeout
        )),
    };
    for (_, p) in pending.drain() {
        let e = why(&p);
        let _ = p.reply.send(Err(e));
    }
    rx.close();
    while let Ok(p) = rx.try_recv() {
        let e = why(&p);
        let _ = p.reply.send(Err(e));
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
            session: shared.session,
        },
    )
    .await?;
    Ok((reader, wr))
}

async fn send(wr: &mut Writer, id: u64, p: &Pending) -> std::io::Result<()> {
    write_frame(
        wr,
        &Frame::Request {
            id,
            offset: p.offset,
            len: p.len,
            priority: p.priority,
        },
    )
    .await
}

/// Runs one connection until it fails (`Err`) or the source is dropped.
async fn serve_link(
    shared: &Shared,
    pending: &mut HashMap<u64, Pending>,
    next_id: &mut u64,
    rx: &mut mpsc::UnboundedReceiver<Pending>,
    reader: &mut Reader,
    wr: &mut Writer,
) -> Result<(), LinkError> {
    // What the last connection left unanswered goes out first.
    let mut ids: Vec<u64> = pending.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        send(wr, id, &pending[&id]).await?;
    }
    loop {
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return Ok(()) };
                let id = *next_id;
                *next_id += 1;
                // Outstanding before it is sent: if the connection fails
                // now, the next one sends it again (never lost).
                pending.insert(id, p);
                send(wr, id, &pending[&id]).await?;
            }
            frame = reader.next() => match frame {
                Ok(Some(Frame::Data { id, offset, len, bytes })) => {
                    if id == 0 {
                        shared.stats.pushed_bytes.fetch_add(u64::from(len), Relaxed);
                        shared.landing.store(offset, len, bytes.as_deref());
                        // The push never pauses: give the demand channel
                        // its turn between frames.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let Some(p) = pending.remove(&id) else { continue };
                    if p.offset != offset || p.len != len {
                        let why = format!(
                            "the answer to {:#x}+{:#x} is {offset:#x}+{len:#x}", p.offset, p.len
                        );
                        pending.insert(id, p);
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why).into());
                    }
                    shared.landing.store(offset, len, bytes.as_deref());
                    let fetched = match bytes {
                        Some(b) => Fetched::Data(b),
                        None => Fetched::Zero,
                    };
                    let _ = p.reply.send(Ok(fetched));
                }
                Ok(Some(Frame::Error { id, message, .. })) => {
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.reply.send(Err(SourceError::Failed {
                            offset: p.offset,
                            len: u64::from(p.len),
                            source: std::io::Error::other(format!("page server: {message}")),
                        }));
                    }
                }
                Ok(Some(_)) => {
                    return Err(std::io::Error::other("an unexpected frame from the page server").into())
                }
                Ok(None) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Err(LinkError::Protocol(ProtocolError::Checksum { id, .. })) => {
                    // Corrupted in transit: never installed, asked again.
                    shared.stats.checksum_failures.fetch_add(1, Relaxed);
                    if let Some(mut p) = pending.remove(&id) {
                        p.checksum_failures += 1;
                        if p.checksum_failures > shared.config.checksum_retries {
                            let _ = p.reply.send(Err(SourceError::Failed {
                                offset: p.offset,
                                len: u64::from(p.len),
                                source: std::io::Error::other("every copy of these bytes failed its checksum"),
                            }));
                            continue;
                        }
                        let id = *next_id;
                        *next_id += 1;
                        pending.insert(id, p);
                        send(wr, id, &pending[&id]).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
