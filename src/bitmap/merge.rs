// SPDX-License-Identifier: GPL-2.0-or-later

//! Merging bitmaps: `result = a | b`, in place or into a third bitmap. The original's merge
//! takes bitmaps of one geometry; current QEMU's also takes bitmaps of equal size in items
//! and different granularities.

use super::{for_each_marked_block, padding_ones, words, HBitmap, Violation, LAST};

impl HBitmap {
    /// Whether `self` and `other` have the same number of groups and the same granularity.
    pub fn can_merge(&self, other: &HBitmap) -> bool {
        self.groups == other.groups && self.granularity == other.granularity
    }

    /// `self |= other`. Returns false, changing nothing, when the bitmaps cannot be merged.
    /// The meta bitmap is not updated.
    pub fn merge(&mut self, other: &HBitmap) -> bool {
        if !self.can_merge(other) {
            return false;
        }
        if other.count() == 0 {
            return true;
        }
        let stale = self.stale || other.stale;
        if stale {
            for (dst, src) in self.levels.iter_mut().zip(&other.levels) {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d |= s);
            }
        } else {
            for (dst, src) in self.levels[..LAST].iter_mut().zip(&other.levels) {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d |= s);
            }
            // The last level only where `other` has dirty words, which the (already merged)
            // summary of `other` tells.
            let blocks = merge_dirty_blocks(
                &mut self.levels[LAST],
                &other.levels[LAST],
                &other.levels[LAST - 1],
            );
            self.full.refresh_blocks(&self.levels[LAST], blocks);
        }
        if stale {
            self.full.rebuild(&self.levels[LAST]);
        }
        self.stale = stale;
        self.unsummarized.union(&other.unsummarized);
        self.recount();
        true
    }

    /// `self |= self`: changes nothing but recounts, as the original does when all three
    /// arguments of its merge are one bitmap.
    pub(crate) fn merge_with_itself(&mut self) -> bool {
        if self.count() != 0 {
            self.recount();
        }
        true
    }

    /// `result = a | b`. Returns false, changing nothing, when the three bitmaps do not all have
    /// the same size and granularity. For `a |= b`, use [`merge`](Self::merge).
    pub fn merge_into(a: &HBitmap, b: &HBitmap, result: &mut HBitmap) -> bool {
        if !a.can_merge(b) || !a.can_merge(result) {
            return false;
        }
        if a.count() == 0 && b.count() == 0 {
            result.reset_all();
            return true;
        }
        let stale = a.stale || b.stale;
        if stale || result.stale {
            for ((dst, x), y) in result.levels.iter_mut().zip(&a.levels).zip(&b.levels) {
                dst.iter_mut()
                    .zip(x.iter().zip(y))
                    .for_each(|(d, (x, y))| *d = x | y);
            }
        } else {
            let (result_upper, result_last) = result.levels.split_at_mut(LAST);
            // The blocks that can change: dirty in a, b or the old result.
            let blocks: Vec<usize> = (0..result_upper[LAST - 1].len())
                .filter(|&block| {
                    (a.levels[LAST - 1][block]
                        | b.levels[LAST - 1][block]
                        | result_upper[LAST - 1][block])
                        != 0
                })
                .collect();
            let ones = words::or_dirty_blocks(
                &mut result_last[0],
                [&a.levels[LAST], &b.levels[LAST]],
                [
                    &a.levels[LAST - 1],
                    &b.levels[LAST - 1],
                    &result_upper[LAST - 1],
                ],
            );
            for ((dst, x), y) in result.levels[..LAST]
                .iter_mut()
                .zip(&a.levels)
                .zip(&b.levels)
            {
                dst.iter_mut()
                    .zip(x.iter().zip(y))
                    .for_each(|(d, (x, y))| *d = x | y);
            }
            result.full.refresh_blocks(&result.levels[LAST], blocks);
            // The last level was rewritten whole: its count came with it (bits past the last
            // group, which only deserialize_ones sets, do not count).
            result.count = ones - padding_ones(&result.levels[LAST], result.groups);
            return true;
        }
        // Every level of `result` was rewritten from `a` and `b`.
        result.full.rebuild(&result.levels[LAST]);
        result.stale = stale;
        result.unsummarized = a.unsummarized.clone();
        result.unsummarized.union(&b.unsummarized);
        result.recount();
        true
    }

    /// `self |= other` with current QEMU's rules (`hbitmap_merge` since QEMU 5.0): the two
    /// bitmaps must cover the same number of items but may have different granularities; then
    /// every group of `self` that touches a dirty extent of `other` becomes dirty.
    ///
    /// # Panics
    /// When the sizes in items differ.
    ///
    /// ```
    /// let mut coarse = hbitmap::HBitmap::new(1 << 20, 16)?;
    /// let mut fine = hbitmap::HBitmap::new(1 << 20, 9)?;
    /// fine.set(70_000, 1); // the 512-item group 69632..70144
    /// coarse.union_with(&fine);
    /// assert_eq!(coarse.extents().collect::<Vec<_>>(), vec![65536..131072]);
    /// # Ok::<(), hbitmap::BitmapError>(())
    /// ```
    pub fn union_with(&mut self, other: &HBitmap) {
        self.try_union_with(other)
            .unwrap_or_else(|why| panic!("HBitmap::union_with: {why}"));
    }

    /// [`union_with`](Self::union_with), returning the broken precondition (and changing
    /// nothing) instead of panicking.
    pub fn try_union_with(&mut self, other: &HBitmap) -> Result<(), Violation> {
        check_union_sizes(self, other, self)?;
        self.union_with_unchecked(other);
        Ok(())
    }

    /// `result = a | b` with current QEMU's rules (see [`union_with`](Self::union_with)); `a`
    /// and `b` may have different granularities. When they have the same one, `result` must
    /// have it too.
    ///
    /// # Panics
    /// When the sizes in items differ, or `a` and `b` share a granularity that `result` has not.
    pub fn union_into(a: &HBitmap, b: &HBitmap, result: &mut HBitmap) {
        Self::try_union_into(a, b, result)
            .unwrap_or_else(|why| panic!("HBitmap::union_into: {why}"));
    }

    /// [`union_into`](Self::union_into), returning the broken precondition (and changing
    /// nothing) instead of panicking.
    pub fn try_union_into(a: &HBitmap, b: &HBitmap, result: &mut HBitmap) -> Result<(), Violation> {
        check_union_sizes(a, b, result)?;
        Self::union_into_unchecked(a, b, result)
    }

    /// `union_with` after its precondition was checked. Like QEMU, an `other` whose item count
    /// reads 0 changes nothing.
    pub(crate) fn union_with_unchecked(&mut self, other: &HBitmap) {
        if other.count() == 0 {
            return;
        }
        if self.granularity == other.granularity {
            self.merge(other);
        } else {
            self.set_extents_of(other);
        }
    }

    /// `union_into` after its size check; `result` is neither `a` nor `b`. Fails, changing
    /// nothing, when `a` and `b` share a granularity that `result` has not and are not both
    /// empty (QEMU clears `result` then, whatever its granularity).
    pub(crate) fn union_into_unchecked(
        a: &HBitmap,
        b: &HBitmap,
        result: &mut HBitmap,
    ) -> Result<(), Violation> {
        if a.count() == 0 && b.count() == 0 {
            result.reset_all();
        } else if a.granularity != b.granularity {
            result.reset_all();
            result.set_extents_of(a);
            result.set_extents_of(b);
        } else {
            check_union_granularity(a, b, result)?;
            Self::merge_into(a, b, result);
        }
        Ok(())
    }

    /// Sets every group of `self` that touches a dirty extent of `source`, which has the same
    /// size in items and any granularity (QEMU's `hbitmap_sparse_merge`).
    fn set_extents_of(&mut self, source: &HBitmap) {
        let mut offset = 0;
        while let Some((start, count)) =
            source.next_dirty_area_limited(offset, source.orig_size, u64::MAX)
        {
            self.set(start, count);
            offset = start + count;
        }
    }
}

/// `dst |= src` over the 64-word blocks that `src_summary` marks as holding dirty words;
/// returns those blocks' numbers.
fn merge_dirty_blocks(dst: &mut [u64], src: &[u64], src_summary: &[u64]) -> Vec<usize> {
    let mut blocks = Vec::new();
    for_each_marked_block(src_summary, false, src.len(), |range| {
        blocks.push(range.start / 64);
        dst[range.clone()]
            .iter_mut()
            .zip(&src[range])
            .for_each(|(d, s)| *d |= s);
    });
    blocks
}

/// The sizes in items of the operands of a current-QEMU merge must agree.
pub(crate) fn check_union_sizes(
    a: &HBitmap,
    b: &HBitmap,
    result: &HBitmap,
) -> Result<(), Violation> {
    if a.orig_size == result.orig_size && b.orig_size == result.orig_size {
        Ok(())
    } else {
        Err(Violation::MergeSizes {
            a: a.orig_size,
            b: b.orig_size,
            result: result.orig_size,
        })
    }
}

/// When `a` and `b` share a granularity, their words are ORed into `result`'s: it must have
/// the same geometry (QEMU does not check, and writes past `result`'s levels).
pub(crate) fn check_union_granularity(
    a: &HBitmap,
    b: &HBitmap,
    result: &HBitmap,
) -> Result<(), Violation> {
    if a.granularity != b.granularity || result.granularity == a.granularity {
        Ok(())
    } else {
        Err(Violation::MergeGranularity {
            operands: a.granularity,
            result: result.granularity,
        })
    }
}
