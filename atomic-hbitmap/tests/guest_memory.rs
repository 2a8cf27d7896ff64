// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! vm-memory's way of testing a bitmap backend: writes through `GuestMemoryMmap<B>` (the `Bytes`
//! methods of the memory and of its regions, volatile slices and references, several regions,
//! writes crossing from one region into the next) mark exactly the pages that
//! `GuestMemoryMmap<AtomicBitmap>` marks.
#![cfg(feature = "vm-memory")]

mod common;

use std::sync::atomic::Ordering;

use atomic_hbitmap::AtomicHBitmap;
use common::Rng;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory,
};

/// Two adjacent regions (writes may cross from one into the other), a gap, and a region whose
/// size is not a multiple of 64 pages.
const REGIONS: [(u64, usize); 3] = [
    (0, 0x1_0000),
    (0x1_0000, 0x20_0000),
    (0x1000_0000, 0x40_1000),
];

/// The dirty state of every page of every region, read through vm-memory's `Bitmap` trait.
fn dirty_pages<B: Bitmap>(memory: &GuestMemoryMmap<B>, page: usize) -> Vec<Vec<bool>> {
    memory
        .iter()
        .map(|region| {
            let bitmap = region.bitmap();
            (0..region.len() as usize)
                .step_by(page)
                .map(|offset| bitmap.dirty_at(offset))
                .collect()
        })
        .collect()
}

/// Random guest writes of every kind; returns what each reported, for comparison.
fn guest_writes<B: NewBitmap + Send + Sync>(
    memory: &GuestMemoryMmap<B>,
    seed: u64,
    ops: usize,
) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let buf = vec![0xa5u8; 0x3_0000];
    let mut results = Vec::new();
    for _ in 0..ops {
        let (base, size) = REGIONS[rng.usize_below(REGIONS.len())];
        let addr = base + rng.below(size as u64 + 0x100) - rng.below(0x80).min(base);
        let len = match rng.below(4) {
            0 => rng.usize_below(16),
            1 => rng.usize_below(0x1100),
            2 => rng.usize_below(0x2_0000),
            _ => 0x1000,
        };
        let at = GuestAddress(addr);
        let result = match rng.below(9) {
            0 => format!("{:?}", memory.write_slice(&buf[..len], at)),
            1 => format!("{:?}", memory.write(&buf[..len], at)),
            2 => format!("{:?}", memory.write_obj(rng.next(), at)),
            3 => format!("{:?}", memory.write_obj([7u8; 3], at)),
            4 => format!(
                "{:?}",
                memory.store(7u32, GuestAddress(addr & !3), Ordering::Relaxed)
            ),
            5 => match memory.get_slice(at, len) {
                Ok(slice) => {
                    slice.copy_from(&buf[..len]);
                    "volatile copy".to_string()
                }
                Err(e) => format!("{e:?}"),
            },
            6 => match memory.get_slice(at, len.max(16)) {
                Ok(slice) => {
                    let offset = rng.usize_below(slice.len() - 8);
                    let r = slice.write_obj(3u16, offset);
                    let reference = slice.get_ref::<u32>(offset & !3).map(|r| r.store(9));
                    format!("{r:?} {reference:?}")
                }
                Err(e) => format!("{e:?}"),
            },
            7 => {
                let mut written = 0;
                for slice in memory.get_slices(at, len) {
                    match slice {
                        Ok(slice) => {
                            let sub = slice.subslice(0, slice.len()).unwrap();
                            written += sub.write(&buf[..sub.len()], 0).unwrap();
                        }
                        Err(e) => return vec![format!("{e:?}")],
                    }
                }
                format!("{written}")
            }
            _ => match memory.find_region(at) {
                Some(region) => {
                    let offset = MemoryRegionAddress(addr - region.start_addr().0);
                    format!("{:?}", region.write_slice(&buf[..len], offset))
                }
                None => "no region".to_string(),
            },
        };
        results.push(result);
    }
    results
}

fn memory<B: NewBitmap>() -> GuestMemoryMmap<B> {
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(base, size)| (GuestAddress(base), size))
        .collect();
    GuestMemoryMmap::<B>::from_ranges(&ranges).unwrap()
}

#[test]
fn guest_writes_mark_the_same_pages() {
    // The page size `NewBitmap::with_len` gives both.
    let page = (1usize << 30) / AtomicBitmap::with_len(1 << 30).len();
    assert_eq!(AtomicHBitmap::with_len(1 << 30).page_size().get(), page);
    for seed in 0..8 {
        let ours = memory::<AtomicHBitmap>();
        let theirs = memory::<AtomicBitmap>();
        assert_eq!(
            guest_writes(&ours, seed, 300),
            guest_writes(&theirs, seed, 300)
        );
        let expected = dirty_pages(&theirs, page);
        assert!(
            expected.iter().flatten().any(|&d| d),
            "the writes marked nothing"
        );
        assert!(
            expected.iter().flatten().any(|&d| !d),
            "the writes marked everything"
        );
        assert_eq!(dirty_pages(&ours, page), expected, "seed {seed}");
        // And the words and runs a migration pass would take.
        for (ours, theirs) in ours.iter().zip(theirs.iter()) {
            let (ours, theirs) = (ours.get_mmap(), theirs.get_mmap());
            let words = theirs.bitmap().clone().get_and_reset();
            assert_eq!(ours.bitmap().clone().get_and_reset(), words);
            let runs: Vec<_> = ours.bitmap().harvest().collect();
            assert_eq!(runs, common::runs_of_words(&words));
        }
    }
}

/// The README's example ("Using it from Rust"), compiled and checked.
#[test]
fn readme_example() -> Result<(), Box<dyn std::error::Error>> {
    // Was GuestMemoryMmap<AtomicBitmap>: only the type name changes.
    let memory = GuestMemoryMmap::<AtomicHBitmap>::from_ranges(&[
        (GuestAddress(0), 1 << 30),
        (GuestAddress(1 << 32), 1 << 30),
    ])?;
    memory.write_obj(0xdead_beef_u64, GuestAddress(0x5000))?; // marks its page, as AtomicBitmap does
    memory.write_slice(&[1; 0x3000], GuestAddress((1 << 32) + 0x1800))?;

    // A migration pass: each region's dirty pages as runs, visiting only those pages.
    let mut sent = Vec::new();
    for region in memory.iter() {
        let mmap = region.get_mmap();
        let bitmap: &AtomicHBitmap = mmap.bitmap();
        let page = bitmap.page_size().get() as u64;
        for pages in bitmap.harvest() {
            let start = region.start_addr().0 + pages.start as u64 * page;
            sent.push(start..start + pages.len() as u64 * page); // copy these guest pages out
        }
    }
    let page = (1u64 << 30) / AtomicBitmap::with_len(1 << 30).len() as u64;
    assert_eq!(sent[0], 0x5000 / page * page..(0x5000 / page + 1) * page);
    assert_eq!(sent[1].start, (1 << 32) + 0x1800 / page * page);
    assert_eq!(sent[1].end, ((1 << 32) + 0x4800u64).div_ceil(page) * page);
    Ok(())
}
