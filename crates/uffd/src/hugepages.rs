//! Reserving hugetlb pages for hugetlb mappings and giving them back, and
//! the cross-process lock that guards every system-wide setting this
//! workspace changes.

use std::fs::File;
use std::path::Path;

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::Error;
use crate::memory::HUGE_PAGE_SIZE;

/// Free 2 MiB huge pages right now (0 when hugetlb is absent).
pub fn free_hugepages() -> u64 {
    free_hugepages_of(HUGE_PAGE_SIZE)
}

/// The configured pool of 2 MiB huge pages.
pub fn nr_hugepages() -> u64 {
    nr_hugepages_of(HUGE_PAGE_SIZE)
}

/// Free huge pages of `page_size` bytes right now (0 when the kernel has
/// no pool of that size).
pub fn free_hugepages_of(page_size: usize) -> u64 {
    read_number(&pool_file(page_size, "free_hugepages")).unwrap_or(0)
}

/// The configured pool of huge pages of `page_size` bytes.
pub fn nr_hugepages_of(page_size: usize) -> u64 {
    read_number(&pool_file(page_size, "nr_hugepages")).unwrap_or(0)
}

/// Whether the kernel has a hugetlb pool of `page_size` bytes
/// (`/sys/kernel/mm/hugepages/hugepages-<kB>kB`).
pub fn hugepage_size_supported(page_size: usize) -> bool {
    Path::new(&pool_file(page_size, "nr_hugepages")).exists()
}

fn pool_file(page_size: usize, attr: &str) -> String {
    format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/{attr}",
        page_size >> 10
    )
}

/// An exclusive lock on one system-wide setting, held until dropped.
///
/// Every process using this crate that changes the setting takes the same
/// `flock(2)` on `/tmp/uffd-<name>.lock` first, so two test processes never
/// change the same knob at once nor restore each other's value. The lock
/// belongs to an open file description: a second `acquire` of the same
/// name in the same process waits for the first to be dropped.
///
/// Its holder writes down what it changed before changing it
/// ([`write_journal`](Self::write_journal), `/tmp/uffd-<name>.restore`), so
/// that a process killed before it restored the setting (SIGKILL, a test
/// runner's timeout) is repaired by the next holder: a journal seen under
/// the lock ([`journal`](Self::journal)) is a dead holder's, since every
/// live holder clears its own before it lets go.
#[derive(Debug)]
pub struct SettingLock {
    _file: File,
    journal: String,
}

impl SettingLock {
    /// Waits for and takes the lock named `name` (a file-name fragment
    /// such as `hugepages` or `thp`).
    pub fn acquire(name: &str) -> Result<SettingLock, Error> {
        let path = format!("/tmp/uffd-{name}.lock");
        // Read-only with O_CREAT, world-readable: flock needs no write
        // access, so users other than the file's creator can take the lock too.
        let file = rustix::fs::open(
            path.as_str(),
            OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(File::from)
        .map_err(|e| io_error(&format!("opening {path}"), e.into()))?;
        rustix::fs::flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| io_error(&format!("locking {path}"), e.into()))?;
        Ok(SettingLock {
            _file: file,
            journal: format!("/tmp/uffd-{name}.restore"),
        })
    }

    /// Where this lock's journal lives.
    pub fn journal_path(&self) -> &str {
        &self.journal
    }

    /// What a holder that died before restoring the setting wrote down.
    pub fn journal(&self) -> Option<String> {
        std::fs::read_to_string(&self.journal).ok()
    }

    /// Writes down `text` (what restores the setting), replacing the
    /// journal in one rename: never half written.
    pub fn write_journal(&self, text: &str) -> std::io::Result<()> {
        let tmp = format!("{}.{}", self.journal, std::process::id());
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.journal))
    }

    /// The setting is as it was: nothing to restore any more.
    pub fn clear_journal(&self) {
        let _ = std::fs::remove_file(&self.journal);
    }
}

/// At least `count` free huge pages of one size, for as long as this
/// value lives.
///
/// If fewer are free, the pool is grown (which needs root); on drop the pool
/// is set back to what it was. The size it is set back to goes into the
/// lock's journal first, so that a process killed before its drop ran
/// (SIGKILL, a test runner's timeout, an interrupted `uffd selftest`) is
/// repaired by the next reservation of that size. The pool's
/// [`SettingLock`] is held meanwhile
/// (`/tmp/uffd-hugepages.lock` for 2 MiB pages, `/tmp/uffd-hugepages-<kB>kB.lock`
/// for other sizes), so that concurrent test processes neither shrink each
/// other's pool nor race for its pages.
#[derive(Debug)]
pub struct HugepageReservation {
    page_size: usize,
    previous: Option<u64>,
    count: u64,
    lock: SettingLock,
}

impl HugepageReservation {
    /// Makes sure `count` 2 MiB huge pages are free, growing the pool if needed.
    ///
    /// Fails with a reason fit for a SKIP line when the pool cannot be grown
    /// (not root, no hugetlb support, or not enough memory).
    pub fn reserve(count: u64) -> Result<HugepageReservation, Error> {
        Self::reserve_sized(HUGE_PAGE_SIZE, count)
    }

    /// Makes sure `count` huge pages of `page_size` bytes (e.g. 1 GiB) are
    /// free, growing that pool if needed. Fails as [`reserve`](Self::reserve) does.
    pub fn reserve_sized(page_size: usize, count: u64) -> Result<HugepageReservation, Error> {
        let kib = page_size >> 10;
        if !hugepage_size_supported(page_size) {
            return Err(io_error(
                &format!("huge pages of {kib} KiB are not supported by this kernel"),
                std::io::ErrorKind::Unsupported.into(),
            ));
        }
        // The 2 MiB lock keeps its historical name so that processes built
        // before other sizes existed still exclude each other.
        let name = if page_size == HUGE_PAGE_SIZE {
            "hugepages".to_string()
        } else {
            format!("hugepages-{kib}kB")
        };
        let lock = SettingLock::acquire(&name)?;
        let nr_file = pool_file(page_size, "nr_hugepages");
        // A holder that died without giving its pages back.
        if let Some(size) = lock.journal().and_then(|t| t.trim().parse::<u64>().ok()) {
            if std::fs::write(&nr_file, size.to_string()).is_ok() {
                lock.clear_journal();
            }
        }
        let free = free_hugepages_of(page_size);
        if free >= count {
            return Ok(HugepageReservation {
                page_size,
                previous: None,
                count,
                lock,
            });
        }
        let previous = nr_hugepages_of(page_size);
        let wanted = previous + (count - free);
        let needs_root = |e: std::io::Error| {
            io_error(
                &format!(
                    "{count} huge pages of {kib} KiB are needed but {free} are free, and \
                     growing {nr_file} to {wanted} failed (needs root)"
                ),
                e,
            )
        };
        // Refused before anything is written down: a journal is for a
        // change that can be made.
        rustix::fs::access(nr_file.as_str(), rustix::fs::Access::WRITE_OK)
            .map_err(|e| needs_root(e.into()))?;
        // Written down before the pool grows, so no moment exists where it
        // is grown and its old size is known only to this process. Only
        // root can grow it, and root can write here; a failure to is a
        // failure to grow.
        lock.write_journal(&format!("{previous}\n")).map_err(|e| {
            io_error(
                &format!("writing {} before growing {nr_file}", lock.journal_path()),
                e,
            )
        })?;
        let reservation = HugepageReservation {
            page_size,
            previous: Some(previous),
            count,
            lock,
        };
        std::fs::write(&nr_file, wanted.to_string()).map_err(needs_root)?;
        let mut now_free = free_hugepages_of(page_size);
        if now_free < count {
            // Free memory is often there but in pieces (page cache spread
            // over it): ask the kernel to compact it once, then to grow the
            // pool again.
            let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
            let _ = std::fs::write(&nr_file, wanted.to_string());
            now_free = free_hugepages_of(page_size);
        }
        if now_free < count {
            return Err(io_error(
                &format!(
                    "asked the kernel for {wanted} huge pages of {kib} KiB but only {now_free} \
                     are free (memory too fragmented or too small)"
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

    /// The pool's size before this reservation grew it, which it is set
    /// back to on drop; `None` when enough pages were free already.
    pub fn grown_from(&self) -> Option<u64> {
        self.previous
    }

    /// The size of the reserved pages in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            let restored = std::fs::write(
                pool_file(self.page_size, "nr_hugepages"),
                previous.to_string(),
            );
            // Kept if the pool could not be set back: the next holder
            // tries again.
            if restored.is_ok() {
                self.lock.clear_journal();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_files_are_named_by_size_in_kib() {
        assert_eq!(
            pool_file(2 << 20, "nr_hugepages"),
            "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        );
        assert_eq!(
            pool_file(1 << 30, "free_hugepages"),
            "/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages"
        );
    }

    #[test]
    fn an_absent_size_is_refused_with_the_reason() {
        // No kernel has a hugetlb pool of 12 KiB pages.
        let e = HugepageReservation::reserve_sized(12 << 10, 1).unwrap_err();
        assert!(e.to_string().contains("12 KiB are not supported"), "{e}");
        assert!(!hugepage_size_supported(12 << 10));
        assert_eq!(free_hugepages_of(12 << 10), 0);
    }

    #[test]
    fn a_setting_lock_excludes_a_second_holder_until_dropped() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let first = SettingLock::acquire("unit-test").unwrap();
        let second_has_it = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _second = SettingLock::acquire("unit-test").unwrap();
                second_has_it.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(
                !second_has_it.load(Ordering::SeqCst),
                "a second holder got the lock while the first held it"
            );
            drop(first);
            waiter.join().unwrap();
        });
        assert!(second_has_it.load(Ordering::SeqCst));
    }
}
