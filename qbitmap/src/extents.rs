// SPDX-License-Identifier: GPL-2.0-or-later

//! Dirty extents: from an [`HBitmap`](hbitmap::HBitmap), and from imported JSON back into one.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// One dirty byte range, as `dump --output=json` prints it and `import` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

impl From<Range<u64>> for Extent {
    fn from(range: Range<u64>) -> Extent {
        Extent {
            offset: range.start,
            length: range.end - range.start,
        }
    }
}

/// Dirty bytes of a byte-addressed bitmap, clipped to its size (the library's).
pub use hbitmap::qcow2::dirty_bytes;

/// Why imported extents were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ExtentError {
    Overflow(Extent),
    PastEnd { extent: Extent, virtual_size: u64 },
}

impl std::error::Error for ExtentError {}

impl std::fmt::Display for ExtentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExtentError::Overflow(e) => write!(
                f,
                "extent at offset {} of length {} ends past 2^64",
                e.offset, e.length
            ),
            ExtentError::PastEnd {
                extent,
                virtual_size,
            } => write!(
                f,
                "extent at offset {} of length {} ends at {}, past the image's virtual size \
                 of {virtual_size} bytes ({})",
                extent.offset,
                extent.length,
                extent.offset + extent.length,
                crate::size::format_size(*virtual_size)
            ),
        }
    }
}

/// Sorts extents, merges overlapping and adjacent ones, drops empty ones, and refuses any that
/// ends past `virtual_size`.
pub fn normalize(extents: &[Extent], virtual_size: u64) -> Result<Vec<Range<u64>>, ExtentError> {
    let mut ranges = Vec::with_capacity(extents.len());
    for extent in extents {
        let end = extent.end().ok_or(ExtentError::Overflow(*extent))?;
        if end > virtual_size {
            return Err(ExtentError::PastEnd {
                extent: *extent,
                virtual_size,
            });
        }
        if extent.length > 0 {
            ranges.push(extent.offset..end);
        }
    }
    ranges.sort_unstable_by_key(|r| (r.start, r.end));
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    Ok(merged)
}

/// How many ranges do not start and end on granule boundaries (the end of the disk counts as
/// one): importing them dirties more than they say.
pub fn unaligned(ranges: &[Range<u64>], granularity: u64, virtual_size: u64) -> usize {
    let aligned = |x: u64| x.is_multiple_of(granularity) || x == virtual_size;
    ranges
        .iter()
        .filter(|r| !(aligned(r.start) && aligned(r.end)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hbitmap::HBitmap;

    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn normalizes() {
        let input = [e(100, 10), e(0, 10), e(5, 10), e(15, 5), e(50, 0), e(20, 1)];
        assert_eq!(normalize(&input, 1000), Ok(vec![0..21, 100..110]));
        assert_eq!(normalize(&[], 1000), Ok(vec![]));
        assert_eq!(normalize(&[e(0, 1000)], 1000).unwrap()[0], 0..1000);
        assert!(matches!(
            normalize(&[e(0, 1001)], 1000),
            Err(ExtentError::PastEnd { .. })
        ));
        assert!(matches!(
            normalize(&[e(u64::MAX, 2)], 1000),
            Err(ExtentError::Overflow(_))
        ));
    }

    #[test]
    fn counts_unaligned() {
        assert_eq!(unaligned(&[0..512, 1024..1100], 512, 1100), 0);
        assert_eq!(unaligned(&[0..500, 1000..1024], 512, 1100), 2);
    }

    #[test]
    fn dirty_bytes_clip_to_size() {
        let mut bitmap = HBitmap::new(100_000, 16).unwrap();
        bitmap.set(99_999, 1);
        assert_eq!(bitmap.count(), 65536);
        assert_eq!(dirty_bytes(&bitmap), 100_000 - 65536);
        bitmap.set(0, 1);
        assert_eq!(dirty_bytes(&bitmap), 100_000);
        let extents: u64 = bitmap.extents().map(|r| r.end - r.start).sum();
        assert_eq!(extents, 100_000);
    }
}
