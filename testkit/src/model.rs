// SPDX-License-Identifier: GPL-2.0-or-later

//! The expected results of the searches, computed naively from the last level's words, with
//! the semantics of later QEMU (the size used is the current one, and the group size is 64 bits
//! wide). Models that keep one flag per group read their words through [`word_of`].

/// Groups needed for `size` items at `granularity`, exactly (no wrapping): `None` when the
/// original's rounding `size + 2^g - 1` would wrap.
pub fn groups_for(size: u64, granularity: u32) -> Option<u64> {
    let sum = u128::from(size) + (1u128 << granularity) - 1;
    (sum <= u128::from(u64::MAX)).then_some((sum >> granularity) as u64)
}

/// The first group in `from..end` whose bit is clear, reading the last level one word at a time
/// through `word(index)`.
pub fn first_clear(mut word: impl FnMut(u64) -> u64, from: u64, end: u64) -> Option<u64> {
    let mut group = from;
    while group < end {
        let bits = word(group >> 6) | ((1u64 << (group & 63)) - 1);
        if bits != u64::MAX {
            let clear = (group & !63) + u64::from(bits.trailing_ones());
            return (clear < end).then_some(clear);
        }
        group = (group | 63) + 1;
    }
    None
}

/// The first group in `from..end` whose bit is set.
pub fn first_set(mut word: impl FnMut(u64) -> u64, from: u64, end: u64) -> Option<u64> {
    let mut group = from;
    while group < end {
        let bits = word(group >> 6) & (u64::MAX << (group & 63));
        if bits != 0 {
            let set = (group & !63) + u64::from(bits.trailing_zeros());
            return (set < end).then_some(set);
        }
        group = (group | 63) + 1;
    }
    None
}

/// `hbitmap_next_zero(start, count)` as later QEMU defines it, for a bitmap of `size` items in
/// `groups` groups of `2^granularity`: the first item of the first clean group of the range (or
/// `start` itself when its group is clean), -1 when there is none. The range is clipped to the
/// bitmap; a `start` at or past the size gives -1.
pub fn expect_next_zero(
    size: u64,
    granularity: u32,
    groups: u64,
    start: u64,
    count: u64,
    word: impl FnMut(u64) -> u64,
) -> i64 {
    if start >= size || count == 0 {
        return -1;
    }
    let end_bit = if count > size - start {
        groups
    } else {
        ((start + count - 1) >> granularity) + 1
    };
    match first_clear(word, start >> granularity, end_bit) {
        None => -1,
        Some(group) => (group << granularity).max(start) as i64,
    }
}

/// `hbitmap_next_dirty_area(start, count)` as later QEMU defines it. `first_dirty` is what an
/// iterator started at `start` returns first (`hbitmap_iter_next`, -1 at the end, negative for
/// items at or past 2^63 as in the original); `word` reads the last level.
pub fn expect_next_dirty_area(
    size: u64,
    granularity: u32,
    start: u64,
    count: u64,
    first_dirty: impl FnOnce() -> i64,
    word: impl FnMut(u64) -> u64,
) -> Option<(u64, u64)> {
    if start >= size || count == 0 {
        return None;
    }
    let end = if count > size - start {
        size
    } else {
        start + count
    };
    let first = u64::try_from(first_dirty()).ok()?;
    if first >= end {
        return None;
    }
    let area_end = if u128::from(first) + (1u128 << granularity) >= u128::from(end) {
        end
    } else {
        let end_bit = ((end - 1) >> granularity) + 1;
        match first_clear(word, (first >> granularity) + 1, end_bit) {
            // A clean group whose first item reads as negative is "not found", as in the original.
            Some(group) if ((group << granularity) as i64) >= 0 => group << granularity,
            _ => end,
        }
    };
    let area_start = first.max(start);
    Some((area_start, area_end - area_start))
}

/// Set bits among the first `bits` bits of `words`.
pub fn popcount_below(words: &[u64], bits: u64) -> u64 {
    (0..bits.div_ceil(64))
        .map(|index| {
            let word = words[index as usize];
            let keep = if (index + 1) * 64 <= bits {
                u64::MAX
            } else {
                (1u64 << (bits % 64)) - 1
            };
            u64::from((word & keep).count_ones())
        })
        .sum()
}

/// In every level but the last, bit N is set iff word N of the level below is nonzero (level
/// 0's top bit is the sentinel, always set).
pub fn check_summary(hb: &hbitmap::HBitmap) -> Result<(), String> {
    if hb.level_words(0)[0] >> 63 != 1 {
        return Err("level 0 lacks its sentinel".into());
    }
    for level in 0..hbitmap::LEVELS - 1 {
        let upper = hb.level_words(level);
        let lower = hb.level_words(level + 1);
        for (index, &word) in upper.iter().enumerate() {
            for bit in 0..64 {
                if level == 0 && index == 0 && bit == 63 {
                    continue;
                }
                let below = index * 64 + bit;
                let expected = below < lower.len() && lower[below] != 0;
                if (word >> bit & 1 == 1) != expected {
                    return Err(format!(
                        "level {level} bit {below} is {} but word {below} of level {} is {:?}",
                        word >> bit & 1,
                        level + 1,
                        lower.get(below)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Word `index` of a flag-per-bit model (flag `index * 64 + n` is bit `n`), whose flags come
/// in whole words as the bitmap's do; a word past the end panics, as a model bug should.
pub fn word_of(bits: &[bool], index: u64) -> u64 {
    let first = index as usize * 64;
    bits[first..first + 64]
        .iter()
        .enumerate()
        .fold(0, |word, (bit, &set)| word | u64::from(set) << bit)
}
