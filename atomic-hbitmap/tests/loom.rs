// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Model tests of the concurrency contract under loom, over every interleaving (and every
//! outcome the memory orderings allow; up to three preemptions, two where a harvest takes a full
//! group) of small bitmaps: marks within one page word, two words of one group (the 8 page words
//! under one summary bit), two groups, two summary words, and a group whose words are all dirty
//! (taken by the harvest, then split into runs):
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p atomic-hbitmap --test loom --release`
//!
//! After all threads have joined, the pages left set must be exactly those a final harvest
//! finds (the summary hides no dirty word), every marked page must be returned exactly once
//! over the harvests (or cleared by a reset), and a page whose mark happened before a harvest
//! started (signalled through a flag) must be returned by that harvest.
#![cfg(loom)]

use std::collections::BTreeSet;
use std::num::NonZeroUsize;

use atomic_hbitmap::AtomicHBitmap;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

fn bitmap(pages: usize) -> AtomicHBitmap {
    AtomicHBitmap::new(pages, NonZeroUsize::new(1).unwrap())
}

fn pages_of(runs: impl Iterator<Item = std::ops::Range<usize>>) -> Vec<usize> {
    runs.flatten().collect()
}

/// Pages set according to `is_bit_set`, then a final harvest, which must find exactly them.
fn settle(b: &AtomicHBitmap, candidates: &[usize]) -> Vec<usize> {
    let set: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&p| b.is_bit_set(p))
        .collect();
    let harvested = pages_of(b.harvest());
    assert_eq!(harvested, set, "the summary hides a dirty page");
    assert_eq!(b.dirty_pages(), 0);
    harvested
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(3, f);
}

/// `model` with at most `preemptions` preemptions per interleaving: 2 still lets a mark stall
/// between its OR and its summary update while a harvest runs, and keeps the models whose
/// harvest is a few hundred atomic operations small enough to explore.
fn model_bounded(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.max_branches = 20_000;
    builder.check(f);
}

/// Two marks of one word (the first may stall between its page word and the summary) race with
/// a harvest; the second mark signals that it is done.
fn marks_vs_harvest(pages: usize, first: usize, second: usize) {
    model(move || {
        let b = Arc::new(bitmap(pages));
        let done = Arc::new(AtomicBool::new(false));
        let t1 = {
            let b = b.clone();
            thread::spawn(move || b.set_bit(first))
        };
        let t2 = {
            let (b, done) = (b.clone(), done.clone());
            thread::spawn(move || {
                b.set_bit(second);
                done.store(true, Ordering::Release);
            })
        };
        let signalled = done.load(Ordering::Acquire);
        let during = pages_of(b.harvest());
        if signalled {
            assert!(
                during.contains(&second),
                "a mark done before the harvest was missed"
            );
        }
        t1.join().unwrap();
        t2.join().unwrap();
        let after = settle(&b, &[first, second]);
        let mut all: Vec<usize> = during.iter().chain(&after).copied().collect();
        all.sort_unstable();
        let mut expected = vec![first, second];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(all, expected, "during {during:?}, after {after:?}");
    });
}

#[test]
fn marks_of_one_word_vs_harvest() {
    marks_vs_harvest(64, 0, 1);
}

/// The harvest reads both words of the group after taking its summary bit; a mark of the second
/// may come before or after that read.
#[test]
fn marks_of_one_group_vs_harvest() {
    marks_vs_harvest(64 * 3, 5, 64 + 5);
}

#[test]
fn marks_of_two_groups_vs_harvest() {
    marks_vs_harvest(512 * 2, 5, 512 + 5);
}

#[test]
fn mark_vs_get_and_reset() {
    model(|| {
        let b = Arc::new(bitmap(64 * 3));
        b.set_bit(2);
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (b, done) = (b.clone(), done.clone());
            thread::spawn(move || {
                b.set_addr_range(63, 3); // pages 63..66: two words
                done.store(true, Ordering::Release);
            })
        };
        let signalled = done.load(Ordering::Acquire);
        let words = b.get_and_reset();
        let during: BTreeSet<usize> = (0..64 * 3)
            .filter(|&p| words[p / 64] & (1 << (p % 64)) != 0)
            .collect();
        assert!(during.contains(&2));
        if signalled {
            assert!((63..66).all(|p| during.contains(&p)));
        }
        t.join().unwrap();
        let after = settle(&b, &[2, 63, 64, 65]);
        for p in 63..66 {
            assert!(
                during.contains(&p) != after.contains(&p),
                "page {p}: {during:?} {after:?}"
            );
        }
    });
}

#[test]
fn mark_vs_reset() {
    model(|| {
        let b = Arc::new(bitmap(64 * 3));
        b.set_bit(70);
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (b, done) = (b.clone(), done.clone());
            thread::spawn(move || {
                b.set_bit(65);
                done.store(true, Ordering::Release);
            })
        };
        let signalled = done.load(Ordering::Acquire);
        b.reset();
        let left_after_reset = b.is_bit_set(65);
        t.join().unwrap();
        let after = settle(&b, &[65, 70]);
        assert!(
            !after.contains(&70),
            "a page set before the reset survived it"
        );
        if signalled {
            assert!(!left_after_reset);
        }
    });
}

#[test]
fn mark_vs_reset_addr_range() {
    model(|| {
        let b = Arc::new(bitmap(64 * 3));
        b.set_bit(1);
        let t = {
            let b = b.clone();
            thread::spawn(move || b.set_bit(65))
        };
        b.reset_addr_range(0, 64 * 3);
        t.join().unwrap();
        settle(&b, &[1, 65]);
    });
}

#[test]
fn mark_vs_dropped_harvest() {
    model(|| {
        let b = Arc::new(bitmap(64 * 3));
        b.set_bit(0);
        b.set_bit(64 + 5);
        let t = {
            let b = b.clone();
            thread::spawn(move || b.set_bit(64 + 7))
        };
        // Take the first run only; the rest is given back.
        let first: Vec<_> = b.harvest().take(1).collect();
        assert_eq!(first, [0..1]);
        t.join().unwrap();
        assert_eq!(settle(&b, &[0, 64 + 5, 64 + 7]), [64 + 5, 64 + 7]);
    });
}

#[test]
fn two_harvests_share_the_pages() {
    model(|| {
        let b = Arc::new(bitmap(64 * 3));
        let t = {
            let b = b.clone();
            thread::spawn(move || {
                b.set_bit(3);
                b.set_bit(100);
            })
        };
        let h = {
            let b = b.clone();
            thread::spawn(move || pages_of(b.harvest()))
        };
        let mine = pages_of(b.harvest());
        t.join().unwrap();
        let theirs = h.join().unwrap();
        let after = settle(&b, &[3, 100]);
        let mut all: Vec<usize> = mine.into_iter().chain(theirs).chain(after).collect();
        all.sort_unstable();
        assert_eq!(all, [3, 100]);
    });
}

/// A bitmap of two summary words: marks under each race with a harvest, which reads the summary
/// in full.
#[test]
fn marks_under_two_summary_words_vs_harvest() {
    let second_summary_word = 512 * 64;
    marks_vs_harvest(second_summary_word + 64, 7, second_summary_word + 7);
}

/// The harvest takes the 8 page words of a group whose words are all dirty and splits them one
/// at a time; a mark of one of them races with it, and the harvest is dropped after its first
/// run (the words taken and not yet split are given back), or runs to the end.
fn mark_vs_harvest_of_full_group(runs_taken: Option<usize>) {
    model_bounded(2, move || {
        let b = Arc::new(bitmap(512 + 64));
        // Every page word of group 0 dirty: runs 0..10, 11..512.
        b.set_addr_range(0, 512);
        b.reset_bit(10);
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (b, done) = (b.clone(), done.clone());
            thread::spawn(move || {
                b.set_bit(10);
                done.store(true, Ordering::Release);
            })
        };
        let signalled = done.load(Ordering::Acquire);
        let during = match runs_taken {
            Some(n) => pages_of(b.harvest().take(n)),
            None => pages_of(b.harvest()),
        };
        if signalled && runs_taken.is_none() {
            assert!(
                during.contains(&10),
                "a mark done before the harvest was missed"
            );
        }
        t.join().unwrap();
        let after = settle(&b, &(0..512).collect::<Vec<_>>());
        let mut all: Vec<usize> = during.iter().chain(&after).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..512).collect::<Vec<_>>(),
            "during {} pages, after {}",
            during.len(),
            after.len()
        );
    });
}

#[test]
fn mark_vs_harvest_of_full_group_to_the_end() {
    mark_vs_harvest_of_full_group(None);
}

#[test]
fn mark_vs_dropped_harvest_of_full_group() {
    mark_vs_harvest_of_full_group(Some(1));
}
