// SPDX-License-Identifier: GPL-2.0-or-later

//! The hierarchical bitmap itself: storage, set/reset with upward propagation, queries, resize,
//! merge and meta bitmaps.
//!
//! An `HBitmap` stacks [`LEVELS`] bitmaps of 64-bit words. The last level holds one bit per
//! *group* of `2^granularity` items; in every level above it, bit N is set iff word N of the
//! level below is nonzero. Level 0 is a single word whose most significant bit is a sentinel
//! that stops iteration. This is exactly the layout of QEMU's `util/hbitmap.c`, kept word for
//! word so that iteration, serialization and SHA-256 agree with it to the bit.

mod blocks;
mod bulk;
pub(crate) mod bulk_write;
mod full;
pub(crate) mod iter;
pub(crate) mod merge;
mod meta;
mod precondition;
mod search;
mod storage;
mod update;
pub(crate) mod words;

pub use iter::{Extents, Iter};
pub use precondition::Violation;

use std::fmt;

pub(crate) use blocks::{BlockSet, BLOCK_WORDS};
use full::FullSummary;
use meta::MetaBitmap;
use storage::Words;

/// Bits in one storage word (`unsigned long` on 64-bit hosts).
pub const BITS_PER_WORD: u32 = 64;
/// log2 of [`BITS_PER_WORD`]: how far an index shifts to move one level up.
pub const BITS_PER_LEVEL: u32 = 6;
/// log2 of the largest number of groups a bitmap may hold.
pub const LOG_MAX_SIZE: u32 = 41;
/// Number of levels, the last one being the bitmap proper.
pub const LEVELS: usize = (LOG_MAX_SIZE / BITS_PER_LEVEL) as usize + 1;
/// The level that holds one bit per group.
pub(crate) const LAST: usize = LEVELS - 1;
/// Marks the end of iteration in level 0, which never uses its top bit otherwise.
pub(crate) const SENTINEL: u64 = 1 << (BITS_PER_WORD - 1);
/// Largest number of groups: `2^LOG_MAX_SIZE`.
pub const MAX_GROUPS: u64 = 1 << LOG_MAX_SIZE;

/// Why an [`HBitmap`] could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not in 0..64 (a C caller's `int` may be negative).
    #[error("granularity {0} is out of range: it must be in 0..64")]
    Granularity(i64),
    /// The size needs more than 2^41 groups at this granularity.
    #[error("size {size} at granularity {granularity} needs {groups} groups, more than 2^41")]
    TooLarge {
        /// Requested size in items.
        size: u64,
        /// Requested granularity.
        granularity: u32,
        /// Groups the size needs.
        groups: u64,
    },
}

/// A hierarchical dirty bitmap: QEMU's `HBitmap`.
///
/// The bitmap covers `size` items; each bit stands for a group of `2^granularity` items. Setting
/// or resetting any item of a group sets or resets the whole group, and iteration reports the
/// first item of each dirty group.
///
/// ```
/// use hbitmap::HBitmap;
///
/// // 1 MiB tracked at 4 KiB granularity.
/// let mut bitmap = HBitmap::new(1 << 20, 12)?;
/// bitmap.set(5000, 10); // dirties the group 4096..8192
/// assert_eq!(bitmap.count(), 4096);
/// assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![4096]);
/// assert_eq!(bitmap.extents().collect::<Vec<_>>(), vec![4096..8192]);
/// # Ok::<(), hbitmap::BitmapError>(())
/// ```
pub struct HBitmap {
    /// Size in items, as requested.
    orig_size: u64,
    /// Size in groups: bits used in the last level.
    groups: u64,
    /// Set groups in the last level.
    count: u64,
    granularity: u32,
    /// `levels[LAST]` is the bitmap proper; each level above summarizes the one below. Level
    /// `i` always holds exactly the words that `new` and `truncate` give it.
    levels: [Words; LEVELS],
    /// Which 64-word blocks of the last level are all ones: lets `next_zero` cross long dirty
    /// runs without reading them.
    full: FullSummary,
    /// Tracks which chunks of this bitmap changed (migration's "dirty-dirty" bitmap).
    meta: Option<MetaBitmap>,
    /// True for a meta bitmap: its parent owns it (the C ABI refuses to free it).
    owned_by_parent: bool,
    /// True while the summary levels may disagree with the last level: after a deserialization
    /// step without `finish`. Counting then follows the summary levels, as the original does.
    stale: bool,
    /// The blocks of the last level that deserialization filled with dirty words since the
    /// summary was last right; empty while `stale` is false. Outside them a clear summary bit
    /// always means a clean word, which lets deserialization skip writing zeros over them.
    unsummarized: BlockSet,
}

/// Groups needed for `size` items, rounding up exactly as the original does (the addition wraps
/// for sizes within `2^granularity` of `u64::MAX`).
pub(crate) fn groups_for(size: u64, granularity: u32) -> u64 {
    size.wrapping_add((1u64 << granularity) - 1) >> granularity
}

/// Words a level needs to hold `bits` bits; never fewer than one.
pub(crate) fn words_for(bits: u64) -> usize {
    bits.div_ceil(u64::from(BITS_PER_WORD)).max(1) as usize
}

/// Mask of bits `start..=last` of one word (both taken modulo 64).
#[inline]
pub(crate) fn word_mask(start: u64, last: u64) -> u64 {
    let hi = last & 63;
    let lo = start & 63;
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

impl HBitmap {
    /// Creates an empty bitmap of `size` items, one bit per `2^granularity` items.
    ///
    /// Fails when `granularity >= 64` or when the size needs more than 2^41 groups.
    pub fn new(size: u64, granularity: u32) -> Result<HBitmap, BitmapError> {
        if granularity >= BITS_PER_WORD {
            return Err(BitmapError::Granularity(granularity.into()));
        }
        let groups = groups_for(size, granularity);
        if groups > MAX_GROUPS {
            return Err(BitmapError::TooLarge {
                size,
                granularity,
                groups,
            });
        }
        let mut levels: [Words; LEVELS] = Default::default();
        let mut bits = groups;
        for level in levels.iter_mut().rev() {
            let words = words_for(bits);
            *level = Words::zeroed(words);
            bits = words as u64;
        }
        levels[0][0] = SENTINEL;
        let full = FullSummary::new(levels[LAST].len());
        Ok(HBitmap {
            orig_size: size,
            groups,
            count: 0,
            granularity,
            levels,
            full,
            meta: None,
            owned_by_parent: false,
            stale: false,
            unsummarized: BlockSet::default(),
        })
    }

    /// Size in items, as given to [`new`](Self::new) or [`truncate`](Self::truncate).
    pub fn size(&self) -> u64 {
        self.orig_size
    }

    /// Number of groups (bits of the last level).
    pub fn groups(&self) -> u64 {
        self.groups
    }

    /// log2 of the number of items in a group.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Dirty items: the number of dirty groups times the group size (wrapping, as the original).
    pub fn count(&self) -> u64 {
        self.count << self.granularity
    }

    /// Number of dirty groups.
    pub fn dirty_groups(&self) -> u64 {
        self.count
    }

    /// True when no group is dirty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Words of one level (0 is the coarsest, [`LEVELS`]` - 1` the bitmap proper).
    pub fn level_words(&self, level: usize) -> &[u64] {
        &self.levels[level]
    }

    /// Whether the group holding `item` is dirty.
    ///
    /// # Panics
    /// When `item` lies beyond the last group.
    pub fn get(&self, item: u64) -> bool {
        self.try_get(item)
            .unwrap_or_else(|why| panic!("HBitmap::get: {why}"))
    }

    /// [`get`](Self::get), returning the broken precondition instead of panicking.
    pub fn try_get(&self, item: u64) -> Result<bool, Violation> {
        match self.get_checked(item) {
            Some(dirty) => Ok(dirty),
            None => Err(self.check_item(item).unwrap_err()),
        }
    }

    /// Whether the group holding `item` is dirty; `None` past the last group.
    #[inline]
    #[allow(unsafe_code)]
    pub(crate) fn get_checked(&self, item: u64) -> Option<bool> {
        let group = item >> self.granularity;
        if group >= self.groups {
            return None;
        }
        let index = (group >> BITS_PER_LEVEL) as usize;
        debug_assert!(index < self.levels[LAST].len());
        // SAFETY: the last level always holds `words_for(self.groups)` words: the fields are
        // private to this module, where only `new` and `truncate_unchecked` size the levels, and
        // `group < self.groups`. The
        // point queries of the guest write path are latency-bound: each instruction saved
        // lets more of them overlap.
        let word = unsafe { *self.levels[LAST].get_unchecked(index) };
        Some(word >> (group & 63) & 1 != 0)
    }

    /// Checks that `item` lies within the bitmap.
    #[inline]
    pub(crate) fn check_item(&self, item: u64) -> Result<(), Violation> {
        let group = item >> self.granularity;
        if group < self.groups {
            Ok(())
        } else {
            Err(Violation::ItemOutOfRange {
                item,
                group,
                groups: self.groups,
            })
        }
    }

    /// Checks an item range and converts it to groups `first..=last`; `None` for an empty range.
    #[inline]
    pub(crate) fn check_range(
        &self,
        start: u64,
        count: u64,
    ) -> Result<Option<(u64, u64)>, Violation> {
        if count == 0 {
            return Ok(None);
        }
        let Some(last) = start.checked_add(count - 1) else {
            return Err(Violation::RangeWraps { start, count });
        };
        let (first, last) = (start >> self.granularity, last >> self.granularity);
        if last >= self.groups {
            return Err(Violation::RangeOutOfRange {
                start,
                count,
                last,
                groups: self.groups,
            });
        }
        Ok(Some((first, last)))
    }

    /// Checks that a range covers whole groups: its start and, unless it ends at the size, its
    /// length are multiples of the group size (current QEMU's rule for resets).
    pub(crate) fn check_whole_groups(&self, start: u64, count: u64) -> Result<(), Violation> {
        let group_size = 1u64 << self.granularity;
        let aligned = |value: u64| value & (group_size - 1) == 0;
        if count == 0
            || (aligned(start) && (aligned(count) || start.wrapping_add(count) == self.orig_size))
        {
            Ok(())
        } else {
            Err(Violation::ResetMisaligned {
                start,
                count,
                group_size,
                size: self.orig_size,
            })
        }
    }

    /// Marks every group touched by `start..start + count` dirty. A zero count does nothing.
    ///
    /// # Panics
    /// When the range ends beyond the last group.
    pub fn set(&mut self, start: u64, count: u64) {
        self.try_set(start, count)
            .unwrap_or_else(|why| panic!("HBitmap::set: {why}"));
    }

    /// [`set`](Self::set), returning the broken precondition (and changing nothing) instead of
    /// panicking.
    pub fn try_set(&mut self, start: u64, count: u64) -> Result<(), Violation> {
        if let Some((first, last)) = self.check_range(start, count)? {
            self.set_groups(start, count, first, last);
        }
        Ok(())
    }

    /// Marks every group touched by `start..start + count` clean: a range that covers a group
    /// only partly still cleans all of it. A zero count does nothing.
    ///
    /// # Panics
    /// When the range ends beyond the last group.
    pub fn reset(&mut self, start: u64, count: u64) {
        self.try_reset(start, count)
            .unwrap_or_else(|why| panic!("HBitmap::reset: {why}"));
    }

    /// [`reset`](Self::reset), returning the broken precondition (and changing nothing) instead
    /// of panicking.
    pub fn try_reset(&mut self, start: u64, count: u64) -> Result<(), Violation> {
        if let Some((first, last)) = self.check_range(start, count)? {
            self.reset_groups(start, count, first, last);
        }
        Ok(())
    }

    /// Marks the whole bitmap clean. The meta bitmap, if any, is not touched.
    pub fn reset_all(&mut self) {
        if self.stale {
            for level in &mut self.levels[1..] {
                level.fill(0);
            }
        } else {
            self.clear_dirty_words();
        }
        self.levels[0][0] = SENTINEL;
        self.full.clear();
        self.count = 0;
        self.stale = false;
        self.unsummarized.clear();
    }

    /// Zeroes the nonzero words of levels 1.. found through the summary above each, bottom
    /// level first so every summary is read before it is cleared: a huge, mostly clean bitmap is
    /// cleared without touching its clean pages.
    fn clear_dirty_words(&mut self) {
        for level in (1..LEVELS).rev() {
            let (upper, lower) = self.levels.split_at_mut(level);
            let words = &mut lower[0];
            let len = words.len();
            for_each_marked_block(&upper[level - 1], level == 1, len, |range| {
                words[range].fill(0)
            });
        }
        self.levels[0].fill(0);
    }

    /// Counts the dirty groups in `first..=last` by walking the summary levels, as the original
    /// does; differs from a plain popcount only while the summary is stale.
    pub(crate) fn count_between_via_summary(&self, first: u64, last: u64) -> u64 {
        let end = last + 1;
        let end_word = (end >> BITS_PER_LEVEL) as usize;
        let mut cursor = iter::Cursor::at_group(self, first);
        let mut count = 0;
        loop {
            let (pos, word) = cursor.next_word(self);
            if pos >= end_word {
                if pos == end_word {
                    count += u64::from((word & ((1u64 << (end & 63)) - 1)).count_ones());
                }
                return count;
            }
            count += u64::from(word.count_ones());
        }
    }

    /// Recomputes the dirty-group count over the whole bitmap, as the original does after merge
    /// and deserialization.
    pub(crate) fn recount(&mut self) {
        self.count = if self.groups == 0 {
            0
        } else if self.stale {
            self.count_between_via_summary(0, self.groups - 1)
        } else {
            popcount_below(&self.levels[LAST], self.groups)
        };
    }

    /// Resizes the bitmap to `size` items. Shrinking first cleans the groups that disappear
    /// (which marks them in the meta bitmap); growing adds clean groups. The meta bitmap
    /// follows.
    ///
    /// # Panics
    /// When the new size needs more than 2^41 groups.
    pub fn truncate(&mut self, size: u64) {
        self.try_truncate(size)
            .unwrap_or_else(|why| panic!("HBitmap::truncate: {why}"));
    }

    /// [`truncate`](Self::truncate), returning the broken precondition (and changing nothing)
    /// instead of panicking.
    pub fn try_truncate(&mut self, size: u64) -> Result<(), Violation> {
        self.check_truncate(size)?;
        self.truncate_unchecked(size);
        Ok(())
    }

    pub(crate) fn check_truncate(&self, size: u64) -> Result<(), Violation> {
        let (granularity, groups) = (self.granularity, groups_for(size, self.granularity));
        if groups > MAX_GROUPS {
            return Err(Violation::Geometry(BitmapError::TooLarge {
                size,
                granularity,
                groups,
            }));
        }
        Ok(())
    }

    /// `truncate` once `check_truncate` passed (the C ABI reports its failure itself).
    pub(crate) fn truncate_unchecked(&mut self, size: u64) {
        let granularity = self.granularity;
        let groups = groups_for(size, granularity);
        // Kept current so next_zero and next_dirty_area see the new end (QEMU 4.1, 4e4de22279).
        self.orig_size = size;
        if groups == self.groups {
            return;
        }
        let shrink = groups < self.groups;
        if shrink {
            // Clean whole groups from the first one wholly past the new end.
            let group_size = 1u64 << granularity;
            let start = size.wrapping_add(group_size - 1) & group_size.wrapping_neg();
            let fix_count = (self.groups << granularity).wrapping_sub(start);
            self.reset_groups(start, fix_count, groups, self.groups - 1);
        }
        self.groups = groups;
        let old_words = self.levels[LAST].len();
        let mut bits = groups;
        for level in self.levels.iter_mut().rev() {
            let words = words_for(bits);
            if level.len() == words {
                break;
            }
            level.resize_zeroed(words);
            bits = words as u64;
        }
        if shrink {
            self.drop_summary_past_end();
        }
        // The last word both sizes share is the only one whose summary can change.
        let kept = old_words.min(self.levels[LAST].len());
        self.full.fit(self.levels[LAST].len());
        self.full.refresh(&self.levels[LAST], kept - 1..kept);
        if let Some(meta) = self.meta.as_mut() {
            meta.truncate_unchecked(self.groups << granularity);
        }
    }

    /// After a shrink, clears the summary bits of words that went away with the levels, and the
    /// bits of summary words that thereby became blank. Only padding bits past the old last group
    /// (deserialization writes whole words) survive the reset that precedes the shrink, so this
    /// changes nothing unless those were set; the original then leaves a summary bit pointing
    /// past the shortened level and reads out of bounds when iterating.
    fn drop_summary_past_end(&mut self) {
        let mut blank_below = false;
        for level in (0..LAST).rev() {
            // Bits 0..below of this level's last word summarize the words of the level below.
            let below = self.levels[level + 1].len() as u64;
            let top = (below - 1) % 64;
            let mut keep = u64::MAX >> (63 - top);
            if blank_below {
                keep &= !(1 << top);
            }
            if level == 0 {
                keep |= SENTINEL;
            }
            let word = self.levels[level]
                .last_mut()
                .expect("levels are never empty");
            let old = *word;
            *word &= keep;
            blank_below = old != 0 && *word == 0;
        }
    }

    /// Creates the meta bitmap: one bit per `chunk_size` groups' worth of items, marked over the
    /// range of a set or reset that changes this bitmap as the original sees change: a set that
    /// changes the first or last word of its range or fills a clean word, a reset that makes a
    /// word clean. (A set that only fills partly dirty words inside its range does not mark it.)
    /// Returns it.
    ///
    /// # Panics
    /// When a meta bitmap exists already, when `chunk_size` is not a power of two, or when
    /// the resulting granularity would reach 64.
    pub fn create_meta(&mut self, chunk_size: u32) -> &mut HBitmap {
        self.try_create_meta(chunk_size)
            .unwrap_or_else(|why| panic!("HBitmap::create_meta: {why}"))
    }

    /// [`create_meta`](Self::create_meta), returning the broken precondition instead of
    /// panicking.
    pub fn try_create_meta(&mut self, chunk_size: u32) -> Result<&mut HBitmap, Violation> {
        let chunk_size = i32::try_from(chunk_size)
            .map_err(|_| Violation::ChunkNotPowerOfTwo(chunk_size as i32))?;
        self.check_create_meta(chunk_size)?;
        Ok(self.create_meta_unchecked(chunk_size))
    }

    pub(crate) fn meta_granularity(&self, chunk_size: i32) -> u32 {
        self.granularity + (chunk_size as u32).trailing_zeros()
    }

    pub(crate) fn check_create_meta(&self, chunk_size: i32) -> Result<(), Violation> {
        if chunk_size & chunk_size.wrapping_sub(1) != 0 {
            return Err(Violation::ChunkNotPowerOfTwo(chunk_size));
        }
        if self.meta.is_some() {
            return Err(Violation::MetaExists);
        }
        let granularity = self.meta_granularity(chunk_size);
        if granularity >= BITS_PER_WORD {
            return Err(Violation::MetaGranularity {
                chunk_size,
                granularity,
            });
        }
        Ok(())
    }

    /// `create_meta` once `check_create_meta` passed.
    pub(crate) fn create_meta_unchecked(&mut self, chunk_size: i32) -> &mut HBitmap {
        let granularity = self.meta_granularity(chunk_size);
        // The meta bitmap has at most as many groups as this one: it cannot be too large.
        let meta = HBitmap::new(self.groups << self.granularity, granularity)
            .expect("meta bitmap is never larger than its bitmap");
        self.meta.insert(MetaBitmap::new(meta))
    }

    /// The meta bitmap, if one was created.
    pub fn meta(&self) -> Option<&HBitmap> {
        self.meta.as_deref()
    }

    /// The meta bitmap, mutably (to reset chunks once they were sent).
    pub fn meta_mut(&mut self) -> Option<&mut HBitmap> {
        self.meta.as_deref_mut()
    }

    /// The meta bitmap's address for C callers, valid until it is freed.
    pub(crate) fn meta_ptr(&self) -> Option<*mut HBitmap> {
        self.meta.as_ref().map(MetaBitmap::as_ptr)
    }

    /// Whether this is a meta bitmap, owned by another bitmap.
    pub(crate) fn is_meta(&self) -> bool {
        self.owned_by_parent
    }

    /// Drops the meta bitmap; returns false when there was none.
    pub fn free_meta(&mut self) -> bool {
        self.meta.take().is_some()
    }

    /// Iterates over the first item of every dirty group, in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter::new(self, 0)
    }

    /// Iterates over the first item of every dirty group from the group holding `first` on.
    /// Yields nothing when `first` lies beyond the last group.
    pub fn iter_from(&self, first: u64) -> Iter<'_> {
        Iter::new(self, first)
    }

    /// Iterates over maximal dirty extents as item ranges, clipped to the bitmap's size.
    pub fn extents(&self) -> Extents<'_> {
        Extents::new(self)
    }
}

/// Popcount of the first `bits` bits of `words`.
pub(crate) fn popcount_below(words: &[u64], bits: u64) -> u64 {
    let full = (bits / 64) as usize;
    let mut count = self::words::popcount(&words[..full]);
    let tail = bits % 64;
    if tail != 0 {
        count += u64::from((words[full] & ((1u64 << tail) - 1)).count_ones());
    }
    count
}

/// The padding bits of a last level of `groups` bits: the bits past the last group in the
/// word that holds it (0 when the groups fill their last word). The one definition of padding:
/// a last level has no word after that one, and stored bitmaps pad the same way.
pub(crate) fn padding_mask(groups: u64) -> u64 {
    match groups % 64 {
        0 => 0,
        used => u64::MAX << used,
    }
}

/// Set bits of a last level's `words` past its first `groups` bits.
pub(crate) fn padding_ones(words: &[u64], groups: u64) -> u64 {
    words.get((groups / 64) as usize).map_or(0, |&word| {
        u64::from((word & padding_mask(groups)).count_ones())
    })
}

/// Calls `f` with the range of 64 words (clipped to `len`) below each nonzero word of
/// `summary`. `skip_sentinel` ignores level 0's sentinel bit.
pub(crate) fn for_each_marked_block(
    summary: &[u64],
    skip_sentinel: bool,
    len: usize,
    mut f: impl FnMut(std::ops::Range<usize>),
) {
    for (index, &bits) in summary.iter().enumerate() {
        let bits = if skip_sentinel {
            bits & !SENTINEL
        } else {
            bits
        };
        let base = index * 64;
        if bits != 0 && base < len {
            f(base..(base + 64).min(len));
        }
    }
}

impl fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("HBitmap");
        out.field("size", &self.orig_size)
            .field("granularity", &self.granularity)
            .field("groups", &self.groups)
            .field("dirty_groups", &self.count);
        if !self.stale && self.groups > 0 {
            const SHOWN: usize = 8;
            let extents: Vec<_> = self.extents().take(SHOWN + 1).collect();
            if extents.len() > SHOWN {
                out.field("first_extents", &&extents[..SHOWN]);
            } else {
                out.field("extents", &extents);
            }
        }
        if self.stale {
            out.field("stale_summary", &true);
        }
        out.field("meta", &self.meta).finish()
    }
}

impl Clone for HBitmap {
    fn clone(&self) -> Self {
        HBitmap {
            orig_size: self.orig_size,
            groups: self.groups,
            count: self.count,
            granularity: self.granularity,
            levels: self.levels.clone(),
            full: self.full.clone(),
            meta: self.meta.clone(),
            owned_by_parent: self.owned_by_parent,
            stale: self.stale,
            unsummarized: self.unsummarized.clone(),
        }
    }
}

impl PartialEq for HBitmap {
    /// Same size, granularity and dirty groups (the meta bitmap is not compared).
    fn eq(&self, other: &Self) -> bool {
        self.orig_size == other.orig_size
            && self.granularity == other.granularity
            && self.count == other.count
            && self.levels[LAST][..] == other.levels[LAST][..]
    }
}

impl Eq for HBitmap {}

#[cfg(test)]
mod tests;
