//! One chunk's object: compressed where that helps, checked against its
//! content address when read back.

use bytes::Bytes;

use crate::manifest::{ChunkHash, ChunkRef, Compression};

/// A chunk ready to upload.
#[derive(Debug)]
pub struct Encoded {
    /// The object's bytes.
    pub stored: Bytes,
    /// How they are stored.
    pub compression: Compression,
}

/// Compression must save at least this share (in 1/8ths) to be used: a
/// chunk that barely compresses costs decoding time on every fault for
/// almost nothing saved.
const KEEP_IF_AT_MOST_EIGHTHS: usize = 7;

/// Encodes a chunk: LZ4 when it shrinks the chunk to 7/8 or less, as it
/// is otherwise.
pub fn encode(bytes: &[u8]) -> Encoded {
    let compressed = lz4_flex::block::compress(bytes);
    if compressed.len() * 8 <= bytes.len() * KEEP_IF_AT_MOST_EIGHTHS && !compressed.is_empty() {
        Encoded {
            stored: Bytes::from(compressed),
            compression: Compression::Lz4,
        }
    } else {
        Encoded {
            stored: Bytes::copy_from_slice(bytes),
            compression: Compression::None,
        }
    }
}

/// Why an object is not the chunk the manifest names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The object's length is not the manifest's stored length.
    #[error("chunk {hash} is {got} bytes in the store, the manifest says {want}")]
    Length {
        /// The chunk.
        hash: ChunkHash,
        /// Its length in the store.
        got: u64,
        /// The manifest's.
        want: u32,
    },
    /// LZ4 decoding failed or produced the wrong length.
    #[error("chunk {hash} does not decompress: {why}")]
    Decompress {
        /// The chunk.
        hash: ChunkHash,
        /// The decoder's reason.
        why: String,
    },
    /// The bytes do not hash to the chunk's name.
    #[error("chunk {hash} is corrupt: its bytes hash to {got}")]
    Hash {
        /// The chunk.
        hash: ChunkHash,
        /// What they hash to.
        got: ChunkHash,
    },
}

/// Decodes a chunk object and checks it against `entry`. Allocates at
/// most `entry.len` bytes (bounded by the manifest's chunk size).
pub fn decode(entry: &ChunkRef, stored: Bytes) -> Result<Bytes, ChunkError> {
    if stored.len() as u64 != u64::from(entry.stored_len) {
        return Err(ChunkError::Length {
            hash: entry.hash,
            got: stored.len() as u64,
            want: entry.stored_len,
        });
    }
    let bytes = match entry.compression {
        Compression::None => stored,
        Compression::Lz4 => {
            let out = lz4_flex::block::decompress(&stored, entry.len as usize).map_err(|e| {
                ChunkError::Decompress {
                    hash: entry.hash,
                    why: e.to_string(),
                }
            })?;
            if out.len() != entry.len as usize {
                return Err(ChunkError::Decompress {
                    hash: entry.hash,
                    why: format!("{} bytes instead of {}", out.len(), entry.len),
                });
            }
            Bytes::from(out)
        }
    };
    verify(entry, &bytes)?;
    Ok(bytes)
}

/// Checks uncompressed bytes against `entry`'s length and hash.
pub fn verify(entry: &ChunkRef, bytes: &[u8]) -> Result<(), ChunkError> {
    if bytes.len() != entry.len as usize {
        return Err(ChunkError::Length {
            hash: entry.hash,
            got: bytes.len() as u64,
            want: entry.len,
        });
    }
    let got = ChunkHash::of(bytes);
    if got != entry.hash {
        return Err(ChunkError::Hash {
            hash: entry.hash,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(bytes: &[u8], e: &Encoded) -> ChunkRef {
        ChunkRef {
            len: bytes.len() as u32,
            stored_len: e.stored.len() as u32,
            compression: e.compression,
            hash: ChunkHash::of(bytes),
        }
    }

    #[test]
    fn compressible_chunks_are_compressed_and_come_back() {
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8).collect();
        let e = encode(&bytes);
        assert_eq!(e.compression, Compression::Lz4);
        assert!(e.stored.len() < bytes.len() / 2);
        let entry = entry_for(&bytes, &e);
        assert_eq!(decode(&entry, e.stored).unwrap(), bytes);
    }

    #[test]
    fn random_chunks_are_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let bytes: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let e = encode(&bytes);
        assert_eq!(e.compression, Compression::None);
        let entry = entry_for(&bytes, &e);
        let mut bad = e.stored.to_vec();
        bad[100] ^= 1;
        assert!(matches!(
            decode(&entry, Bytes::from(bad)),
            Err(ChunkError::Hash { .. })
        ));
        assert_eq!(decode(&entry, e.stored).unwrap(), bytes);
    }
}
