//! A source backed by bytes in memory.

use std::sync::Arc;

use super::{check_bounds, is_zero, Content, MappedBytes, PageSource, SourceError};

/// Bytes held in this process (a snapshot already downloaded, a test
/// pattern). COPY reads straight from the buffer.
#[derive(Debug, Clone)]
pub struct MemorySource {
    bytes: Arc<[u8]>,
}

impl MemorySource {
    /// A source over `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemorySource {
        MemorySource {
            bytes: bytes.into(),
        }
    }

    /// A source sharing `bytes` with other owners.
    pub fn from_arc(bytes: Arc<[u8]>) -> MemorySource {
        MemorySource { bytes }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }
}

impl PageSource for MemorySource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        check_bounds(offset, buf.len() as u64, self.len())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(Content::Data)
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        self.slice(offset, len as u64).map(MappedBytes::new)
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        self.slice(offset, len).is_some_and(is_zero)
    }

    fn describe(&self) -> String {
        format!("memory ({} bytes)", self.bytes.len())
    }
}
