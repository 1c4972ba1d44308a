//! The system-wide settings some cases change: which transparent huge page
//! sizes the kernel may allocate, and swap. Each change is made under a
//! [`SettingLock`] (so two test processes never fight over a knob) and
//! undone by a guard's `Drop`, so a case that fails or panics leaves the
//! machine as it found it. A process killed before its `Drop` ran is
//! repaired by the next holder of the lock: it restores the THP knobs from
//! [`THP_JOURNAL`] and takes down a leftover swap file.
//!
//! Swap: `swapon(2)` and `swapoff(2)` are called directly, and the swap
//! header is written here, so util-linux need not be installed.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uffd::SettingLock;

use crate::harness::Stop;
use crate::{fail, skip};

/// Where the kernel publishes its transparent huge page knobs.
pub const THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// The per-size directory of an mTHP size, e.g. `.../hugepages-64kB`.
pub fn thp_size_dir(size: usize) -> PathBuf {
    Path::new(THP_SYSFS).join(format!("hugepages-{}kB", size >> 10))
}

/// The mTHP sizes the kernel offers for anonymous memory, smallest first,
/// found as uffd-wp-mremap.c finds them: every `hugepages-<kB>kB` whose
/// `enabled` file can be read.
pub fn thp_sizes() -> Vec<usize> {
    let Ok(dir) = std::fs::read_dir(THP_SYSFS) else {
        return Vec::new();
    };
    let mut sizes: Vec<usize> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let kb: usize = name
                .to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            std::fs::read_to_string(thp_size_dir(kb << 10).join("enabled")).ok()?;
            Some(kb << 10)
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

/// The selected word of a sysfs choice file: `madvise` in
/// `always [madvise] never`.
pub fn selected_choice(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(&text[start..start + len])
}

/// Where a [`ThpSettings`] writes down the old value of each knob before
/// it changes it, so that a process killed before its `Drop` ran (SIGKILL,
/// a test runner's timeout) is repaired by the next holder of the lock:
/// the `thp` [`SettingLock`]'s journal.
pub const THP_JOURNAL: &str = "/tmp/uffd-thp.restore";

/// The transparent huge page knobs, locked and remembered: every knob set
/// through this value is restored to what it was when it drops.
#[derive(Debug)]
pub struct ThpSettings {
    /// (knob, value before the first change), in the order changed.
    saved: Vec<(PathBuf, String)>,
    lock: SettingLock,
}

impl ThpSettings {
    /// Takes the `thp` lock (waiting for another process that holds it).
    /// SKIPs when the kernel has no transparent huge pages.
    pub fn lock() -> Result<ThpSettings, Stop> {
        if !Path::new(THP_SYSFS).exists() {
            skip!("the kernel has no transparent huge pages ({THP_SYSFS} is missing)");
        }
        let lock = SettingLock::acquire("thp").map_err(|e| Stop::Fail(e.to_string()))?;
        debug_assert_eq!(lock.journal_path(), THP_JOURNAL);
        // A holder that died without restoring.
        if let Some(text) = lock.journal() {
            for (knob, old) in text.lines().filter_map(|l| l.split_once('\t')) {
                if let Err(e) = std::fs::write(knob, old) {
                    eprintln!("warning: could not restore {knob} to {old}: {e}");
                }
            }
            lock.clear_journal();
        }
        Ok(ThpSettings {
            saved: Vec::new(),
            lock,
        })
    }

    /// Writes `saved` to the journal (replacing it in one rename).
    fn write_journal(&self) -> Result<(), Stop> {
        let text: String = self
            .saved
            .iter()
            .map(|(k, v)| format!("{}\t{v}\n", k.display()))
            .collect();
        self.lock
            .write_journal(&text)
            .map_err(|e| Stop::Fail(format!("writing {THP_JOURNAL}: {e}")))
    }

    /// Sets the choice file `knob` to `value`, remembering its old value
    /// the first time. SKIPs when the write needs a privilege we lack.
    pub fn set(&mut self, knob: &Path, value: &str) -> Result<(), Stop> {
        let text = std::fs::read_to_string(knob)
            .map_err(|e| Stop::Fail(format!("reading {}: {e}", knob.display())))?;
        let Some(old) = selected_choice(&text) else {
            fail!("{} reads {text:?}: no [selected] choice", knob.display());
        };
        if old == value {
            return Ok(());
        }
        // Journalled before the change, so no moment exists where the knob
        // is changed and its old value is known only to this process.
        let first = !self.saved.iter().any(|(k, _)| k == knob);
        if first {
            self.saved.push((knob.to_path_buf(), old.to_string()));
            self.write_journal()?;
        }
        match std::fs::write(knob, value) {
            Ok(()) => Ok(()),
            Err(e) => {
                if first {
                    self.saved.pop();
                    self.write_journal()?;
                }
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    skip!("changing {} needs root: {e}", knob.display())
                }
                fail!("writing {value} to {}: {e}", knob.display())
            }
        }
    }

    /// Lets the kernel allocate huge pages of `size` only, and only for
    /// anonymous memory (`shmem` false) or for shmem (`shmem` true): that
    /// size's `enabled` or `shmem_enabled` becomes `always`, every other
    /// per-size knob of both kinds `never`, as uffd-wp-mremap.c sets them.
    /// A global shmem `deny` or `force`, which overrides the per-size
    /// knobs, becomes `never` for shmem. SKIPs when the size has no knob.
    pub fn only(&mut self, size: usize, shmem: bool) -> Result<(), Stop> {
        self.set_only(size, shmem).map_err(|stop| match stop {
            Stop::Skip(why) => Stop::Skip(format!(
                "enabling only {} KiB THPs for {}: {why}",
                size >> 10,
                if shmem { "shmem" } else { "anonymous memory" }
            )),
            fail => fail,
        })
    }

    fn set_only(&mut self, size: usize, shmem: bool) -> Result<(), Stop> {
        let knob_name = if shmem { "shmem_enabled" } else { "enabled" };
        let target = thp_size_dir(size).join(knob_name);
        if !target.exists() {
            skip!(
                "the kernel offers no {} KiB transparent huge pages for {} ({} is missing)",
                size >> 10,
                if shmem { "shmem" } else { "anonymous memory" },
                target.display()
            );
        }
        let dirs: Vec<PathBuf> = std::fs::read_dir(THP_SYSFS)
            .map_err(|e| Stop::Fail(format!("listing {THP_SYSFS}: {e}")))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().as_bytes().starts_with(b"hugepages-"))
            .map(|e| e.path())
            .collect();
        for dir in dirs {
            for name in ["enabled", "shmem_enabled"] {
                let knob = dir.join(name);
                if knob != target && knob.exists() {
                    self.set(&knob, "never")?;
                }
            }
        }
        if shmem {
            let global = Path::new(THP_SYSFS).join("shmem_enabled");
            if let Ok(text) = std::fs::read_to_string(&global) {
                if matches!(selected_choice(&text), Some("deny" | "force")) {
                    self.set(&global, "never")?;
                }
            }
        }
        self.set(&target, "always")
    }
}

impl Drop for ThpSettings {
    fn drop(&mut self) {
        for (knob, old) in self.saved.iter().rev() {
            if let Err(e) = std::fs::write(knob, old) {
                eprintln!(
                    "warning: could not restore {} to {old}: {e}",
                    knob.display()
                );
            }
        }
        if !self.saved.is_empty() {
            self.lock.clear_journal();
        }
    }
}

/// The name of every swap file [`create_swap_file`] makes, before the pid.
pub const SWAP_FILE_PREFIX: &str = "uffd-selftest-swap-";

/// Size of the swap file [`Swap::enable`] creates: room for the largest
/// folio a case pages out (2 MiB) many times over.
pub const SWAP_FILE_BYTES: usize = 16 << 20;

/// Swap space for as long as this value lives: the system's own if it has
/// some, otherwise a swap file created, enabled, and on drop disabled and
/// removed here. The `swap` lock is held meanwhile.
#[derive(Debug)]
pub struct Swap {
    created: Option<PathBuf>,
    what: String,
    _lock: SettingLock,
}

impl Swap {
    /// Makes swap available. SKIPs with the reasons when no swap exists and
    /// none can be added (not root, or no file system here takes a swap
    /// file: tmpfs and overlayfs refuse them).
    pub fn enable() -> Result<Swap, Stop> {
        let lock = SettingLock::acquire("swap").map_err(|e| Stop::Fail(e.to_string()))?;
        // Under the lock, a swap file of ours is left over from a process
        // that died before its Drop ran (every live holder removes its own
        // first): take it down, so that what is left is the system's.
        for stale in active_swap().iter().map(Path::new).filter(|p| {
            p.file_name()
                .is_some_and(|n| n.as_bytes().starts_with(SWAP_FILE_PREFIX.as_bytes()))
        }) {
            if let Err(e) = swapoff(stale) {
                eprintln!("warning: swapoff of the stale {}: {e}", stale.display());
            }
            let _ = std::fs::remove_file(stale);
        }
        let active = active_swap();
        if let Some(first) = active.first() {
            return Ok(Swap {
                created: None,
                what: format!("the system's swap {first}"),
                _lock: lock,
            });
        }
        // Checked first: without it, every swap file would be written
        // only to be refused.
        let admin = rustix::thread::capabilities(None)
            .map(|c| {
                c.effective
                    .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
            })
            .unwrap_or(false);
        if !admin {
            skip!("no swap is enabled, and adding a swap file needs CAP_SYS_ADMIN");
        }
        let mut dirs = vec![std::env::temp_dir(), PathBuf::from("/var/tmp")];
        dirs.dedup();
        let mut refusals = Vec::new();
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            match create_swap_file(dir, SWAP_FILE_BYTES) {
                Ok(path) => {
                    let what = format!(
                        "a {} MiB swap file on {}",
                        SWAP_FILE_BYTES >> 20,
                        fs_name(dir)
                    );
                    return Ok(Swap {
                        created: Some(path),
                        what,
                        _lock: lock,
                    });
                }
                Err(SwapRefused::NotPermitted(why)) => skip!("{why}"),
                Err(SwapRefused::FileSystem(why)) => refusals.push(why),
            }
        }
        skip!(
            "no swap is enabled and none could be added: {}",
            refusals.join("; ")
        )
    }

    /// What swap is in use, for the case's report.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The swap file this value created, if it created one.
    pub fn created(&self) -> Option<&Path> {
        self.created.as_deref()
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            if let Err(e) = swapoff(path) {
                eprintln!("warning: swapoff {}: {e}", path.display());
            }
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The devices and files in `/proc/swaps`.
pub fn active_swap() -> Vec<String> {
    std::fs::read_to_string("/proc/swaps")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Why a swap file could not be enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapRefused {
    /// The process may not enable swap (EPERM: needs CAP_SYS_ADMIN).
    NotPermitted(String),
    /// This directory's file system does not take a swap file (or the
    /// file could not be written there).
    FileSystem(String),
}

/// Creates a swap file of `bytes` in `dir` (written out, with the swap
/// header `mkswap` would write) and enables it with `swapon(2)`. On
/// failure the file is removed again and the error names the file system.
pub fn create_swap_file(dir: &Path, bytes: usize) -> Result<PathBuf, SwapRefused> {
    let path = dir.join(format!("{SWAP_FILE_PREFIX}{}", std::process::id()));
    let fs = fs_name(dir);
    let refused = |what: &str, e: &dyn std::fmt::Display| {
        SwapRefused::FileSystem(format!("{what} {} on {fs}: {e}", path.display()))
    };
    if let Err(e) = write_swap_file(&path, bytes) {
        let _ = std::fs::remove_file(&path);
        return Err(refused("writing", &e));
    }
    match swapon(&path) {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            if e.raw_os_error() == Some(libc::EPERM) {
                Err(SwapRefused::NotPermitted(format!(
                    "enabling swap needs CAP_SYS_ADMIN: swapon {}: {e}",
                    path.display()
                )))
            } else {
                Err(refused("swapon", &e))
            }
        }
    }
}

/// Writes `bytes` of zeros with a version-1 swap header in the first page
/// and flushes them: swapon maps the file's blocks once, so they must be
/// allocated (no holes, no delayed allocation) before it is called.
fn write_swap_file(path: &Path, bytes: usize) -> std::io::Result<()> {
    let page = rustix::param::page_size();
    let pages = bytes / page;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = pages * page;
    while left > 0 {
        let n = left.min(zeros.len());
        file.write_all(&zeros[..n])?;
        left -= n;
    }
    file.write_all_at(&swap_header(page, pages), 0)?;
    file.sync_all()
}

/// The first page of a swap area (`union swap_header` in
/// include/linux/swap.h): version 1 at byte 1024, the last usable page
/// after it, no bad pages, and the `SWAPSPACE2` signature ending the page.
pub fn swap_header(page_size: usize, pages: usize) -> Vec<u8> {
    let mut header = vec![0u8; page_size];
    header[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    header[1028..1032].copy_from_slice(&(pages as u32 - 1).to_ne_bytes());
    header[page_size - 10..].copy_from_slice(b"SWAPSPACE2");
    header
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// `swapon(2)` with default priority and no flags.
fn swapon(path: &Path) -> std::io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; swapon
    // only reads it.
    if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `swapoff(2)`: moves what is swapped out there back into memory and
/// disables the area.
fn swapoff(path: &Path) -> std::io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: as in `swapon`.
    if unsafe { libc::swapoff(c.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The name of the file system holding `dir` (for reports), from statfs(2).
pub fn fs_name(dir: &Path) -> String {
    match rustix::fs::statfs(dir) {
        Ok(st) => match st.f_type as u64 {
            0xEF53 => "ext4".into(),
            0x0102_1994 => "tmpfs".into(),
            0x794C_7630 => "overlayfs".into(),
            0x5846_5342 => "xfs".into(),
            0x9123_683E => "btrfs".into(),
            0x2FC1_2FC1 => "zfs".into(),
            0x6969 => "nfs".into(),
            0x6573_5546 => "fuse".into(),
            other => format!("a file system of type {other:#x}"),
        },
        Err(e) => format!("an unknown file system ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_read_from_the_brackets() {
        assert_eq!(selected_choice("always [madvise] never\n"), Some("madvise"));
        assert_eq!(
            selected_choice("always inherit within_size advise [never] deny force"),
            Some("never")
        );
        assert_eq!(selected_choice("no brackets"), None);
    }

    #[test]
    fn the_swap_header_is_what_mkswap_writes() {
        let h = swap_header(4096, 4096);
        assert_eq!(h.len(), 4096);
        assert_eq!(&h[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_ne_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(h[1028..1032].try_into().unwrap()), 4095);
        assert!(h[1032..4086].iter().all(|&b| b == 0), "no bad pages");
    }

    #[test]
    fn size_dirs_are_named_in_kib() {
        assert_eq!(
            thp_size_dir(64 << 10),
            Path::new("/sys/kernel/mm/transparent_hugepage/hugepages-64kB")
        );
    }
}
