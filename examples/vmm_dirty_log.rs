// SPDX-License-Identifier: GPL-2.0-or-later

//! A VMM's block device tracking guest writes in an `AtomicHBitmap`, kept as a persistent dirty
//! bitmap in a qcow2 image (for the next incremental backup):
//!
//! - several vCPU/IO threads mark the pages (here 64 KiB, the image's cluster size) each write
//!   touches, concurrently, through `&AtomicHBitmap`;
//! - the main thread harvests the bitmap periodically into an `HBitmap` (each pass takes only the
//!   dirty pages, as a migration or backup pass would), while the writes go on;
//! - at the end the accumulated bitmap is stored in the image with `Image::store_bitmap`, where
//!   QEMU finds it:
//!
//! ```sh
//! cargo run --release --example vmm_dirty_log -- /tmp/disk.qcow2
//! qemu-nbd -r -t -f qcow2 -B vmm-dirty -k /tmp/nbd.sock /tmp/disk.qcow2 &
//! nbdinfo --json --map=qemu:dirty-bitmap:vmm-dirty 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! `tests/atomic_example.rs` runs it and checks that QEMU exports exactly the extents written.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hbitmap::qcow2::{BitmapFlags, Image};
use hbitmap::{AtomicHBitmap, HBitmap};
use hbitmap_testkit::Rng;

/// The dirty-tracking granularity: the image's cluster size, QEMU's default for a bitmap.
pub const PAGE: u64 = 64 << 10;

/// What a run did: the guest writes `(offset, length)` of every thread, and how many harvests
/// ran while they were being made.
pub struct Outcome {
    pub writes: Vec<(u64, u64)>,
    pub passes: usize,
}

/// Creates `image` (a qcow2 of `disk_size` bytes), runs `threads` writers of `writes` writes
/// each against an `AtomicHBitmap`, harvests it every half millisecond meanwhile, and stores what
/// was harvested as the persistent bitmap `name`.
pub fn run(
    image: &Path,
    disk_size: u64,
    name: &str,
    threads: u64,
    writes: usize,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut qcow2 = Image::create(image, disk_size, PAGE)?;
    let page = NonZeroUsize::new(PAGE as usize).expect("non-zero");
    let dirty = Arc::new(AtomicHBitmap::new(usize::try_from(disk_size)?, page));
    let running = Arc::new(AtomicUsize::new(threads as usize));
    let writers: Vec<_> = (0..threads)
        .map(|id| {
            let (dirty, running) = (dirty.clone(), running.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(id + 1);
                let mut done = Vec::with_capacity(writes);
                for i in 0..writes {
                    if i % 100 == 99 {
                        thread::sleep(Duration::from_micros(100)); // waiting for the device
                    }
                    // Sector-aligned writes of 512 B to 64 KiB, one in 50 up to 2 MiB,
                    // clustered in the first quarter of the disk.
                    let sectors = disk_size / 512;
                    let max = if rng.chance(1, 50) { 4096 } else { 128 };
                    let length = 512 * (1 + rng.below(max));
                    let offset = 512 * rng.below(sectors / 4).min(sectors - length / 512);
                    dirty.set_addr_range(offset as usize, length as usize);
                    done.push((offset, length));
                }
                running.fetch_sub(1, Ordering::Release);
                done
            })
        })
        .collect();
    // The bitmap persisted: bytes as items, one bit per 64 KiB (granularity 16).
    let mut persistent = HBitmap::new(disk_size, PAGE.trailing_zeros())?;
    let mut passes = 0;
    while running.load(Ordering::Acquire) > 0 {
        persistent.set_atomic_harvest(&dirty);
        passes += 1;
        thread::sleep(Duration::from_micros(500));
    }
    let mut outcome = Outcome {
        writes: Vec::new(),
        passes,
    };
    for writer in writers {
        outcome
            .writes
            .extend(writer.join().map_err(|_| "a writer panicked")?);
    }
    // The last pass, after every write: nothing may be left behind.
    persistent.set_atomic_harvest(&dirty);
    assert_eq!(dirty.dirty_pages(), 0);
    qcow2.store_bitmap(
        name,
        &persistent,
        BitmapFlags {
            in_use: false,
            auto: true,
        },
    )?;
    qcow2.close()?;
    Ok(outcome)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("vmm-dirty-log.qcow2")
            .display()
            .to_string()
    });
    let outcome = run(Path::new(&path), 16 << 30, "vmm-dirty", 4, 20_000)?;
    let image = Image::open(&path, hbitmap::qcow2::OpenOptions::default())?;
    let stored = image.inspect_bitmap("vmm-dirty")?;
    println!(
        "{path}: {} guest writes by 4 threads, {} harvests while writing; bitmap 'vmm-dirty' \
         stored with {} dirty 64 KiB clusters in {} extents",
        outcome.writes.len(),
        outcome.passes,
        stored.dirty_groups(),
        stored.extents().count()
    );
    Ok(())
}
