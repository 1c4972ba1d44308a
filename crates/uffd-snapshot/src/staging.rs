//! Saved pages on their way to the image: the saver copies t0 contents
//! into memory buffers and a flusher thread writes them out, so that a
//! writer waiting for its page waits for a 4 KiB copy, never for the disk.
//!
//! Memory is bounded: at most `cap` bytes of buffers exist; the background
//! pass leaves the last `reserve` of them to write faults, and when even
//! those are taken a fault waits for the flusher (the disk) to return one.
//! fork() bounds nothing: its copies of written pages live until the child
//! exits.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Error;
use crate::image::SparseImage;

/// The image writer's nice value: below the writers'.
const FLUSHER_NICE: i32 = 10;

/// Bytes of staging allowed by default: a quarter of the memory available
/// now, at least 16 MiB, never more than the image needs.
pub(crate) fn default_cap(image_len: u64) -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(256 << 20, |kib| kib.saturating_mul(1024));
    (available / 4).max(16 << 20).min(image_len.max(16 << 20))
}

/// One buffer of staged pages: `pieces` say where in the image each run
/// of bytes goes.
#[derive(Debug)]
struct Batch {
    buf: Vec<u8>,
    used: usize,
    pieces: Vec<(u64, usize, usize)>,
}

/// The saver's end: buffers to fill, the flusher behind them.
#[derive(Debug)]
pub(crate) struct Staging {
    buf_len: usize,
    buffers: usize,
    /// Buffers that may still be allocated.
    unallocated: usize,
    reserve: usize,
    free: Vec<Vec<u8>>,
    current: Option<Batch>,
    to_flusher: Option<Sender<Batch>>,
    returned: Receiver<Vec<u8>>,
    flusher: Option<JoinHandle<Result<SparseImage, Error>>>,
}

impl Staging {
    /// Starts the flusher, which owns `image` until [`Staging::finish`].
    /// Buffers are `buf_len` bytes (at least one page of `max_page`).
    pub(crate) fn start(image: SparseImage, cap: u64, buf_len: usize) -> Result<Staging, Error> {
        let most_needed = image.len() / buf_len as u64 + 2;
        let buffers = (cap / buf_len as u64).max(4).min(most_needed) as usize;
        let (to_flusher, batches) = mpsc::channel::<Batch>();
        let (giving_back, returned) = mpsc::channel::<Vec<u8>>();
        let flusher = std::thread::Builder::new()
            .name("uffd-snapshot-io".into())
            .spawn(move || {
                // Writing the page cache is long stretches in the kernel
                // that a woken writer at the same priority waited behind
                // for up to 41 ms (perf sched: its wake-up to run delay);
                // the disk can wait, the writers cannot.
                let _ = rustix::process::setpriority_process(
                    Some(rustix::thread::gettid()),
                    FLUSHER_NICE,
                );
                flush(image, batches, giving_back)
            })
            .map_err(Error::io("starting the image writer thread", "/proc/self"))?;
        Ok(Staging {
            buf_len,
            unallocated: buffers,
            buffers,
            reserve: (buffers / 8).clamp(1, 1024),
            free: Vec::new(),
            current: None,
            to_flusher: Some(to_flusher),
            returned,
            flusher: Some(flusher),
        })
    }

    fn collect_returned(&mut self) {
        while let Ok(buf) = self.returned.try_recv() {
            self.free.push(buf);
        }
    }

    /// True when everything staged so far has been written to the image.
    pub(crate) fn written_out(&mut self) -> bool {
        self.collect_returned();
        self.current.as_ref().is_none_or(|b| b.pieces.is_empty())
            && self.free.len() + self.unallocated + usize::from(self.current.is_some())
                == self.buffers
    }

    fn available(&self) -> usize {
        self.free.len() + self.unallocated
    }

    /// True when the background pass may stage more: buffers beyond the
    /// faults' reserve are free (or the current one has room for `len`).
    pub(crate) fn background_room(&mut self, len: usize) -> bool {
        self.collect_returned();
        self.current
            .as_ref()
            .is_some_and(|b| b.buf.len() - b.used >= len)
            || self.available() > self.reserve
    }

    /// Room for `len` bytes (at most one buffer): the filled current
    /// buffer goes to the flusher; waits for one to come back only when
    /// every buffer is taken.
    fn room(&mut self, len: usize) -> Result<&mut Batch, Error> {
        debug_assert!(len <= self.buf_len);
        if self
            .current
            .as_ref()
            .is_some_and(|b| b.buf.len() - b.used < len)
        {
            self.send_current()?;
        }
        if self.current.is_none() {
            self.collect_returned();
            let buf = match self.free.pop() {
                Some(buf) => buf,
                None if self.unallocated > 0 => {
                    self.unallocated -= 1;
                    vec![0; self.buf_len]
                }
                None => self.wait_returned()?,
            };
            self.current = Some(Batch {
                buf,
                used: 0,
                pieces: Vec::new(),
            });
        }
        Ok(self.current.as_mut().expect("just set"))
    }

    fn wait_returned(&mut self) -> Result<Vec<u8>, Error> {
        loop {
            match self.returned.recv_timeout(Duration::from_secs(1)) {
                Ok(buf) => return Ok(buf),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(self.flusher_failed()),
            }
        }
    }

    /// Stages `len` bytes for image offset `offset`, filled by `fill`
    /// (which reads the memory; its error leaves nothing staged).
    pub(crate) fn stage<E>(
        &mut self,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, Error> {
        let batch = self.room(len)?;
        let at = batch.used;
        if let Err(e) = fill(&mut batch.buf[at..at + len]) {
            return Ok(Err(e));
        }
        batch.used += len;
        batch.pieces.push((offset, at, len));
        Ok(Ok(()))
    }

    /// Hands the partly filled buffer to the flusher.
    pub(crate) fn send_current(&mut self) -> Result<(), Error> {
        let Some(batch) = self.current.take() else {
            return Ok(());
        };
        if batch.pieces.is_empty() {
            self.free.push(batch.buf);
            return Ok(());
        }
        let sent = self
            .to_flusher
            .as_ref()
            .map(|tx| tx.send(batch).is_ok())
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(self.flusher_failed())
        }
    }

    fn flusher_failed(&mut self) -> Error {
        self.to_flusher = None;
        match self.flusher.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => Error::SaverPanicked("the image writer thread panicked".into()),
            _ => Error::Stuck("the image writer thread stopped".into()),
        }
    }

    /// Everything staged written: the image back, not yet committed.
    pub(crate) fn finish(mut self) -> Result<SparseImage, Error> {
        self.send_current()?;
        self.to_flusher = None;
        match self.flusher.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::SaverPanicked(
                "the image writer thread panicked".into(),
            )),
            None => Err(Error::Stuck("the image writer thread stopped".into())),
        }
    }
}

fn flush(
    mut image: SparseImage,
    batches: Receiver<Batch>,
    giving_back: Sender<Vec<u8>>,
) -> Result<SparseImage, Error> {
    for batch in batches {
        for &(offset, at, len) in &batch.pieces {
            image.write_pages(offset, &batch.buf[at..at + len], 4096)?;
        }
        // The saver may be gone (it failed); the buffer is then dropped.
        let _ = giving_back.send(batch.buf);
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn staged_pages_reach_the_image_in_any_order_and_memory_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("uffd-staging-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let pages = 64u64;
        let image = SparseImage::create(&path, pages * 4096).unwrap();
        // Four buffers of two pages: staging 64 pages must recycle them.
        let mut staging = Staging::start(image, 4 * 8192, 8192).unwrap();
        for p in (0..pages).rev() {
            let staged = staging
                .stage(p * 4096, 4096, |buf| {
                    buf.fill(p as u8 + 1);
                    Ok::<(), ()>(())
                })
                .unwrap();
            assert!(staged.is_ok());
            assert!(staging.free.len() + staging.unallocated <= 4);
        }
        // A failed fill stages nothing.
        assert!(staging
            .stage(0, 4096, |buf| {
                buf.fill(0xee);
                Err(())
            })
            .unwrap()
            .is_err());
        let image = staging.finish().unwrap();
        assert_eq!(image.data_bytes, pages * 4096);
        let file = image.commit().unwrap();
        let f = std::fs::File::open(file).unwrap();
        for p in 0..pages {
            let mut page = [0u8; 4096];
            f.read_exact_at(&mut page, p * 4096).unwrap();
            assert!(page.iter().all(|&b| b == p as u8 + 1), "page {p}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
