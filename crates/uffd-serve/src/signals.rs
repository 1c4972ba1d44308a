//! SIGTERM/SIGINT (drain and stop) and SIGUSR1 (write working sets) for a
//! running server, through a self-pipe: the handlers only write one byte,
//! a helper thread does the work.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

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

/// Routes SIGTERM and SIGINT to [`ServerHandle::shutdown`] and SIGUSR1 to
/// [`ServerHandle::record_now`] for the rest of the process's life.
pub fn install(handle: ServerHandle) -> std::io::Result<()> {
    let (read, write): (OwnedFd, OwnedFd) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let raw_write: RawFd = write.as_raw_fd();
    PIPE_WRITE.store(raw_write, Ordering::SeqCst);
    // The write end must live as long as the handlers may run.
    std::mem::forget(write);
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
    std::thread::Builder::new()
        .name("uffd-serve-signals".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            loop {
                match rustix::io::read(&read, &mut byte) {
                    Ok(1) => match i32::from(byte[0]) {
                        libc::SIGUSR1 => {
                            tracing::info!("SIGUSR1: writing working sets");
                            handle.record_now();
                        }
                        signal => {
                            tracing::info!(signal, "stop requested: draining");
                            handle.shutdown();
                        }
                    },
                    Err(rustix::io::Errno::INTR) => continue,
                    _ => break,
                }
            }
        })?;
    Ok(())
}
