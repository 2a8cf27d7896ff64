// SPDX-License-Identifier: GPL-2.0-or-later

//! Unit tests of the core against hand-worked examples and a plain bit vector.

use super::*;

/// `native`, or `miri` under Miri, which interprets every access thousands of times slower:
/// a smaller size that still spans every level (and, past `storage::LARGE_BYTES / 8` words,
/// a mapped last level).
const fn sized(native: u64, miri: u64) -> u64 {
    if cfg!(miri) {
        miri
    } else {
        native
    }
}

fn items(bitmap: &HBitmap) -> Vec<u64> {
    bitmap.iter().collect()
}

#[test]
fn word_mask_covers_inclusive_bit_ranges() {
    assert_eq!(word_mask(0, 63), u64::MAX);
    assert_eq!(word_mask(0, 0), 1);
    assert_eq!(word_mask(63, 63), 1 << 63);
    assert_eq!(word_mask(4, 7), 0xf0);
    assert_eq!(word_mask(64 + 4, 64 + 7), 0xf0);
}

#[test]
fn granularity_example_from_the_original() {
    // The size-16, granularity-1 example of util/hbitmap.c.
    let mut bitmap = HBitmap::new(16, 1).unwrap();
    bitmap.set(0, 9);
    assert_eq!(items(&bitmap), [0, 2, 4, 6, 8]);
    bitmap.reset(1, 3);
    assert_eq!(items(&bitmap), [4, 6, 8]);
    bitmap.set(9, 2);
    assert_eq!(items(&bitmap), [4, 6, 8, 10]);
    // The comment in the original says this empties the bitmap, but its code (and so this one)
    // keeps group 5: items 5..=9 end in group 4.
    bitmap.reset(5, 5);
    assert_eq!(items(&bitmap), [10]);
}

#[test]
fn level_sizes_and_sentinel() {
    let bitmap = HBitmap::new(1 << 20, 0).unwrap();
    let sizes: Vec<usize> = (0..LEVELS)
        .map(|level| bitmap.level_words(level).len())
        .collect();
    assert_eq!(sizes, [1, 1, 1, 1, 4, 256, 16384]);
    assert_eq!(bitmap.level_words(0)[0], SENTINEL);
    // Size 0 still has one word per level.
    let empty = HBitmap::new(0, 3).unwrap();
    assert!((0..LEVELS).all(|level| empty.level_words(level).len() == 1));
    assert_eq!(empty.iter().next(), None);
}

#[test]
fn new_rejects_bad_granularity_and_size() {
    assert_eq!(
        HBitmap::new(1, 64).unwrap_err(),
        BitmapError::Granularity(64)
    );
    assert!(matches!(
        HBitmap::new(u64::MAX, 0),
        Err(BitmapError::TooLarge { .. })
    ));
    assert!(HBitmap::new(MAX_GROUPS + 1, 0).is_err());
}

#[test]
fn counts_are_scaled_by_granularity() {
    let mut bitmap = HBitmap::new(1000, 3).unwrap();
    bitmap.set(9, 1);
    assert_eq!(bitmap.count(), 8);
    assert_eq!(bitmap.dirty_groups(), 1);
    bitmap.set(0, 1000);
    assert_eq!(bitmap.dirty_groups(), 125);
}

#[test]
fn set_and_reset_propagate_through_every_level() {
    let size = sized(1 << 30, 1 << 20);
    let mut bitmap = HBitmap::new(size, 0).unwrap();
    bitmap.set(size - 1, 1);
    for level in 1..LEVELS {
        assert!(
            bitmap.level_words(level).iter().any(|&w| w != 0),
            "level {level}"
        );
    }
    assert_eq!(items(&bitmap), [size - 1]);
    bitmap.reset(size - 1, 1);
    for level in 1..LEVELS {
        assert!(
            bitmap.level_words(level).iter().all(|&w| w == 0),
            "level {level}"
        );
    }
}

#[test]
fn reset_all_clears_sparse_and_dense_bitmaps() {
    let size = sized(1 << 24, 1 << 19);
    let mut bitmap = HBitmap::new(size, 0).unwrap();
    for start in (0..size).step_by(sized(999_983, 31_249) as usize) {
        bitmap.set(start, 300);
    }
    bitmap.set(sized(5_000_000, 156_250), sized(100_000, 3_125));
    bitmap.reset_all();
    assert!(bitmap.is_empty());
    for level in 1..LEVELS {
        assert!(
            bitmap.level_words(level).iter().all(|&w| w == 0),
            "level {level}"
        );
    }
    assert_eq!(bitmap.level_words(0), [SENTINEL]);
    assert_eq!(bitmap.iter().next(), None);
}

#[test]
fn stale_summary_counts_through_the_summary() {
    // A deserialization step without finish leaves the summary stale: set does not see the
    // dirty word the summary does not know of, and counts its bits as newly set, as the
    // original does (a popcount of the changes would say 64).
    let mut bitmap = HBitmap::new(64 * 64, 0).unwrap();
    bitmap.deserialize_ones(64, 64, false);
    bitmap.deserialize_ones(256, 64, false);
    bitmap.set(0, 128);
    assert_eq!(bitmap.dirty_groups(), 128);
    bitmap.deserialize_finish();
    assert_eq!(bitmap.dirty_groups(), 192);
}

/// Deserializes zeros over all of `bitmap` (finishing) and checks that it is clean: no page of
/// words that an earlier, unfinished deserialization made dirty may be taken for clean.
fn deserialize_zeros_leave_it_clean(mut bitmap: HBitmap, what: &str) {
    let len = bitmap.serialization_size(0, bitmap.size()) as usize;
    bitmap.deserialize_part(&vec![0; len], 0, bitmap.size(), true);
    assert_eq!(bitmap.dirty_groups(), 0, "{what}");
    assert_eq!(bitmap.iter().next(), None, "{what}");
    assert!(bitmap.levels[LAST].iter().all(|&word| word == 0), "{what}");
}

#[test]
fn unfinished_deserializations_are_followed_through_merge_and_truncate() {
    // Large enough to hold whole pages of words, wherever the heap puts them.
    let size = sized(1 << 20, 1 << 17);
    let stale = || {
        let mut bitmap = HBitmap::new(size, 0).unwrap();
        // A dirty bit first: merging a bitmap that counts none is a no-op.
        bitmap.set(0, 1);
        let half = size / 2;
        let len = bitmap.serialization_size(0, half) as usize;
        bitmap.deserialize_part(&vec![0x5a; len], 0, half, false);
        bitmap.deserialize_ones(half, half, false);
        bitmap
    };
    deserialize_zeros_leave_it_clean(stale(), "deserialized");
    deserialize_zeros_leave_it_clean(stale().clone(), "clone");

    let mut merged = HBitmap::new(size, 0).unwrap();
    assert!(merged.merge(&stale()));
    deserialize_zeros_leave_it_clean(merged, "merge");

    let mut result = HBitmap::new(size, 0).unwrap();
    let clean = HBitmap::new(size, 0).unwrap();
    assert!(HBitmap::merge_into(&clean, &stale(), &mut result));
    deserialize_zeros_leave_it_clean(result, "merge_into");

    let mut cut = stale();
    cut.truncate(size / 2);
    deserialize_zeros_leave_it_clean(cut, "truncate");

    let mut zeroed = stale();
    zeroed.deserialize_zeroes(0, size, true);
    assert!(zeroed.levels[LAST].iter().all(|&word| word == 0));
}

#[test]
fn meta_marks_set_changes_and_blanking_resets() {
    let mut bitmap = HBitmap::new(1 << 16, 0).unwrap();
    bitmap.create_meta(512);
    bitmap.set(1000, 10);
    assert_eq!(bitmap.meta().unwrap().iter().collect::<Vec<_>>(), [512]);
    bitmap.meta_mut().unwrap().reset_all();
    bitmap.set(1000, 10); // no change
    assert!(bitmap.meta().unwrap().is_empty());
    bitmap.set(1030, 1);
    bitmap.meta_mut().unwrap().reset_all();
    bitmap.reset(1000, 1); // the word keeps bits: not a blanking reset
    assert!(bitmap.meta().unwrap().is_empty());
    bitmap.reset(960, 100); // words 15 and 16 become clean
    assert_eq!(
        bitmap.meta().unwrap().iter().collect::<Vec<_>>(),
        [512, 1024]
    );
    assert!(bitmap.free_meta());
    assert!(!bitmap.free_meta());
}

#[test]
fn truncate_grows_and_shrinks() {
    let mut bitmap = HBitmap::new(1000, 0).unwrap();
    bitmap.set(900, 100);
    bitmap.truncate(950);
    assert_eq!(bitmap.size(), 950);
    assert_eq!(bitmap.count(), 50);
    bitmap.truncate(1 << 20);
    assert_eq!(bitmap.count(), 50);
    assert_eq!(bitmap.next_zero(900, 1 << 20), Some(950));
    bitmap.set((1 << 20) - 1, 1);
    assert_eq!(items(&bitmap).last(), Some(&((1 << 20) - 1)));
}

#[test]
fn merges_follow_qemu_4_2() {
    let mut a = HBitmap::new(4096, 2).unwrap();
    let b = HBitmap::new(4096, 2).unwrap();
    let mut result = HBitmap::new(4096, 2).unwrap();
    a.set(100, 1);
    result.set(3000, 1);
    assert!(HBitmap::merge_into(&a, &b, &mut result));
    assert_eq!(items(&result), [100]);
    let other = HBitmap::new(4096, 3).unwrap();
    assert!(!a.merge(&other));
}

#[test]
fn extents_are_maximal_and_clipped() {
    let mut bitmap = HBitmap::new(1000, 4).unwrap();
    bitmap.set(0, 1);
    bitmap.set(16, 16);
    bitmap.set(995, 1);
    assert_eq!(bitmap.extents().collect::<Vec<_>>(), [0..32, 992..1000]);
}

#[test]
fn next_word_and_peek() {
    let mut bitmap = HBitmap::new(256, 0).unwrap();
    bitmap.set(3, 2);
    bitmap.set(130, 1);
    let mut iter = bitmap.iter();
    assert_eq!(iter.peek(), Some(3));
    assert_eq!(iter.next(), Some(3));
    assert_eq!(iter.next_word(), Some((0, 0b10000)));
    assert_eq!(iter.next_word(), Some((2, 0b100)));
    assert_eq!(iter.next_word(), None);
}

#[test]
fn debug_shows_shape_and_extents() {
    let mut bitmap = HBitmap::new(1 << 20, 9).unwrap();
    bitmap.set(4096, 1);
    let text = format!("{bitmap:?}");
    assert!(text.contains("granularity: 9"), "{text}");
    assert!(text.contains("4096..4608"), "{text}");
}

#[test]
fn level_lengths_follow_the_size_through_truncates() {
    let mut bitmap = HBitmap::new(100, 0).unwrap();
    for size in [100u64, 1 << 20, 65, 64, 1, 0, 4097, (1 << 18) + 1, 3] {
        bitmap.truncate(size);
        let mut bits = bitmap.groups();
        for level in (0..LEVELS).rev() {
            assert_eq!(
                bitmap.level_words(level).len(),
                words_for(bits),
                "size {size} level {level}"
            );
            bits = words_for(bits) as u64;
        }
    }
}

#[test]
fn regrown_bitmaps_are_clean_past_the_old_end() {
    // Large enough for the last level to be a mapping of its own; the shrink keeps part of a
    // page whose old bits must not come back.
    let size = sized(1 << 24, 1 << 18);
    let mut bitmap = HBitmap::new(size, 0).unwrap();
    bitmap.set(0, size);
    for (shrink, grow) in [
        (size - 100, size),
        (sized(1 << 20, 1 << 16) + 7, size),
        (5000, 2 * size),
    ] {
        bitmap.truncate(shrink);
        assert_eq!(bitmap.count(), shrink);
        bitmap.truncate(grow);
        assert_eq!(bitmap.count(), shrink, "{shrink} -> {grow}");
        assert_eq!(bitmap.next_zero(0, grow), Some(shrink));
        assert_eq!(bitmap.iter_from(shrink).next(), None);
        bitmap.set(0, grow);
    }
}

/// The full-block summary follows every operation that changes the last level, across long
/// runs of full words, truncates, merges and deserialization steps; next_zero agrees with a
/// plain scan.
#[test]
fn full_block_summary_stays_exact() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let cases = if cfg!(miri) {
        [(64 * 64 + 17, 0u32), (1 << 13, 2), (4095, 0)]
    } else {
        [(64 * 64 * 64 * 3 + 17, 0u32), (1 << 20, 2), (4095, 0)]
    };
    for &(size, granularity) in &cases {
        let mut bitmap = HBitmap::new(size, granularity).unwrap();
        let mut other = HBitmap::new(size, granularity).unwrap();
        for step in 0..sized(1000, 60) {
            let size = bitmap.size();
            let start = next(size);
            let long = next(4) == 0;
            let count = 1 + next(if long { size - start } else { 300 });
            let count = count.min(size - start);
            match next(9) {
                0..=2 => bitmap.set(start, count),
                3 => bitmap.reset(start, count),
                4 => {
                    other.reset_all();
                    other.set(start, count);
                    assert!(bitmap.merge(&other));
                }
                5 => {
                    let chunk = bitmap.serialization_align() * (1 + next(4));
                    let first = start / chunk * chunk;
                    let len = chunk.min(size - first);
                    // An unfinished step, checked, then a finished one: other operations on a
                    // stale summary are outside the original's contract.
                    if first >= chunk {
                        bitmap.deserialize_zeroes(0, chunk, false);
                        assert!(super::full::is_exact(&bitmap.full, &bitmap.levels[LAST]));
                    }
                    match next(3) {
                        0 => bitmap.deserialize_ones(first, len, true),
                        1 => bitmap.deserialize_zeroes(first, len, true),
                        _ => {
                            let bytes =
                                vec![0xf7u8; bitmap.serialization_size(first, len) as usize];
                            bitmap.deserialize_part(&bytes, first, len, true);
                        }
                    }
                }
                6 if step % 50 == 0 => {
                    let grow = next(size);
                    let new_size = (size / 2 + grow).max(1);
                    bitmap.truncate(new_size);
                    other = HBitmap::new(new_size, granularity).unwrap();
                }
                7 if step % 100 == 0 => bitmap.reset_all(),
                _ => {
                    let mut copy = bitmap.clone();
                    assert!(HBitmap::merge_into(&bitmap, &other, &mut copy));
                    bitmap = copy;
                }
            }
            assert!(
                super::full::is_exact(&bitmap.full, &bitmap.levels[LAST]),
                "step {step}, size {size}"
            );
            let probe_bound = bitmap.size();
            let probe = next(probe_bound);
            let words = &bitmap.levels[LAST];
            let first = probe >> bitmap.granularity();
            let expected = (first..bitmap.groups())
                .find(|&group| words[(group / 64) as usize] >> (group % 64) & 1 == 0)
                .map(|group| (group << bitmap.granularity()).max(probe));
            assert_eq!(bitmap.next_zero(probe, u64::MAX), expected, "step {step}");
        }
    }
}
