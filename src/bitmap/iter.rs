// SPDX-License-Identifier: GPL-2.0-or-later

//! Iteration over dirty groups, word by word through the summary levels.
//!
//! The cursor state (`pos`, `cur`) is the same as in QEMU's `HBitmapIter`, so the C ABI layer
//! runs these functions directly on a caller's iterator struct.

use std::ops::Range;

use super::{HBitmap, BITS_PER_LEVEL, LAST, LEVELS, SENTINEL};

/// Advances to the next nonzero word of the last level and returns it, updating `pos` (its
/// index) and the per-level `cur` masks of words still to visit. Returns 0 at the end.
///
/// # Panics
/// When a summary bit leads to a clean word, which only a deserialization without `finish`
/// leaves behind (the original asserts the same).
#[inline(always)]
pub(crate) fn skip_words(hb: &HBitmap, pos: &mut usize, cur: &mut [u64; LEVELS]) -> u64 {
    let mut index = *pos;
    let mut level = LAST;
    let mut word;
    // Climb until some level still has words to visit; level 0's sentinel stops the climb.
    loop {
        // An iterator not set up by `init` may lack the sentinel: `level` then wraps and the
        // index below panics rather than reading out of bounds.
        level = level.wrapping_sub(1);
        index >>= BITS_PER_LEVEL;
        // A level with nothing left to visit needs no load (the common case one level up
        // from a sparse word).
        word = cur[level];
        if word != 0 {
            word &= hb.levels[level][index];
            if word != 0 {
                break;
            }
        }
    }
    if level == 0 && word == SENTINEL {
        return 0;
    }
    // Descend, taking the lowest marked word at each level.
    while level < LAST {
        index = (index << BITS_PER_LEVEL) + word.trailing_zeros() as usize;
        cur[level] = word & (word - 1);
        word = hb.levels[level + 1][index];
        if word == 0 {
            stale_summary(level, index);
        }
        level += 1;
    }
    *pos = index;
    word
}

#[cold]
#[inline(never)]
fn stale_summary(level: usize, index: usize) -> ! {
    panic!(
        "hbitmap iterator: level {level} marks word {index} of level {} dirty but it is clean \
         (deserialized without finish?)",
        level + 1
    )
}

/// The next dirty group at or after the cursor, as its first item (`group << granularity`);
/// -1 at the end. With `advance` false the same item is returned again next time.
#[inline]
pub(crate) fn next_item(
    hb: &HBitmap,
    granularity: u32,
    pos: &mut usize,
    cur: &mut [u64; LEVELS],
    advance: bool,
) -> Option<u64> {
    let word = cur[LAST] & hb.levels[LAST][*pos];
    if word == 0 {
        return next_item_in_next_word(hb, granularity, pos, cur, advance);
    }
    Some(take_item(word, granularity, *pos, cur, advance))
}

/// What is left of the current word, `Some(0)` if nothing; None for a cursor position out of
/// range, which the caller reports.
#[inline(always)]
pub(crate) fn rest_of_word(hb: &HBitmap, pos: usize, cur: &[u64; LEVELS]) -> Option<u64> {
    Some(cur[LAST] & *hb.levels[LAST].get(pos)?)
}

/// `next_item` once the current word is exhausted: kept out of line so the common case needs
/// no stack frame.
#[inline(never)]
fn next_item_in_next_word(
    hb: &HBitmap,
    granularity: u32,
    pos: &mut usize,
    cur: &mut [u64; LEVELS],
    advance: bool,
) -> Option<u64> {
    item_in_next_word(hb, granularity, pos, cur, advance)
}

/// The body of [`next_item_in_next_word`], for callers that keep it out of line themselves.
#[inline(always)]
pub(crate) fn item_in_next_word(
    hb: &HBitmap,
    granularity: u32,
    pos: &mut usize,
    cur: &mut [u64; LEVELS],
    advance: bool,
) -> Option<u64> {
    match skip_words(hb, pos, cur) {
        0 => None,
        word => Some(take_item(word, granularity, *pos, cur, advance)),
    }
}

#[inline(always)]
pub(crate) fn take_item(
    word: u64,
    granularity: u32,
    pos: usize,
    cur: &mut [u64; LEVELS],
    advance: bool,
) -> u64 {
    cur[LAST] = if advance { word & (word - 1) } else { word };
    let group = ((pos as u64) << BITS_PER_LEVEL) + u64::from(word.trailing_zeros());
    group << granularity
}

/// Cursor state positioned at `group`, which must lie within the bitmap.
pub(crate) fn init(hb: &HBitmap, group: u64) -> (usize, [u64; LEVELS]) {
    debug_assert!(group < hb.groups);
    let mut cur = [0u64; LEVELS];
    let mut index = group;
    for level in (0..LEVELS).rev() {
        let bit = index & 63;
        index >>= BITS_PER_LEVEL;
        // Drop the bits before `group`; above the last level, also the bit of the word the
        // level below already holds.
        let keep = if level == LAST {
            u64::MAX << bit
        } else {
            (u64::MAX << bit) << 1
        };
        cur[level] = hb.levels[level][index as usize] & keep;
    }
    ((group >> BITS_PER_LEVEL) as usize, cur)
}

/// Iteration state over one bitmap, in the shape of QEMU's `HBitmapIter`.
pub(crate) struct Cursor {
    pub(crate) pos: usize,
    pub(crate) cur: [u64; LEVELS],
}

impl Cursor {
    pub(crate) fn at_group(hb: &HBitmap, group: u64) -> Cursor {
        let (pos, cur) = init(hb, group);
        Cursor { pos, cur }
    }

    /// The next nonzero word and its index, consuming it whole; `(usize::MAX, 0)` at the end.
    /// This is the header's `hbitmap_iter_next_word`.
    pub(crate) fn next_word(&mut self, hb: &HBitmap) -> (usize, u64) {
        let mut word = self.cur[LAST];
        if word == 0 {
            word = skip_words(hb, &mut self.pos, &mut self.cur);
            if word == 0 {
                return (usize::MAX, 0);
            }
        }
        self.cur[LAST] = 0;
        (self.pos, word)
    }
}

/// Iterator over the first item of each dirty group, in increasing order (items at or past 2^63
/// included: `HBitmap::new(3 << 62, 62)` has one).
///
/// Like QEMU's iterator it sees groups cleaned after it was created (they are skipped) but not
/// necessarily groups dirtied after it was created; the borrow rules make that moot in Rust.
pub struct Iter<'a> {
    hb: &'a HBitmap,
    cursor: Option<Cursor>,
}

impl<'a> Iter<'a> {
    pub(crate) fn new(hb: &'a HBitmap, first: u64) -> Iter<'a> {
        let group = first >> hb.granularity;
        let cursor = (group < hb.groups).then(|| Cursor::at_group(hb, group));
        Iter { hb, cursor }
    }

    /// The next dirty item without moving past it.
    pub fn peek(&mut self) -> Option<u64> {
        self.step(false)
    }

    /// The next whole nonzero word of the last level: its index and its bits. Bits of a word
    /// already partly consumed by [`next`](Iterator::next) are not returned again.
    pub fn next_word(&mut self) -> Option<(usize, u64)> {
        let cursor = self.cursor.as_mut()?;
        match cursor.next_word(self.hb) {
            (usize::MAX, _) => None,
            found => Some(found),
        }
    }

    fn step(&mut self, advance: bool) -> Option<u64> {
        let cursor = self.cursor.as_mut()?;
        next_item(
            self.hb,
            self.hb.granularity,
            &mut cursor.pos,
            &mut cursor.cur,
            advance,
        )
    }
}

impl Iterator for Iter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.step(true)
    }
}

/// Iterator over maximal dirty extents as item ranges, clipped to the bitmap's size.
pub struct Extents<'a> {
    hb: &'a HBitmap,
    next: u64,
}

impl<'a> Extents<'a> {
    pub(crate) fn new(hb: &'a HBitmap) -> Extents<'a> {
        Extents { hb, next: 0 }
    }
}

impl Iterator for Extents<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let size = self.hb.orig_size;
        let (start, count) = self
            .hb
            .next_dirty_area(self.next, size.checked_sub(self.next)?)?;
        self.next = start + count;
        Some(start..start + count)
    }
}
