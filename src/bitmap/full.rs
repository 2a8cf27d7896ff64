// SPDX-License-Identifier: GPL-2.0-or-later

//! The full-block summary: which 64-word blocks of the last level are all ones.
//!
//! Level 0 has one bit per block of 64 words of the bitmap's last level, set iff every word of
//! the block is all ones; each level above has one bit per word of the level below, set iff that
//! word is all ones, up to a single word. Finding the end of a dirty run then reads the words of
//! its first and last blocks and climbs and descends this tree in between: QEMU reads 2^18 words
//! to cross a 2^24-group run, this reads at most 128 and a few summary words. At one bit per
//! 4096 groups it costs 1/4096 of the last level, and only once some block is full: until then
//! (and after `reset_all`) it is not allocated at all, so creating a bitmap costs what it did
//! without it, and its pages are written only where a block becomes or stops being full.
//!
//! Unlike the dirty summary it is exact at all times, deserialization steps included: it
//! depends on the last level only, which is always exact.

use super::storage::Words;
use super::{words_for, BITS_PER_LEVEL};

/// Words in a block: one bit of level 0.
const BLOCK: usize = 64;

#[derive(Clone, Default)]
pub(crate) struct FullSummary {
    /// `levels[0]` summarizes the last level's blocks; the last entry is a single word. Empty
    /// while no block is full: every bit then reads as clear.
    levels: Vec<Words>,
    /// Words of the bitmap's last level that `levels[0]` covers.
    words: usize,
}

/// Whether block `block` of `last_level` is all ones (its words that exist, for the last block).
#[inline]
fn block_is_full(last_level: &[u64], block: usize) -> bool {
    let start = block * BLOCK;
    let end = (start + BLOCK).min(last_level.len());
    // Stops at the first word with a clear bit: the usual answer, at the first word read.
    last_level[start.min(end)..end]
        .iter()
        .all(|&word| word == u64::MAX)
}

/// The word summarizing words `index * 64 ..` of `below` (an upper level): bit j set iff word
/// `index * 64 + j` exists and is all ones.
#[inline]
fn full_bits(below: &[u64], index: usize) -> u64 {
    let start = index * 64;
    let end = (start + 64).min(below.len());
    below[start.min(end)..end]
        .iter()
        .enumerate()
        .fold(0, |bits, (j, &word)| {
            bits | u64::from(word == u64::MAX) << j
        })
}

/// Mask of bits `first..=last` (both within one word, taken modulo 64).
#[inline(always)]
fn mask(first: usize, last: usize) -> u64 {
    (u64::MAX >> (63 - (last & 63))) & (u64::MAX << (first & 63))
}

impl FullSummary {
    /// The summary of a last level of `words` clean words (nothing allocated).
    pub(crate) fn new(words: usize) -> FullSummary {
        FullSummary {
            levels: Vec::new(),
            words,
        }
    }

    /// Allocates the levels, all clear, for the first full block.
    fn allocate(&mut self) {
        debug_assert!(self.levels.is_empty());
        let mut bits = self.words.div_ceil(BLOCK).max(1);
        loop {
            let len = words_for(bits as u64);
            self.levels.push(Words::zeroed(len));
            if len == 1 {
                break;
            }
            bits = len;
        }
    }

    /// Follows a resize of the last level to `words` words, whose first `min(old, new)` words
    /// are unchanged and whose new words are clean: levels are resized and bits of blocks that
    /// went away are dropped. The caller then [`refresh`](Self::refresh)es the last word both
    /// sizes share, whose block (and, after a grow, new top level) may have changed.
    pub(crate) fn fit(&mut self, words: usize) {
        self.words = words;
        if self.levels.is_empty() {
            return;
        }
        let mut bits = words.div_ceil(BLOCK).max(1);
        let mut level = 0;
        loop {
            let len = words_for(bits as u64);
            match self.levels.get_mut(level) {
                Some(existing) if existing.len() != len => existing.resize_zeroed(len),
                Some(_) => {}
                None => self.levels.push(Words::zeroed(len)),
            }
            // Bits past the level's end stand for blocks or words that no longer exist.
            let tail = bits % 64;
            if tail != 0 {
                let last = &mut self.levels[level][len - 1];
                if *last >> tail != 0 {
                    *last &= (1 << tail) - 1;
                }
            }
            level += 1;
            if len == 1 {
                break;
            }
            bits = len;
        }
        self.levels.truncate(level);
    }

    /// Every word is clean.
    pub(crate) fn clear(&mut self) {
        self.levels = Vec::new();
    }

    /// Sets bit `index` of level 0 and the bits above it that this fills.
    fn mark_full(&mut self, index: usize) {
        if self.levels.is_empty() {
            self.allocate();
        }
        let mut index = index;
        for level in &mut self.levels {
            let word = &mut level[index >> BITS_PER_LEVEL];
            *word |= 1 << (index & 63);
            if *word != u64::MAX {
                return;
            }
            index >>= BITS_PER_LEVEL;
        }
    }

    /// Word `pos` of `last_level` just became all ones.
    #[inline]
    pub(crate) fn word_filled(&mut self, last_level: &[u64], pos: usize) {
        let block = pos / BLOCK;
        if block_is_full(last_level, block) {
            self.mark_full(block);
        }
    }

    /// Word `pos` of the last level was all ones and no longer is.
    #[inline]
    pub(crate) fn word_unfilled(&mut self, pos: usize) {
        let mut index = pos / BLOCK;
        for level in &mut self.levels {
            let word = &mut level[index >> BITS_PER_LEVEL];
            let was_full = *word == u64::MAX;
            *word &= !(1 << (index & 63));
            if !was_full {
                return;
            }
            index >>= BITS_PER_LEVEL;
        }
    }

    /// Words `first..=last` of the last level each lost at least one bit: no block holding one
    /// of them is full.
    pub(crate) fn words_unfilled(&mut self, first: usize, last: usize) {
        let (mut first, mut last) = (first / BLOCK, last / BLOCK);
        for level in &mut self.levels {
            // Every word of this level in first/64..=last/64 loses a bit here, so the level
            // above loses the same span, shifted: stop once nothing changes.
            let mut changed = false;
            let (first_word, last_word) = (first >> BITS_PER_LEVEL, last >> BITS_PER_LEVEL);
            for index in first_word..=last_word {
                let lo = if index == first_word { first } else { 0 };
                let hi = if index == last_word { last } else { 63 };
                let bits = mask(lo, hi);
                let word = &mut level[index];
                // Read before writing: a clean page of the summary stays unbacked.
                if *word & bits != 0 {
                    *word &= !bits;
                    changed = true;
                }
            }
            if !changed {
                return;
            }
            (first, last) = (first_word, last_word);
        }
    }

    /// Recomputes the summary of the last level's words in `range` (`last_level` being that
    /// level): of their blocks and of every level above them.
    pub(crate) fn refresh(&mut self, last_level: &[u64], range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.refresh_blocks(last_level, range.start / BLOCK..=(range.end - 1) / BLOCK);
    }

    /// Recomputes the summary of the 64-word blocks `blocks` (ascending) of `last_level`, then
    /// of every level above the span they cover: a sparse merge costs in proportion to the
    /// blocks it touched.
    pub(crate) fn refresh_blocks(
        &mut self,
        last_level: &[u64],
        blocks: impl IntoIterator<Item = usize>,
    ) {
        debug_assert_eq!(last_level.len(), self.words);
        // Only words that change are passed up: most refreshes change nothing.
        let mut changed: Option<(usize, usize)> = None;
        for block in blocks {
            let full = block_is_full(last_level, block);
            if self.levels.is_empty() {
                if !full {
                    continue;
                }
                self.allocate();
            }
            let word = &mut self.levels[0][block >> BITS_PER_LEVEL];
            let bit = 1 << (block & 63);
            let bits = if full { *word | bit } else { *word & !bit };
            if *word != bits {
                *word = bits;
                changed = Some(changed.map_or((block, block), |(first, _)| (first, block)));
            }
        }
        for level in 1..self.levels.len() {
            let Some((first, last)) = changed.take() else {
                return;
            };
            let (below, above) = self.levels.split_at_mut(level);
            let (below, above) = (&below[level - 1], &mut above[0]);
            // Bits first/64..=last/64 of this level summarize the words that changed below.
            let (first, last) = (first >> BITS_PER_LEVEL, last >> BITS_PER_LEVEL);
            for index in first >> BITS_PER_LEVEL..=last >> BITS_PER_LEVEL {
                let bits = full_bits(below, index);
                if above[index] != bits {
                    above[index] = bits;
                    changed = Some((first, last));
                }
            }
        }
    }

    /// [`refresh`](Self::refresh) of the whole last level.
    pub(crate) fn rebuild(&mut self, last_level: &[u64]) {
        self.refresh(last_level, 0..last_level.len());
    }

    /// The first word at or after `from` of `last_level` that is not all ones, if any before
    /// `end`.
    pub(crate) fn next_not_full(
        &self,
        last_level: &[u64],
        from: usize,
        end: usize,
    ) -> Option<usize> {
        let end = end.min(last_level.len());
        if from >= end {
            return None;
        }
        // The rest of the first block, word by word.
        let block_end = (from / BLOCK + 1) * BLOCK;
        if let Some(offset) = last_level[from..block_end.min(end)]
            .iter()
            .position(|&word| word != u64::MAX)
        {
            return Some(from + offset);
        }
        if block_end >= end {
            return None;
        }
        let block = self.next_block_not_full(block_end / BLOCK)?;
        let start = block * BLOCK;
        let found = last_level[start.min(end)..(start + BLOCK).min(end)]
            .iter()
            .position(|&word| word != u64::MAX)?;
        Some(start + found)
    }

    /// The first block at or after `from` whose bit of level 0 is clear: climbs until some
    /// level has a clear bit at or after the position reached, then descends through the first
    /// clear bit of each word (a clear bit stands for a word below that has one, or for a word
    /// past the end). `None` past the end.
    fn next_block_not_full(&self, from: usize) -> Option<usize> {
        if self.levels.is_empty() {
            return (from < self.words.div_ceil(BLOCK)).then_some(from);
        }
        let mut index = from;
        let mut level = 0;
        loop {
            let word = index >> BITS_PER_LEVEL;
            let clear = !*self.levels[level].get(word)? & (u64::MAX << (index & 63));
            if clear != 0 {
                index = (word << BITS_PER_LEVEL) + clear.trailing_zeros() as usize;
                break;
            }
            level += 1;
            if level == self.levels.len() {
                return None;
            }
            index = word + 1;
        }
        while level > 0 {
            level -= 1;
            let bits = *self.levels[level].get(index)?;
            index = (index << BITS_PER_LEVEL) + (!bits).trailing_zeros() as usize;
        }
        Some(index)
    }
}

/// For tests of the bitmap: whether `summary` is exactly what `last_level` makes.
#[cfg(test)]
pub(crate) fn is_exact(summary: &FullSummary, last_level: &[u64]) -> bool {
    let mut fresh = FullSummary::new(last_level.len());
    fresh.rebuild(last_level);
    summary.words == last_level.len() && summary.same_bits(&fresh)
}

#[cfg(test)]
impl FullSummary {
    /// Whether both summaries have the same bits, an unallocated one reading as all clear.
    fn same_bits(&self, other: &FullSummary) -> bool {
        let all_clear = |summary: &FullSummary| {
            summary
                .levels
                .iter()
                .all(|level| level.iter().all(|&word| word == 0))
        };
        match (self.levels.is_empty(), other.levels.is_empty()) {
            (true, true) => true,
            (true, false) => all_clear(other),
            (false, true) => all_clear(self),
            (false, false) => {
                self.levels.len() == other.levels.len()
                    && self
                        .levels
                        .iter()
                        .zip(&other.levels)
                        .all(|(a, b)| a[..] == b[..])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(words: &[u64], from: usize, end: usize) -> Option<usize> {
        (from..end).find(|&i| words[i] != u64::MAX)
    }

    fn check(summary: &FullSummary, words: &[u64]) {
        let mut fresh = FullSummary::new(words.len());
        fresh.rebuild(words);
        assert!(summary.same_bits(&fresh), "levels differ from a rebuild");
        // Under Miri, whose every step is thousands of times slower, fewer probes.
        let probes = if cfg!(miri) { 4 } else { 300 };
        for from in (0..words.len())
            .step_by((words.len() / probes).max(7))
            .chain([words.len().saturating_sub(1)])
        {
            for end in [from, from + 1, words.len() / 2, words.len()] {
                assert_eq!(
                    summary.next_not_full(words, from, end),
                    scan(words, from, end)
                );
            }
        }
    }

    // Minutes under Miri, and full.rs has no unsafe code of its own: the other tests reach its
    // storage's.
    #[cfg_attr(miri, ignore)]
    #[test]
    fn follows_fills_and_unfills_across_levels() {
        for len in [
            1usize,
            63,
            64,
            65,
            4096,
            4097,
            64 * 64 * 3 + 5,
            64 * 64 * 65 + 1,
        ] {
            let mut words = vec![0u64; len];
            let mut summary = FullSummary::new(len);
            // Fill everything word by word, then open holes.
            for pos in 0..len {
                words[pos] = u64::MAX;
                summary.word_filled(&words, pos);
            }
            check(&summary, &words);
            for pos in (0..len).step_by(97 + len / 100) {
                words[pos] = 1;
                summary.word_unfilled(pos);
            }
            check(&summary, &words);
            let (first, last) = (len / 3, len / 2);
            words[first..=last].iter_mut().for_each(|w| *w &= !2);
            summary.words_unfilled(first, last);
            check(&summary, &words);
            words.iter_mut().for_each(|w| *w = u64::MAX);
            summary.refresh(&words, 0..len);
            check(&summary, &words);
        }
    }

    #[test]
    fn fit_drops_words_that_went_away_and_keeps_the_rest() {
        let mut words = vec![u64::MAX; 64 * 64 + 3];
        let mut summary = FullSummary::new(words.len());
        summary.rebuild(&words);
        for len in [64 * 64 + 3, 64 * 64, 100, 64, 5, 1, 64 * 65] {
            let old = words.len();
            words.resize(len, 0);
            summary.fit(len);
            summary.refresh(&words, old.min(len).saturating_sub(1)..len.min(old));
            check(&summary, &words);
        }
    }

    #[test]
    fn refreshing_blocks_covers_the_levels_above_their_span() {
        let mut words = vec![0u64; 64 * 64 * 2 + 9];
        let mut summary = FullSummary::new(words.len());
        for block in [3usize, 70, 128] {
            let end = (block * 64 + 64).min(words.len());
            words[block * 64..end].fill(u64::MAX);
        }
        summary.refresh_blocks(&words, [3, 70, 128]);
        check(&summary, &words);
        assert_eq!(
            summary.next_not_full(&words, 3 * 64, words.len()),
            Some(4 * 64)
        );
        assert_eq!(summary.next_not_full(&words, 128 * 64, words.len()), None);
    }
}
