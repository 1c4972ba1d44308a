//! The page server: serves one memory image to any number of destinations
//! at once, each as often as it likes, over a demand and a bulk channel
//! per destination (see [`crate::protocol`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};
use uffd_pager::{Content, PageSource};

use crate::io::{write_frame, FrameReader, LinkError};
use crate::protocol::{Channel, ErrorCode, Frame, ACCEPTS_LZ4};

/// How the server serves.
#[derive(Debug, Clone)]
pub struct PageServerConfig {
    /// Stream every page to each destination's bulk channel in the
    /// background, following its recent demand faults first.
    pub push: bool,
    /// Bytes per pushed frame.
    pub push_chunk: u32,
    /// Compress data frames (LZ4) where that shrinks them by an eighth or
    /// more, for destinations that accept it: worth it on links slower than
    /// the compression (about 1 GB/s per core), not on loopback or 10 GbE.
    pub compress: bool,
}

impl Default for PageServerConfig {
    fn default() -> Self {
        PageServerConfig {
            push: false,
            push_chunk: 256 << 10,
            compress: false,
        }
    }
}

/// What one destination took, for logs and `--stats-json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    /// The destination's session id.
    pub session: u64,
    /// Connections it made (more than two: it reconnected).
    pub connections: u64,
    /// Demand requests answered.
    pub demand_requests: u64,
    /// Bytes sent on the demand channel.
    pub demand_bytes: u64,
    /// Background requests answered on the bulk channel.
    pub bulk_requests: u64,
    /// Bytes sent answering them.
    pub bulk_bytes: u64,
    /// Bytes pushed unasked.
    pub pushed_bytes: u64,
}

struct Session {
    id: u64,
    connections: AtomicU64,
    demand_requests: AtomicU64,
    demand_bytes: AtomicU64,
    bulk_requests: AtomicU64,
    bulk_bytes: AtomicU64,
    pushed_bytes: AtomicU64,
    /// The last offset a demand fault asked for, plus one (0: none yet).
    last_demand: AtomicU64,
    /// One bit per push chunk already pushed.
    pushed: Mutex<Vec<u64>>,
}

impl Session {
    fn stats(&self) -> SessionStats {
        SessionStats {
            session: self.id,
            connections: self.connections.load(Relaxed),
            demand_requests: self.demand_requests.load(Relaxed),
            demand_bytes: self.demand_bytes.load(Relaxed),
            bulk_requests: self.bulk_requests.load(Relaxed),
            bulk_bytes: self.bulk_bytes.load(Relaxed),
            pushed_bytes: self.pushed_bytes.load(Relaxed),
        }
    }
}

struct Shared {
    source: Arc<dyn PageSource>,
    identity: u64,
    page_size: u32,
    config: PageServerConfig,
    sessions: Mutex<HashMap<u64, Weak<Session>>>,
    finished: Mutex<Vec<SessionStats>>,
    stop: Notify,
    stopping: std::sync::atomic::AtomicBool,
}

/// Stops a running [`PageServer`] from another thread or a signal helper.
#[derive(Clone)]
pub struct PageServerHandle(Arc<Shared>);

impl std::fmt::Debug for PageServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageServerHandle")
    }
}

impl PageServerHandle {
    /// Stops accepting and closes every connection; [`PageServer::run`]
    /// returns. Destinations keep their faulting threads waiting and
    /// reconnect to whatever serves the address next.
    pub fn stop(&self) {
        self.0.stopping.store(true, Relaxed);
        self.0.stop.notify_waiters();
        self.0.stop.notify_one();
    }
}

/// A bound page server.
pub struct PageServer {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("addr", &self.listener.local_addr().ok())
            .field("source", &self.shared.source.describe())
            .finish()
    }
}

impl PageServer {
    /// Listens on `addr` to serve `source` (its bytes are the image;
    /// `identity` tells destinations it is the same image after a restart:
    /// see [`image_identity`]).
    pub fn bind(
        addr: &str,
        source: Arc<dyn PageSource>,
        identity: u64,
        config: PageServerConfig,
    ) -> std::io::Result<PageServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(PageServer {
            listener,
            shared: Arc::new(Shared {
                source,
                identity,
                page_size: 4096,
                config,
                sessions: Mutex::new(HashMap::new()),
                finished: Mutex::new(Vec::new()),
                stop: Notify::new(),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that stops it.
    pub fn handle(&self) -> PageServerHandle {
        PageServerHandle(Arc::clone(&self.shared))
    }

    /// Serves until stopped; returns what each destination took.
    pub fn run(self) -> std::io::Result<Vec<SessionStats>> {
        let runtime = crate::runtime("uffd-page-server", 0)?;
        // Bulk channels (the push above all) on a niced thread of their
        // own: demand answers never wait behind them for the CPU.
        let bulk_runtime = crate::runtime("uffd-page-server-bulk", 10)?;
        let bulk = bulk_runtime.handle().clone();
        let shared = Arc::clone(&self.shared);
        runtime.block_on(async move {
            let listener = TcpListener::from_std(self.listener)?;
            loop {
                if shared.stopping.load(Relaxed) {
                    break;
                }
                tokio::select! {
                    _ = shared.stop.notified() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            let shared = Arc::clone(&shared);
                            let bulk = bulk.clone();
                            tokio::spawn(async move {
                                let stop = Arc::clone(&shared);
                                tokio::select! {
                                    r = connection(stream, &shared, &bulk) => if let Err(e) = r {
                                        debug!(%peer, error = %e, "connection ended");
                                    },
                                    _ = stop.stop.notified() => {}
                                }
                            });
                        }
                        Err(e) => warn!(error = %e, "accept failed"),
                    },
                }
            }
            Ok::<(), std::io::Error>(())
        })?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        bulk_runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        let mut all = self.shared.finished.lock().expect("stats lock").clone();
        let live: Vec<Arc<Session>> = self
            .shared
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        all.extend(live.iter().map(|s| s.stats()));
        Ok(all)
    }
}

/// An identity for the image in `file`: its device, inode, size and
/// modification time, hashed. The same file after a server restart has the
/// same identity; a replaced file has another.
pub fn image_identity(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
    ] {
        for b in v.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(h)
}

async fn connection(
    stream: TcpStream,
    shared: &Arc<Shared>,
    bulk_runtime: &tokio::runtime::Handle,
) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    write_frame(
        &mut wr,
        &Frame::Hello {
            page_size: shared.page_size,
            image_len: shared.source.len(),
            identity: shared.identity,
        },
    )
    .await?;
    let Some(Frame::Attach {
        channel,
        capabilities,
        session,
    }) = reader.next().await?
    else {
        return Err(std::io::Error::other("the destination did not attach").into());
    };
    let compress = shared.config.compress && capabilities & ACCEPTS_LZ4 != 0;
    let s = session_of(shared, session);
    s.connections.fetch_add(1, Relaxed);
    info!(session, %channel, "destination attached");
    let result = match channel {
        Channel::Demand => demand(reader, wr, shared, &s, compress).await,
        Channel::Bulk => {
            let (shared, session) = (Arc::clone(shared), Arc::clone(&s));
            bulk_runtime
                .spawn(async move { bulk(reader, wr, &shared, &session, compress).await })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()).into()))
        }
    };
    let stats = s.stats();
    drop(s);
    // The last channel of a session gone: keep its figures.
    let mut sessions = shared.sessions.lock().expect("sessions lock");
    if sessions
        .get(&session)
        .is_some_and(|w| w.strong_count() == 0)
    {
        sessions.remove(&session);
        info!(
            session,
            demand_requests = stats.demand_requests,
            bulk_requests = stats.bulk_requests,
            pushed_bytes = stats.pushed_bytes,
            "destination gone"
        );
        shared.finished.lock().expect("stats lock").push(stats);
    }
    result
}

fn session_of(shared: &Shared, id: u64) -> Arc<Session> {
    let mut sessions = shared.sessions.lock().expect("sessions lock");
    if let Some(s) = sessions.get(&id).and_then(Weak::upgrade) {
        return s;
    }
    let chunks = shared
        .source
        .len()
        .div_ceil(u64::from(shared.config.push_chunk)) as usize;
    let s = Arc::new(Session {
        id,
        connections: AtomicU64::new(0),
        demand_requests: AtomicU64::new(0),
        demand_bytes: AtomicU64::new(0),
        bulk_requests: AtomicU64::new(0),
        bulk_bytes: AtomicU64::new(0),
        pushed_bytes: AtomicU64::new(0),
        last_demand: AtomicU64::new(0),
        pushed: Mutex::new(vec![0; chunks.div_ceil(64)]),
    });
    sessions.insert(id, Arc::downgrade(&s));
    s
}

/// What [`read_answer`] found for a range.
enum Answer {
    /// Its bytes, in the caller's buffer.
    Bytes,
    /// A frame that answers it whole: a zero range, or an error.
    Frame(Frame),
}

/// Reads the answer to a request for `offset..offset + len` into `buf`,
/// which it resizes to `len` (a reused buffer costs no allocation and no
/// clearing).
fn read_answer(shared: &Shared, id: u64, offset: u64, len: u32, buf: &mut Vec<u8>) -> Answer {
    let size = shared.source.len();
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size)
    {
        return Answer::Frame(Frame::Error {
            id,
            code: ErrorCode::OutOfRange as u32,
            message: format!("{offset:#x}+{len:#x} lies past the image's {size} bytes"),
        });
    }
    buf.resize(len as usize, 0);
    let zero = Answer::Frame(Frame::Data {
        id,
        offset,
        len,
        bytes: None,
    });
    match shared.source.read_at(offset, buf) {
        Ok(Content::Zero) => zero,
        Ok(Content::Data) if uffd_pager::source::is_zero(buf) => zero,
        Ok(Content::Data) => Answer::Bytes,
        Err(e) => Answer::Frame(Frame::Error {
            id,
            code: ErrorCode::Io as u32,
            message: e.to_string(),
        }),
    }
}

/// Answers a request (`id` 0: pushes a range), reading through `buf`,
/// compressed when `compress` and that shrinks it; returns the data bytes
/// it sent.
async fn reply(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    buf: &mut Vec<u8>,
    (id, offset, len): (u64, u64, u32),
    compress: bool,
) -> std::io::Result<u64> {
    if let Answer::Frame(f) = read_answer(shared, id, offset, len, buf) {
        write_frame(wr, &f).await?;
        return Ok(0);
    }
    if compress {
        if let Some(wire) = crate::protocol::compressed_data(id, offset, len, buf) {
            wr.write_all(&wire).await?;
            return Ok(buf.len() as u64);
        }
    }
    let head = crate::protocol::data_head(id, offset, len, buf);
    crate::io::write_data(wr, &head, buf).await?;
    Ok(buf.len() as u64)
}

async fn demand(
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    shared: &Arc<Shared>,
    s: &Session,
    compress: bool,
) -> Result<(), LinkError> {
    let mut buf = Vec::new();
    while let Some(frame) = reader.next().await? {
        let Frame::Request {
            id, offset, len, ..
        } = frame
        else {
            return Err(std::io::Error::other("only requests are expected").into());
        };
        s.last_demand.store(offset + 1, Relaxed);
        let sent = reply(&mut wr, shared, &mut buf, (id, offset, len), compress).await?;
        s.demand_requests.fetch_add(1, Relaxed);
        s.demand_bytes.fetch_add(sent, Relaxed);
    }
    Ok(())
}

async fn bulk(
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    shared: &Arc<Shared>,
    s: &Session,
    compress: bool,
) -> Result<(), LinkError> {
    let (tx, mut rx) = mpsc::channel::<(u64, u64, u32)>(1024);
    let requests = async move {
        while let Some(frame) = reader.next().await? {
            let Frame::Request {
                id, offset, len, ..
            } = frame
            else {
                return Err(std::io::Error::other("only requests are expected").into());
            };
            if tx.send((id, offset, len)).await.is_err() {
                break;
            }
        }
        Ok::<(), LinkError>(())
    };
    let mut cursor = 0usize;
    let mut followed = 0u64;
    let mut pushing = shared.config.push;
    let mut buf = Vec::new();
    let replies = async {
        loop {
            // Answers first: a background read waits on them; the push
            // only fills the time between.
            let next = if pushing {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            } else {
                match rx.recv().await {
                    Some(r) => Some(r),
                    None => return Ok(()),
                }
            };
            if let Some(request) = next {
                let sent = reply(&mut wr, shared, &mut buf, request, compress).await?;
                s.bulk_requests.fetch_add(1, Relaxed);
                s.bulk_bytes.fetch_add(sent, Relaxed);
                continue;
            }
            // Follow the latest demand fault: the guest is likely to touch
            // what lies after it.
            let demand = s.last_demand.load(Relaxed);
            if demand != followed {
                followed = demand;
                cursor = ((demand - 1) / u64::from(shared.config.push_chunk)) as usize;
            }
            match next_unpushed(shared, s, cursor) {
                Some(chunk) => {
                    cursor = chunk + 1;
                    let chunk_len = u64::from(shared.config.push_chunk);
                    let offset = chunk as u64 * chunk_len;
                    let len = chunk_len.min(shared.source.len() - offset) as u32;
                    let sent = reply(&mut wr, shared, &mut buf, (0, offset, len), compress).await?;
                    s.pushed_bytes.fetch_add(sent, Relaxed);
                    // A push never waits while the destination keeps up:
                    // let the demand channels on this worker run between
                    // chunks.
                    tokio::task::yield_now().await;
                }
                None => {
                    info!(session = s.id, "every page pushed");
                    pushing = false;
                }
            }
        }
    };
    tokio::select! {
        r = requests => r,
        r = replies => r,
    }
}

/// Marks and returns the first chunk at or after `from` (wrapping) not yet
/// pushed to this session.
fn next_unpushed(shared: &Shared, s: &Session, from: usize) -> Option<usize> {
    let chunks = shared
        .source
        .len()
        .div_ceil(u64::from(shared.config.push_chunk)) as usize;
    let mut bits = s.pushed.lock().expect("push lock");
    (0..chunks)
        .map(|k| (from + k) % chunks.max(1))
        .find(|&c| bits[c / 64] & (1 << (c % 64)) == 0)
        .inspect(|&c| bits[c / 64] |= 1 << (c % 64))
}
