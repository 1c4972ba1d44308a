//! Reading this process's memory without trusting it to stay mapped, and
//! writing the raw image `uffd serve --mem-file` restores: sparse, fsync'd,
//! renamed into place only when complete.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// `/proc/self/mem`: the kernel copies from our address space and answers
/// EIO for an address that is not mapped, where a plain load would crash
/// the process. A region munmap'd or mremap'd while a snapshot runs is
/// reported this way before its UNMAP/REMAP event has been read.
#[derive(Debug)]
pub(crate) struct ProcMem {
    file: File,
}

impl ProcMem {
    pub(crate) fn open() -> Result<ProcMem, Error> {
        let path = "/proc/self/mem";
        let file = File::open(path).map_err(Error::io("opening this process's memory", path))?;
        Ok(ProcMem { file })
    }

    /// Copies `buf.len()` bytes at `addr` into `buf`; an error when any of
    /// it is not mapped.
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

/// True when the page is all zero bytes.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(16);
    let rest = words.remainder();
    words
        .into_iter()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// An image being written: a temporary file beside its final path, sized
/// to the whole image so that pages never written stay holes.
#[derive(Debug)]
pub(crate) struct SparseImage {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
    len: u64,
    pub(crate) data_bytes: u64,
}

impl SparseImage {
    pub(crate) fn create(path: &Path, len: u64) -> Result<SparseImage, Error> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::Mismatch(format!("{} names no file", path.display())))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(Error::io("creating the image's temporary file", &tmp))?;
        let image = SparseImage {
            file,
            tmp,
            path: path.to_path_buf(),
            done: false,
            len,
            data_bytes: 0,
        };
        image
            .file
            .set_len(len)
            .map_err(Error::io("sizing the image", &image.tmp))?;
        Ok(image)
    }

    /// Writes `data` at `offset`, leaving its all-zero pages (of
    /// `page_size`) as holes.
    pub(crate) fn write_pages(
        &mut self,
        offset: u64,
        data: &[u8],
        page_size: usize,
    ) -> Result<(), Error> {
        let page_size = page_size.clamp(1, 4096);
        let mut run: Option<usize> = None;
        let pages = data.len().div_ceil(page_size);
        for i in 0..=pages {
            let nonzero = i < pages && {
                let p = &data[i * page_size..((i + 1) * page_size).min(data.len())];
                !is_zero(p)
            };
            match (nonzero, run) {
                (true, None) => run = Some(i),
                (false, Some(start)) => {
                    let bytes = &data[start * page_size..(i * page_size).min(data.len())];
                    self.file
                        .write_all_at(bytes, offset + (start * page_size) as u64)
                        .map_err(Error::io("writing the image", &self.tmp))?;
                    self.data_bytes += bytes.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The image's length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The temporary file, for a forked child to write into.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// fsync, rename over the final path, fsync the directory.
    pub(crate) fn commit(mut self) -> Result<PathBuf, Error> {
        self.file
            .sync_all()
            .map_err(Error::io("fsync of the image", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(Error::io("renaming the image into place", &self.path))?;
        self.done = true;
        sync_dir(&self.path)?;
        Ok(self.path.clone())
    }
}

impl Drop for SparseImage {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// fsync of the directory holding `path`, so that a rename survives a crash.
pub(crate) fn sync_dir(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync of the image's directory", dir))
}
