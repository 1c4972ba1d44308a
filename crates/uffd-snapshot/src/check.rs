//! Memory whose every 4 KiB page carries a version counter, written by
//! threads that remember what they overwrite: the checker behind the
//! tests and `uffd snapshot live-demo`, which tells whether an image
//! equals the memory at t0 exactly.
//!
//! Page `p` at version `v` holds `v` in its first 8 bytes and a pattern of
//! `(p, v)` in the rest; version 0 is all zero (untouched memory). Each
//! writer owns the pages `p % writers == its index`, so a page has one
//! writer. Writers take a lock shared for each write;
//! [`VersionedMemory::at_t0`] takes it exclusively, bumps the epoch and
//! runs the snapshot's t0 step. The first write to a page in an epoch
//! records the version it overwrote: the page's version at t0 is that
//! record if the page was written since, or its current version if not.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use uffd::Mapping;

use crate::{Error, Prepared, Running};

/// The page granularity of versions.
pub const PAGE: usize = 4096;

/// See the module docs.
#[derive(Debug)]
pub struct VersionedMemory {
    mapping: Mapping,
    lock: RwLock<()>,
    epoch: AtomicU64,
    first: Vec<AtomicU64>,
    at_epoch: Vec<AtomicU64>,
    stop: AtomicBool,
    ops: AtomicU64,
    longest_op_ns: AtomicU64,
}

/// The contents of page `p` at version `v`.
pub fn page_contents(p: u64, v: u64, out: &mut [u8]) {
    if v == 0 {
        out.fill(0);
        return;
    }
    for (k, w) in out.chunks_exact_mut(8).enumerate() {
        let word = if k == 0 {
            v
        } else {
            (p << 32) ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k as u64
        };
        w.copy_from_slice(&word.to_le_bytes());
    }
}

impl VersionedMemory {
    /// Takes `mapping` over (its pages start at version 0: zero).
    pub fn new(mapping: Mapping) -> VersionedMemory {
        let pages = mapping.len() / PAGE;
        VersionedMemory {
            mapping,
            lock: RwLock::new(()),
            epoch: AtomicU64::new(0),
            first: (0..pages).map(|_| AtomicU64::new(u64::MAX)).collect(),
            at_epoch: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            longest_op_ns: AtomicU64::new(0),
        }
    }

    /// The memory.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Pages of 4 KiB.
    pub fn pages(&self) -> u64 {
        (self.mapping.len() / PAGE) as u64
    }

    /// The version page `p` holds now (reads memory).
    pub fn version(&self, p: u64) -> u64 {
        let mut v = [0u8; 8];
        self.mapping.read(p as usize * PAGE, &mut v);
        u64::from_le_bytes(v)
    }

    /// Writes page `p` at its next version, recording the old one on its
    /// first write in this epoch. The caller owns `p` (one writer per page).
    pub fn write_next(&self, p: u64, buf: &mut [u8; PAGE]) {
        let started = Instant::now();
        let _shared = self.lock.read().unwrap_or_else(|e| e.into_inner());
        let v = self.version(p);
        let epoch = self.epoch.load(Relaxed);
        if self.first[p as usize].load(Relaxed) != epoch {
            self.first[p as usize].store(epoch, Relaxed);
            self.at_epoch[p as usize].store(v, Relaxed);
        }
        page_contents(p, v + 1, buf);
        self.mapping.write(p as usize * PAGE, buf);
        drop(_shared);
        self.ops.fetch_add(1, Relaxed);
        self.longest_op_ns
            .fetch_max(started.elapsed().as_nanos() as u64, Relaxed);
    }

    /// Writer `index` of `writers`: writes random pages it owns until
    /// [`VersionedMemory::stop`], pausing `pace` between writes.
    pub fn writer(&self, index: u64, writers: u64, pace: Duration) {
        let own = self.pages().saturating_sub(index).div_ceil(writers.max(1));
        if own == 0 {
            return;
        }
        let mut x = 0x2545_F491_4F6C_DD1D ^ (index + 1).wrapping_mul(0x9E37_79B9);
        let mut buf = [0u8; PAGE];
        while !self.stop.load(Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = index + (x % own) * writers;
            self.write_next(p, &mut buf);
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
    }

    /// Tells the writers to stop.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// True once [`VersionedMemory::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Lets writers run again after [`VersionedMemory::stop`].
    pub fn restart(&self) {
        self.stop.store(false, Relaxed);
    }

    /// Stops the writers (they wait in their next write) until the guard drops.
    pub fn pause(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    /// With the writers paused, starts a new epoch and runs `t0` (the
    /// snapshot's protect step): the instant the image must equal.
    pub fn at_t0<T>(&self, t0: impl FnOnce() -> T) -> T {
        let _paused = self.pause();
        self.epoch.fetch_add(1, Relaxed);
        t0()
    }

    /// Takes a live snapshot's t0 with the writers held: across the whole
    /// walk ([`Prepared::protect`]), or, with `arm`, across
    /// [`crate::Armed::protect`] after a [`Prepared::arm`] walk made while
    /// they ran. Also returns the longest write during that arm walk (zero
    /// without one), taken as [`VersionedMemory::take_longest_op`] does.
    pub fn reach_t0(&self, prepared: Prepared, arm: bool) -> Result<(Running, Duration), Error> {
        if !arm {
            return Ok((self.at_t0(|| prepared.protect())?, Duration::ZERO));
        }
        let armed = prepared.arm()?;
        let arming = self.take_longest_op();
        Ok((self.at_t0(|| armed.protect())?, arming))
    }

    /// Writes completed so far, and resets the count.
    pub fn take_ops(&self) -> u64 {
        self.ops.swap(0, Relaxed)
    }

    /// The longest single write (including any wait for the snapshot)
    /// since the last call, and resets it.
    pub fn take_longest_op(&self) -> Duration {
        Duration::from_nanos(self.longest_op_ns.swap(0, Relaxed))
    }

    /// The version page `p` had at the last t0. Call with writers stopped.
    pub fn version_at_t0(&self, p: u64) -> u64 {
        if self.first[p as usize].load(Relaxed) == self.epoch.load(Relaxed) {
            self.at_epoch[p as usize].load(Relaxed)
        } else {
            self.version(p)
        }
    }

    /// Pages of `image` (the bytes at `image[offset..]` for this memory)
    /// that differ from the memory at the last t0, as page ranges. Call
    /// with writers stopped.
    pub fn mismatches_at_t0(&self, image: &[u8]) -> Vec<Range<u64>> {
        self.mismatches(image, |p| self.version_at_t0(p))
    }

    /// Pages of `image` that differ from the memory now.
    pub fn mismatches_now(&self, image: &[u8]) -> Vec<Range<u64>> {
        self.mismatches(image, |p| self.version(p))
    }

    /// [`VersionedMemory::mismatches_at_t0`] of an image file, read a
    /// chunk at a time (an image as large as memory need not fit beside it).
    pub fn file_mismatches_at_t0(&self, image: &std::fs::File) -> std::io::Result<Vec<Range<u64>>> {
        self.file_mismatches(image, |p| self.version_at_t0(p))
    }

    /// [`VersionedMemory::mismatches_now`] of an image file.
    pub fn file_mismatches_now(&self, image: &std::fs::File) -> std::io::Result<Vec<Range<u64>>> {
        self.file_mismatches(image, |p| self.version(p))
    }

    fn file_mismatches(
        &self,
        image: &std::fs::File,
        version: impl Fn(u64) -> u64,
    ) -> std::io::Result<Vec<Range<u64>>> {
        use std::os::unix::fs::FileExt;
        let len = image.metadata()?.len();
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut chunk = vec![0u8; 256 * PAGE];
        let mut p = 0;
        while p < self.pages() {
            let n = (self.pages() - p).min(256);
            let at = p * PAGE as u64;
            let have = len.saturating_sub(at).min(n * PAGE as u64) as usize;
            image.read_exact_at(&mut chunk[..have], at)?;
            let part = self.compare(&chunk[..have], p, n, &version);
            for r in part {
                push(&mut out, r);
            }
            p += n;
        }
        Ok(out)
    }

    fn mismatches(&self, image: &[u8], version: impl Fn(u64) -> u64) -> Vec<Range<u64>> {
        self.compare(image, 0, self.pages(), &version)
    }

    /// Pages `first..first + n` against `bytes`, which starts at page `first`.
    fn compare(
        &self,
        bytes: &[u8],
        first: u64,
        n: u64,
        version: &impl Fn(u64) -> u64,
    ) -> Vec<Range<u64>> {
        let mut want = [0u8; PAGE];
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in first..first + n {
            page_contents(p, version(p), &mut want);
            let at = (p - first) as usize * PAGE;
            if bytes.get(at..at + PAGE) != Some(&want[..]) {
                push(&mut out, p..p + 1);
            }
        }
        out
    }
}

fn push(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => out.push(r),
    }
}
