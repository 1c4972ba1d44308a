//! Reserving 2 MiB huge pages for hugetlb mappings, and giving them back.

use std::fs::File;
use std::path::Path;

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::Error;

const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const LOCK_PATH: &str = "/tmp/uffd-hugepages.lock";

/// Free 2 MiB huge pages right now (0 when hugetlb is absent).
pub fn free_hugepages() -> u64 {
    read_number(FREE_HUGEPAGES).unwrap_or(0)
}

/// The configured pool of 2 MiB huge pages.
pub fn nr_hugepages() -> u64 {
    read_number(NR_HUGEPAGES).unwrap_or(0)
}

/// At least `count` free 2 MiB huge pages, for as long as this value lives.
///
/// If fewer are free, the pool is grown (which needs root); on drop the pool
/// is set back to what it was. An exclusive lock on
/// `/tmp/uffd-hugepages.lock` is held meanwhile, so that concurrent test
/// processes neither shrink each other's pool nor race for its pages.
#[derive(Debug)]
pub struct HugepageReservation {
    previous: Option<u64>,
    count: u64,
    _lock: File,
}

impl HugepageReservation {
    /// Makes sure `count` huge pages are free, growing the pool if needed.
    ///
    /// Fails with a reason fit for a SKIP line when the pool cannot be grown
    /// (not root, no hugetlb support, or not enough memory).
    pub fn reserve(count: u64) -> Result<HugepageReservation, Error> {
        if !Path::new(NR_HUGEPAGES).exists() {
            return Err(io_error(
                "2 MiB huge pages are not supported by this kernel",
                std::io::ErrorKind::Unsupported.into(),
            ));
        }
        // Read-only with O_CREAT, world-readable: flock needs no write access,
        // so users other than the file's creator can take the lock too.
        let lock = rustix::fs::open(
            LOCK_PATH,
            OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(File::from)
        .map_err(|e| io_error(&format!("opening {LOCK_PATH}"), e.into()))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| io_error(&format!("locking {LOCK_PATH}"), e.into()))?;
        let free = free_hugepages();
        if free >= count {
            return Ok(HugepageReservation {
                previous: None,
                count,
                _lock: lock,
            });
        }
        let previous = nr_hugepages();
        let wanted = previous + (count - free);
        std::fs::write(NR_HUGEPAGES, wanted.to_string()).map_err(|e| {
            io_error(
                &format!(
                    "{count} huge pages are needed but {free} are free, and growing \
                     {NR_HUGEPAGES} to {wanted} failed (needs root)"
                ),
                e,
            )
        })?;
        let reservation = HugepageReservation {
            previous: Some(previous),
            count,
            _lock: lock,
        };
        let now_free = free_hugepages();
        if now_free < count {
            return Err(io_error(
                &format!(
                    "asked the kernel for {wanted} huge pages but only {now_free} are free \
                     (memory too fragmented or too small)"
                ),
                std::io::ErrorKind::OutOfMemory.into(),
            ));
        }
        Ok(reservation)
    }

    /// How many pages were asked for.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            let _ = std::fs::write(NR_HUGEPAGES, previous.to_string());
        }
    }
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn io_error(what: &str, source: std::io::Error) -> Error {
    Error::Io {
        what: what.to_string(),
        source,
    }
}
