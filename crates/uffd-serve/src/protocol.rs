//! Firecracker's handshake message: a JSON array of guest memory regions,
//! and the checks every region must pass before a byte is served.
//!
//! The message comes from another process and is untrusted: every field is
//! checked against the page size, the memory file and the other regions,
//! and every failure names the region and what is wrong with it.

use serde::{Deserialize, Serialize};

/// 4 KiB base pages.
pub const PAGE_4K: u64 = 4096;
/// 2 MiB huge pages (hugetlbfs-backed guest memory).
pub const PAGE_2M: u64 = 2 << 20;
/// The most regions one VM may send; Firecracker sends one or two.
pub const MAX_REGIONS: usize = 4096;
/// The largest handshake message accepted, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The end of the user address space with 5-level page tables; no region
/// of a real process reaches past it.
pub const USER_SPACE_END: u64 = 1 << 56;

/// One guest memory region as Firecracker describes it
/// (`GuestRegionUffdMapping` in its `persist.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its contents start in the memory snapshot file.
    pub offset: u64,
    /// The page size the region is mapped with, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Deprecated duplicate of `page_size`; despite its name it holds bytes.
    /// Older Firecracker releases send only this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// A region that passed every check: the pager's own region type, so the
/// handshake hands the engine exactly what it validated.
pub use uffd_pager::Region;

impl From<&Region> for GuestRegionUffdMapping {
    /// The message entry Firecracker would send for this region.
    fn from(region: &Region) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: region.start,
            size: region.len,
            offset: region.offset,
            page_size: Some(region.page_size),
            page_size_kib: Some(region.page_size),
        }
    }
}

/// Why a handshake message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not a JSON array of regions.
    #[error("the handshake message is not a JSON array of regions: {0}")]
    Malformed(String),
    /// The JSON stops before the array is closed.
    #[error(
        "the handshake message is truncated after {bytes} bytes (the JSON array is not closed)"
    )]
    Truncated {
        /// How many bytes arrived.
        bytes: usize,
    },
    /// The message is larger than any sane region list.
    #[error("the handshake message exceeds {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The array is empty: there is no memory to serve.
    #[error("the handshake lists no regions")]
    Empty,
    /// More regions than any VM has.
    #[error("the handshake lists {count} regions; at most {MAX_REGIONS} are accepted")]
    TooManyRegions {
        /// How many were listed.
        count: usize,
    },
    /// A region fails a check on its own.
    #[error("region {index} ({}): {problem}", describe(.region))]
    BadRegion {
        /// Its position in the array.
        index: usize,
        /// The region as sent.
        region: GuestRegionUffdMapping,
        /// What is wrong with it.
        problem: RegionProblem,
    },
    /// Two regions share guest addresses.
    #[error("regions {first} and {second} overlap at {overlap_start:#x}")]
    Overlap {
        /// The lower region's index.
        first: usize,
        /// The higher region's index.
        second: usize,
        /// The first address both cover.
        overlap_start: u64,
    },
    /// Regions use different page sizes; one userfaultfd is served at one size.
    #[error("regions use different page sizes ({first} and {other} bytes)")]
    MixedPageSizes {
        /// The first region's page size.
        first: u64,
        /// A different one.
        other: u64,
    },
}

/// What is wrong with one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionProblem {
    /// Neither `page_size` nor `page_size_kib` is present.
    #[error("no page_size given")]
    NoPageSize,
    /// `page_size` and `page_size_kib` disagree.
    #[error("page_size {page_size} and page_size_kib {page_size_kib} disagree")]
    InconsistentPageSize {
        /// `page_size`.
        page_size: u64,
        /// `page_size_kib`.
        page_size_kib: u64,
    },
    /// Only 4 KiB and 2 MiB pages exist for guest memory.
    #[error("page size {0} is neither 4096 nor 2097152")]
    UnsupportedPageSize(u64),
    /// Zero length.
    #[error("size is zero")]
    ZeroSize,
    /// A length no process can map.
    #[error("size {0:#x} is absurd (beyond the user address space)")]
    AbsurdSize(u64),
    /// The address range wraps or leaves the user address space.
    #[error("the region ends beyond the user address space")]
    OutsideUserSpace,
    /// The start address is not a multiple of the page size.
    #[error("base_host_virt_addr is not aligned to the page size")]
    UnalignedAddress,
    /// The length is not a multiple of the page size.
    #[error("size is not a multiple of the page size")]
    UnalignedSize,
    /// The file offset is not a multiple of the page size.
    #[error("offset is not aligned to the page size")]
    UnalignedOffset,
    /// The region's contents would lie past the end of the memory file.
    #[error("offset + size = {end:#x} lies past the end of the memory file ({file_len:#x} bytes)")]
    PastEndOfFile {
        /// Where the region's contents would end.
        end: u64,
        /// The memory file's length.
        file_len: u64,
    },
}

fn describe(r: &GuestRegionUffdMapping) -> String {
    format!(
        "base {:#x}, size {:#x}, offset {:#x}, page_size {}",
        r.base_host_virt_addr,
        r.size,
        r.offset,
        r.page_size
            .or(r.page_size_kib)
            .map_or_else(|| "none".to_string(), |p| p.to_string())
    )
}

/// Parses the bytes received so far. `Ok(None)` means the JSON is a valid
/// prefix that is not complete yet: read more (or report truncation at EOF).
pub fn parse_message(bytes: &[u8]) -> Result<Option<Vec<GuestRegionUffdMapping>>, MessageError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(MessageError::TooLarge);
    }
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(trimmed) {
        Ok(regions) => Ok(Some(regions)),
        Err(e) if e.is_eof() => Ok(None),
        Err(e) => Err(MessageError::Malformed(e.to_string())),
    }
}

/// Checks every region on its own and against the others and the memory
/// file; returns them sorted by address.
pub fn validate(
    regions: &[GuestRegionUffdMapping],
    file_len: u64,
) -> Result<Vec<Region>, MessageError> {
    if regions.is_empty() {
        return Err(MessageError::Empty);
    }
    if regions.len() > MAX_REGIONS {
        return Err(MessageError::TooManyRegions {
            count: regions.len(),
        });
    }
    let mut checked = Vec::with_capacity(regions.len());
    for (index, raw) in regions.iter().enumerate() {
        let region = check_region(raw, file_len).map_err(|problem| MessageError::BadRegion {
            index,
            region: *raw,
            problem,
        })?;
        checked.push((index, region));
    }
    let first_page = checked[0].1.page_size;
    if let Some((_, other)) = checked.iter().find(|(_, r)| r.page_size != first_page) {
        return Err(MessageError::MixedPageSizes {
            first: first_page,
            other: other.page_size,
        });
    }
    checked.sort_by_key(|(_, r)| r.start);
    for pair in checked.windows(2) {
        let ((i, a), (j, b)) = (pair[0], pair[1]);
        if b.start < a.end() {
            return Err(MessageError::Overlap {
                first: i.min(j),
                second: i.max(j),
                overlap_start: b.start,
            });
        }
    }
    Ok(checked.into_iter().map(|(_, r)| r).collect())
}

fn check_region(raw: &GuestRegionUffdMapping, file_len: u64) -> Result<Region, RegionProblem> {
    let page_size = match (raw.page_size, raw.page_size_kib) {
        (None, None) => return Err(RegionProblem::NoPageSize),
        (Some(p), Some(k)) if p != k => {
            return Err(RegionProblem::InconsistentPageSize {
                page_size: p,
                page_size_kib: k,
            })
        }
        (Some(p), _) | (None, Some(p)) => p,
    };
    if page_size != PAGE_4K && page_size != PAGE_2M {
        return Err(RegionProblem::UnsupportedPageSize(page_size));
    }
    if raw.size == 0 {
        return Err(RegionProblem::ZeroSize);
    }
    if raw.size >= USER_SPACE_END {
        return Err(RegionProblem::AbsurdSize(raw.size));
    }
    match raw.base_host_virt_addr.checked_add(raw.size) {
        Some(end) if end <= USER_SPACE_END => {}
        _ => return Err(RegionProblem::OutsideUserSpace),
    }
    if !raw.base_host_virt_addr.is_multiple_of(page_size) {
        return Err(RegionProblem::UnalignedAddress);
    }
    if !raw.size.is_multiple_of(page_size) {
        return Err(RegionProblem::UnalignedSize);
    }
    if !raw.offset.is_multiple_of(page_size) {
        return Err(RegionProblem::UnalignedOffset);
    }
    let end = raw.offset.saturating_add(raw.size);
    if end > file_len {
        return Err(RegionProblem::PastEndOfFile { end, file_len });
    }
    Ok(Region::new(
        raw.base_host_virt_addr,
        raw.size,
        raw.offset,
        page_size,
    ))
}

/// Encodes regions as the one JSON message Firecracker sends.
pub fn encode_message(regions: &[Region]) -> Vec<u8> {
    let mappings: Vec<_> = regions.iter().map(GuestRegionUffdMapping::from).collect();
    serde_json::to_vec(&mappings).expect("plain structs always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(base: u64, size: u64, offset: u64, page: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: Some(page),
            page_size_kib: Some(page),
        }
    }

    fn problem(r: GuestRegionUffdMapping, file_len: u64) -> RegionProblem {
        match validate(&[r], file_len) {
            Err(MessageError::BadRegion { problem, .. }) => problem,
            other => panic!("expected a bad region, got {other:?}"),
        }
    }

    #[test]
    fn firecracker_message_parses() {
        let text = br#"[{"base_host_virt_addr":140000000000000,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let regions = parse_message(text).unwrap().unwrap();
        let valid = validate(&regions, 8192).unwrap();
        assert_eq!(valid[0].start, 140000000000000 & !4095);
        assert_eq!(valid[0].page_size, 4096);
    }

    #[test]
    fn old_firecracker_sends_only_page_size_kib() {
        let text = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#;
        let regions = parse_message(text).unwrap().unwrap();
        assert_eq!(validate(&regions, 4096).unwrap()[0].page_size, 4096);
    }

    #[test]
    fn prefixes_wait_for_more_and_garbage_is_malformed() {
        let full = encode_message(&[Region::new(4096, 4096, 0, 4096)]);
        for cut in 0..full.len() {
            assert_eq!(
                parse_message(&full[..cut]),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        assert!(parse_message(&full).unwrap().is_some());
        assert!(matches!(
            parse_message(b"{\"a\":1}"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            parse_message(b"[1,2]"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            parse_message(b"[]]"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            parse_message(&vec![b' '; MAX_MESSAGE + 1]),
            Err(MessageError::TooLarge)
        ));
    }

    #[test]
    fn every_region_problem_is_caught() {
        let mb = 1 << 20;
        assert_eq!(
            problem(mapping(0, 4096, 0, 8192), mb),
            RegionProblem::UnsupportedPageSize(8192)
        );
        assert_eq!(problem(mapping(0, 0, 0, 4096), mb), RegionProblem::ZeroSize);
        assert_eq!(
            problem(mapping(4096, u64::MAX - 4095, 0, 4096), mb),
            RegionProblem::AbsurdSize(u64::MAX - 4095)
        );
        assert_eq!(
            problem(mapping(u64::MAX - 4095, 4096, 0, 4096), mb),
            RegionProblem::OutsideUserSpace
        );
        assert_eq!(
            problem(mapping(100, 4096, 0, 4096), mb),
            RegionProblem::UnalignedAddress
        );
        assert_eq!(
            problem(mapping(4096, 100, 0, 4096), mb),
            RegionProblem::UnalignedSize
        );
        assert_eq!(
            problem(mapping(4096, 4096, 12, 4096), mb),
            RegionProblem::UnalignedOffset
        );
        assert_eq!(
            problem(mapping(PAGE_2M, PAGE_2M, 4096, PAGE_2M), 4 * mb),
            RegionProblem::UnalignedOffset
        );
        assert_eq!(
            problem(mapping(4096, 8192, mb - 4096, 4096), mb),
            RegionProblem::PastEndOfFile {
                end: mb + 4096,
                file_len: mb
            }
        );
        let mut none = mapping(0, 4096, 0, 4096);
        none.page_size = None;
        none.page_size_kib = None;
        assert_eq!(problem(none, mb), RegionProblem::NoPageSize);
        let mut mixed = mapping(0, 4096, 0, 4096);
        mixed.page_size_kib = Some(4);
        assert!(matches!(
            problem(mixed, mb),
            RegionProblem::InconsistentPageSize { .. }
        ));
    }

    #[test]
    fn set_level_problems_are_caught() {
        assert_eq!(validate(&[], 4096), Err(MessageError::Empty));
        let overlap = validate(
            &[
                mapping(0x10000, 0x4000, 0, 4096),
                mapping(0x8000, 0x9000, 0, 4096),
            ],
            1 << 20,
        );
        assert_eq!(
            overlap,
            Err(MessageError::Overlap {
                first: 0,
                second: 1,
                overlap_start: 0x10000
            })
        );
        let mixed = validate(
            &[
                mapping(0, PAGE_2M, 0, PAGE_2M),
                mapping(PAGE_2M, 4096, 0, 4096),
            ],
            4 << 20,
        );
        assert!(matches!(mixed, Err(MessageError::MixedPageSizes { .. })));
        let many = vec![mapping(0, 4096, 0, 4096); MAX_REGIONS + 1];
        assert!(matches!(
            validate(&many, 4096),
            Err(MessageError::TooManyRegions { .. })
        ));
        let sorted = validate(
            &[
                mapping(0x20000, 4096, 0, 4096),
                mapping(0x10000, 4096, 4096, 4096),
            ],
            8192,
        )
        .unwrap();
        assert_eq!(sorted[0].start, 0x10000);
    }
}
