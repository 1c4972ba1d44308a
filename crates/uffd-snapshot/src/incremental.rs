//! Incremental snapshots: a base image (a [`crate::LiveSnapshot`]) and
//! deltas holding only the pages written since the previous snapshot, read
//! from memory now.

use std::ops::Range;
use std::path::Path;

use crate::delta::{DeltaStats, DeltaWriter};
use crate::error::Error;
use crate::image::ProcMem;
use crate::region::{validate, Region};

/// Writes the image ranges `ranges` of `regions` (for example from
/// [`crate::DirtyTracker::written_image_ranges`], or
/// [`crate::Report::written`] for the first delta after a base) as a delta
/// file at `path`, reading the pages from memory now.
///
/// The delta holds each page as it is while it is read: stop the writers
/// across this call for a delta of one instant (a pre-copy round of a
/// migration needs no stop: a page written after it was read is reported
/// written again next round).
pub fn write_delta(
    regions: &[Region],
    ranges: &[Range<u64>],
    path: &Path,
) -> Result<DeltaStats, Error> {
    let image_len = validate(regions)?;
    let mem = ProcMem::open()?;
    let mut runs: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| (r.start & !4095)..r.end.next_multiple_of(4096).min(image_len))
        .filter(|r| r.start < r.end)
        .collect();
    runs.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for r in runs {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    DeltaWriter::write(path, 4096, image_len, &merged, |offset, buf| {
        let mut at = 0usize;
        while at < buf.len() {
            let image_at = offset + at as u64;
            let region = regions
                .iter()
                .find(|r| r.offset() <= image_at && image_at < r.offset() + r.len());
            let n = match region {
                Some(r) => {
                    let n = ((r.offset() + r.len() - image_at) as usize).min(buf.len() - at);
                    mem.read(r.addr() + (image_at - r.offset()), &mut buf[at..at + n])
                        .map_err(Error::io("reading memory for a delta", "/proc/self/mem"))?;
                    n
                }
                None => {
                    // A gap between regions in the image: zero.
                    let next = regions
                        .iter()
                        .map(Region::offset)
                        .filter(|&o| o > image_at)
                        .min()
                        .unwrap_or(offset + buf.len() as u64);
                    let n = ((next - image_at) as usize).min(buf.len() - at);
                    buf[at..at + n].fill(0);
                    n
                }
            };
            at += n;
        }
        Ok(())
    })
}
