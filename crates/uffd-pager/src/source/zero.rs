//! A source of zeros.

use super::{check_bounds, Content, PageSource, SourceError};

/// Every byte is zero: fresh memory, or the base layer of a
/// [`super::LayeredSource`] that holds only a diff.
#[derive(Debug, Clone, Copy)]
pub struct ZeroSource {
    len: u64,
}

impl ZeroSource {
    /// A zero source of `len` bytes.
    pub fn new(len: u64) -> ZeroSource {
        ZeroSource { len }
    }
}

impl PageSource for ZeroSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        check_bounds(offset, buf.len() as u64, self.len)?;
        Ok(Content::Zero)
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        check_bounds(offset, len, self.len).is_ok()
    }

    fn describe(&self) -> String {
        format!("zero ({} bytes)", self.len)
    }
}
