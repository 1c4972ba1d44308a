//! The page index: a short hash of every page of a snapshot's image, kept
//! next to its manifest, so that a later push with `--parent` can tell
//! which of its pages the parent already stores by downloading this
//! object (16 bytes per 4 KiB page: 0.4% of the image) instead of the
//! parent's chunks.
//!
//! ```text
//! header   magic "UFFDPAGE" (8) | version u32 = 1 | page_size u32 = 4096
//!          | image_len u64 | pages u64
//!          | checksum of the manifest it belongs to (32)          (64 bytes)
//! page     the first 16 bytes of the page's blake3; 16 zero bytes for a
//!          page that is all zero                                  (16 bytes each)
//! trailer  blake3 of everything before it                         (32 bytes)
//! ```
//!
//! The last page of an image whose length is not a multiple of 4 KiB is
//! hashed as the bytes it has. The manifest checksum binds the index to
//! one manifest: an index left over from an earlier push under the same
//! name is refused rather than trusted. [`PageIndex::decode`] treats its
//! input as hostile like [`crate::Manifest::decode`]: the page count must
//! match the image length and the object's length exactly before anything
//! is allocated.

use crate::manifest::{ChunkHash, MAX_IMAGE_LEN, PAGE_SIZE};

/// The first bytes of every page index.
pub const MAGIC: &[u8; 8] = b"UFFDPAGE";
/// The layout [`PageIndex::encode`] writes and [`PageIndex::decode`] reads.
pub const VERSION: u32 = 1;
/// Largest index accepted, and written: 1 GiB, the index of a 256 GiB
/// image. Larger images are pushed without one (and cannot be parents).
pub const MAX_INDEX_LEN: u64 = 1 << 30;

const HEADER_LEN: usize = 64;
const TRAILER_LEN: usize = 32;
const HASH_LEN: usize = 16;

/// A page's short hash; [`ZERO_PAGE`] for a page that is all zero.
pub type PageHash = [u8; HASH_LEN];

/// The hash recorded for a page that is all zero.
pub const ZERO_PAGE: PageHash = [0; HASH_LEN];

/// The short hash of one page's bytes ([`ZERO_PAGE`] when they are all
/// zero; a non-zero page never gets that value).
pub fn page_hash(bytes: &[u8]) -> PageHash {
    if uffd_pager::source::is_zero(bytes) {
        return ZERO_PAGE;
    }
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&blake3::hash(bytes).as_bytes()[..HASH_LEN]);
    if h == ZERO_PAGE {
        // One chance in 2^128; kept apart from the zero mark all the same.
        h[0] = 1;
    }
    h
}

/// The size of the index of an image of `image_len` bytes, if it is not
/// over [`MAX_INDEX_LEN`].
pub fn index_len(image_len: u64) -> Option<u64> {
    image_len
        .div_ceil(PAGE_SIZE)
        .checked_mul(HASH_LEN as u64)?
        .checked_add((HEADER_LEN + TRAILER_LEN) as u64)
        .filter(|&n| n <= MAX_INDEX_LEN)
}

/// Every page's short hash, for one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageIndex {
    image_len: u64,
    manifest: ChunkHash,
    hashes: Vec<PageHash>,
}

/// Why bytes are not a usable page index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageIndexError {
    /// Of the wrong size.
    #[error("the page index is {len} bytes: {why}")]
    Size {
        /// Its length.
        len: u64,
        /// What is wrong with it.
        why: String,
    },
    /// Does not start with the magic bytes.
    #[error("not a uffd page index (bad magic bytes)")]
    Magic,
    /// A version or page size this build does not read.
    #[error("page index version {version} with {page_size}-byte pages is not supported (this build reads version {VERSION}, 4096-byte pages)")]
    Version {
        /// Its version.
        version: u32,
        /// Its page size.
        page_size: u32,
    },
    /// The trailer does not match the contents.
    #[error("the page index's checksum does not match its contents: it is corrupt or truncated")]
    Checksum,
    /// The header disagrees with itself or with the manifest.
    #[error("the page index does not fit: {0}")]
    Mismatch(String),
}

impl PageIndex {
    /// The index of an image of `image_len` bytes with page hashes
    /// `hashes`, for the manifest whose checksum is `manifest`.
    pub fn new(
        image_len: u64,
        manifest: ChunkHash,
        hashes: Vec<PageHash>,
    ) -> Result<PageIndex, PageIndexError> {
        let pages = image_len.div_ceil(PAGE_SIZE);
        if image_len > MAX_IMAGE_LEN || hashes.len() as u64 != pages {
            return Err(PageIndexError::Mismatch(format!(
                "{} page hashes for an image of {image_len} bytes",
                hashes.len()
            )));
        }
        Ok(PageIndex {
            image_len,
            manifest,
            hashes,
        })
    }

    /// The image's length.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The checksum of the manifest it belongs to.
    pub fn manifest(&self) -> ChunkHash {
        self.manifest
    }

    /// Page `i`'s hash, by image order.
    pub fn hashes(&self) -> &[PageHash] {
        &self.hashes
    }

    /// The encoded index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hashes.len() * HASH_LEN + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.manifest.0);
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and validates an index (see the module's documentation).
    /// Allocates at most as much as `bytes` is long.
    pub fn decode(bytes: &[u8]) -> Result<PageIndex, PageIndexError> {
        let len = bytes.len() as u64;
        let size = |why: &str| PageIndexError::Size {
            len,
            why: why.to_string(),
        };
        if len > MAX_INDEX_LEN {
            return Err(size("larger than any page index this build accepts"));
        }
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(size("shorter than a header and a checksum"));
        }
        if &bytes[..8] != MAGIC {
            return Err(PageIndexError::Magic);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let page_size = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if version != VERSION || u64::from(page_size) != PAGE_SIZE {
            return Err(PageIndexError::Version { version, page_size });
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(PageIndexError::Checksum);
        }
        let image_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let pages = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        if image_len > MAX_IMAGE_LEN || pages != image_len.div_ceil(PAGE_SIZE) {
            return Err(PageIndexError::Mismatch(format!(
                "{pages} pages for an image of {image_len} bytes"
            )));
        }
        let table = &body[HEADER_LEN..];
        if table.len() as u64 != pages * HASH_LEN as u64 {
            return Err(size(&format!(
                "{pages} pages need {} bytes of hashes",
                pages * HASH_LEN as u64
            )));
        }
        let mut manifest = [0u8; 32];
        manifest.copy_from_slice(&bytes[32..64]);
        // `pages` hashes fit in `bytes`: bounded by the input's length.
        let hashes = table
            .chunks_exact(HASH_LEN)
            .map(|h| h.try_into().expect("16 bytes"))
            .collect();
        Ok(PageIndex {
            image_len,
            manifest: ChunkHash(manifest),
            hashes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zero_pages() {
        let zero = vec![0u8; 4096];
        let mut data = vec![7u8; 4096];
        assert_eq!(page_hash(&zero), ZERO_PAGE);
        let h = page_hash(&data);
        assert_ne!(h, ZERO_PAGE);
        data[4095] = 8;
        assert_ne!(page_hash(&data), h);
        let index = PageIndex::new(8192 + 10, ChunkHash([3; 32]), vec![h, ZERO_PAGE, h]).unwrap();
        let bytes = index.encode();
        assert_eq!(bytes.len() as u64, index_len(8192 + 10).unwrap());
        assert_eq!(PageIndex::decode(&bytes), Ok(index));
        let mut bad = bytes.clone();
        bad[70] ^= 1;
        assert_eq!(PageIndex::decode(&bad), Err(PageIndexError::Checksum));
        assert!(PageIndex::new(8192, ChunkHash([3; 32]), vec![h]).is_err());
        assert_eq!(index_len(MAX_IMAGE_LEN), None, "too large to index");
    }
}
