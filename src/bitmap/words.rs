// SPDX-License-Identifier: GPL-2.0-or-later

//! Whole-array word loops: popcounts and summaries over the last level.
//!
//! These run over every word of a bitmap (deserialize_finish, merge, recount), so they are
//! compiled twice: portably, and with the `popcnt` instruction for CPUs that have it (chosen
//! at run time; x86-64's baseline lacks it and its software popcount costs a dozen
//! instructions per word).
#![allow(unsafe_code)]

use std::ops::Range;

/// Popcount of `words`.
pub(crate) fn popcount(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU supports popcnt, checked just above.
        return unsafe { x86::popcount(words) };
    }
    popcount_portable(words)
}

/// Sets `summary` to one bit per nonzero word of `words` (64 words per summary word), clearing
/// its other bits, and returns the popcount of `words`: one pass does both.
pub(crate) fn summarize(words: &[u64], summary: &mut [u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU supports popcnt, checked just above.
        return unsafe { x86::summarize(words, summary) };
    }
    summarize_portable(words, summary)
}

#[inline(always)]
fn popcount_portable(words: &[u64]) -> u64 {
    words.iter().map(|word| u64::from(word.count_ones())).sum()
}

#[inline(always)]
fn summarize_portable(words: &[u64], summary: &mut [u64]) -> u64 {
    let mut total = 0u64;
    for (out, block) in summary.iter_mut().zip(words.chunks(64)) {
        let mut bits = 0u64;
        let mut ones = 0u64;
        for (index, &word) in block.iter().enumerate() {
            bits |= u64::from(word != 0) << index;
            ones += u64::from(word.count_ones());
        }
        // Written only when it changes: the summary of a fresh, mostly clean bitmap keeps its
        // untouched pages.
        if *out != bits {
            *out = bits;
        }
        total += ones;
    }
    let covered = words.len().div_ceil(64).min(summary.len());
    summary[covered..].fill(0);
    total
}

/// `dst = a | b` block by block (64 words under each summary bit), skipping blocks clean in
/// all three per `summaries` (of `a`, `b`, `dst`) and zeroing blocks dirty only in `dst`.
/// Returns the popcount of `dst` afterwards: the merge counts as it writes.
pub(crate) fn or_dirty_blocks(dst: &mut [u64], src: [&[u64]; 2], summaries: [&[u64]; 3]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU supports popcnt, checked just above.
        return unsafe { x86::or_dirty_blocks(dst, src, summaries) };
    }
    or_dirty_blocks_portable(dst, src, summaries)
}

#[inline(always)]
fn or_dirty_blocks_portable(dst: &mut [u64], src: [&[u64]; 2], summaries: [&[u64]; 3]) -> u64 {
    let len = dst.len();
    let mut ones = 0u64;
    for (index, ((&sa, &sb), &sd)) in summaries[0]
        .iter()
        .zip(summaries[1])
        .zip(summaries[2])
        .enumerate()
    {
        if sa | sb | sd == 0 {
            continue;
        }
        let range = index * 64..(index * 64 + 64).min(len);
        let (d, a, b) = (
            &mut dst[range.clone()],
            &src[0][range.clone()],
            &src[1][range],
        );
        if sa | sb == 0 {
            d.fill(0);
        } else {
            for (d, (a, b)) in d.iter_mut().zip(a.iter().zip(b)) {
                *d = a | b;
                ones += u64::from(d.count_ones());
            }
        }
    }
    ones
}

/// Whether bits `range` of `bits` (bit `i` is bit `i % 64` of word `i / 64`) are all clear.
pub(crate) fn bits_clear(bits: &[u64], range: Range<usize>) -> bool {
    if range.is_empty() {
        return true;
    }
    let (first, last) = (range.start / 64, (range.end - 1) / 64);
    let head = u64::MAX << (range.start % 64);
    let tail = u64::MAX >> (63 - (range.end - 1) % 64);
    if first == last {
        return bits[first] & head & tail == 0;
    }
    bits[first] & head == 0
        && bits[first + 1..last].iter().all(|&word| word == 0)
        && bits[last] & tail == 0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "popcnt")]
    pub(super) fn popcount(words: &[u64]) -> u64 {
        super::popcount_portable(words)
    }

    #[target_feature(enable = "popcnt")]
    pub(super) fn or_dirty_blocks(
        dst: &mut [u64],
        src: [&[u64]; 2],
        summaries: [&[u64]; 3],
    ) -> u64 {
        super::or_dirty_blocks_portable(dst, src, summaries)
    }

    #[target_feature(enable = "popcnt")]
    pub(super) fn summarize(words: &[u64], summary: &mut [u64]) -> u64 {
        super::summarize_portable(words, summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_clear_looks_at_exactly_the_range() {
        let bits = [0u64, 1 << 5, 0, 1 << 63];
        for (range, clear) in [
            (0..64, true),
            (0..69, true),
            (0..70, false),
            (64..69, true),
            (69..70, false),
            (70..255, true),
            (70..256, false),
            (10..10, true),
            (255..256, false),
        ] {
            assert_eq!(bits_clear(&bits, range.clone()), clear, "{range:?}");
        }
    }

    #[test]
    fn summary_and_popcount_agree_with_a_plain_loop() {
        let words: Vec<u64> = (0..200u64)
            .map(|i| if i % 3 == 0 { 0 } else { i * 0x9e37_79b9 })
            .collect();
        let mut summary = vec![u64::MAX; 5];
        let total = summarize(&words, &mut summary);
        assert_eq!(
            total,
            words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>()
        );
        assert_eq!(popcount(&words), total);
        for (index, word) in words.iter().enumerate() {
            assert_eq!(
                summary[index / 64] >> (index % 64) & 1 == 1,
                *word != 0,
                "word {index}"
            );
        }
        assert_eq!(summary[4], 0);
    }

    /// The dispatched loops (the `popcnt` build where the CPU has it) and the portable ones give
    /// the same results. Under Miri the `popcnt` build is dispatched to only when the feature is
    /// enabled at compile time (`.ci/test-miri` builds with `-C target-feature=+popcnt`): Miri
    /// reports every other feature as absent.
    #[test]
    fn dispatched_and_portable_loops_agree() {
        let words = |seed: u64| -> Vec<u64> {
            (0..64 * 5 + 7u64)
                .map(|i| {
                    // Block 3 clean in both operands; the others clean, sparse or dense.
                    match (i / 64 + seed) % 4 {
                        _ if i / 64 == 3 => 0,
                        1 => 0,
                        2 if i % 5 != 0 => 0,
                        _ => (i + seed).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    }
                })
                .collect()
        };
        let (a, b) = (words(0), words(1));
        assert_eq!(popcount(&a), popcount_portable(&a));
        let summary = |words: &[u64]| {
            let mut fast = vec![u64::MAX; 7];
            let mut portable = vec![u64::MAX; 7];
            let total = summarize(words, &mut fast);
            assert_eq!(total, summarize_portable(words, &mut portable));
            assert_eq!(fast, portable);
            fast
        };
        let (sa, sb) = (summary(&a), summary(&b));
        // A destination dirty where neither operand is (block 3), so it is zeroed there.
        let mut dst = vec![0u64; a.len()];
        dst[3 * 64 + 3] = 1;
        let sd = summary(&dst);
        let mut portable = dst.clone();
        let ones = or_dirty_blocks(&mut dst, [&a, &b], [&sa, &sb, &sd]);
        let portable_ones = or_dirty_blocks_portable(&mut portable, [&a, &b], [&sa, &sb, &sd]);
        assert_eq!(dst, portable);
        assert_eq!(ones, portable_ones);
        let or: Vec<u64> = a.iter().zip(&b).map(|(a, b)| a | b).collect();
        assert_eq!(dst, or);
        assert_eq!(ones, popcount(&or));
    }
}
