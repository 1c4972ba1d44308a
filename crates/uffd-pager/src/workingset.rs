//! The working set: the pages a workload touched first, in order, saved in
//! a small versioned, checksummed file so a later restore can prefetch them.

use std::io;
use std::path::Path;

/// An ordered list of first-touched pages, as source byte offsets (so a
/// recording made at one set of host addresses replays at any other).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    page_size: u64,
    pages: Vec<u64>,
    /// Length of the source (memory file) it was recorded on; 0 when not
    /// known (files of version 1).
    source_len: u64,
}

/// Why a working-set file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("working-set file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The bytes are not a working set this version understands.
    #[error("not a valid working-set file: {0}")]
    Format(&'static str),
    /// The working set was recorded on memory of another size: it belongs
    /// to another snapshot.
    #[error("the working set was recorded on a {recorded}-byte memory file, this one has {actual} bytes: it belongs to another snapshot (record it again with --record)")]
    OtherSnapshot {
        /// The recorded source length.
        recorded: u64,
        /// The length of the source it was to be used with.
        actual: u64,
    },
    /// A page lies past the end of the memory it is used with (a version 1
    /// file, which does not record the length, from a larger snapshot).
    #[error("the working set names a page at {offset:#x}, past the end of the {actual}-byte memory file: it belongs to another snapshot")]
    PageOutOfRange {
        /// The page's source offset.
        offset: u64,
        /// The length of the source it was to be used with.
        actual: u64,
    },
}

const MAGIC: &[u8; 8] = b"UFFDWSET";
/// Version 2 adds the source length after the page count.
const VERSION: u32 = 2;
const HEADER_V1: usize = 8 + 4 + 4 + 8;
const HEADER_V2: usize = HEADER_V1 + 8;
/// Smallest and largest page sizes a working set may name (4 KiB base
/// pages up to 1 GiB huge pages).
const PAGE_SIZES: std::ops::RangeInclusive<u64> = 4096..=(1 << 30);
/// A LEB128 number of at most 64 bits takes at most this many bytes.
const LEB_MAX: u64 = 10;

impl WorkingSet {
    /// A working set of `pages` (source byte offsets, in first-touch order)
    /// with pages of `page_size` bytes, its source length unknown.
    pub fn new(page_size: u64, pages: Vec<u64>) -> WorkingSet {
        WorkingSet {
            page_size,
            pages,
            source_len: 0,
        }
    }

    /// The same, recorded on a source of `source_len` bytes: a file saved
    /// from it is refused for any source of another length.
    pub fn with_source_len(mut self, source_len: u64) -> WorkingSet {
        self.source_len = source_len;
        self
    }

    /// The page size the offsets are aligned to.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The length of the source it was recorded on, if known.
    pub fn source_len(&self) -> Option<u64> {
        (self.source_len != 0).then_some(self.source_len)
    }

    /// Source byte offsets of the pages, in first-touch order.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when no page was recorded.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Consecutive pages merged into `(first offset, page count)` runs,
    /// keeping the order of first touch.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &offset in &self.pages {
            match runs.last_mut() {
                Some((start, count))
                    if count
                        .checked_mul(self.page_size)
                        .and_then(|n| start.checked_add(n))
                        == Some(offset) =>
                {
                    *count += 1
                }
                _ => runs.push((offset, 1)),
            }
        }
        runs
    }

    /// Encodes the file: magic `UFFDWSET`, version (u32 LE), page size
    /// (u32 LE), page count (u64 LE), source length (u64 LE, 0 = unknown),
    /// then the runs as LEB128 pairs (zig-zag delta of the start page from
    /// the previous run's end, run length), then a CRC-32 (IEEE) of
    /// everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_V2 + self.pages.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.page_size as u32).to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.source_len.to_le_bytes());
        let mut next = 0i64;
        for (start, count) in self.runs() {
            let page = (start / self.page_size.max(1)) as i64;
            put_leb(&mut out, zigzag(page.wrapping_sub(next)));
            put_leb(&mut out, count);
            next = page.wrapping_add(count as i64);
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes [`WorkingSet::to_bytes`] for use with a source of
    /// `source_len` bytes, checking magic, version, checksum, that it was
    /// recorded on a source of that length, and that every page lies
    /// inside it. Nothing in the file is trusted: all arithmetic is
    /// checked, and what is allocated is bounded by the pages of
    /// `source_len`, whatever the file claims.
    pub fn from_bytes(bytes: &[u8], source_len: u64) -> Result<WorkingSet, WorkingSetError> {
        if bytes.len() < HEADER_V1 + 4 {
            return Err(WorkingSetError::Format("too short"));
        }
        if &bytes[..8] != MAGIC {
            return Err(WorkingSetError::Format("bad magic (expected UFFDWSET)"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(WorkingSetError::Format(
                "checksum mismatch (file corrupt or truncated)",
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        let (header, recorded_len) = match version {
            1 => (HEADER_V1, 0),
            2 if body.len() >= HEADER_V2 => (HEADER_V2, u64_at(HEADER_V1)),
            2 => return Err(WorkingSetError::Format("too short")),
            _ => return Err(WorkingSetError::Format("unsupported version")),
        };
        let page_size = u64::from(u32::from_le_bytes(
            body[12..16].try_into().expect("4 bytes"),
        ));
        if !page_size.is_power_of_two() || !PAGE_SIZES.contains(&page_size) {
            return Err(WorkingSetError::Format(
                "page size is not a power of two from 4 KiB to 1 GiB",
            ));
        }
        if recorded_len != 0 && recorded_len != source_len {
            return Err(WorkingSetError::OtherSnapshot {
                recorded: recorded_len,
                actual: source_len,
            });
        }
        let count = u64_at(16);
        let source_pages = source_len / page_size;
        if count > source_pages {
            return Err(WorkingSetError::Format(
                "more pages than the memory file holds",
            ));
        }
        let mut pages = Vec::with_capacity(count as usize);
        let mut rest = &body[header..];
        let mut next = 0u64;
        while !rest.is_empty() {
            let delta = unzigzag(get_leb(&mut rest)?);
            let run = get_leb(&mut rest)?;
            let page = next
                .checked_add_signed(delta)
                .ok_or(WorkingSetError::Format("run starts before page 0"))?;
            let end = page
                .checked_add(run)
                .ok_or(WorkingSetError::Format("run out of range"))?;
            if run == 0 || run > count - pages.len() as u64 {
                return Err(WorkingSetError::Format("run out of range"));
            }
            if end > source_pages {
                return Err(WorkingSetError::PageOutOfRange {
                    offset: page.max(source_pages).saturating_mul(page_size),
                    actual: source_len,
                });
            }
            // In range of the source, so these products cannot overflow.
            pages.extend((page..end).map(|p| p * page_size));
            next = end;
        }
        if pages.len() as u64 != count {
            return Err(WorkingSetError::Format(
                "page count does not match the runs",
            ));
        }
        Ok(WorkingSet {
            page_size,
            pages,
            source_len,
        })
    }

    /// Writes the file atomically (a temporary file renamed over it), so a
    /// crash never leaves half a working set.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), WorkingSetError> {
        let path = path.as_ref();
        let io = |source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_bytes())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io)
    }

    /// Reads and checks a file written by [`WorkingSet::save`], for use
    /// with a source of `source_len` bytes (see [`WorkingSet::from_bytes`]).
    /// A file larger than any working set of that source could be is
    /// refused before it is read.
    pub fn load(path: impl AsRef<Path>, source_len: u64) -> Result<WorkingSet, WorkingSetError> {
        let path = path.as_ref();
        let io = |source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let limit = (source_len / *PAGE_SIZES.start())
            .saturating_mul(2 * LEB_MAX)
            .saturating_add((HEADER_V2 + 4) as u64);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, limit + 1), &mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > limit {
            return Err(WorkingSetError::Format(
                "larger than any working set of this memory file",
            ));
        }
        WorkingSet::from_bytes(&bytes, source_len)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_leb(bytes: &mut &[u8]) -> Result<u64, WorkingSetError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes
            .split_first()
            .ok_or(WorkingSetError::Format("truncated number"))?;
        *bytes = rest;
        if shift == 63 && byte & 0x7e != 0 {
            return Err(WorkingSetError::Format("number too large"));
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WorkingSetError::Format("number too long"))
}

/// CRC-32 (IEEE 802.3, reflected, as in zlib).
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_keeps_order() {
        let pages = vec![40960, 45056, 49152, 0, 4096, 1 << 30, 8192];
        let ws = WorkingSet::new(4096, pages.clone());
        let bytes = ws.to_bytes();
        assert_eq!(
            WorkingSet::from_bytes(&bytes, 2 << 30).unwrap().pages(),
            &pages[..]
        );
        assert_eq!(ws.runs(), vec![(40960, 3), (0, 2), (1 << 30, 1), (8192, 1)]);
        // Compact: a long sequential run costs a few bytes.
        let seq = WorkingSet::new(4096, (0..100_000).map(|p| p * 4096).collect());
        assert!(seq.to_bytes().len() < 48);
    }

    #[test]
    fn corruption_is_detected() {
        let mut bytes = WorkingSet::new(4096, vec![0, 4096, 81920]).to_bytes();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        assert!(matches!(
            WorkingSet::from_bytes(&bytes, 1 << 20),
            Err(WorkingSetError::Format(_))
        ));
        assert!(WorkingSet::from_bytes(b"UFFDWSET", 1 << 20).is_err());
        assert!(WorkingSet::from_bytes(&[0u8; 40], 1 << 20).is_err());
    }
}
