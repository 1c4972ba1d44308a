//! What the workspace's tests share, so each concept has one home:
//!
//! - [`skip`]: a test that cannot run here says why and returns, and with
//!   `UFFD_REQUIRE=1` it fails instead, so a machine where everything is
//!   available (CI) cannot go green having asserted nothing. Skips carry
//!   the [`Need`] they lack; `UFFD_ALLOW_SKIP=gup-test,...` names needs
//!   this machine is known not to have.
//! - The availability checks every test starts with: [`user_uffd`],
//!   [`vmm_uffd`].
//! - [`Scratch`] directories, [`snapshot_file`] and [`page_pattern`]
//!   (the memory file every server test restores from),
//!   [`FailingSource`].
//! - With the `s3` feature, `s3`: a real S3 server on loopback and a
//!   fault-injecting proxy, for the object-storage tests.

#![deny(unsafe_code)]

#[cfg(feature = "s3")]
pub mod s3;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use uffd_pager::{Content, PageSource, SourceError};

/// What a skipped test lacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any userfaultfd (denied by sysctl, seccomp or permissions).
    Userfaultfd,
    /// A userfaultfd that catches kernel-mode faults, as a VMM opens it.
    KernelFaults,
    /// A kernel feature or ioctl.
    Feature,
    /// Root (to switch users, reserve huge pages, create namespaces).
    Root,
    /// Reserved huge pages.
    Hugetlb,
    /// A 1 GiB huge page: one contiguous gigabyte of free memory, which a
    /// busy machine (page cache, tests running beside) may not have even
    /// when it has plenty free.
    Hugetlb1G,
    /// A program the test runs (setpriv, mkswap...).
    Tool,
    /// The kernel's gup_test debugfs file (CONFIG_GUP_TEST).
    GupTest,
}

impl Need {
    /// The name `UFFD_ALLOW_SKIP` uses.
    pub fn name(self) -> &'static str {
        match self {
            Need::Userfaultfd => "userfaultfd",
            Need::KernelFaults => "kernel-faults",
            Need::Feature => "feature",
            Need::Root => "root",
            Need::Hugetlb => "hugetlb",
            Need::Hugetlb1G => "hugetlb-1g",
            Need::Tool => "tool",
            Need::GupTest => "gup-test",
        }
    }
}

/// True when `UFFD_REQUIRE=1`: skipping is a failure.
pub fn required() -> bool {
    std::env::var("UFFD_REQUIRE").is_ok_and(|v| v == "1")
}

fn allowed(need: Need) -> bool {
    std::env::var("UFFD_ALLOW_SKIP")
        .is_ok_and(|list| list.split(',').any(|n| n.trim() == need.name()))
}

/// Reports that the calling test cannot run here, for `reason`. Prints
/// `SKIP (need): reason`; under `UFFD_REQUIRE=1` it panics instead, unless
/// `UFFD_ALLOW_SKIP` names `need`. Callers return right after.
#[track_caller]
pub fn skip(need: Need, reason: impl Display) {
    if required() && !allowed(need) {
        panic!(
            "UFFD_REQUIRE=1, but this test would skip ({}): {reason}",
            need.name()
        );
    }
    eprintln!("SKIP ({}): {reason}", need.name());
}

/// True when this process may open a user-mode-only userfaultfd (the
/// tests that touch only their own memory need no more); otherwise skips.
#[track_caller]
pub fn user_uffd() -> bool {
    match uffd::probe() {
        Ok(_) => true,
        Err(e) if e.is_denied() => {
            skip(
                Need::Userfaultfd,
                format_args!("userfaultfd is denied here: {e}"),
            );
            false
        }
        Err(e) => panic!("probing userfaultfd failed: {e}"),
    }
}

/// True when this process may open a userfaultfd that catches kernel-mode
/// faults too, as a VMM (Firecracker, the stand-in VMM) does; otherwise
/// skips with the kernel's reason.
#[track_caller]
pub fn vmm_uffd() -> bool {
    match uffd::OpenOptions::new().open() {
        Ok(_) => true,
        Err(e) if e.is_denied() => {
            skip(
                Need::KernelFaults,
                format_args!("a VMM-style userfaultfd is denied here: {e}"),
            );
            false
        }
        Err(e) => panic!("opening a userfaultfd failed: {e}"),
    }
}

/// True when running as root; otherwise skips saying what for.
#[track_caller]
pub fn root(what: &str) -> bool {
    if rustix_is_root() {
        return true;
    }
    skip(Need::Root, format_args!("needs root to {what}"));
    false
}

fn rustix_is_root() -> bool {
    // "Uid:" lists the real, effective, saved and file-system ids.
    proc_status_field("/proc/self/status", "Uid")
        .is_some_and(|ids| ids.split_whitespace().nth(1) == Some("0"))
}

/// The value of field `name` (without its colon) in a `/proc/.../status`
/// file such as `/proc/self/status` or `/proc/PID/task/TID/status`,
/// trimmed; `None` when the file cannot be read or has no such field.
pub fn proc_status_field(path: &str, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key == name).then(|| value.trim().to_string())
    })
}

/// The number a `/proc/.../status` field starts with ("Threads: 4",
/// "RssAnon: 1024 kB"); `None` when there is no such field or it is not
/// a number.
pub fn proc_status_number(path: &str, name: &str) -> Option<u64> {
    proc_status_field(path, name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty directory whose name contains `name`.
    pub fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "uffd-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Anonymous memory process `pid` holds now (`RssAnon` of its
/// `/proc/PID/status`), KiB.
pub fn rss_anon_kib(pid: u32) -> u64 {
    proc_status_number(&format!("/proc/{pid}/status"), "RssAnon")
        .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"))
}

/// The contents of page `index` of [`snapshot_file`]: its index in the
/// first 8 bytes and a pattern, except every 4th page, which is all zero.
pub fn page_pattern(index: usize, page: &mut [u8]) {
    if index % 4 == 3 {
        page.fill(0);
        return;
    }
    for (j, b) in page.iter_mut().enumerate() {
        *b = (index.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8 | 1;
    }
    page[..8].copy_from_slice(&(index as u64).to_le_bytes());
}

/// Writes a memory snapshot of `len` bytes made of [`page_pattern`] pages.
pub fn snapshot_file(path: &Path, len: u64) {
    let mut data = vec![0u8; len as usize];
    for (i, page) in data.chunks_mut(4096).enumerate() {
        page_pattern(i, page);
    }
    std::fs::write(path, data).expect("writing the snapshot file");
}

/// A source of `pages` 4 KiB pages where page `i` holds the byte `i + 1`,
/// except page `bad`, whose every read fails: transiently (the engine
/// retries, then gives up) or for good (EIO).
#[derive(Debug, Clone, Copy)]
pub struct FailingSource {
    /// Pages in the source.
    pub pages: usize,
    /// The page that cannot be read.
    pub bad: usize,
    /// Whether the failure claims to be transient.
    pub transient: bool,
}

impl PageSource for FailingSource {
    fn len(&self) -> u64 {
        (self.pages * 4096) as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let len = buf.len() as u64;
        let bad = (self.bad * 4096) as u64;
        if offset <= bad && bad < offset + len {
            let source = std::io::Error::from_raw_os_error(5); // EIO
            return Err(if self.transient {
                SourceError::Transient {
                    offset,
                    len,
                    source,
                }
            } else {
                SourceError::Failed {
                    offset,
                    len,
                    source,
                }
            });
        }
        for (i, page) in buf.chunks_mut(4096).enumerate() {
            page.fill((offset / 4096) as u8 + i as u8 + 1);
        }
        Ok(Content::Data)
    }

    fn describe(&self) -> String {
        format!(
            "failing (page {} of {}, {})",
            self.bad,
            self.pages,
            if self.transient {
                "transient"
            } else {
                "permanent"
            }
        )
    }
}

/// The stand-in VMM (`uffd-standin-vmm`, a binary of the uffd-serve
/// package) for tests of other packages: Cargo sets `CARGO_BIN_EXE_*` only
/// for a package's own binaries, so it is built (a no-op when up to date)
/// with the cargo that builds the test (`cargo`: `env!("CARGO")`), in the
/// same profile as `next_to` (a binary of the test's package, such as
/// `env!("CARGO_BIN_EXE_uffd")`), from `manifest_dir`, and located from
/// cargo's report.
pub fn standin_vmm(cargo: &str, next_to: &Path, manifest_dir: &str) -> PathBuf {
    let mut build = std::process::Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "uffd-serve",
        "--bin",
        "uffd-standin-vmm",
        "--message-format=json",
    ]);
    if next_to.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    let out = build
        .current_dir(manifest_dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running cargo to build uffd-standin-vmm");
    assert!(out.status.success(), "building uffd-standin-vmm failed");
    // Cargo's JSON messages: the artifact line of the binary names it.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"name\":\"uffd-standin-vmm\"") && l.contains("\"executable\":\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .expect("cargo reported no uffd-standin-vmm executable")
}

/// The stand-in VMM `standin` (see [`standin_vmm`]) restoring `mem` from
/// the server at `socket`; its other flags and its stdio are the caller's.
pub fn standin_command(standin: &Path, socket: &Path, mem: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(standin);
    command
        .arg("--socket")
        .arg(socket)
        .arg("--mem-file")
        .arg(mem);
    command
}

/// A child process killed and reaped when dropped, so a failed assertion
/// never leaves a server or a VMM behind.
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_field_is_found_by_its_whole_name() {
        let threads = proc_status_field("/proc/self/status", "Threads").unwrap();
        assert!(threads.parse::<u64>().unwrap() >= 1, "{threads}");
        assert!(proc_status_number("/proc/self/status", "Threads").unwrap() >= 1);
        // "Name:" holds a word, not a number.
        assert_eq!(proc_status_number("/proc/self/status", "Name"), None);
        // "VmPeak", "VmSize" and the others begin with "Vm"; none is "Vm".
        assert_eq!(proc_status_field("/proc/self/status", "Vm"), None);
        assert_eq!(proc_status_field("/proc/self/status", "NoSuchField"), None);
        assert_eq!(
            proc_status_field("/proc/self/no-such-file", "Threads"),
            None
        );
        let rss = rss_anon_kib(std::process::id());
        assert!(rss > 0, "{rss}");
    }
}
