//! A real S3 server on loopback for the object-storage tests, and an HTTP
//! proxy in front of it that injects faults.
//!
//! [`S3Server`] is `s3s-fs` (the S3 protocol from the `s3s` crate over a
//! directory) serving on 127.0.0.1 on a port of its own, with SigV4
//! authentication on, inside the test process: no program to install, no
//! service to start. Its objects are files under [`S3Server::root`], so a
//! test can corrupt one behind the server's back.
//!
//! [`Proxy`] forwards TCP to it and reads the HTTP/1.1 requests going
//! through (the S3 clients here send one request at a time per
//! connection): it logs them, delays them, answers some with 503 itself,
//! or goes down (cuts every connection and refuses new ones) and comes back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::Scratch;

/// The bucket every [`S3Server`] has.
pub const BUCKET: &str = "snapshots";
/// The access key its authentication accepts.
pub const ACCESS_KEY: &str = "uffd-test-access";
/// The matching secret key.
pub const SECRET_KEY: &str = "uffd-test-secret-key";

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("starting a test runtime")
}

/// An S3 server (s3s-fs) on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct S3Server {
    root: Scratch,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3Server {
    /// Starts a server with one empty bucket, [`BUCKET`].
    pub fn start() -> S3Server {
        let root = Scratch::new("s3");
        std::fs::create_dir_all(root.path(BUCKET)).expect("creating the bucket");
        let runtime = runtime("test-s3-server");
        let fs = s3s_fs::FileSystem::new(root.dir()).expect("s3s-fs over the scratch directory");
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the S3 server on loopback");
        let addr = listener.local_addr().expect("the S3 server's address");
        runtime.spawn(async move {
            let http =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // Small responses (headers, then the body) must not wait
                // for delayed ACKs.
                let _ = socket.set_nodelay(true);
                let conn = http
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            root,
            addr,
            runtime: Some(runtime),
        }
    }

    /// Its `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory holding its buckets.
    pub fn root(&self) -> &Path {
        self.root.dir()
    }

    /// The file holding object `key` of [`BUCKET`].
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.path(BUCKET).join(key)
    }

    /// Stops serving: open connections are cut, new ones refused.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The standard AWS environment that points an S3 client at `endpoint`
/// with this server's credentials (plain HTTP allowed), for a child
/// process's environment.
pub fn aws_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// One request seen by a [`Proxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `GET`, `PUT`, `HEAD`...
    pub method: String,
    /// The request target (`/bucket/key?query`).
    pub target: String,
    /// The status the proxy answered with itself, if it did.
    pub injected: Option<u16>,
}

#[derive(Debug)]
struct ProxyState {
    upstream: SocketAddr,
    delay_us: AtomicU64,
    fail_next: AtomicU32,
    down: tokio::sync::watch::Sender<bool>,
    seen: Mutex<Vec<Seen>>,
}

/// A fault-injecting HTTP proxy on 127.0.0.1 in front of `upstream`,
/// stopped on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts forwarding to `upstream`, with no fault.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let runtime = runtime("test-s3-proxy");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy on loopback");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(ProxyState {
            upstream,
            delay_us: AtomicU64::new(0),
            fail_next: AtomicU32::new(0),
            down: tokio::sync::watch::channel(false).0,
            seen: Mutex::new(Vec::new()),
        });
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *st.down.borrow() {
                    drop(client);
                    continue;
                }
                tokio::spawn(connection(client, Arc::clone(&st)));
            }
        });
        Proxy {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    /// Its `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Delays every request by `delay` before forwarding it.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_us.store(delay.as_micros() as u64, SeqCst);
    }

    /// Answers the next `n` requests with 503 Service Unavailable itself.
    pub fn fail_next(&self, n: u32) {
        self.state.fail_next.store(n, SeqCst);
    }

    /// Down: every open connection is cut and new ones are closed at once.
    /// Up again: forwards as before.
    pub fn set_down(&self, down: bool) {
        self.state.down.send_replace(down);
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear(&self) {
        self.state.seen.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn connection(client: TcpStream, st: Arc<ProxyState>) {
    let Ok(server) = TcpStream::connect(st.upstream).await else {
        return;
    };
    // Forwarded as they come: no Nagle delay added to the link's.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut down = st.down.subscribe();
    let (client_read, client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let back = {
        let client_write = Arc::clone(&client_write);
        async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if client_write
                    .lock()
                    .await
                    .write_all(&buf[..n])
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    let forth = async move {
        let mut reader = BufReader::new(client_read);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let end = line == b"\r\n";
                head.extend_from_slice(&line);
                if end {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&head).to_string();
            let mut first = text.lines().next().unwrap_or("").split(' ');
            let method = first.next().unwrap_or("").to_string();
            let target = first.next().unwrap_or("").to_string();
            let header = |name: &str| {
                text.lines().skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
            };
            let body_len: u64 = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            let delay = st.delay_us.load(SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_micros(delay)).await;
            }
            let inject = st
                .fail_next
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            st.seen.lock().unwrap().push(Seen {
                method,
                target,
                injected: inject.then_some(503),
            });
            if inject {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
                let reply = format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut w = client_write.lock().await;
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.shutdown().await;
                return;
            }
            if server_write.write_all(&head).await.is_err() {
                return;
            }
            if chunked {
                // Not parsed further: the rest of this connection is piped.
                let _ = tokio::io::copy(&mut reader, &mut server_write).await;
                return;
            }
            let mut body = (&mut reader).take(body_len);
            if tokio::io::copy(&mut body, &mut server_write).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = back => {}
        () = forth => {}
        _ = down.wait_for(|d| *d) => {}
    }
}
