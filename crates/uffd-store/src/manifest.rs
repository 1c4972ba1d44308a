//! The manifest: which chunk holds which bytes of a memory image.
//!
//! A snapshot is one manifest object plus content-addressed chunk objects.
//! The manifest is binary, little-endian, versioned and checksummed:
//!
//! ```text
//! header   magic "UFFDSNAP" (8) | version u32 | chunk_size u32
//!          | image_len u64 | entries u64                      (32 bytes)
//! entry    offset u64 | len u32 | stored_len u32 | compression u8
//!          | 3 zero bytes | blake3 of the chunk's bytes (32)   (52 bytes each)
//! trailer  blake3 of everything before it                      (32 bytes)
//! ```
//!
//! Entries are sorted by offset, one per chunk that holds a non-zero byte;
//! a chunk with no entry is all zero. Chunk `i` covers
//! `i * chunk_size .. min((i + 1) * chunk_size, image_len)`.
//!
//! [`Manifest::decode`] treats its input as hostile: every size is checked
//! before anything is allocated (the entry table must be exactly as long as
//! the object), arithmetic is checked, and every entry is validated against
//! the image (aligned, in range, of the right length, in order, a known
//! compression with a plausible stored length) before it is used.

use std::fmt;

/// The first bytes of every manifest.
pub const MAGIC: &[u8; 8] = b"UFFDSNAP";
/// The layout [`Manifest::encode`] writes and [`Manifest::decode`] reads.
pub const VERSION: u32 = 1;
/// Smallest chunk size: one 4 KiB page.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size, which bounds every chunk buffer a manifest can ask
/// for: 64 MiB.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest image a manifest may describe: 256 TiB (keeps every offset and
/// sum far from overflowing).
pub const MAX_IMAGE_LEN: u64 = 1 << 48;
/// Largest manifest object accepted (5 million chunks: 20 TiB of 4 MiB
/// chunks); larger ones are refused before they are downloaded.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 52;
const TRAILER_LEN: usize = 32;

/// A chunk's content address: the blake3 hash of its (uncompressed) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, as used in object names.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<ChunkHash> {
        blake3::Hash::from_hex(text)
            .ok()
            .map(|h| ChunkHash(*h.as_bytes()))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a chunk object's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// As they are.
    None,
    /// An LZ4 block (lz4_flex's block format, no size prefix).
    Lz4,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
        }
    }

    fn from_code(code: u8) -> Option<Compression> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            _ => None,
        }
    }

    /// The name shown by `uffd snapshot info`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        }
    }
}

/// One non-zero chunk of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Where the chunk starts in the image (a multiple of the chunk size).
    pub offset: u64,
    /// Its length: the chunk size, or less for the image's last chunk.
    pub len: u32,
    /// The length of its object in the store.
    pub stored_len: u32,
    /// How that object is stored.
    pub compression: Compression,
    /// The blake3 hash of its `len` bytes, which names the object.
    pub hash: ChunkHash,
}

/// Which chunk holds which bytes of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u32,
    image_len: u64,
    entries: Vec<ChunkRef>,
}

/// Why bytes are not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Shorter than a header and a trailer, or longer than allowed.
    #[error("the manifest is {len} bytes: {why}")]
    Size {
        /// Its length.
        len: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Does not start with the magic bytes.
    #[error("not a uffd snapshot manifest (bad magic bytes)")]
    Magic,
    /// A version this build does not read.
    #[error("manifest version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// The trailer does not match the contents.
    #[error("the manifest's checksum does not match its contents: it is corrupt or truncated")]
    Checksum,
    /// A header field is out of bounds.
    #[error("the manifest's header is invalid: {0}")]
    Header(String),
    /// The entry table's length disagrees with the entry count.
    #[error("the manifest says {entries} entries, but holds room for {room}")]
    EntryCount {
        /// The count in the header.
        entries: u64,
        /// What the object's length allows.
        room: u64,
    },
    /// An entry is inconsistent with the image.
    #[error("manifest entry {index} is invalid: {why}")]
    Entry {
        /// Its index.
        index: u64,
        /// What is wrong with it.
        why: String,
    },
}

impl Manifest {
    /// A manifest for an image of `image_len` bytes in chunks of
    /// `chunk_size`, from its non-zero chunks (sorted here). Fails like
    /// [`Manifest::decode`] would on the same contents.
    pub fn new(
        chunk_size: u32,
        image_len: u64,
        mut entries: Vec<ChunkRef>,
    ) -> Result<Manifest, ManifestError> {
        entries.sort_by_key(|e| e.offset);
        check_header(chunk_size, image_len)?;
        for (i, e) in entries.iter().enumerate() {
            let previous = i.checked_sub(1).map(|p| entries[p].offset);
            check_entry(i as u64, e, previous, chunk_size, image_len)?;
        }
        Ok(Manifest {
            chunk_size,
            image_len,
            entries,
        })
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The image's length in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The non-zero chunks, by offset.
    pub fn entries(&self) -> &[ChunkRef] {
        &self.entries
    }

    /// Chunks in the image, zero ones included.
    pub fn chunk_count(&self) -> u64 {
        self.image_len.div_ceil(u64::from(self.chunk_size))
    }

    /// The entry of the chunk holding image byte `offset`; `None` when that
    /// chunk is all zero (or `offset` lies past the image).
    pub fn chunk_at(&self, offset: u64) -> Option<&ChunkRef> {
        if offset >= self.image_len {
            return None;
        }
        let start = offset - offset % u64::from(self.chunk_size);
        self.entries
            .binary_search_by_key(&start, |e| e.offset)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The encoded manifest.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.push(e.compression.code());
            out.extend_from_slice(&[0; 3]);
            out.extend_from_slice(&e.hash.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and validates a manifest (see the module's documentation).
    /// Allocates at most as much as `bytes` is long.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let len = bytes.len() as u64;
        if len > MAX_MANIFEST_LEN {
            return Err(ManifestError::Size {
                len,
                why: "larger than any manifest this build accepts",
            });
        }
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(ManifestError::Size {
                len,
                why: "shorter than a header and a checksum",
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(ManifestError::Magic);
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(ManifestError::Checksum);
        }
        let chunk_size = u32_at(bytes, 12);
        let image_len = u64_at(bytes, 16);
        let count = u64_at(bytes, 24);
        check_header(chunk_size, image_len)?;
        let table = &body[HEADER_LEN..];
        let room = (table.len() / ENTRY_LEN) as u64;
        if table.len() % ENTRY_LEN != 0 || count != room {
            return Err(ManifestError::EntryCount {
                entries: count,
                room,
            });
        }
        // `room` entries fit in `bytes`, so this allocation is bounded by
        // the input's own length.
        let mut entries: Vec<ChunkRef> = Vec::with_capacity(table.len() / ENTRY_LEN);
        for (i, raw) in table.chunks_exact(ENTRY_LEN).enumerate() {
            let index = i as u64;
            let compression =
                Compression::from_code(raw[16]).ok_or_else(|| ManifestError::Entry {
                    index,
                    why: format!("unknown compression code {}", raw[16]),
                })?;
            if raw[17..20] != [0, 0, 0] {
                return Err(ManifestError::Entry {
                    index,
                    why: "reserved bytes are not zero".into(),
                });
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&raw[20..52]);
            let entry = ChunkRef {
                offset: u64_at(raw, 0),
                len: u32_at(raw, 8),
                stored_len: u32_at(raw, 12),
                compression,
                hash: ChunkHash(hash),
            };
            check_entry(
                index,
                &entry,
                entries.last().map(|e| e.offset),
                chunk_size,
                image_len,
            )?;
            entries.push(entry);
        }
        Ok(Manifest {
            chunk_size,
            image_len,
            entries,
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a chunk size and an image length.
pub fn check_header(chunk_size: u32, image_len: u64) -> Result<(), ManifestError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ManifestError::Header(format!(
            "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )));
    }
    if image_len > MAX_IMAGE_LEN {
        return Err(ManifestError::Header(format!(
            "image length {image_len} is over the limit of {MAX_IMAGE_LEN}"
        )));
    }
    Ok(())
}

fn check_entry(
    index: u64,
    e: &ChunkRef,
    previous: Option<u64>,
    chunk_size: u32,
    image_len: u64,
) -> Result<(), ManifestError> {
    let bad = |why: String| Err(ManifestError::Entry { index, why });
    let cs = u64::from(chunk_size);
    if e.offset % cs != 0 {
        return bad(format!(
            "offset {:#x} is not a multiple of the chunk size",
            e.offset
        ));
    }
    if e.offset >= image_len {
        return bad(format!(
            "offset {:#x} lies past the image's {image_len} bytes",
            e.offset
        ));
    }
    if previous.is_some_and(|p| p >= e.offset) {
        return bad("entries are not in increasing offset order".into());
    }
    // In range: offset < image_len, so the subtraction cannot wrap.
    let want = cs.min(image_len - e.offset);
    if u64::from(e.len) != want {
        return bad(format!(
            "length {} at {:#x}, but that chunk is {want} bytes",
            e.len, e.offset
        ));
    }
    let plausible = match e.compression {
        Compression::None => e.stored_len == e.len,
        // Compressed only where it helps, so never larger.
        Compression::Lz4 => e.stored_len > 0 && e.stored_len <= e.len,
    };
    if !plausible {
        return bad(format!(
            "stored length {} does not fit a {} chunk of {} bytes",
            e.stored_len,
            e.compression.name(),
            e.len
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, len: u32) -> ChunkRef {
        ChunkRef {
            offset,
            len,
            stored_len: len,
            compression: Compression::None,
            hash: ChunkHash::of(&offset.to_le_bytes()),
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let m = Manifest::new(
            4096,
            3 * 4096 + 100,
            vec![entry(3 * 4096, 100), entry(0, 4096)],
        )
        .unwrap();
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.chunk_count(), 4);
        assert_eq!(back.chunk_at(10).unwrap().offset, 0);
        assert!(back.chunk_at(4096).is_none(), "a zero chunk has no entry");
        assert_eq!(back.chunk_at(3 * 4096 + 99).unwrap().len, 100);
        assert!(back.chunk_at(3 * 4096 + 100).is_none(), "past the image");
    }

    #[test]
    fn flipped_byte_fails_the_checksum() {
        let m = Manifest::new(4096, 8192, vec![entry(4096, 4096)]).unwrap();
        let mut bytes = m.encode();
        bytes[40] ^= 1;
        assert_eq!(Manifest::decode(&bytes), Err(ManifestError::Checksum));
    }

    #[test]
    fn invalid_entries_are_refused() {
        assert!(Manifest::new(4096, 8192, vec![entry(100, 4096)]).is_err());
        assert!(Manifest::new(4096, 8192, vec![entry(8192, 4096)]).is_err());
        assert!(Manifest::new(4096, 8000, vec![entry(4096, 4096)]).is_err());
        assert!(Manifest::new(4096, 8192, vec![entry(0, 4096), entry(0, 4096)]).is_err());
        assert!(Manifest::new(1000, 8192, vec![]).is_err());
        assert!(Manifest::new(4096, MAX_IMAGE_LEN + 1, vec![]).is_err());
    }
}
