//! SIGTERM/SIGINT (drain and stop) and SIGUSR1 (write working sets) for a
//! running server, through a self-pipe: the handlers only write one byte,
//! a helper thread does the work.
//!
//! The handlers go in before the server starts taking VMs on (binding, or
//! receiving them from the server it takes over from): a signal's default
//! action would end the process while it holds VMs' userfaultfds, and each
//! of those VMs would then read zeros where its memory should be. A stop
//! asked for before the server exists is kept and applied once it does, so
//! the server stops the regular way, draining every VM it took on.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use crate::server::ServerHandle;

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Where signals go: the server once it exists, until then what was asked.
#[derive(Debug, Default)]
struct Routing {
    server: Option<ServerHandle>,
    stop: bool,
    record: bool,
}

impl Routing {
    /// Hands whatever is pending to the server, if there is one yet.
    fn deliver(&mut self) {
        let Some(server) = &self.server else {
            return;
        };
        if std::mem::take(&mut self.record) {
            server.record_now();
        }
        if std::mem::take(&mut self.stop) {
            server.shutdown();
        }
    }
}

/// The process's signal routing, from [`install`].
#[derive(Debug, Clone)]
pub struct Signals {
    routing: Arc<Mutex<Routing>>,
}

impl Signals {
    /// From now on signals go to `server`; one that came before it existed
    /// is delivered now.
    pub fn route_to(&self, server: ServerHandle) {
        let mut routing = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        routing.server = Some(server);
        routing.deliver();
    }
}

/// Catches SIGTERM, SIGINT and SIGUSR1 for the rest of the process's life:
/// SIGTERM and SIGINT become [`ServerHandle::shutdown`], SIGUSR1
/// [`ServerHandle::record_now`], of the server given to
/// [`Signals::route_to`] (at once if it has been, when it is if not).
pub fn install() -> std::io::Result<Signals> {
    let (read, write): (OwnedFd, OwnedFd) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let raw_write: RawFd = write.as_raw_fd();
    PIPE_WRITE.store(raw_write, Ordering::SeqCst);
    // The write end must live as long as the handlers may run.
    std::mem::forget(write);
    let signals = Signals {
        routing: Arc::new(Mutex::new(Routing::default())),
    };
    let routing = signals.routing.clone();
    std::thread::Builder::new()
        .name("uffd-serve-signals".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            loop {
                match rustix::io::read(&read, &mut byte) {
                    Ok(1) => {
                        let mut routing = routing.lock().unwrap_or_else(|e| e.into_inner());
                        let waiting = if routing.server.is_none() {
                            " (once the server has started)"
                        } else {
                            ""
                        };
                        match i32::from(byte[0]) {
                            libc::SIGUSR1 => {
                                tracing::info!("SIGUSR1: writing working sets{waiting}");
                                routing.record = true;
                            }
                            signal => {
                                tracing::info!(signal, "stop requested: draining{waiting}");
                                routing.stop = true;
                            }
                        }
                        routing.deliver();
                    }
                    Err(rustix::io::Errno::INTR) => continue,
                    _ => break,
                }
            }
        })?;
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: a zeroed sigaction with a plain handler and SA_RESTART is
        // a valid argument; the handler only calls write(2).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(signals)
}
