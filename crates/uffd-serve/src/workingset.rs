//! The working set: which pages of the memory file a VM touched first, in
//! the order it touched them, stored compactly with a version and checksum.
//!
//! Layout (little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `UFWS` |
//! | 2 | version (1) |
//! | 2 | reserved, zero |
//! | 4 | page size in bytes |
//! | 8 | memory file length in bytes |
//! | 8 | page count |
//! | .. | per page: the page index minus the previous one, zigzag LEB128 |
//! | 4 | CRC-32 (IEEE) of everything before it |
//!
//! Pages are indexes into the memory file (offset / page size), not guest
//! addresses: a VMM maps guest memory somewhere else on every restore.
//! Nearby pages tend to be touched together, so deltas are mostly one or
//! two bytes.

use std::path::Path;

const MAGIC: &[u8; 4] = b"UFWS";
const VERSION: u16 = 1;
const HEADER: usize = 4 + 2 + 2 + 4 + 8 + 8;

/// Why a working-set file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not a working-set file.
    #[error("not a working-set file (bad magic)")]
    BadMagic,
    /// Written by a newer format.
    #[error(
        "working-set format version {0} is not supported (this build reads version {VERSION})"
    )]
    UnsupportedVersion(u16),
    /// Shorter than its header and checksum, or its count says.
    #[error("the working-set file is truncated")]
    Truncated,
    /// The checksum does not match: the file is damaged.
    #[error("working-set checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is damaged")]
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// A page lies outside the file it was recorded for.
    #[error("page {index} lies beyond the recorded memory file of {file_len} bytes")]
    PageOutOfRange {
        /// The page index.
        index: u64,
        /// The recorded file length.
        file_len: u64,
    },
    /// The working set was recorded for another memory file or page size.
    #[error("the working set was recorded for {recorded}, not {actual}")]
    Mismatch {
        /// What it was recorded for.
        recorded: String,
        /// What it is used with.
        actual: String,
    },
}

/// Pages of a memory file in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkingSet {
    /// Page size the indexes count in.
    pub page_size: u64,
    /// Length of the memory file it was recorded against.
    pub file_len: u64,
    /// Page indexes (file offset / page size), first touch first.
    pub pages: Vec<u64>,
}

impl WorkingSet {
    /// Encodes to the file format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.pages.len() * 2 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.page_size as u32).to_le_bytes());
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        let mut previous = 0u64;
        for &page in &self.pages {
            let delta = page.wrapping_sub(previous) as i64;
            write_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            previous = page;
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes the file format, checking magic, version, checksum and ranges.
    pub fn decode(bytes: &[u8]) -> Result<WorkingSet, WorkingSetError> {
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(WorkingSetError::BadMagic);
        }
        if bytes.len() < HEADER + 4 {
            return Err(WorkingSetError::Truncated);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(WorkingSetError::UnsupportedVersion(version));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        let computed = crc32(body);
        if stored != computed {
            return Err(WorkingSetError::Checksum { stored, computed });
        }
        let page_size = u64::from(u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")));
        let file_len = u64::from_le_bytes(body[12..20].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(body[20..28].try_into().expect("8 bytes"));
        let limit = file_len.checked_div(page_size).unwrap_or(0);
        // Every page takes at least one byte, which bounds the allocation.
        if count > (body.len() - HEADER) as u64 {
            return Err(WorkingSetError::Truncated);
        }
        let mut pages = Vec::with_capacity(count as usize);
        let mut at = HEADER;
        let mut previous = 0u64;
        for _ in 0..count {
            let zigzag = read_varint(body, &mut at).ok_or(WorkingSetError::Truncated)?;
            let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
            let page = previous.wrapping_add(delta as u64);
            if page >= limit {
                return Err(WorkingSetError::PageOutOfRange {
                    index: page,
                    file_len,
                });
            }
            pages.push(page);
            previous = page;
        }
        Ok(WorkingSet {
            page_size,
            file_len,
            pages,
        })
    }

    /// Writes the file atomically (a temporary file renamed over `path`).
    pub fn write(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, self.encode()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and checks a file.
    pub fn read(path: &Path) -> Result<WorkingSet, WorkingSetError> {
        let bytes = std::fs::read(path).map_err(|source| WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        WorkingSet::decode(&bytes)
    }

    /// Fails unless the set was recorded for a file of `file_len` bytes
    /// served in pages of `page_size`.
    pub fn check_matches(&self, file_len: u64, page_size: u64) -> Result<(), WorkingSetError> {
        if self.file_len != file_len || self.page_size != page_size {
            return Err(WorkingSetError::Mismatch {
                recorded: format!(
                    "a {}-byte file in {}-byte pages",
                    self.file_len, self.page_size
                ),
                actual: format!("a {file_len}-byte file in {page_size}-byte pages"),
            });
        }
        Ok(())
    }
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// CRC-32 (IEEE 802.3, reflected), bitwise with a small table.
fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            page_size: 4096,
            file_len: 1 << 30,
            pages: vec![5, 6, 7, 1000, 3, 262_143, 0],
        }
    }

    #[test]
    fn round_trips_and_is_compact() {
        let ws = sample();
        let bytes = ws.encode();
        assert_eq!(WorkingSet::decode(&bytes).unwrap(), ws);
        let sequential = WorkingSet {
            page_size: 4096,
            file_len: 1 << 30,
            pages: (0..10_000).collect(),
        };
        assert_eq!(sequential.encode().len(), HEADER + 10_000 + 4);
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn damage_is_detected() {
        let bytes = sample().encode();
        let mut flipped = bytes.clone();
        flipped[HEADER + 1] ^= 0x10;
        assert!(matches!(
            WorkingSet::decode(&flipped),
            Err(WorkingSetError::Checksum { .. })
        ));
        assert!(matches!(
            WorkingSet::decode(&bytes[..10]),
            Err(WorkingSetError::Truncated)
        ));
        assert!(matches!(
            WorkingSet::decode(b"nope"),
            Err(WorkingSetError::BadMagic)
        ));
        let mut newer = bytes.clone();
        newer[4] = 9;
        assert!(matches!(
            WorkingSet::decode(&newer),
            Err(WorkingSetError::UnsupportedVersion(9))
        ));
        let wrong = sample();
        assert!(wrong.check_matches(1 << 30, 2 << 20).is_err());
        assert!(wrong.check_matches(1 << 30, 4096).is_ok());
    }

    #[test]
    fn pages_outside_the_file_are_refused() {
        let ws = WorkingSet {
            page_size: 4096,
            file_len: 8192,
            pages: vec![0, 2],
        };
        assert!(matches!(
            WorkingSet::decode(&ws.encode()),
            Err(WorkingSetError::PageOutOfRange { index: 2, .. })
        ));
    }
}
