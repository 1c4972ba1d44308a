//! The manifest: which bytes of which chunk make up each part of a memory
//! image.
//!
//! A snapshot is one manifest object plus content-addressed chunk objects.
//! A chunk is any packing of pages (the working set first, say, or only
//! the pages that changed since a parent snapshot), not tied to an image
//! offset; extents map image ranges onto ranges of chunks. The manifest is
//! binary, little-endian, versioned and checksummed. Version 2:
//!
//! ```text
//! header   magic "UFFDSNAP" (8) | version u32 = 2 | chunk_size u32
//!          | image_len u64 | chunks u64 | extents u64            (40 bytes)
//! chunk    blake3 of its uncompressed bytes (32) | len u32 | stored_len u32
//!          | compression u8 | 7 zero bytes                       (48 bytes each)
//! extent   image_offset u64 | len u32 | chunk u32 | chunk_offset u32
//!                                                                (20 bytes each)
//! trailer  blake3 of everything before it                        (32 bytes)
//! ```
//!
//! Extents are sorted by image offset and do not overlap; they start on a
//! 4 KiB page and end on one (or at the image's end); image bytes in no
//! extent are zero. `chunk_size` is the size pushes pack chunks to (a
//! chunk is never larger than [`MAX_CHUNK_SIZE`]); every chunk is named by
//! at least one extent, and once.
//!
//! Version 1 (still read, converted to the same form) had one entry per
//! non-zero fixed-size chunk at a fixed image offset:
//!
//! ```text
//! header   magic (8) | version u32 = 1 | chunk_size u32 | image_len u64
//!          | entries u64                                         (32 bytes)
//! entry    offset u64 | len u32 | stored_len u32 | compression u8
//!          | 3 zero bytes | blake3 (32)                          (52 bytes each)
//! trailer  blake3 of everything before it                        (32 bytes)
//! ```
//!
//! [`Manifest::decode`] treats its input as hostile: the tables must be
//! exactly as long as the counts say before anything is allocated (so
//! nothing larger than the input is), arithmetic is checked, and every
//! chunk and extent is validated (in range, page aligned, in order, not
//! overlapping, naming a chunk that exists and bytes inside it) before the
//! manifest is handed out.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// The first bytes of every manifest.
pub const MAGIC: &[u8; 8] = b"UFFDSNAP";
/// The layout [`Manifest::encode`] writes.
pub const VERSION: u32 = 2;
/// The first layout, which [`Manifest::decode`] still reads.
pub const VERSION_1: u32 = 1;
/// The granularity of extents (and of dedup against a parent): 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// Smallest chunk size: one 4 KiB page.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size, which bounds every chunk buffer a manifest can ask
/// for: 64 MiB.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest image a manifest may describe: 256 TiB (keeps every offset and
/// sum far from overflowing).
pub const MAX_IMAGE_LEN: u64 = 1 << 48;
/// Largest manifest object accepted (13 million extents, or 5 million
/// chunks); larger ones are refused before they are downloaded.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

const HEADER_V1: usize = 32;
const ENTRY_V1: usize = 52;
const HEADER_LEN: usize = 40;
const CHUNK_LEN: usize = 48;
const EXTENT_LEN: usize = 20;
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

/// One chunk object of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The blake3 hash of its `len` bytes, which names the object.
    pub hash: ChunkHash,
    /// Its length, uncompressed: at most [`MAX_CHUNK_SIZE`].
    pub len: u32,
    /// The length of its object in the store.
    pub stored_len: u32,
    /// How that object is stored.
    pub compression: Compression,
}

/// Image bytes `offset..offset + len` are chunk `chunk`'s bytes
/// `chunk_offset..chunk_offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts in the image (page aligned).
    pub offset: u64,
    /// Its length (whole pages, or up to the image's end).
    pub len: u32,
    /// The index of its chunk in [`Manifest::chunks`].
    pub chunk: u32,
    /// Where its bytes start in that chunk.
    pub chunk_offset: u32,
}

impl Extent {
    /// One past its last image byte. Cannot overflow in a validated
    /// manifest (offsets are below [`MAX_IMAGE_LEN`]).
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Which chunk bytes make up an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    version: u32,
    chunk_size: u32,
    image_len: u64,
    chunks: Vec<ChunkRef>,
    extents: Vec<Extent>,
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
    #[error("manifest version {0} is not supported (this build reads versions {VERSION_1} and {VERSION})")]
    Version(u32),
    /// The trailer does not match the contents.
    #[error("the manifest's checksum does not match its contents: it is corrupt or truncated")]
    Checksum,
    /// A header field is out of bounds.
    #[error("the manifest's header is invalid: {0}")]
    Header(String),
    /// The tables' length disagrees with the counts in the header.
    #[error("the manifest says {counted}, but its {len} bytes hold another amount")]
    Counts {
        /// The counts in the header.
        counted: String,
        /// The object's length.
        len: u64,
    },
    /// A version 1 entry is inconsistent with the image.
    #[error("manifest entry {index} is invalid: {why}")]
    Entry {
        /// Its index.
        index: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A chunk of the chunk table is invalid.
    #[error("manifest chunk {index} is invalid: {why}")]
    Chunk {
        /// Its index.
        index: u64,
        /// What is wrong with it.
        why: String,
    },
    /// An extent is inconsistent with the image or the chunks.
    #[error("manifest extent {index} is invalid: {why}")]
    Extent {
        /// Its index.
        index: u64,
        /// What is wrong with it.
        why: String,
    },
}

impl Manifest {
    /// A manifest for an image of `image_len` bytes from its chunk table
    /// and its extents (sorted here). Fails like [`Manifest::decode`]
    /// would on the same contents.
    pub fn new(
        chunk_size: u32,
        image_len: u64,
        chunks: Vec<ChunkRef>,
        mut extents: Vec<Extent>,
    ) -> Result<Manifest, ManifestError> {
        extents.sort_by_key(|e| e.offset);
        let m = Manifest {
            version: VERSION,
            chunk_size,
            image_len,
            chunks,
            extents,
        };
        m.check()?;
        Ok(m)
    }

    /// The layout version it was read from ([`VERSION`] when built here).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The size chunks were packed to, in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The image's length in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The chunk table, in the order the chunks were packed.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The extents, by image offset.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Image bytes held in chunks (the rest are zero).
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.len)).sum()
    }

    /// The extent holding image byte `offset`; `None` when that byte is
    /// zero (or lies past the image). A binary search, no allocation.
    pub fn extent_at(&self, offset: u64) -> Option<&Extent> {
        let first = self.extents.partition_point(|e| e.end() <= offset);
        self.extents
            .get(first)
            .filter(|e| e.offset <= offset && offset < e.end())
    }

    /// The extents overlapping image bytes `offset..end`, by offset.
    pub fn extents_in(&self, offset: u64, end: u64) -> &[Extent] {
        let first = self.extents.partition_point(|e| e.end() <= offset);
        let last = first + self.extents[first..].partition_point(|e| e.offset < end);
        &self.extents[first..last]
    }

    /// The blake3 hash of its (version 2) encoding: names this manifest
    /// exactly, whichever version it was read from.
    pub fn checksum(&self) -> ChunkHash {
        ChunkHash::of(&self.encode())
    }

    /// The encoded manifest (version 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.chunks.len() * CHUNK_LEN + self.extents.len() * EXTENT_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.hash.0);
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.push(c.compression.code());
            out.extend_from_slice(&[0; 7]);
        }
        for e in &self.extents {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            out.extend_from_slice(&e.chunk.to_le_bytes());
            out.extend_from_slice(&e.chunk_offset.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and validates a manifest of either version (see the
    /// module's documentation). Allocates at most about as much as
    /// `bytes` is long.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let len = bytes.len() as u64;
        if len > MAX_MANIFEST_LEN {
            return Err(ManifestError::Size {
                len,
                why: "larger than any manifest this build accepts",
            });
        }
        if bytes.len() < HEADER_V1 + TRAILER_LEN {
            return Err(ManifestError::Size {
                len,
                why: "shorter than a header and a checksum",
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(ManifestError::Magic);
        }
        let version = u32_at(bytes, 8);
        if version != VERSION && version != VERSION_1 {
            return Err(ManifestError::Version(version));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(ManifestError::Checksum);
        }
        let chunk_size = u32_at(bytes, 12);
        let image_len = u64_at(bytes, 16);
        check_header(chunk_size, image_len)?;
        if version == VERSION_1 {
            return decode_v1(body, chunk_size, image_len);
        }
        if body.len() < HEADER_LEN {
            return Err(ManifestError::Size {
                len,
                why: "shorter than a version 2 header and a checksum",
            });
        }
        let n_chunks = u64_at(bytes, 24);
        let n_extents = u64_at(bytes, 32);
        let want = n_chunks
            .checked_mul(CHUNK_LEN as u64)
            .and_then(|c| n_extents.checked_mul(EXTENT_LEN as u64)?.checked_add(c))
            .and_then(|t| t.checked_add(HEADER_LEN as u64));
        if want != Some(body.len() as u64) {
            return Err(ManifestError::Counts {
                counted: format!("{n_chunks} chunks and {n_extents} extents"),
                len,
            });
        }
        // Both counts now fit in `bytes`: these allocations are bounded by
        // the input's own length.
        let (chunk_table, extent_table) =
            body[HEADER_LEN..].split_at(n_chunks as usize * CHUNK_LEN);
        let mut chunks = Vec::with_capacity(n_chunks as usize);
        for (i, raw) in chunk_table.chunks_exact(CHUNK_LEN).enumerate() {
            let bad = |why: String| ManifestError::Chunk {
                index: i as u64,
                why,
            };
            let compression = Compression::from_code(raw[40])
                .ok_or_else(|| bad(format!("unknown compression code {}", raw[40])))?;
            if raw[41..48] != [0; 7] {
                return Err(bad("reserved bytes are not zero".into()));
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&raw[..32]);
            chunks.push(ChunkRef {
                hash: ChunkHash(hash),
                len: u32_at(raw, 32),
                stored_len: u32_at(raw, 36),
                compression,
            });
        }
        let extents = extent_table
            .chunks_exact(EXTENT_LEN)
            .map(|raw| Extent {
                offset: u64_at(raw, 0),
                len: u32_at(raw, 8),
                chunk: u32_at(raw, 12),
                chunk_offset: u32_at(raw, 16),
            })
            .collect();
        let m = Manifest {
            version,
            chunk_size,
            image_len,
            chunks,
            extents,
        };
        m.check()?;
        Ok(m)
    }

    /// Every rule of the module's documentation, for decoded and built
    /// manifests alike.
    fn check(&self) -> Result<(), ManifestError> {
        check_header(self.chunk_size, self.image_len)?;
        if self.chunks.len() > u32::MAX as usize {
            return Err(ManifestError::Header(format!(
                "{} chunks: more than extents can name",
                self.chunks.len()
            )));
        }
        let mut hashes = HashSet::with_capacity(self.chunks.len());
        for (i, c) in self.chunks.iter().enumerate() {
            check_chunk(c).map_err(|why| ManifestError::Chunk {
                index: i as u64,
                why,
            })?;
            if !hashes.insert(c.hash) {
                return Err(ManifestError::Chunk {
                    index: i as u64,
                    why: format!("chunk {} is listed twice", c.hash),
                });
            }
        }
        let mut used = vec![false; self.chunks.len()];
        let mut previous_end = 0u64;
        for (i, e) in self.extents.iter().enumerate() {
            let bad = |why: String| ManifestError::Extent {
                index: i as u64,
                why,
            };
            if e.len == 0 {
                return Err(bad("it is empty".into()));
            }
            if e.offset % PAGE_SIZE != 0 {
                return Err(bad(format!("offset {:#x} is not page aligned", e.offset)));
            }
            if e.offset < previous_end {
                return Err(bad(format!(
                    "it starts at {:#x}, before the previous extent's end {previous_end:#x} (out of order or overlapping)",
                    e.offset
                )));
            }
            let end = e
                .offset
                .checked_add(u64::from(e.len))
                .filter(|&end| end <= self.image_len)
                .ok_or_else(|| {
                    bad(format!(
                        "{:#x}+{:#x} lies past the image's {} bytes",
                        e.offset, e.len, self.image_len
                    ))
                })?;
            if end % PAGE_SIZE != 0 && end != self.image_len {
                return Err(bad(format!(
                    "it ends at {end:#x}, neither on a page nor at the image's end"
                )));
            }
            let Some(chunk) = self.chunks.get(e.chunk as usize) else {
                return Err(bad(format!(
                    "it names chunk {} of {}",
                    e.chunk,
                    self.chunks.len()
                )));
            };
            if u64::from(e.chunk_offset) + u64::from(e.len) > u64::from(chunk.len) {
                return Err(bad(format!(
                    "bytes {:#x}+{:#x} of chunk {} lie past its {} bytes",
                    e.chunk_offset, e.len, e.chunk, chunk.len
                )));
            }
            used[e.chunk as usize] = true;
            previous_end = end;
        }
        if let Some(unused) = used.iter().position(|u| !u) {
            return Err(ManifestError::Chunk {
                index: unused as u64,
                why: "no extent uses it".into(),
            });
        }
        Ok(())
    }
}

/// A version 1 manifest (validated as that version was), converted: each
/// entry becomes an extent of a whole chunk, identical chunks one entry
/// of the chunk table.
fn decode_v1(body: &[u8], chunk_size: u32, image_len: u64) -> Result<Manifest, ManifestError> {
    let count = u64_at(body, 24);
    let table = &body[HEADER_V1..];
    let room = (table.len() / ENTRY_V1) as u64;
    if table.len() % ENTRY_V1 != 0 || count != room {
        return Err(ManifestError::Counts {
            counted: format!("{count} entries"),
            len: (body.len() + TRAILER_LEN) as u64,
        });
    }
    // `room` entries fit in the input: bounded by its length.
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut by_hash: HashMap<ChunkHash, u32> = HashMap::new();
    let mut extents = Vec::with_capacity(table.len() / ENTRY_V1);
    let mut previous: Option<u64> = None;
    for (i, raw) in table.chunks_exact(ENTRY_V1).enumerate() {
        let index = i as u64;
        let bad = |why: String| ManifestError::Entry { index, why };
        let compression = Compression::from_code(raw[16])
            .ok_or_else(|| bad(format!("unknown compression code {}", raw[16])))?;
        if raw[17..20] != [0, 0, 0] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&raw[20..52]);
        let offset = u64_at(raw, 0);
        let chunk = ChunkRef {
            hash: ChunkHash(hash),
            len: u32_at(raw, 8),
            stored_len: u32_at(raw, 12),
            compression,
        };
        check_entry_v1(offset, &chunk, previous, chunk_size, image_len).map_err(bad)?;
        previous = Some(offset);
        let next = chunks.len() as u32;
        let at = *by_hash.entry(chunk.hash).or_insert(next);
        if at == next {
            chunks.push(chunk);
        } else if chunks[at as usize] != chunk {
            return Err(bad(format!(
                "chunk {} appears with two different sizes",
                chunk.hash
            )));
        }
        extents.push(Extent {
            offset,
            len: chunk.len,
            chunk: at,
            chunk_offset: 0,
        });
    }
    let m = Manifest {
        version: VERSION_1,
        chunk_size,
        image_len,
        chunks,
        extents,
    };
    m.check()?;
    Ok(m)
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

fn check_chunk(c: &ChunkRef) -> Result<(), String> {
    if c.len == 0 || c.len > MAX_CHUNK_SIZE {
        return Err(format!(
            "length {} is not from 1 to {MAX_CHUNK_SIZE}",
            c.len
        ));
    }
    let plausible = match c.compression {
        Compression::None => c.stored_len == c.len,
        // Compressed only where it helps, so never larger.
        Compression::Lz4 => c.stored_len > 0 && c.stored_len <= c.len,
    };
    if !plausible {
        return Err(format!(
            "stored length {} does not fit a {} chunk of {} bytes",
            c.stored_len,
            c.compression.name(),
            c.len
        ));
    }
    Ok(())
}

fn check_entry_v1(
    offset: u64,
    c: &ChunkRef,
    previous: Option<u64>,
    chunk_size: u32,
    image_len: u64,
) -> Result<(), String> {
    let cs = u64::from(chunk_size);
    if offset % cs != 0 {
        return Err(format!(
            "offset {offset:#x} is not a multiple of the chunk size"
        ));
    }
    if offset >= image_len {
        return Err(format!(
            "offset {offset:#x} lies past the image's {image_len} bytes"
        ));
    }
    if previous.is_some_and(|p| p >= offset) {
        return Err("entries are not in increasing offset order".into());
    }
    // In range: offset < image_len, so the subtraction cannot wrap.
    let want = cs.min(image_len - offset);
    if u64::from(c.len) != want {
        return Err(format!(
            "length {} at {offset:#x}, but that chunk is {want} bytes",
            c.len
        ));
    }
    check_chunk(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            hash: ChunkHash([n; 32]),
            len,
            stored_len: len,
            compression: Compression::None,
        }
    }

    fn extent(offset: u64, len: u32, chunk: u32, chunk_offset: u32) -> Extent {
        Extent {
            offset,
            len,
            chunk,
            chunk_offset,
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let m = Manifest::new(
            4096,
            4 * 4096 + 100,
            vec![chunk(1, 8192), chunk(2, 4096 + 100)],
            vec![
                extent(4 * 4096, 100, 1, 4096),
                extent(0, 4096, 0, 4096),
                extent(2 * 4096, 4096, 1, 0),
                extent(3 * 4096, 4096, 0, 0),
            ],
        )
        .unwrap();
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.version(), VERSION);
        assert_eq!(back.extent_at(10).unwrap().chunk_offset, 4096);
        assert!(back.extent_at(4096).is_none(), "a zero page has no extent");
        assert_eq!(back.extent_at(4 * 4096 + 99).unwrap().len, 100);
        assert!(back.extent_at(4 * 4096 + 100).is_none(), "past the image");
        assert_eq!(back.extents_in(4096, 3 * 4096 + 1).len(), 2);
        assert!(back.extents_in(4096, 8192).is_empty());
        assert_eq!(back.data_bytes(), 3 * 4096 + 100);
    }

    #[test]
    fn flipped_byte_fails_the_checksum() {
        let m = Manifest::new(
            4096,
            8192,
            vec![chunk(1, 4096)],
            vec![extent(4096, 4096, 0, 0)],
        )
        .unwrap();
        let mut bytes = m.encode();
        bytes[40] ^= 1;
        assert_eq!(Manifest::decode(&bytes), Err(ManifestError::Checksum));
    }

    #[test]
    fn invalid_extents_and_chunks_are_refused() {
        let c = || vec![chunk(1, 8192)];
        let new = |chunks, extents| Manifest::new(4096, 4 * 4096, chunks, extents);
        assert!(
            new(c(), vec![extent(100, 4096, 0, 0)]).is_err(),
            "unaligned"
        );
        assert!(
            new(c(), vec![extent(0, 100, 0, 0)]).is_err(),
            "ends mid-page"
        );
        assert!(
            new(c(), vec![extent(3 * 4096, 8192, 0, 0)]).is_err(),
            "past the image"
        );
        assert!(
            new(c(), vec![extent(0, 4096, 1, 0)]).is_err(),
            "no such chunk"
        );
        assert!(
            new(c(), vec![extent(0, 8192, 0, 4096)]).is_err(),
            "past the chunk"
        );
        assert!(
            new(c(), vec![extent(0, 8192, 0, 0), extent(4096, 4096, 0, 0)]).is_err(),
            "overlapping"
        );
        assert!(new(c(), vec![extent(0, 0, 0, 0)]).is_err(), "empty");
        assert!(new(c(), vec![]).is_err(), "an unused chunk");
        assert!(
            new(
                vec![chunk(1, 4096), chunk(1, 4096)],
                vec![extent(0, 4096, 0, 0), extent(4096, 4096, 1, 0)]
            )
            .is_err(),
            "a chunk listed twice"
        );
        let mut lz = chunk(1, 4096);
        lz.compression = Compression::Lz4;
        lz.stored_len = 5000;
        assert!(
            new(vec![lz], vec![extent(0, 4096, 0, 0)]).is_err(),
            "stored larger"
        );
        assert!(Manifest::new(1000, 8192, vec![], vec![]).is_err());
        assert!(Manifest::new(4096, MAX_IMAGE_LEN + 1, vec![], vec![]).is_err());
        assert!(new(c(), vec![extent(0, 8192, 0, 0)]).is_ok());
    }

    /// A version 1 manifest as that version wrote it.
    fn v1(chunk_size: u32, image_len: u64, entries: &[(u64, ChunkRef)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION_1.to_le_bytes());
        out.extend_from_slice(&chunk_size.to_le_bytes());
        out.extend_from_slice(&image_len.to_le_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (offset, c) in entries {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.push(c.compression.code());
            out.extend_from_slice(&[0; 3]);
            out.extend_from_slice(&c.hash.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    #[test]
    fn version_1_manifests_are_read_as_whole_chunk_extents() {
        let bytes = v1(
            8192,
            3 * 8192 + 100,
            &[
                (0, chunk(1, 8192)),
                (2 * 8192, chunk(1, 8192)),
                (3 * 8192, chunk(2, 100)),
            ],
        );
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m.version(), VERSION_1);
        assert_eq!(m.chunks().len(), 2, "identical chunks are one");
        assert_eq!(m.extents().len(), 3);
        assert_eq!(m.extent_at(2 * 8192 + 5).unwrap().chunk, 0);
        assert!(m.extent_at(8192).is_none());
        assert_eq!(m.extent_at(3 * 8192).unwrap().len, 100);
        // Re-encoded as version 2, it reads back the same.
        let again = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(again.extents(), m.extents());
        assert_eq!(again.version(), VERSION);
        // The same hash with another length is refused.
        let bad = v1(
            8192,
            2 * 8192,
            &[
                (0, chunk(1, 8192)),
                (8192, {
                    let mut c = chunk(1, 8192);
                    c.compression = Compression::Lz4;
                    c.stored_len = 10;
                    c
                }),
            ],
        );
        assert!(matches!(
            Manifest::decode(&bad),
            Err(ManifestError::Entry { index: 1, .. })
        ));
        let unaligned = v1(8192, 2 * 8192, &[(100, chunk(1, 8192))]);
        assert!(Manifest::decode(&unaligned).is_err());
    }
}
