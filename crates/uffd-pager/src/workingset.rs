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
}

const MAGIC: &[u8; 8] = b"UFFDWSET";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;

impl WorkingSet {
    /// A working set of `pages` (source byte offsets, in first-touch order)
    /// with pages of `page_size` bytes.
    pub fn new(page_size: u64, pages: Vec<u64>) -> WorkingSet {
        WorkingSet { page_size, pages }
    }

    /// The page size the offsets are aligned to.
    pub fn page_size(&self) -> u64 {
        self.page_size
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
                Some((start, count)) if *start + *count * self.page_size == offset => *count += 1,
                _ => runs.push((offset, 1)),
            }
        }
        runs
    }

    /// Encodes the file: magic `UFFDWSET`, version (u32 LE), page size
    /// (u32 LE), page count (u64 LE), then the runs as LEB128 pairs (zig-zag
    /// delta of the start page from the previous run's end, run length),
    /// then a CRC-32 (IEEE) of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.pages.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.page_size as u32).to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        let mut next = 0i64;
        for (start, count) in self.runs() {
            let page = (start / self.page_size.max(1)) as i64;
            put_leb(&mut out, zigzag(page - next));
            put_leb(&mut out, count);
            next = page + count as i64;
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes [`WorkingSet::to_bytes`], checking magic, version and checksum.
    pub fn from_bytes(bytes: &[u8]) -> Result<WorkingSet, WorkingSetError> {
        if bytes.len() < HEADER + 4 {
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
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(WorkingSetError::Format("unsupported version"));
        }
        let page_size = u64::from(u32::from_le_bytes(
            body[12..16].try_into().expect("4 bytes"),
        ));
        if !page_size.is_power_of_two() {
            return Err(WorkingSetError::Format("page size is not a power of two"));
        }
        let count = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
        let mut pages = Vec::with_capacity(count.min(1 << 24) as usize);
        let mut rest = &body[HEADER..];
        let mut next = 0i64;
        while !rest.is_empty() {
            let delta = unzigzag(get_leb(&mut rest)?);
            let run = get_leb(&mut rest)?;
            let page = next + delta;
            if page < 0 || pages.len() as u64 + run > count {
                return Err(WorkingSetError::Format("run out of range"));
            }
            pages.extend((0..run).map(|i| (page as u64 + i) * page_size));
            next = page + run as i64;
        }
        if pages.len() as u64 != count {
            return Err(WorkingSetError::Format(
                "page count does not match the runs",
            ));
        }
        Ok(WorkingSet { page_size, pages })
    }

    /// Writes the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), WorkingSetError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads and checks a file written by [`WorkingSet::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<WorkingSet, WorkingSetError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        WorkingSet::from_bytes(&bytes)
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
        assert_eq!(WorkingSet::from_bytes(&bytes).unwrap().pages(), &pages[..]);
        assert_eq!(ws.runs(), vec![(40960, 3), (0, 2), (1 << 30, 1), (8192, 1)]);
        // Compact: a long sequential run costs a few bytes.
        let seq = WorkingSet::new(4096, (0..100_000).map(|p| p * 4096).collect());
        assert!(seq.to_bytes().len() < 40);
    }

    #[test]
    fn corruption_is_detected() {
        let mut bytes = WorkingSet::new(4096, vec![0, 4096, 81920]).to_bytes();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        assert!(matches!(
            WorkingSet::from_bytes(&bytes),
            Err(WorkingSetError::Format(_))
        ));
        assert!(WorkingSet::from_bytes(b"UFFDWSET").is_err());
        assert!(WorkingSet::from_bytes(&[0u8; 40]).is_err());
    }
}
