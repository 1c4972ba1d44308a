//! A source backed by a file: a memory snapshot.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::fs::SeekFrom;
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

use super::{check_bounds, Content, PageSource, SourceError};

/// How a [`FileSource`] reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileMode {
    /// `pread(2)` into the engine's buffer: no mapping, works for any size
    /// and any file system.
    Pread,
    /// Map the file read-only and let the kernel copy straight from the
    /// page cache (one copy instead of two). The file must not shrink
    /// while the source lives: reading a truncated part raises SIGBUS.
    Mmap,
}

/// A memory snapshot file.
///
/// Holes (sparse regions found with `SEEK_DATA`/`SEEK_HOLE`) are reported
/// as [`Content::Zero`] without reading; the engine also detects all-zero
/// pages in data it read and maps zero pages for them.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: File,
    len: u64,
    mode: FileMode,
    map: Option<NonNull<u8>>,
    /// Sorted, disjoint `[start, end)` ranges that hold data; everything
    /// else is a hole.
    data: Vec<(u64, u64)>,
}

// SAFETY: the mapping is read-only, owned by this struct and only read
// through shared references; the fd is thread-safe.
unsafe impl Send for FileSource {}
// SAFETY: as above.
unsafe impl Sync for FileSource {}

impl FileSource {
    /// Opens `path` for reading in the given mode.
    pub fn open(path: impl AsRef<Path>, mode: FileMode) -> io::Result<FileSource> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        let data = data_extents(&file, len);
        let map = match mode {
            FileMode::Pread => None,
            FileMode::Mmap if len == 0 => None,
            FileMode::Mmap => {
                // SAFETY: a fresh read-only shared mapping of our own fd at
                // an address the kernel chooses; it aliases no Rust object.
                let ptr = unsafe {
                    rustix::mm::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        ProtFlags::READ,
                        MapFlags::SHARED,
                        &file,
                        0,
                    )
                }?;
                NonNull::new(ptr.cast::<u8>())
            }
        };
        Ok(FileSource {
            path,
            file,
            len,
            mode,
            map,
            data,
        })
    }

    /// Maps the whole file into this process's page tables now
    /// (`MADV_POPULATE_READ`, which also reads it into the page cache), so
    /// that serving a page later costs no fault in this process. Worth it
    /// for a snapshot that serves many restores. Does nothing in
    /// [`FileMode::Pread`].
    pub fn populate(&self) -> io::Result<()> {
        if let Some(map) = self.map {
            // SAFETY: advice on our own read-only mapping; it changes no
            // contents.
            unsafe {
                rustix::mm::madvise(
                    map.as_ptr().cast::<c_void>(),
                    self.len as usize,
                    rustix::mm::Advice::LinuxPopulateRead,
                )
            }?;
        }
        Ok(())
    }

    /// The mode the file is read in.
    pub fn mode(&self) -> FileMode {
        self.mode
    }

    /// True if `offset..end` lies entirely in holes. Async-signal-safe: a
    /// binary search of an immutable vector.
    pub(crate) fn is_hole(&self, offset: u64, end: u64) -> bool {
        // The first extent that ends after `offset`.
        let i = self.data.partition_point(|&(_, e)| e <= offset);
        match self.data.get(i) {
            Some(&(start, _)) => start >= end,
            None => true,
        }
    }

    fn pread_all(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match rustix::io::pread(&self.file, &mut buf[done..], at) {
                Ok(0) => {
                    return Err(SourceError::OutOfRange {
                        offset,
                        len: buf.len() as u64,
                        size: at,
                    })
                }
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(SourceError::from_io(offset, buf.len() as u64, errno.into()))
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` with `pread(2)` only: no
    /// allocation, no lock, errno untouched (raw system calls), so the
    /// SIGBUS handler can call it. EINTR is retried; end of file is
    /// `Errno::NXIO`.
    pub(crate) fn pread_signal_safe(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(&self.file, &mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(Errno::NXIO),
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(errno),
            }
        }
        Ok(())
    }
}

impl PageSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let len = buf.len() as u64;
        check_bounds(offset, len, self.len)?;
        if self.is_hole(offset, offset + len) {
            return Ok(Content::Zero);
        }
        match self.mapped(offset, buf.len()) {
            Some(bytes) => buf.copy_from_slice(bytes),
            None => self.pread_all(offset, buf)?,
        }
        Ok(Content::Data)
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let map = self.map?;
        check_bounds(offset, len as u64, self.len).ok()?;
        // SAFETY: inside the read-only mapping of `self.len` bytes, which
        // lives as long as `self`.
        Some(unsafe { std::slice::from_raw_parts(map.as_ptr().add(offset as usize), len) })
    }

    fn advise(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
    }

    fn describe(&self) -> String {
        let mode = match self.mode {
            FileMode::Pread => "pread",
            FileMode::Mmap => "mmap",
        };
        format!("file {} ({} bytes, {mode})", self.path.display(), self.len)
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        if let Some(map) = self.map {
            // SAFETY: the mapping made in `open`; no borrow of it outlives
            // `self`.
            let _ = unsafe { rustix::mm::munmap(map.as_ptr().cast::<c_void>(), self.len as usize) };
        }
    }
}

/// The data extents of `file`, from `SEEK_DATA`/`SEEK_HOLE`. A file system
/// without hole reporting gives one extent covering everything.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_fd();
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match rustix::fs::seek(fd, SeekFrom::Data(at)) {
            Ok(start) => start,
            Err(Errno::NXIO) => break,
            Err(_) => return vec![(0, len)],
        };
        let end = match rustix::fs::seek(fd, SeekFrom::Hole(start)) {
            Ok(end) => end.min(len),
            Err(_) => return vec![(0, len)],
        };
        if end <= start {
            break;
        }
        extents.push((start, end));
        at = end;
    }
    extents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_lookup() {
        let dir = std::env::temp_dir().join(format!("uffd-pager-hole-{}", std::process::id()));
        let file = File::create(&dir).unwrap();
        file.set_len(1 << 20).unwrap();
        rustix::io::pwrite(&file, &[1u8; 4096], 8192).unwrap();
        drop(file);
        let source = FileSource::open(&dir, FileMode::Pread).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(source.is_hole(0, 8192));
        assert!(!source.is_hole(0, 8193));
        assert!(!source.is_hole(8192, 12288));
        assert!(source.is_hole(12288 + 65536, 1 << 20));
    }
}
