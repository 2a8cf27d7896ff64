// SPDX-License-Identifier: GPL-2.0-or-later

//! Sets of blocks of last-level words, a bit per block.

use std::ops::Range;

use super::words;

/// Last-level words per block: a page's worth.
pub(crate) const BLOCK_WORDS: usize = 512;

/// A set of blocks of [`BLOCK_WORDS`] last-level words. Empty, it allocates nothing.
#[derive(Clone, Default, Debug)]
pub(crate) struct BlockSet {
    bits: Vec<u64>,
}

impl BlockSet {
    /// The blocks that hold any of `words`.
    fn blocks(words: &Range<usize>) -> Range<usize> {
        words.start / BLOCK_WORDS..words.end.div_ceil(BLOCK_WORDS)
    }

    /// Adds the blocks that hold any of `words`.
    pub(crate) fn insert(&mut self, words: Range<usize>) {
        if words.is_empty() {
            return;
        }
        let blocks = Self::blocks(&words);
        let needed = blocks.end.div_ceil(64);
        if self.bits.len() < needed {
            self.bits.resize(needed, 0);
        }
        for block in blocks {
            self.bits[block / 64] |= 1 << (block % 64);
        }
    }

    /// Whether a block that holds any of `words` is in the set.
    pub(crate) fn touches(&self, words: Range<usize>) -> bool {
        if words.is_empty() || self.bits.is_empty() {
            return false;
        }
        let blocks = Self::blocks(&words);
        let end = blocks.end.min(self.bits.len() * 64);
        blocks.start < end && !words::bits_clear(&self.bits, blocks.start..end)
    }

    /// Adds every block of `other`.
    pub(crate) fn union(&mut self, other: &BlockSet) {
        if self.bits.len() < other.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        for (mine, theirs) in self.bits.iter_mut().zip(&other.bits) {
            *mine |= theirs;
        }
    }

    /// Empties the set and frees its memory.
    pub(crate) fn clear(&mut self) {
        self.bits = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_found_by_any_of_their_words() {
        let mut set = BlockSet::default();
        assert!(!set.touches(0..100_000));
        set.insert(1000..1001);
        assert!(set.touches(512..1024));
        assert!(set.touches(1023..1025));
        assert!(!set.touches(0..512));
        assert!(!set.touches(1024..100_000));
        let mut other = BlockSet::default();
        other.insert(70 * 512..70 * 512 + 1);
        set.union(&other);
        assert!(set.touches(70 * 512 + 511..70 * 512 + 512));
        assert!(!set.touches(2 * 512..70 * 512));
        set.clear();
        assert!(!set.touches(0..100_000));
    }
}
