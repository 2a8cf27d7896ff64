// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Real threads: markers dirty clustered pages (and ranges crossing words, groups and summary
//! words) while another thread harvests over and over, mixing in `get_and_reset`. In the end the
//! union of what was harvested is exactly what was marked. `ATOMIC_HBITMAP_STRESS_MARKS` (per
//! thread) makes the run longer.

mod common;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use atomic_hbitmap::AtomicHBitmap;
use common::{env_or, Rng};

const PAGES: usize = 1 << 20;

fn set(words: &mut [u64], page: usize) {
    words[page / 64] |= 1 << (page % 64);
}

#[test]
fn union_of_harvests_is_what_was_marked() {
    let marks = env_or(
        "ATOMIC_HBITMAP_STRESS_MARKS",
        if cfg!(miri) { 200 } else { 2_000_000 },
    );
    let bitmap = Arc::new(AtomicHBitmap::new(
        PAGES * 4096,
        NonZeroUsize::new(4096).unwrap(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let markers: Vec<_> = (0..3)
        .map(|id| {
            let bitmap = bitmap.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(id);
                let mut marked = vec![0u64; PAGES / 64];
                // Each thread dirties pages around a few hot spots, as a guest does.
                let spots: Vec<usize> = (0..16).map(|_| rng.usize_below(PAGES)).collect();
                for _ in 0..marks {
                    let spot = spots[rng.usize_below(spots.len())];
                    let page = (spot + rng.usize_below(5000)) % PAGES;
                    if rng.chance(80) {
                        bitmap.set_bit(page);
                        set(&mut marked, page);
                    } else {
                        let pages = 1 + rng.usize_below(300);
                        bitmap.set_addr_range(page * 4096 + 17, pages * 4096 - 17);
                        for p in page..(page + pages).min(PAGES) {
                            set(&mut marked, p);
                        }
                    }
                }
                marked
            })
        })
        .collect();
    let harvester = {
        let (bitmap, stop) = (bitmap.clone(), stop.clone());
        thread::spawn(move || {
            let mut harvested = vec![0u64; PAGES / 64];
            let mut passes = 0u64;
            while !stop.load(Ordering::Acquire) {
                if passes % 8 == 7 {
                    for (into, word) in harvested.iter_mut().zip(bitmap.get_and_reset()) {
                        *into |= word;
                    }
                } else {
                    let mut last_end = 0;
                    for run in bitmap.harvest() {
                        assert!(
                            run.start >= last_end && !run.is_empty(),
                            "runs out of order"
                        );
                        last_end = run.end;
                        for page in run {
                            set(&mut harvested, page);
                        }
                    }
                }
                passes += 1;
            }
            (harvested, passes)
        })
    };
    let mut marked = vec![0u64; PAGES / 64];
    for m in markers {
        for (into, word) in marked.iter_mut().zip(m.join().unwrap()) {
            *into |= word;
        }
    }
    stop.store(true, Ordering::Release);
    let (mut harvested, passes) = harvester.join().unwrap();
    for run in bitmap.harvest() {
        for page in run {
            set(&mut harvested, page);
        }
    }
    assert_eq!(bitmap.dirty_pages(), 0);
    let count = |w: &[u64]| w.iter().map(|w| w.count_ones()).sum::<u32>();
    assert!(
        harvested == marked,
        "harvested {} pages, marked {}",
        count(&harvested),
        count(&marked)
    );
    println!(
        "{} pages marked, {passes} concurrent passes",
        count(&marked)
    );
}
