// SPDX-License-Identifier: GPL-2.0-or-later

//! Setting and resetting ranges of groups, level by level.
//!
//! Each level is updated over a bit range; a change is propagated to the level above over the
//! range of words touched, exactly when and where the original propagates it, so that the
//! summary levels (and the meta bitmap, which follows the same "changed" answers) match it bit
//! for bit. The last level also counts the bits it flips, so no second pass is needed.

use super::{word_mask, words, HBitmap, BITS_PER_LEVEL, LAST};

/// Sets bits `start..=last` of one level. Returns whether the level above needs updating: a
/// first or last word changed, or a middle word was zero. With `COUNT`, adds the newly set bits
/// to `added`.
#[inline]
fn set_range<const COUNT: bool>(words: &mut [u64], start: u64, last: u64, added: &mut u64) -> bool {
    let pos = (start >> BITS_PER_LEVEL) as usize;
    let lastpos = (last >> BITS_PER_LEVEL) as usize;
    if pos == lastpos {
        let old = words[pos];
        let new = old | word_mask(start, last);
        words[pos] = new;
        *added += u64::from((new ^ old).count_ones());
        return new != old;
    }
    let old = words[pos];
    let new = old | word_mask(start, 63);
    words[pos] = new;
    *added += u64::from((new ^ old).count_ones());
    let mut changed = new != old;
    let middle = &mut words[pos + 1..lastpos];
    if !middle.is_empty() {
        changed |= middle.contains(&0);
        if COUNT {
            *added += 64 * middle.len() as u64 - words::popcount(middle);
        }
        middle.fill(u64::MAX);
    }
    let old = words[lastpos];
    let new = old | word_mask(0, last);
    words[lastpos] = new;
    *added += u64::from((new ^ old).count_ones());
    changed | (new != old)
}

/// Clears bits `start..=last` of one level. Returns the range of this level's words that
/// became blank (for the level above), or `None` when none did. Adds the cleared bits to
/// `removed`. With the (still unmodified, consistent) level above as `summary`, the words in the
/// middle of the range are visited only where the summary marks them dirty, so cleaning a huge,
/// mostly clean range costs in proportion to what is dirty.
#[inline]
fn reset_range(
    words: &mut [u64],
    summary: Option<&[u64]>,
    start: u64,
    last: u64,
    removed: &mut u64,
) -> Option<(u64, u64)> {
    let mut pos = start >> BITS_PER_LEVEL;
    let mut lastpos = last >> BITS_PER_LEVEL;
    let mut changed = false;
    // The first and last words are passed up only if they became entirely zero.
    let clear = |word: &mut u64, mask: u64, removed: &mut u64| {
        let old = *word;
        *word = old & !mask;
        *removed += u64::from((old & mask).count_ones());
        old != 0 && old & !mask == 0
    };
    if pos < lastpos {
        if clear(&mut words[pos as usize], word_mask(start, 63), removed) {
            changed = true;
        } else {
            pos += 1;
        }
        let middle = (start >> BITS_PER_LEVEL) as usize + 1..lastpos as usize;
        // Some middle word was nonzero iff the middle had set bits.
        let ones = match summary {
            Some(summary) => clear_marked_words(words, summary, middle),
            None => {
                let middle = &mut words[middle];
                let ones = words::popcount(middle);
                middle.fill(0);
                ones
            }
        };
        changed |= ones != 0;
        *removed += ones;
        if clear(&mut words[lastpos as usize], word_mask(0, last), removed) {
            changed = true;
        } else {
            lastpos = lastpos.wrapping_sub(1);
        }
    } else if clear(&mut words[pos as usize], word_mask(start, last), removed) {
        changed = true;
    } else {
        lastpos = lastpos.wrapping_sub(1);
    }
    changed.then_some((pos, lastpos))
}

/// Zeroes the words in `range` that `summary` marks as nonzero and returns their popcount.
fn clear_marked_words(words: &mut [u64], summary: &[u64], range: std::ops::Range<usize>) -> u64 {
    let mut ones = 0;
    let mut index = range.start;
    while index < range.end {
        // The summary word covering `index`, without the bits before it or past the range.
        let base = index & !63;
        let mut marks = summary[index >> BITS_PER_LEVEL] & (u64::MAX << (index & 63));
        let end = range.end - base;
        if end < 64 {
            marks &= (1u64 << end) - 1;
        }
        while marks != 0 {
            let word = &mut words[base + marks.trailing_zeros() as usize];
            ones += u64::from(word.count_ones());
            *word = 0;
            marks &= marks - 1;
        }
        index = base + 64;
    }
    ones
}

impl HBitmap {
    /// Sets groups `first..=last` (the checked form of the item range `start`, `count`), then the
    /// summary levels and the meta bitmap.
    #[inline]
    pub(crate) fn set_groups(&mut self, start: u64, count: u64, first: u64, last: u64) {
        let pos = (first >> BITS_PER_LEVEL) as usize;
        if self.stale || pos != (last >> BITS_PER_LEVEL) as usize {
            return self.set_groups_general(start, count, first, last);
        }
        // One word of a consistent bitmap: the guest write path.
        let word = &mut self.levels[LAST][pos];
        let old = *word;
        let new = old | word_mask(first, last);
        if new == old {
            return;
        }
        *word = new;
        self.count = self.count.wrapping_add(u64::from((new ^ old).count_ones()));
        if old == 0 {
            self.mark_in_summary(pos);
        }
        if new == u64::MAX {
            self.full.word_filled(&self.levels[LAST], pos);
        }
        if let Some(meta) = self.meta.as_mut() {
            meta.set(start, count);
        }
    }

    /// Marks word `pos` of the last level, which just became nonzero, in the summary levels of a
    /// consistent bitmap: up to the first level whose word was already nonzero.
    #[inline]
    fn mark_in_summary(&mut self, pos: usize) {
        let mut index = pos;
        for level in (0..LAST).rev() {
            let word = &mut self.levels[level][index >> BITS_PER_LEVEL];
            let old = *word;
            *word = old | 1 << (index & 63);
            if old != 0 {
                return;
            }
            index >>= BITS_PER_LEVEL;
        }
    }

    /// Clears word `pos` of the last level, which just became zero, from the summary levels of a
    /// consistent bitmap: up to the first level whose word keeps other bits.
    #[inline]
    fn unmark_in_summary(&mut self, pos: usize) {
        let mut index = pos;
        for level in (0..LAST).rev() {
            let word = &mut self.levels[level][index >> BITS_PER_LEVEL];
            *word &= !(1 << (index & 63));
            if *word != 0 {
                return;
            }
            index >>= BITS_PER_LEVEL;
        }
    }

    #[inline(never)]
    fn set_groups_general(&mut self, start: u64, count: u64, first: u64, last: u64) {
        let mut added = 0;
        let changed = if self.stale {
            // Count as the original does, through the (stale) summary.
            let already = self.count_between_via_summary(first, last);
            added = (last - first + 1).wrapping_sub(already);
            self.set_levels(first, last, &mut 0)
        } else {
            self.set_levels(first, last, &mut added)
        };
        self.count = self.count.wrapping_add(added);
        if changed {
            if let Some(meta) = self.meta.as_mut() {
                meta.set(start, count);
            }
        }
    }

    /// Sets bits `first..=last` of the last level and propagates; true if the last level changed.
    fn set_levels(&mut self, first: u64, last: u64, added: &mut u64) -> bool {
        let changed = set_range::<true>(&mut self.levels[LAST], first, last, added);
        // Middle words that were dirty already may have become full without the dirty summary
        // seeing a change.
        let words = (first >> BITS_PER_LEVEL) as usize..(last >> BITS_PER_LEVEL) as usize + 1;
        self.full.refresh(&self.levels[LAST], words);
        if !changed {
            return false;
        }
        let (mut start, mut last) = (first >> BITS_PER_LEVEL, last >> BITS_PER_LEVEL);
        let mut ignored = 0;
        for level in (0..LAST).rev() {
            if !set_range::<false>(&mut self.levels[level], start, last, &mut ignored) {
                break;
            }
            start >>= BITS_PER_LEVEL;
            last >>= BITS_PER_LEVEL;
        }
        true
    }

    /// Resets groups `first..=last` (the checked form of the item range `start`, `count`), then
    /// the summary levels and, if a word became blank, the meta bitmap.
    #[inline]
    pub(crate) fn reset_groups(&mut self, start: u64, count: u64, first: u64, last: u64) {
        let pos = (first >> BITS_PER_LEVEL) as usize;
        if self.stale || pos != (last >> BITS_PER_LEVEL) as usize {
            return self.reset_groups_general(start, count, first, last);
        }
        // One word of a consistent bitmap.
        let word = &mut self.levels[LAST][pos];
        let old = *word;
        let mask = word_mask(first, last);
        let new = old & !mask;
        if new == old {
            return;
        }
        *word = new;
        if old == u64::MAX {
            self.full.word_unfilled(pos);
        }
        // Wrapping, as the original's: a truncate over dirty padding bits leaves them uncounted.
        self.count = self
            .count
            .wrapping_sub(u64::from((old & mask).count_ones()));
        if new == 0 {
            self.unmark_in_summary(pos);
            if let Some(meta) = self.meta.as_mut() {
                meta.set(start, count);
            }
        }
    }

    #[inline(never)]
    fn reset_groups_general(&mut self, start: u64, count: u64, first: u64, last: u64) {
        let mut removed = 0;
        let blanked = if self.stale {
            removed = self.count_between_via_summary(first, last);
            self.reset_levels(first, last, &mut 0)
        } else {
            self.reset_levels(first, last, &mut removed)
        };
        self.count = self.count.wrapping_sub(removed);
        if blanked {
            if let Some(meta) = self.meta.as_mut() {
                meta.set(start, count);
            }
        }
    }

    /// Clears bits `first..=last` of the last level and propagates; true if a word of the last
    /// level became blank (the original's notion of "changed" for the meta bitmap).
    fn reset_levels(&mut self, first: u64, last: u64, removed: &mut u64) -> bool {
        self.full.words_unfilled(
            (first >> BITS_PER_LEVEL) as usize,
            (last >> BITS_PER_LEVEL) as usize,
        );
        // The summary can guide the clearing only while it matches the level below.
        let guided = !self.stale;
        let (upper, lower) = self.levels.split_at_mut(LAST);
        let summary = guided.then_some(&upper[LAST - 1][..]);
        let Some(mut range) = reset_range(&mut lower[0], summary, first, last, removed) else {
            return false;
        };
        let mut ignored = 0;
        for level in (0..LAST).rev() {
            let (upper, lower) = self.levels.split_at_mut(level);
            let summary = upper.last().filter(|_| guided).map(|words| &words[..]);
            match reset_range(&mut lower[0], summary, range.0, range.1, &mut ignored) {
                Some(next) => range = next,
                None => break,
            }
        }
        true
    }
}
