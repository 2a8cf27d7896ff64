// SPDX-License-Identifier: GPL-2.0-or-later

//! Searching: the next clean group and the next dirty extent.

use super::{iter, HBitmap, Violation, BITS_PER_LEVEL, LAST};

impl HBitmap {
    /// The first clean item in `start..start + count`, or `None` when every group of the range
    /// is dirty, `count` is 0, or `start` is at or past the bitmap's size. A `count` reaching past
    /// the end is clipped to it. The result is the first item of the clean group, or `start`
    /// when `start` itself lies in a clean group.
    pub fn next_zero(&self, start: u64, count: u64) -> Option<u64> {
        // Bounds first, then the read (the original read the word before checking).
        if start >= self.orig_size || count == 0 {
            return None;
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
            // The full-block summary finds the end of the run without reading all of it.
            pos = self.full.next_not_full(words, pos + 1, end_word)?;
            word = words[pos];
        }
        let group = ((pos as u64) << BITS_PER_LEVEL) + u64::from(word.trailing_ones());
        if group >= end_bit {
            return None;
        }
        Some((group << granularity).max(start))
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
        let first_dirty = iter::next_item(self, self.granularity, &mut pos, &mut cur, false)
            .filter(|&first| first < end)?;
        // 64-bit group size: the original truncated it to 32 bits.
        let group_size = 1u64 << self.granularity;
        let area_end = if group_size >= end - first_dirty {
            end
        } else {
            let from = first_dirty + group_size;
            self.next_zero(from, end - from).unwrap_or(end)
        };
        let area_start = first_dirty.max(start);
        Some((area_start, area_end - area_start))
    }
}

/// The searches of current QEMU's API (QEMU 7.2 and later): `hbitmap_next_dirty`,
/// `hbitmap_next_dirty_area` with a length limit, and `hbitmap_status`.
impl HBitmap {
    /// The first dirty item in `start..start + count` (clipped to the bitmap's size): `start`
    /// itself when its group is dirty, else the first item of the first dirty group. `None`
    /// when the range holds no dirty group, `count` is 0, or `start` is at or past the size.
    ///
    /// ```
    /// let mut bitmap = hbitmap::HBitmap::new(1 << 20, 12)?;
    /// bitmap.set(8192, 1); // dirties 8192..12288
    /// assert_eq!(bitmap.next_dirty(0, u64::MAX), Some(8192));
    /// assert_eq!(bitmap.next_dirty(9000, 100), Some(9000));
    /// assert_eq!(bitmap.next_dirty(0, 8192), None);
    /// # Ok::<(), hbitmap::BitmapError>(())
    /// ```
    pub fn next_dirty(&self, start: u64, count: u64) -> Option<u64> {
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
        // Most searches end in the word they start in: no cursor over the levels for them.
        let pos = (group >> BITS_PER_LEVEL) as usize;
        let word = self.levels[LAST][pos] & (u64::MAX << (group & 63));
        let first_dirty = if word != 0 {
            (((pos as u64) << BITS_PER_LEVEL) + u64::from(word.trailing_zeros()))
                << self.granularity
        } else {
            let (mut pos, mut cur) = iter::init(self, group);
            iter::next_item(self, self.granularity, &mut pos, &mut cur, true)?
        };
        (first_dirty < end).then(|| first_dirty.max(start))
    }

    /// The first dirty extent within `start..end` (`end` clipped to the bitmap's size), at most
    /// `max_count` items long: its start (never before `start`) and length. `None` when the
    /// range holds no dirty group. QEMU's `block-dirty-bitmap` users cut extents with the limit
    /// (an NBD reply, a backup job's cluster run).
    ///
    /// # Panics
    /// When `max_count` is 0 (QEMU asserts it is positive).
    ///
    /// ```
    /// let mut bitmap = hbitmap::HBitmap::new(1 << 20, 12)?;
    /// bitmap.set(8192, 3 * 4096); // dirties 8192..20480
    /// assert_eq!(bitmap.next_dirty_area_limited(0, u64::MAX, u64::MAX), Some((8192, 12288)));
    /// assert_eq!(bitmap.next_dirty_area_limited(10000, 1 << 20, 1000), Some((10000, 1000)));
    /// assert_eq!(bitmap.next_dirty_area_limited(0, 8192, u64::MAX), None);
    /// # Ok::<(), hbitmap::BitmapError>(())
    /// ```
    pub fn next_dirty_area_limited(
        &self,
        start: u64,
        end: u64,
        max_count: u64,
    ) -> Option<(u64, u64)> {
        assert!(
            max_count > 0,
            "HBitmap::next_dirty_area_limited: max_count is 0"
        );
        let end = end.min(self.orig_size);
        if start >= end {
            return None;
        }
        let start = self.next_dirty(start, end - start)?;
        let mut end = start + (end - start).min(max_count);
        if let Some(next_zero) = self.next_zero(start, end - start) {
            end = next_zero;
        }
        Some((start, end - start))
    }

    /// Whether `start..start + count` begins dirty or clean, and how many items from `start` on
    /// share that state (a run that reaches the end of the range counts as the whole range).
    ///
    /// # Panics
    /// When `count` is 0 or the range ends past the bitmap's size.
    ///
    /// ```
    /// let mut bitmap = hbitmap::HBitmap::new(1 << 20, 12)?;
    /// bitmap.set(8192, 4096);
    /// assert_eq!(bitmap.status(0, 1 << 20), (false, 8192));
    /// assert_eq!(bitmap.status(8192, 1 << 19), (true, 4096));
    /// assert_eq!(bitmap.status(9000, 100), (true, 100));
    /// # Ok::<(), hbitmap::BitmapError>(())
    /// ```
    pub fn status(&self, start: u64, count: u64) -> (bool, u64) {
        self.try_status(start, count)
            .unwrap_or_else(|why| panic!("HBitmap::status: {why}"))
    }

    /// [`status`](Self::status), returning the broken precondition instead of panicking.
    pub fn try_status(&self, start: u64, count: u64) -> Result<(bool, u64), Violation> {
        self.check_status(start, count)?;
        Ok(self.status_unchecked(start, count))
    }

    pub(crate) fn check_status(&self, start: u64, count: u64) -> Result<(), Violation> {
        match start.checked_add(count) {
            Some(end) if count > 0 && end <= self.orig_size => Ok(()),
            _ => Err(Violation::StatusRange {
                start,
                count,
                size: self.orig_size,
            }),
        }
    }

    /// `status` once `check_status` passed.
    pub(crate) fn status_unchecked(&self, start: u64, count: u64) -> (bool, u64) {
        match self.next_dirty(start, count) {
            None => (false, count),
            Some(dirty) if dirty > start => (false, dirty - start),
            Some(_) => match self.next_zero(start, count) {
                None => (true, count),
                Some(clean) => (true, clean - start),
            },
        }
    }
}
