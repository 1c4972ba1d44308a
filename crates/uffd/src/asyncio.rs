//! An async event stream on tokio's `AsyncFd` (feature `tokio`).

#![allow(unsafe_code)]

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::Error;
use crate::event::{Event, EventBuffer};
use crate::uffd::Uffd;

/// A non-blocking [`Uffd`] registered with the tokio reactor.
///
/// ```no_run
/// # async fn demo() -> Result<(), uffd::Error> {
/// use uffd::{AsyncUffd, EventBuffer, OpenOptions};
/// let uffd = AsyncUffd::new(OpenOptions::new().non_blocking(true).open()?)?;
/// let mut buf = EventBuffer::new(64);
/// for event in uffd.read_events(&mut buf).await?.drain(..) {
///     println!("{event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AsyncUffd {
    inner: AsyncFd<Uffd>,
}

impl AsyncUffd {
    /// Registers `uffd`, which must have been opened non-blocking, with the
    /// current tokio runtime.
    pub fn new(uffd: Uffd) -> Result<AsyncUffd, Error> {
        let flags = rustix::fs::fcntl_getfl(&uffd).map_err(|errno| Error::Io {
            what: "reading the userfaultfd's file flags".into(),
            source: errno.into(),
        })?;
        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
            return Err(Error::NeedsNonBlocking {
                what: "an AsyncUffd (tokio polls the fd)",
            });
        }
        // SAFETY: `Uffd` owns its fd, which stays open and is the same fd
        // for as long as the `Uffd` lives inside the `AsyncFd`.
        let inner = unsafe { AsyncFd::register_with_interest(uffd, Interest::READABLE) }.map_err(
            |source| Error::Io {
                what: "registering the userfaultfd with tokio".into(),
                source: source.into(),
            },
        )?;
        Ok(AsyncUffd { inner })
    }

    /// The userfaultfd, for resolving ioctls (they never block).
    pub fn get_ref(&self) -> &Uffd {
        self.inner.get_ref()
    }

    /// Waits until at least one message is queued, then reads as many as fit.
    pub async fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
    ) -> Result<&'b mut Vec<Event>, Error> {
        loop {
            let mut guard = self.inner.readable().await.map_err(|source| Error::Io {
                what: "waiting for userfaultfd messages".into(),
                source,
            })?;
            let n = buf.fill_from(self.inner.get_ref())?.len();
            if n > 0 {
                return Ok(buf.events_mut());
            }
            // Another reader took the message, or the fault was resolved.
            guard.clear_ready();
        }
    }

    /// An endless stream of events; `next().await` yields one at a time.
    pub fn events(&self, capacity: usize) -> EventStream<'_> {
        EventStream {
            uffd: self,
            buf: EventBuffer::new(capacity),
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Gives back the userfaultfd.
    pub fn into_inner(self) -> Uffd {
        self.inner.into_inner()
    }
}

/// Events from an [`AsyncUffd`], read in batches and handed out one by one.
#[derive(Debug)]
pub struct EventStream<'a> {
    uffd: &'a AsyncUffd,
    buf: EventBuffer,
    pending: std::collections::VecDeque<Event>,
}

impl EventStream<'_> {
    /// The next event, waiting for one if none is buffered.
    pub async fn next(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let batch = self.uffd.read_events(&mut self.buf).await?;
            self.pending.extend(batch.drain(..));
        }
    }
}
