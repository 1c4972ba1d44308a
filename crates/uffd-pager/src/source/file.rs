//! A source backed by a file: a memory snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::fs::SeekFrom;
use rustix::io::Errno;
use uffd::FileMapping;

use super::{check_bounds, is_zero, Content, MappedBytes, PageSource, SourceError};

/// How a [`FileSource`] reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileMode {
    /// `pread(2)` into the engine's buffer: no mapping, works for any size
    /// and any file system.
    Pread,
    /// Map the file read-only and let the kernel copy straight from the
    /// page cache (one copy instead of two). Only the kernel reads the
    /// mapping, so a file that shrinks while served costs no signal: the
    /// copy fails with `EFAULT`, a `pread(2)` finds the real size, and the
    /// pages that are gone are poisoned. Opening reads the file once to
    /// find its zero pages.
    Mmap,
}

/// A memory snapshot file.
///
/// Holes (sparse regions found with `SEEK_DATA`/`SEEK_HOLE`) are reported
/// as [`Content::Zero`] without reading. In [`FileMode::Mmap`] the zero
/// pages among the data are found once at open (the mapping itself is
/// never read here); in [`FileMode::Pread`] the engine finds them in the
/// bytes it reads.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: File,
    len: u64,
    mode: FileMode,
    map: Option<FileMapping>,
    /// Sorted, disjoint `[start, end)` ranges that hold data; everything
    /// else is a hole.
    data: Vec<(u64, u64)>,
    /// One bit per 4 KiB page of the file: set when the page is data that
    /// reads as all zero (mmap mode only; empty otherwise).
    zero_pages: Vec<u64>,
}

/// Granularity of [`FileSource`]'s zero-page map.
const ZERO_MAP_PAGE: u64 = 4096;

impl FileSource {
    /// Opens `path` for reading in the given mode. Anything but a regular
    /// file (a directory, a FIFO, a device) is refused with
    /// `InvalidInput`; the error names the path.
    pub fn open(path: impl AsRef<Path>, mode: FileMode) -> io::Result<FileSource> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{shown}: {e}"));
        let file = File::open(&path).map_err(named)?;
        let meta = file.metadata().map_err(named)?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{shown} is not a regular file (a memory snapshot must be one)"),
            ));
        }
        let len = meta.len();
        let data = data_extents(&file, len);
        let map = match mode {
            FileMode::Pread => None,
            FileMode::Mmap if len == 0 => None,
            FileMode::Mmap => Some(
                FileMapping::read_only(&file, len as usize, true).map_err(|e| named(e.into()))?,
            ),
        };
        let mut source = FileSource {
            path,
            file,
            len,
            mode,
            map,
            data,
            zero_pages: Vec::new(),
        };
        if source.map.is_some() {
            source.zero_pages = source.find_zero_pages().map_err(named)?;
        }
        Ok(source)
    }

    /// Reads every data extent once with `pread(2)` and marks the pages
    /// that are all zero, so the engine can map zero pages without reading
    /// the mapping.
    fn find_zero_pages(&self) -> io::Result<Vec<u64>> {
        let pages = self.len.div_ceil(ZERO_MAP_PAGE);
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let mut buf = vec![0u8; 1 << 20];
        for &(start, end) in &self.data {
            // Extents need not be page aligned; only whole pages count.
            let mut at = start.next_multiple_of(ZERO_MAP_PAGE);
            let end = end - end % ZERO_MAP_PAGE;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                match self.pread_all(at, &mut buf[..n]) {
                    Ok(()) => {}
                    // Shrunk while we scanned: what is gone is not zero.
                    Err(SourceError::OutOfRange { .. }) => return Ok(bits),
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
                for (i, page) in buf[..n].chunks_exact(ZERO_MAP_PAGE as usize).enumerate() {
                    if is_zero(page) {
                        let p = at / ZERO_MAP_PAGE + i as u64;
                        bits[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                at += n as u64;
            }
        }
        Ok(bits)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `device:inode:length` of the open file: two servers with the same
    /// identity serve the same snapshot, whatever path each opened it by.
    pub fn identity(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        match self.file.metadata() {
            Ok(m) => format!("{}:{}:{}", m.dev(), m.ino(), self.len),
            Err(_) => format!("unknown:{}:{}", self.path.display(), self.len),
        }
    }

    /// Maps the whole file into this process's page tables now
    /// (`MADV_POPULATE_READ`, which also reads it into the page cache), so
    /// that serving a page later costs no fault in this process. Worth it
    /// for a snapshot that serves many restores. Does nothing in
    /// [`FileMode::Pread`].
    pub fn populate(&self) -> io::Result<()> {
        if let Some(map) = &self.map {
            map.advise(rustix::mm::Advice::LinuxPopulateRead)?;
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
                    // The file is shorter than when it was opened: report
                    // its size now, not where this read stopped.
                    let size = self.file.metadata().map_or(at, |m| m.len());
                    return Err(SourceError::OutOfRange {
                        offset,
                        len: buf.len() as u64,
                        size,
                    });
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
        // Never a copy from the mapping: a read of a page the file lost
        // would raise SIGBUS in this process.
        self.pread_all(offset, buf)?;
        Ok(Content::Data)
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        let map = self.map.as_ref()?;
        check_bounds(offset, len as u64, self.len).ok()?;
        // `offset + len <= self.len`, the mapping's length, so the address
        // stays inside the mapping, which lives as long as `self`.
        let ptr = NonNull::new(map.as_ptr().wrapping_add(offset as usize).cast_mut())?;
        Some(MappedBytes::from_mapping(ptr, len))
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        let Ok(()) = check_bounds(offset, len, self.len) else {
            return false;
        };
        if self.is_hole(offset, offset + len) {
            return true;
        }
        if self.zero_pages.is_empty()
            || !offset.is_multiple_of(ZERO_MAP_PAGE)
            || !len.is_multiple_of(ZERO_MAP_PAGE)
        {
            return false;
        }
        let first = offset / ZERO_MAP_PAGE;
        (first..first + len / ZERO_MAP_PAGE).all(|p| {
            self.zero_pages[(p / 64) as usize] & (1 << (p % 64)) != 0
                || self.is_hole(p * ZERO_MAP_PAGE, (p + 1) * ZERO_MAP_PAGE)
        })
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
