//! Delta files: the pages of an image that changed since the previous
//! snapshot, restored as a layer over the base (`uffd serve --mem-file
//! BASE --layer D1 --layer D2`) or merged into one raw image.
//!
//! # Format, version 1 (all integers little-endian)
//!
//! ```text
//! 0   magic        8   b"UFFDDLT\0"
//! 8   version      u32 1
//! 12  header_len   u32 64
//! 16  page_size    u32 power of two, 4096 ..= 1 GiB
//! 20  flags        u32 0 (no flags are defined; any bit set is refused)
//! 24  image_len    u64 length of the image the delta applies to
//! 32  entries      u64 number of table entries
//! 40  data_offset  u64 where page data starts: a multiple of page_size, >= 64 + 24 * entries
//! 48  data_len     u64 bytes of page data; data_offset + data_len = file length
//! 56  table_crc    u32 CRC-32 of the table
//! 60  header_crc   u32 CRC-32 of bytes 0..60
//! 64  table        entries x { offset u64, len u64, kind u32 (1 data, 2 zero), data_crc u32 }
//!     (zero)       padding up to data_offset
//!     data         the data entries' bytes, in table order
//! ```
//!
//! Entries are sorted by offset and do not overlap; offsets and lengths
//! are non-zero multiples of page_size within image_len. A zero entry
//! carries no data (its pages read as zero, over whatever the base held)
//! and a data_crc of 0. Every field is checked on decoding, with checked
//! arithmetic, and nothing is allocated beyond what the file's size
//! allows: a hostile file yields an error, never a panic or a huge
//! allocation.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uffd_pager::{Content, PageSource, SourceError};

use crate::error::Error;
use crate::image::{is_zero, sync_dir};

/// The magic bytes a delta file starts with.
pub const MAGIC: [u8; 8] = *b"UFFDDLT\0";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// The header's length.
pub const HEADER_LEN: usize = 64;
/// One table entry's length.
pub const ENTRY_LEN: usize = 24;

const KIND_DATA: u32 = 1;
const KIND_ZERO: u32 = 2;

/// What a delta entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Page bytes stored in the file.
    Data,
    /// Pages that read as zero.
    Zero,
}

/// One run of pages in a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Image offsets it covers.
    pub range: Range<u64>,
    /// What it holds.
    pub kind: EntryKind,
    /// Where its bytes are in the file (data entries; 0 for zero entries).
    pub file_offset: u64,
    /// CRC-32 of its bytes (0 for zero entries).
    pub crc: u32,
}

/// A delta's header and table, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaIndex {
    /// Page size of its entries.
    pub page_size: u32,
    /// Length of the image it applies to.
    pub image_len: u64,
    /// Its entries, sorted.
    pub entries: Vec<Entry>,
    /// Where data starts in the file.
    pub data_offset: u64,
    /// Bytes of data.
    pub data_len: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl DeltaIndex {
    /// Decodes and checks the header (the first 64 bytes of a file of
    /// `file_len` bytes); returns the index with no entries yet and the
    /// number of entries and table CRC to check the table against.
    pub fn decode_header(header: &[u8], file_len: u64) -> Result<(DeltaIndex, u64, u32), String> {
        if header.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
            return Err(format!(
                "{file_len} bytes is shorter than the {HEADER_LEN}-byte header"
            ));
        }
        let h = &header[..HEADER_LEN];
        if h[..8] != MAGIC {
            return Err("not a delta file (bad magic)".into());
        }
        let crc = crc32fast::hash(&h[..60]);
        if crc != u32_at(h, 60) {
            return Err(format!(
                "header checksum {:#010x} does not match its bytes ({crc:#010x}): the file is damaged",
                u32_at(h, 60)
            ));
        }
        let version = u32_at(h, 8);
        if version != VERSION {
            return Err(format!(
                "format version {version}; this uffd reads version {VERSION}"
            ));
        }
        if u32_at(h, 12) as usize != HEADER_LEN {
            return Err(format!(
                "header length {} is not {HEADER_LEN}",
                u32_at(h, 12)
            ));
        }
        let page_size = u32_at(h, 16);
        if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
            return Err(format!(
                "page size {page_size} is not a power of two between 4 KiB and 1 GiB"
            ));
        }
        if u32_at(h, 20) != 0 {
            return Err(format!("unknown flags {:#x}", u32_at(h, 20)));
        }
        let image_len = u64_at(h, 24);
        let entries = u64_at(h, 32);
        let data_offset = u64_at(h, 40);
        let data_len = u64_at(h, 48);
        let table_end = entries
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|t| t.checked_add(HEADER_LEN as u64))
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                format!("a table of {entries} entries does not fit in a file of {file_len} bytes")
            })?;
        if data_offset < table_end || !data_offset.is_multiple_of(u64::from(page_size)) {
            return Err(format!(
                "data offset {data_offset:#x} is inside the table (which ends at {table_end:#x}) \
                 or not page-aligned"
            ));
        }
        if data_offset.checked_add(data_len) != Some(file_len) {
            return Err(format!(
                "data offset {data_offset:#x} + data length {data_len:#x} is not the file's length \
                 {file_len:#x} (truncated or padded file)"
            ));
        }
        if !image_len.is_multiple_of(u64::from(page_size)) {
            return Err(format!(
                "image length {image_len:#x} is not a multiple of the page size"
            ));
        }
        Ok((
            DeltaIndex {
                page_size,
                image_len,
                entries: Vec::new(),
                data_offset,
                data_len,
            },
            entries,
            u32_at(h, 56),
        ))
    }

    /// Decodes and checks the table (`entries` x 24 bytes) against the
    /// header's fields.
    pub fn decode_table(
        &mut self,
        table: &[u8],
        entries: u64,
        table_crc: u32,
    ) -> Result<(), String> {
        let want = entries
            .checked_mul(ENTRY_LEN as u64)
            .ok_or("table length overflows")?;
        if table.len() as u64 != want {
            return Err(format!("table is {} bytes, expected {want}", table.len()));
        }
        let crc = crc32fast::hash(table);
        if crc != table_crc {
            return Err(format!(
                "table checksum {table_crc:#010x} does not match its bytes ({crc:#010x}): the file is damaged"
            ));
        }
        let page = u64::from(self.page_size);
        let mut out = Vec::with_capacity(entries as usize);
        let mut prev_end = 0u64;
        let mut data_at = self.data_offset;
        let mut data_total = 0u64;
        for (i, e) in table.chunks_exact(ENTRY_LEN).enumerate() {
            let (offset, len, kind, crc) =
                (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16), u32_at(e, 20));
            let end = offset
                .checked_add(len)
                .filter(|&end| end <= self.image_len)
                .ok_or_else(|| {
                    format!(
                        "entry {i} ({offset:#x}+{len:#x}) lies past the image's end {:#x}",
                        self.image_len
                    )
                })?;
            if len == 0 || offset % page != 0 || len % page != 0 {
                return Err(format!(
                    "entry {i} ({offset:#x}+{len:#x}) is empty or not page-aligned"
                ));
            }
            if i > 0 && offset < prev_end {
                return Err(format!(
                    "entry {i} at {offset:#x} overlaps or precedes the previous one (ends {prev_end:#x})"
                ));
            }
            prev_end = end;
            let kind = match kind {
                KIND_DATA => EntryKind::Data,
                KIND_ZERO if crc == 0 => EntryKind::Zero,
                KIND_ZERO => return Err(format!("zero entry {i} has a data checksum")),
                other => return Err(format!("entry {i} has unknown kind {other}")),
            };
            let file_offset = match kind {
                EntryKind::Data => {
                    data_total = data_total
                        .checked_add(len)
                        .filter(|&t| t <= self.data_len)
                        .ok_or_else(|| {
                            format!(
                                "data entries add up to more than the {} data bytes",
                                self.data_len
                            )
                        })?;
                    let at = data_at;
                    data_at += len;
                    at
                }
                EntryKind::Zero => 0,
            };
            out.push(Entry {
                range: offset..end,
                kind,
                file_offset,
                crc,
            });
        }
        if data_total != self.data_len {
            return Err(format!(
                "data entries hold {data_total} bytes but the header says {}",
                self.data_len
            ));
        }
        self.entries = out;
        Ok(())
    }

    /// Decodes a whole delta file held in memory, checking every field
    /// and every data checksum.
    pub fn decode(file: &[u8]) -> Result<DeltaIndex, String> {
        let len = file.len() as u64;
        let (mut index, entries, table_crc) = DeltaIndex::decode_header(file, len)?;
        let table_end = HEADER_LEN + entries as usize * ENTRY_LEN;
        index.decode_table(&file[HEADER_LEN..table_end], entries, table_crc)?;
        for (i, e) in index.entries.iter().enumerate() {
            if e.kind == EntryKind::Data {
                let bytes = &file[e.file_offset as usize
                    ..(e.file_offset + e.range.end - e.range.start) as usize];
                check_crc(i, e, crc32fast::hash(bytes))?;
            }
        }
        Ok(index)
    }

    /// The ranges the delta overrides (data and zero alike).
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.entries.iter().map(|e| e.range.clone()).collect()
    }

    /// Bytes of the image the delta overrides.
    pub fn covered(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.range.end - e.range.start)
            .sum()
    }
}

fn check_crc(i: usize, e: &Entry, got: u32) -> Result<(), String> {
    if got != e.crc {
        return Err(format!(
            "entry {i} ({:#x}+{:#x}): data checksum {:#010x} does not match its bytes ({got:#010x})",
            e.range.start,
            e.range.end - e.range.start,
            e.crc
        ));
    }
    Ok(())
}

/// Encodes a delta of an image of `image_len` bytes from `pages`: sorted,
/// non-overlapping runs of image offsets with their bytes (`None` for
/// zero). Adjacent runs are stored as they come.
pub fn encode(page_size: u32, image_len: u64, pages: &[(u64, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut table = Vec::with_capacity(pages.len() * ENTRY_LEN);
    let mut data_len = 0u64;
    for (offset, bytes) in pages {
        let (len, kind, crc) = match bytes {
            Some(b) => (b.len() as u64, KIND_DATA, crc32fast::hash(b)),
            None => (u64::from(page_size), KIND_ZERO, 0),
        };
        table.extend_from_slice(&offset.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&kind.to_le_bytes());
        table.extend_from_slice(&crc.to_le_bytes());
        if kind == KIND_DATA {
            data_len += len;
        }
    }
    let data_offset = ((HEADER_LEN + table.len()) as u64).next_multiple_of(u64::from(page_size));
    let mut out = header(
        page_size,
        image_len,
        pages.len() as u64,
        data_offset,
        data_len,
        &table,
    );
    out.extend_from_slice(&table);
    out.resize(data_offset as usize, 0);
    for (_, bytes) in pages {
        if let Some(b) = bytes {
            out.extend_from_slice(b);
        }
    }
    out
}

fn header(
    page_size: u32,
    image_len: u64,
    entries: u64,
    data_offset: u64,
    data_len: u64,
    table: &[u8],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h.extend_from_slice(&page_size.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&image_len.to_le_bytes());
    h.extend_from_slice(&entries.to_le_bytes());
    h.extend_from_slice(&data_offset.to_le_bytes());
    h.extend_from_slice(&data_len.to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(table).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a delta file from runs of image offsets, reading each run once
/// through `read(offset, buf)` (which fills `buf` with the image bytes at
/// `offset`) and splitting it into data and zero entries page by page.
/// The data is held in memory until the table is known (a delta is the
/// pages written since the previous snapshot, not a whole image), then
/// written atomically: temporary file, fsync, rename, directory fsync.
///
/// `runs` are sorted, non-overlapping, page-aligned image ranges.
pub struct DeltaWriter;

impl std::fmt::Debug for DeltaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeltaWriter")
    }
}

/// What writing a delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeltaStats {
    /// Pages stored with their bytes.
    pub data_pages: u64,
    /// Pages stored as zero entries.
    pub zero_pages: u64,
    /// The file's length.
    pub file_bytes: u64,
}

impl DeltaWriter {
    /// Writes `path` as described above.
    pub fn write(
        path: &Path,
        page_size: u32,
        image_len: u64,
        runs: &[Range<u64>],
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), Error>,
    ) -> Result<DeltaStats, Error> {
        let page = u64::from(page_size);
        // Read every run once and classify its pages: the table must be
        // complete before the data's offset is known, and memory may
        // change if it were read twice.
        let tmp = temp_path(path)?;
        let guard = Remove(tmp.clone());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(Error::io("creating the delta's temporary file", &tmp))?;
        let mut entries: Vec<(u64, u64, u32, crc32fast::Hasher)> = Vec::new();
        let mut data = Vec::new();
        let mut stats = DeltaStats::default();
        let mut buf = vec![0u8; (1 << 20).max(page as usize)];
        let mut prev_end = 0;
        for run in runs {
            if run.start % page != 0
                || run.end % page != 0
                || run.start < prev_end
                || run.end > image_len
            {
                return Err(Error::Mismatch(format!(
                    "delta run {:#x}..{:#x} is unaligned, unsorted or past the image's end {image_len:#x}",
                    run.start, run.end
                )));
            }
            prev_end = run.end;
            let mut at = run.start;
            while at < run.end {
                let n = ((run.end - at) as usize).min(buf.len());
                read(at, &mut buf[..n])?;
                for (i, p) in buf[..n].chunks(page as usize).enumerate() {
                    let offset = at + (i as u64) * page;
                    let kind = if is_zero(p) { KIND_ZERO } else { KIND_DATA };
                    match entries.last_mut() {
                        Some(last) if last.0 + last.1 == offset && last.2 == kind => last.1 += page,
                        _ => entries.push((offset, page, kind, crc32fast::Hasher::new())),
                    }
                    if kind == KIND_DATA {
                        entries.last_mut().expect("pushed").3.update(p);
                        data.extend_from_slice(p);
                        stats.data_pages += 1;
                    } else {
                        stats.zero_pages += 1;
                    }
                }
                at += n as u64;
            }
        }
        let mut table = Vec::with_capacity(entries.len() * ENTRY_LEN);
        for (offset, len, kind, hasher) in entries.iter() {
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&kind.to_le_bytes());
            let crc = if *kind == KIND_DATA {
                hasher.clone().finalize()
            } else {
                0
            };
            table.extend_from_slice(&crc.to_le_bytes());
        }
        let data_offset = ((HEADER_LEN + table.len()) as u64).next_multiple_of(page);
        let head = header(
            page_size,
            image_len,
            entries.len() as u64,
            data_offset,
            data.len() as u64,
            &table,
        );
        let w = |bytes: &[u8], at: u64| {
            file.write_all_at(bytes, at)
                .map_err(Error::io("writing the delta", &tmp))
        };
        w(&head, 0)?;
        w(&table, HEADER_LEN as u64)?;
        file.set_len(data_offset)
            .map_err(Error::io("writing the delta", &tmp))?;
        w(&data, data_offset)?;
        stats.file_bytes = data_offset + data.len() as u64;
        file.sync_all()
            .map_err(Error::io("fsync of the delta", &tmp))?;
        std::fs::rename(&tmp, path).map_err(Error::io("renaming the delta into place", path))?;
        std::mem::forget(guard);
        sync_dir(path)?;
        Ok(stats)
    }
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(path: &Path) -> Result<PathBuf, Error> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Mismatch(format!("{} names no file", path.display())))?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// An opened, fully checked delta file: a [`PageSource`] for the ranges it
/// covers.
#[derive(Debug)]
pub struct DeltaFile {
    file: File,
    path: PathBuf,
    index: DeltaIndex,
}

impl DeltaFile {
    /// Opens and checks `path`: header, table and every data checksum (the
    /// data is read once, in bounded chunks).
    pub fn open(path: &Path) -> Result<DeltaFile, Error> {
        let bad = |why: String| Error::BadDelta {
            path: path.to_path_buf(),
            why,
        };
        let file = File::open(path).map_err(Error::io("opening the delta", path))?;
        let file_len = file
            .metadata()
            .map_err(Error::io("reading the delta's size", path))?
            .len();
        let mut head = [0u8; HEADER_LEN];
        if file_len >= HEADER_LEN as u64 {
            file.read_exact_at(&mut head, 0)
                .map_err(Error::io("reading the delta's header", path))?;
        }
        let (mut index, entries, table_crc) =
            DeltaIndex::decode_header(&head, file_len).map_err(bad)?;
        // Bounded by the file's size (checked by decode_header).
        let mut table = vec![0u8; entries as usize * ENTRY_LEN];
        file.read_exact_at(&mut table, HEADER_LEN as u64)
            .map_err(Error::io("reading the delta's table", path))?;
        index
            .decode_table(&table, entries, table_crc)
            .map_err(bad)?;
        let mut buf = vec![0u8; 1 << 20];
        for (i, e) in index.entries.iter().enumerate() {
            if e.kind != EntryKind::Data {
                continue;
            }
            let mut hasher = crc32fast::Hasher::new();
            let mut at = e.file_offset;
            let end = e.file_offset + (e.range.end - e.range.start);
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], at)
                    .map_err(Error::io("reading the delta's data", path))?;
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            check_crc(i, e, hasher.finalize()).map_err(bad)?;
        }
        Ok(DeltaFile {
            file,
            path: path.to_path_buf(),
            index,
        })
    }

    /// Its decoded index.
    pub fn index(&self) -> &DeltaIndex {
        &self.index
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PageSource for DeltaFile {
    fn len(&self) -> u64 {
        self.index.image_len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let end = offset + buf.len() as u64;
        let entries = &self.index.entries;
        let mut i = entries.partition_point(|e| e.range.end <= offset);
        let mut at = offset;
        let mut any_data = false;
        let mut pieces = Vec::new();
        while at < end {
            let e = match entries.get(i) {
                Some(e) if e.range.start <= at => e,
                _ => {
                    return Err(SourceError::OutOfRange {
                        offset: at,
                        len: end - at,
                        size: self.index.image_len,
                    })
                }
            };
            let stop = e.range.end.min(end);
            pieces.push((at, stop, e.kind, e.file_offset + (at - e.range.start)));
            any_data |= e.kind == EntryKind::Data;
            at = stop;
            i += 1;
        }
        if !any_data {
            return Ok(Content::Zero);
        }
        for (from, to, kind, file_at) in pieces {
            let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match kind {
                EntryKind::Zero => part.fill(0),
                EntryKind::Data => self
                    .file
                    .read_exact_at(part, file_at)
                    .map_err(|e| SourceError::from_io(from, to - from, e))?,
            }
        }
        Ok(Content::Data)
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let entries = &self.index.entries;
        let mut i = entries.partition_point(|e| e.range.end <= offset);
        let mut at = offset;
        while at < end {
            match entries.get(i) {
                Some(e) if e.range.start <= at && e.kind == EntryKind::Zero => at = e.range.end,
                _ => return false,
            }
            i += 1;
        }
        true
    }

    fn describe(&self) -> String {
        format!(
            "delta {} ({} entries, {} bytes of the image)",
            self.path.display(),
            self.index.entries.len(),
            self.index.covered()
        )
    }
}

/// `base` with each delta in `layers` laid over it in order (later layers
/// win): the source `uffd serve --mem-file BASE --layer ...` serves and
/// [`merge`] writes out. Every delta must be of an image as long as the
/// base.
pub fn layered(
    base: Arc<dyn PageSource>,
    layers: &[PathBuf],
) -> Result<Arc<dyn PageSource>, Error> {
    let mut source = base;
    for path in layers {
        let delta = DeltaFile::open(path)?;
        if delta.index.image_len != source.len() {
            return Err(Error::Mismatch(format!(
                "layer {} is a delta of an image of {} bytes, but the base is {} bytes: \
                 it belongs to another snapshot",
                path.display(),
                delta.index.image_len,
                source.len()
            )));
        }
        let ranges = delta.index.ranges();
        source = Arc::new(uffd_pager::LayeredSource::new(
            source,
            Arc::new(delta),
            ranges,
        ));
    }
    Ok(source)
}

/// Writes `source` (for example [`layered`]) to `out` as one raw image:
/// sparse (zero pages are holes), fsync'd, renamed into place.
pub fn write_image(source: &dyn PageSource, out: &Path) -> Result<u64, Error> {
    let len = source.len();
    let mut image = crate::image::SparseImage::create(out, len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        match source.read_at(at, &mut buf[..n]) {
            Ok(Content::Zero) => {}
            Ok(Content::Data) => image.write_pages(at, &buf[..n], 4096)?,
            Err(e) => {
                return Err(Error::Io {
                    what: "reading the layers",
                    path: out.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
        at += n as u64;
    }
    image.commit()?;
    Ok(len)
}

/// Merges `base` (a raw image file) and `layers` (deltas, oldest first)
/// into one raw image at `out`; what `uffd serve --mem-file BASE --layer
/// ...` would serve, byte for byte.
pub fn merge(base: &Path, layers: &[PathBuf], out: &Path) -> Result<u64, Error> {
    let base = uffd_pager::FileSource::open(base, uffd_pager::FileMode::Pread)
        .map_err(Error::io("opening the base image", base))?;
    let source = layered(Arc::new(base), layers)?;
    write_image(&*source, out)
}
