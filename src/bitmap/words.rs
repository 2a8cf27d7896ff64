//! Whole-array word loops: popcounts and summaries over the last level.
//!
//! These run over every word of a bitmap (deserialize_finish, merge, recount), so they are
//! compiled twice: portably, and with the `popcnt` instruction for CPUs that have it (chosen
//! at run time; x86-64's baseline lacks it and its software popcount costs a dozen
//! instructions per word).

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
        *out = bits;
        total += ones;
    }
    let covered = words.len().div_ceil(64).min(summary.len());
    summary[covered..].fill(0);
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "popcnt")]
    pub(super) fn popcount(words: &[u64]) -> u64 {
        super::popcount_portable(words)
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
}
