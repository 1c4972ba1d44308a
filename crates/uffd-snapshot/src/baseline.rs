//! What a live snapshot is measured against: `fork()` with the child
//! writing the image from its copy-on-write view (Redis BGSAVE), and a
//! stop-the-world copy.

#![allow(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::image::{is_zero, ProcMem, SparseImage};
use crate::region::{validate, Region};

/// A forked child writing an image; [`ForkImage::wait`] for it.
#[derive(Debug)]
pub struct ForkImage {
    child: rustix::process::Pid,
    image: SparseImage,
    started: Instant,
    /// How long `fork()` itself took (the page-table copy: the writers'
    /// stall, since fork holds the address space's lock for writing).
    pub fork_time: Duration,
}

impl ForkImage {
    /// Forks now: the instant the image will show. The child writes every
    /// non-zero page of `regions` to the image and exits.
    ///
    /// Only private memory is a point-in-time copy in the child: pages of a
    /// shared mapping (shmem, hugetlb MAP_SHARED) stay shared with the
    /// parent, whose writes the child then sees.
    pub fn start(regions: &[Region], path: &Path) -> Result<ForkImage, Error> {
        let len = validate(regions)?;
        let image = SparseImage::create(path, len)?;
        let plan: Vec<(u64, u64, u64)> = regions
            .iter()
            .map(|r| (r.addr(), r.len(), r.offset()))
            .collect();
        let fd = image.file();
        let started = Instant::now();
        // SAFETY: the child runs only `child_writes`, which allocates
        // nothing, takes no lock and makes raw system calls, then `_exit`s:
        // what is allowed after fork() in a threaded process.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = child_writes(&plan, fd);
            // SAFETY: ends the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let fork_time = started.elapsed();
        if pid < 0 {
            return Err(Error::io("fork()", path)(std::io::Error::last_os_error()));
        }
        Ok(ForkImage {
            child: rustix::process::Pid::from_raw(pid).expect("a positive pid"),
            image,
            started,
            fork_time,
        })
    }

    /// Waits for the child and commits the image; returns the time from
    /// the fork to the child's exit.
    pub fn wait(self) -> Result<Duration, Error> {
        let status = loop {
            match rustix::process::waitpid(Some(self.child), rustix::process::WaitOptions::empty())
            {
                Ok(Some((_, status))) => break status,
                Ok(None) => continue,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::io("waiting for the forked child", "fork")(e.into())),
            }
        };
        let total = self.started.elapsed();
        if status.exit_status() != Some(0) {
            return Err(Error::Io {
                what: "the forked child writing the image",
                path: "fork".into(),
                source: std::io::Error::other(format!("it ended with {status:?}")),
            });
        }
        self.image.commit()?;
        Ok(total)
    }
}

/// The child's whole job: non-zero pages of each region to the image.
fn child_writes(plan: &[(u64, u64, u64)], file: &std::fs::File) -> i32 {
    for &(addr, len, offset) in plan {
        // SAFETY: the region is mapped in the child (fork copies the
        // address space) and no other thread exists here to write it.
        let memory = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
        for (i, page) in memory.chunks(4096).enumerate() {
            if is_zero(page) {
                continue;
            }
            let mut done = 0;
            while done < page.len() {
                match rustix::io::pwrite(file, &page[done..], offset + (i * 4096 + done) as u64) {
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => return 1,
                }
            }
        }
    }
    match rustix::fs::fsync(file) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Stop-the-world copy: every non-zero page of `regions` to a sparse image
/// at `path`, now (the caller holds its writers throughout).
pub fn copy_image(regions: &[Region], path: &Path) -> Result<u64, Error> {
    let len = validate(regions)?;
    let mut image = SparseImage::create(path, len)?;
    let mem = ProcMem::open()?;
    let mut buf = vec![0u8; 1 << 20];
    for r in regions {
        let mut at = 0;
        while at < r.len() {
            let n = ((r.len() - at) as usize).min(buf.len());
            mem.read(r.addr() + at, &mut buf[..n])
                .map_err(Error::io("reading memory", "/proc/self/mem"))?;
            image.write_pages(r.offset() + at, &buf[..n], 4096)?;
            at += n as u64;
        }
    }
    let data = image.data_bytes;
    image.commit()?;
    Ok(data)
}
