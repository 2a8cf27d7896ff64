//! Searching: the next clean group and the next dirty extent.

use super::{iter, words, HBitmap, BITS_PER_LEVEL, LAST};

impl HBitmap {
    /// The first clean item in `start..start + count`, or `None` when every group of the range
    /// is dirty, `count` is 0, or `start` is at or past the bitmap's size. A `count` reaching past
    /// the end is clipped to it. The result is the first item of the clean group, or `start`
    /// when `start` itself lies in a clean group.
    pub fn next_zero(&self, start: u64, count: u64) -> Option<u64> {
        u64::try_from(self.next_zero_raw(start, count)).ok()
    }

    /// `next_zero` with the original's return convention: -1 for "none", and items at or past
    /// 2^63 reading as negative.
    pub(crate) fn next_zero_raw(&self, start: u64, count: u64) -> i64 {
        // Bounds first, then the read (the original read the word before checking).
        if start >= self.orig_size || count == 0 {
            return -1;
        }
        let granularity = self.granularity;
        let words = &self.levels[LAST];
        let first = start >> granularity;
        let end_bit = if count > self.orig_size - start {
            self.groups
        } else {
            ((start + count - 1) >> granularity) + 1
        };
        let end_word = end_bit.div_ceil(64) as usize;
        let mut pos = (first >> BITS_PER_LEVEL) as usize;
        // Groups before `start` in its word count as dirty.
        let mut word = words[pos] | ((1u64 << (first & 63)) - 1);
        if word == u64::MAX {
            pos += 1;
            match words
                .get(pos..end_word.max(pos))
                .and_then(words::first_not_full)
            {
                Some(offset) => pos += offset,
                None => return -1,
            }
            word = words[pos];
        }
        let group = ((pos as u64) << BITS_PER_LEVEL) + u64::from(word.trailing_ones());
        if group >= end_bit {
            return -1;
        }
        let item = group << granularity;
        if item < start {
            return start as i64;
        }
        item as i64
    }

    /// The first dirty extent that intersects `start..start + count` (clipped to the bitmap's
    /// size): its start (never before `start`) and length. The extent runs to the first clean
    /// group or the end of the range. `None` when the range holds no dirty group.
    pub fn next_dirty_area(&self, start: u64, count: u64) -> Option<(u64, u64)> {
        if start >= self.orig_size || count == 0 {
            return None;
        }
        let end = if count > self.orig_size - start {
            self.orig_size
        } else {
            start + count
        };
        let group = start >> self.granularity;
        if group >= self.groups {
            // Only reachable when the size's rounding wrapped (see `groups_for`).
            return None;
        }
        let (mut pos, mut cur) = iter::init(self, group);
        let first_dirty = iter::next_item(self, self.granularity, &mut pos, &mut cur, false);
        let first_dirty = u64::try_from(first_dirty).ok().filter(|&item| item < end)?;
        // 64-bit group size: the original truncated it to 32 bits.
        let group_size = 1u64 << self.granularity;
        let area_end = if group_size >= end - first_dirty {
            end
        } else {
            let from = first_dirty + group_size;
            u64::try_from(self.next_zero_raw(from, end - from)).unwrap_or(end)
        };
        let area_start = first_dirty.max(start);
        Some((area_start, area_end - area_start))
    }
}
