// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! AtomicHBitmap against vm-memory's AtomicBitmap itself: random operations of the whole shared
//! API, every result compared, `get_and_reset` word for word, and `harvest` against the pages
//! the reference holds. Ranges are drawn around the boundaries of words, groups and summary
//! words (64, 512 and 32768 pages), past the end and up to `usize::MAX`; bitmaps are enlarged,
//! cloned and (with the `vm-memory` feature) sliced.
//!
//! `ATOMIC_HBITMAP_DIFF_OPS` (operations per seed, default 4000, 1000 in
//! a debug build) and `ATOMIC_HBITMAP_DIFF_SEEDS`
//! (default 12) make the run longer.

mod common;

use std::num::NonZeroUsize;

use atomic_hbitmap::AtomicHBitmap;
use common::{env_or, runs_of_words, Rng};
use vm_memory::bitmap::AtomicBitmap;

struct Pair {
    ours: AtomicHBitmap,
    theirs: AtomicBitmap,
}

impl Pair {
    fn check_geometry(&self) {
        assert_eq!(self.ours.len(), self.theirs.len());
        assert_eq!(self.ours.byte_size(), self.theirs.byte_size());
    }

    /// Compares every page without changing either bitmap.
    fn check_all(&self) {
        let ours = self.ours.clone().get_and_reset();
        let theirs = self.theirs.clone().get_and_reset();
        assert_eq!(ours, theirs);
        let count: u32 = theirs.iter().map(|w| w.count_ones()).sum();
        assert_eq!(self.ours.dirty_pages(), count as usize);
        let mut runs = Vec::new();
        self.ours.for_each_dirty_run(|run| runs.push(run));
        assert_eq!(runs, runs_of_words(&theirs));
    }
}

/// An address near an interesting boundary of a bitmap of `pages` pages of `page_size` bytes.
fn address(rng: &mut Rng, pages: usize, page_size: usize) -> usize {
    let page = match rng.below(6) {
        0 => rng.usize_below(pages + 2),
        1 => {
            let unit = [64usize, 512, 32_768][rng.usize_below(3)];
            let boundary = unit * rng.usize_below(pages / unit + 2);
            (boundary + rng.usize_below(5)).saturating_sub(2)
        }
        2 => pages.saturating_sub(rng.usize_below(70)),
        3 => pages + rng.usize_below(100),
        4 => rng.usize_below(64),
        _ => rng.usize_below(pages.max(1)),
    };
    if rng.chance(2) {
        return usize::MAX - rng.usize_below(1 << 20);
    }
    page.saturating_mul(page_size)
        .saturating_add(rng.usize_below(page_size.min(1 << 16)))
}

fn length(rng: &mut Rng, page_size: usize) -> usize {
    let pages = match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => rng.usize_below(64),
        3 => rng.usize_below(200),
        4 => [512usize, 4096, 32_768][rng.usize_below(3)] + rng.usize_below(8) - 4,
        5 => rng.usize_below(10_000),
        6 => return usize::MAX - rng.usize_below(3),
        _ => rng.usize_below(300_000),
    };
    if rng.chance(10) {
        return rng.usize_below(3);
    }
    pages
        .saturating_mul(page_size)
        .saturating_sub(rng.usize_below(2))
}

fn run_seed(seed: u64, ops: u64) {
    let mut rng = Rng::new(seed);
    let page_size = [1usize, 3, 128, 4096, 65536][rng.usize_below(5)];
    let page = NonZeroUsize::new(page_size).unwrap();
    let byte_size = match rng.below(4) {
        0 => rng.usize_below(200 * page_size),
        1 => rng.usize_below(5000) * page_size + rng.usize_below(2),
        _ => rng.usize_below(600_000) * page_size + rng.usize_below(page_size),
    };
    let mut pair = Pair {
        ours: AtomicHBitmap::new(byte_size, page),
        theirs: AtomicBitmap::new(byte_size, page),
    };
    pair.check_geometry();
    for op in 0..ops {
        let pages = pair.theirs.len();
        let context = format!("seed {seed} op {op}: {} pages of {page_size} B", pages);
        match rng.below(100) {
            0..=29 => {
                let (start, len) = (
                    address(&mut rng, pages, page_size),
                    length(&mut rng, page_size),
                );
                pair.ours.set_addr_range(start, len);
                pair.theirs.set_addr_range(start, len);
            }
            30..=39 => {
                let (start, len) = (
                    address(&mut rng, pages, page_size),
                    length(&mut rng, page_size),
                );
                pair.ours.reset_addr_range(start, len);
                pair.theirs.reset_addr_range(start, len);
            }
            40..=49 => {
                let index = address(&mut rng, pages, 1);
                pair.ours.set_bit(index);
                pair.theirs.set_bit(index);
            }
            50..=54 => {
                let index = address(&mut rng, pages, 1);
                pair.ours.reset_bit(index);
                pair.theirs.reset_bit(index);
            }
            55..=69 => {
                for _ in 0..20 {
                    let index = address(&mut rng, pages, 1);
                    assert_eq!(
                        pair.ours.is_bit_set(index),
                        pair.theirs.is_bit_set(index),
                        "{context}: is_bit_set({index})"
                    );
                    let addr = address(&mut rng, pages, page_size);
                    assert_eq!(
                        pair.ours.is_addr_set(addr),
                        pair.theirs.is_addr_set(addr),
                        "{context}: is_addr_set({addr})"
                    );
                }
            }
            70..=74 => {
                assert_eq!(
                    pair.ours.get_and_reset(),
                    pair.theirs.get_and_reset(),
                    "{context}: get_and_reset"
                );
            }
            75..=82 => {
                // Harvest, whole or in part; the reference gives up the same pages.
                let expected = runs_of_words(&pair.theirs.clone().get_and_reset());
                let take = if rng.chance(50) {
                    usize::MAX
                } else {
                    rng.usize_below(4)
                };
                let got: Vec<_> = pair.ours.harvest().take(take).collect();
                assert_eq!(got[..], expected[..got.len()], "{context}: harvest");
                if take == usize::MAX {
                    assert_eq!(got.len(), expected.len(), "{context}: harvest");
                }
                for page in got.into_iter().flatten() {
                    pair.theirs.reset_bit(page);
                }
            }
            83..=84 => {
                pair.ours.reset();
                pair.theirs.reset();
            }
            85..=86 => {
                let more = if rng.chance(50) {
                    rng.usize_below(3 * page_size)
                } else {
                    rng.usize_below(70_000) * page_size
                };
                pair.ours.enlarge(more);
                pair.theirs.enlarge(more);
                pair.check_geometry();
            }
            87..=89 => {
                // Clones are independent copies.
                let (ours, theirs) = (pair.ours.clone(), pair.theirs.clone());
                pair.ours.set_bit(0);
                pair.theirs.set_bit(0);
                pair = Pair { ours, theirs };
            }
            90..=94 => slices(&mut rng, &pair, page_size, &context),
            _ => pair.check_all(),
        }
        assert_eq!(pair.ours.len(), pair.theirs.len(), "{context}");
    }
    pair.check_all();
    let default = AtomicHBitmap::default();
    let reference = AtomicBitmap::default();
    assert_eq!(
        (default.len(), default.byte_size()),
        (reference.len(), reference.byte_size())
    );
}

#[cfg(feature = "vm-memory")]
fn slices(rng: &mut Rng, pair: &Pair, page_size: usize, context: &str) {
    use vm_memory::bitmap::Bitmap;
    let pages = pair.theirs.len();
    let offset = address(rng, pages, page_size).min(pair.theirs.byte_size() + 3 * page_size);
    let (ours, theirs) = (pair.ours.slice_at(offset), pair.theirs.slice_at(offset));
    let inner = rng.usize_below(4 * page_size);
    let (ours, theirs) = if rng.chance(50) {
        (ours.slice_at(inner), theirs.slice_at(inner))
    } else {
        (ours, theirs)
    };
    for _ in 0..5 {
        let at = rng.usize_below(pages.saturating_mul(page_size).max(1));
        let len = length(rng, page_size).min(1 << 24);
        if at.checked_add(offset + inner).is_none() {
            continue;
        }
        ours.mark_dirty(at, len);
        theirs.mark_dirty(at, len);
        let probe = rng.usize_below(pages.saturating_mul(page_size).max(1));
        assert_eq!(
            ours.dirty_at(probe),
            theirs.dirty_at(probe),
            "{context}: slice dirty_at"
        );
        assert_eq!(
            pair.ours.dirty_at(probe),
            pair.theirs.dirty_at(probe),
            "{context}: dirty_at"
        );
    }
    pair.ours.mark_dirty(offset, page_size);
    pair.theirs.mark_dirty(offset, page_size);
}

#[cfg(not(feature = "vm-memory"))]
fn slices(_rng: &mut Rng, _pair: &Pair, _page_size: usize, _context: &str) {}

#[test]
fn same_results_as_atomic_bitmap() {
    // A debug build (`cargo test --workspace`) runs a quarter of the release run's operations.
    let ops = env_or(
        "ATOMIC_HBITMAP_DIFF_OPS",
        if cfg!(debug_assertions) { 1000 } else { 4000 },
    );
    let seeds = env_or("ATOMIC_HBITMAP_DIFF_SEEDS", 12);
    for seed in 0..seeds {
        run_seed(seed, ops);
    }
    println!("{seeds} seeds x {ops} operations compared");
}
