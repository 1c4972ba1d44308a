//! `PAGEMAP_SCAN` (Linux 6.7): which pages of a WP_ASYNC range were written,
//! optionally re-protecting them in the same step. This is how dirty tracking
//! works with [`crate::Features::WP_ASYNC`], where the kernel resolves write
//! faults itself and sends no messages.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsFd;

use crate::error::{Error, Op};
use crate::sys;

const PAGE_IS_WRITTEN: u64 = linux_raw_sys::general::PAGE_IS_WRITTEN as u64;
const PM_SCAN_WP_MATCHING: u64 = linux_raw_sys::general::PM_SCAN_WP_MATCHING as u64;
const PM_SCAN_CHECK_WPASYNC: u64 = linux_raw_sys::general::PM_SCAN_CHECK_WPASYNC as u64;

/// A `/proc/<pid>/pagemap` file to scan.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// This process's pagemap.
    pub fn open_self() -> Result<Pagemap, Error> {
        Self::open_path("/proc/self/pagemap")
    }

    /// Another process's pagemap (needs ptrace access to it).
    pub fn open_pid(pid: u32) -> Result<Pagemap, Error> {
        Self::open_path(&format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: &str) -> Result<Pagemap, Error> {
        let file = File::open(path).map_err(|source| Error::Io {
            what: format!("opening {path}"),
            source,
        })?;
        Ok(Pagemap { file })
    }

    /// The ranges of `start..end` written since they were last protected.
    /// With `reprotect`, those pages are write-protected again atomically
    /// (they must be registered with WP on a WP_ASYNC userfaultfd).
    pub fn written(&self, start: u64, end: u64, reprotect: bool) -> Result<Vec<(u64, u64)>, Error> {
        let mut out = Vec::new();
        let mut regions = vec![
            sys::page_region {
                start: 0,
                end: 0,
                categories: 0,
            };
            256
        ];
        let mut cursor = start;
        while cursor < end {
            let mut arg = sys::pm_scan_arg {
                size: core::mem::size_of::<sys::pm_scan_arg>() as u64,
                flags: if reprotect {
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
                } else {
                    0
                },
                start: cursor,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            let req = sys::RawIoctl::with_struct(sys::PAGEMAP_SCAN, &mut arg);
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes up to `vec_len`
            // regions into `regions`, which outlives the call.
            let n = unsafe { rustix::ioctl::ioctl(self.file.as_fd(), req) }.map_err(|errno| {
                Error::Ioctl {
                    op: Op::PagemapScan,
                    start: cursor,
                    len: end - cursor,
                    errno,
                }
            })?;
            out.extend(regions[..n as usize].iter().map(|r| (r.start, r.end)));
            if arg.walk_end <= cursor {
                break;
            }
            cursor = arg.walk_end;
        }
        Ok(out)
    }
}
