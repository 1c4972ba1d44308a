//! A base source with an overlay on top (a diff snapshot over a full one).

use std::ops::Range;
use std::sync::Arc;

use super::{Content, MappedBytes, PageSource, SourceError};

/// Bytes in the overlay's ranges come from the overlay, all others from the
/// base: a diff snapshot (only the pages dirtied since the base) over the
/// full snapshot it was taken from.
#[derive(Debug)]
pub struct LayeredSource {
    base: Arc<dyn PageSource>,
    overlay: Arc<dyn PageSource>,
    /// Sorted, merged source ranges served by the overlay.
    ranges: Vec<Range<u64>>,
}

impl LayeredSource {
    /// `overlay_ranges` are source offsets (any order, may overlap) whose
    /// bytes the overlay provides.
    pub fn new(
        base: Arc<dyn PageSource>,
        overlay: Arc<dyn PageSource>,
        mut overlay_ranges: Vec<Range<u64>>,
    ) -> LayeredSource {
        overlay_ranges.retain(|r| r.start < r.end);
        overlay_ranges.sort_by_key(|r| r.start);
        let mut ranges: Vec<Range<u64>> = Vec::with_capacity(overlay_ranges.len());
        for r in overlay_ranges {
            match ranges.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => ranges.push(r),
            }
        }
        LayeredSource {
            base,
            overlay,
            ranges,
        }
    }

    /// Splits `offset..end` into pieces, each served by one layer
    /// (`true` = overlay).
    fn pieces(&self, offset: u64, end: u64) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        let mut at = offset;
        let mut i = self.ranges.partition_point(|r| r.end <= offset);
        while at < end {
            match self.ranges.get(i) {
                Some(r) if r.start <= at => {
                    let stop = r.end.min(end);
                    out.push((at..stop, true));
                    at = stop;
                    i += 1;
                }
                Some(r) => {
                    let stop = r.start.min(end);
                    out.push((at..stop, false));
                    at = stop;
                }
                None => {
                    out.push((at..end, false));
                    at = end;
                }
            }
        }
        out
    }

    fn layer(&self, overlay: bool) -> &dyn PageSource {
        if overlay {
            &*self.overlay
        } else {
            &*self.base
        }
    }
}

impl PageSource for LayeredSource {
    fn len(&self) -> u64 {
        let overlay_end = self.ranges.last().map_or(0, |r| r.end);
        self.base.len().max(overlay_end)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let pieces = self.pieces(offset, offset + buf.len() as u64);
        if let [(_, overlay)] = pieces[..] {
            return self.layer(overlay).read_at(offset, buf);
        }
        let mut contents = Vec::with_capacity(pieces.len());
        for (range, overlay) in &pieces {
            let part = &mut buf[(range.start - offset) as usize..(range.end - offset) as usize];
            contents.push(self.layer(*overlay).read_at(range.start, part)?);
        }
        if contents.iter().all(|c| *c == Content::Zero) {
            return Ok(Content::Zero);
        }
        // Mixed: a zero piece may have left its part untouched.
        for ((range, _), content) in pieces.iter().zip(contents) {
            if content == Content::Zero {
                buf[(range.start - offset) as usize..(range.end - offset) as usize].fill(0);
            }
        }
        Ok(Content::Data)
    }

    fn mapped(&self, offset: u64, len: usize) -> Option<MappedBytes<'_>> {
        match self.pieces(offset, offset + len as u64)[..] {
            [(_, overlay)] => self.layer(overlay).mapped(offset, len),
            _ => None,
        }
    }

    fn mapped_done(&self, offset: u64, len: usize) {
        // The same one layer `mapped` took them from: the pieces do not
        // change.
        if let [(_, overlay)] = self.pieces(offset, offset + len as u64)[..] {
            self.layer(overlay).mapped_done(offset, len);
        }
    }

    fn installed(&self, offset: u64, len: u64) {
        for (range, overlay) in self.pieces(offset, offset + len) {
            self.layer(overlay)
                .installed(range.start, range.end - range.start);
        }
    }

    fn is_known_zero(&self, offset: u64, len: u64) -> bool {
        self.pieces(offset, offset + len)
            .iter()
            .all(|(range, overlay)| {
                self.layer(*overlay)
                    .is_known_zero(range.start, range.end - range.start)
            })
    }

    fn advise(&self, offset: u64, len: u64) {
        for (range, overlay) in self.pieces(offset, offset + len) {
            self.layer(overlay)
                .advise(range.start, range.end - range.start);
        }
    }

    fn io_size(&self) -> usize {
        self.base.io_size().min(self.overlay.io_size())
    }

    fn describe(&self) -> String {
        format!(
            "layered ({} over {}, {} overlay ranges)",
            self.overlay.describe(),
            self.base.describe(),
            self.ranges.len()
        )
    }
}
