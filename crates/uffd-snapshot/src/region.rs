//! The memory a snapshot or a tracker covers, and where it goes in the image.

use std::ops::Range;

use uffd::{Mapping, MemoryKind};

use crate::error::Error;

/// A range of this process's memory and its place in the image file:
/// Firecracker's layout, where each guest memory region sits at its
/// `offset` in the raw memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    addr: u64,
    len: u64,
    page_size: u64,
    offset: u64,
}

impl Region {
    /// The whole of `mapping`, at image offset 0 (see [`Region::at_offset`]).
    pub fn of(mapping: &Mapping) -> Region {
        Region {
            addr: mapping.addr(),
            len: mapping.len() as u64,
            page_size: mapping.page_size() as u64,
            offset: 0,
        }
    }

    /// `len` bytes at `addr` served in pages of `page_size` (4 KiB, or the
    /// huge page size of a hugetlb mapping), at image offset 0.
    ///
    /// The range must be mapped memory of this process registrable for
    /// write-protect (private anonymous, shmem or hugetlb). Nothing unsafe
    /// follows if it is not: registering fails, or a read of it fails.
    pub fn new(addr: u64, len: u64, page_size: u64) -> Result<Region, Error> {
        let bad = |why: &str| Error::BadRegion {
            addr,
            len,
            why: why.to_string(),
        };
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(bad("the page size must be a power of two of at least 4096"));
        }
        if len == 0 || !addr.is_multiple_of(page_size) || !len.is_multiple_of(page_size) {
            return Err(bad(
                "start and length must be non-zero multiples of the page size",
            ));
        }
        if addr.checked_add(len).is_none() {
            return Err(bad("the range wraps around the address space"));
        }
        Ok(Region {
            addr,
            len,
            page_size,
            offset: 0,
        })
    }

    /// The same region placed at `offset` in the image (a multiple of its
    /// page size).
    pub fn at_offset(mut self, offset: u64) -> Region {
        self.offset = offset;
        self
    }

    /// Regions of `mappings` at consecutive image offsets, in order.
    pub fn consecutive<'a>(mappings: impl IntoIterator<Item = &'a Mapping>) -> Vec<Region> {
        let mut at = 0;
        mappings
            .into_iter()
            .map(|m| {
                let r = Region::of(m).at_offset(at);
                at += r.len;
                r
            })
            .collect()
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: regions are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page size it is protected and saved in.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Its offset in the image.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }

    /// The image offsets of the addresses `range` (clipped to the region),
    /// or `None` if they do not overlap.
    pub fn image_range(&self, range: Range<u64>) -> Option<Range<u64>> {
        let start = range.start.max(self.addr);
        let end = range.end.min(self.addr + self.len);
        (start < end).then(|| self.offset + (start - self.addr)..self.offset + (end - self.addr))
    }

    /// The kind of page a hugetlb page size implies, for messages.
    pub(crate) fn describe(&self) -> String {
        let kind = if self.page_size as usize == MemoryKind::Hugetlb.page_size() {
            "2 MiB pages"
        } else {
            "4 KiB pages"
        };
        format!("{:#x}+{:#x} ({kind})", self.addr, self.len)
    }
}

/// Checks that `regions` do not overlap in memory or in the image; returns
/// the image length (the end of the last region in the image).
pub(crate) fn validate(regions: &[Region]) -> Result<u64, Error> {
    if regions.is_empty() {
        return Err(Error::Mismatch("no regions given".into()));
    }
    let mut end = 0u64;
    for (i, a) in regions.iter().enumerate() {
        if a.offset % a.page_size != 0 {
            return Err(Error::BadRegion {
                addr: a.addr,
                len: a.len,
                why: format!(
                    "image offset {:#x} is not a multiple of the page size",
                    a.offset
                ),
            });
        }
        let a_end = a
            .offset
            .checked_add(a.len)
            .ok_or_else(|| Error::BadRegion {
                addr: a.addr,
                len: a.len,
                why: "image offset + length overflows".into(),
            })?;
        end = end.max(a_end);
        for b in &regions[i + 1..] {
            let mem = a.addr < b.addr + b.len && b.addr < a.addr + a.len;
            let img = a.offset < b.offset + b.len && b.offset < a_end;
            if mem || img {
                return Err(Error::Mismatch(format!(
                    "regions {} and {} overlap {}",
                    a.describe(),
                    b.describe(),
                    if mem { "in memory" } else { "in the image" }
                )));
            }
        }
    }
    Ok(end)
}
