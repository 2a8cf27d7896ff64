// SPDX-License-Identifier: GPL-2.0-or-later

//! Criterion benchmarks of persistent bitmaps in qcow2 images: storing and loading the bitmap of
//! a 16 TiB disk at 64 KiB granularity (2^28 bits, 32 MiB of bitmap data) in an image with
//! 64 KiB clusters: `cargo bench --bench qcow2`.
//!
//! Each runs twice: with the image in memory (`/dev/shm`, a tmpfs: the page cache alone, where
//! a flush costs nothing, so the library's own work and the kernel's copies are measured), and
//! in the system's temporary directory, where the flushes a store makes (fdatasync) wait for the
//! disk.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hbitmap::qcow2::{BitmapFlags, Image, OpenOptions};
use hbitmap::HBitmap;

use hbitmap_testkit::Rng;

const DISK: u64 = 16 << 40;
const GRANULARITY: u32 = 16;
const CLUSTER: u64 = 64 << 10;
/// Bytes of bitmap data: one bit per 64 KiB of the disk.
const DATA_BYTES: u64 = (DISK >> GRANULARITY) / 8;

/// About 30% of the disk dirty in 1 MiB runs, plus scattered small writes.
fn realistic() -> HBitmap {
    let mut rng = Rng::new(1);
    let mut bitmap = HBitmap::new(DISK, GRANULARITY).unwrap();
    let run = 1 << 20;
    let runs = DISK / run;
    for index in 0..runs {
        if rng.next_u64() % 100 < 30 {
            bitmap.set(index * run, run);
        }
    }
    for _ in 0..1_000_000 {
        let len = 4096 * (1 + rng.next_u64() % 64);
        bitmap.set(rng.next_u64() % (DISK - len), len);
    }
    bitmap
}

/// Every word of the bitmap random.
fn dense() -> HBitmap {
    let mut rng = Rng::new(2);
    let mut bitmap = HBitmap::new(DISK, GRANULARITY).unwrap();
    let mut buf = vec![0u8; DATA_BYTES as usize];
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    bitmap.deserialize_part(&buf, 0, DISK, true);
    bitmap
}

fn clean() -> HBitmap {
    HBitmap::new(DISK, GRANULARITY).unwrap()
}

struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A named way to build the bitmap to store.
type Variant = (&'static str, fn() -> HBitmap);

const FLAGS: BitmapFlags = BitmapFlags {
    in_use: false,
    auto: true,
};

/// Where the images go: in memory when a tmpfs is at hand, and on disk.
fn places() -> Vec<(&'static str, PathBuf)> {
    let mut places = Vec::new();
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        places.push(("memory", shm));
    }
    places.push(("disk", std::env::temp_dir()));
    places
}

fn bench_qcow2(c: &mut Criterion) {
    for (place, dir) in places() {
        bench_in(c, place, &dir);
    }
}

fn bench_in(c: &mut Criterion, place: &str, dir: &Path) {
    let variants: [Variant; 3] = [("realistic", realistic), ("dense", dense), ("clean", clean)];
    let mut group = c.benchmark_group(format!("qcow2_16TiB_64KiB_{place}"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(DATA_BYTES));
    for (name, make) in variants {
        let bitmap = make();
        let path = dir.join(format!("hbitmap-bench-{}-{name}.qcow2", std::process::id()));
        let temp = TempImage(path);
        let mut image = Image::create(&temp.0, DISK, CLUSTER).unwrap();
        image.store_bitmap("b", &bitmap, FLAGS).unwrap();

        group.bench_function(format!("store/{name}"), |b| {
            b.iter(|| image.store_bitmap("b", black_box(&bitmap), FLAGS).unwrap())
        });
        group.bench_function(format!("inspect/{name}"), |b| {
            b.iter(|| black_box(image.inspect_bitmap("b").unwrap()))
        });
        // load_bitmap marks the bitmap in use on disk: store it back (untimed) between loads.
        group.bench_function(format!("load/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    image.store_bitmap("b", &bitmap, FLAGS).unwrap();
                    let start = Instant::now();
                    black_box(image.load_bitmap("b").unwrap());
                    total += start.elapsed();
                }
                total
            })
        });
        image.store_bitmap("b", &bitmap, FLAGS).unwrap();
        image.close().unwrap();

        let reader = Image::open(&temp.0, OpenOptions::default()).unwrap();
        let loaded = reader.inspect_bitmap("b").unwrap();
        assert_eq!(loaded.count(), bitmap.count(), "{name}: round trip");
    }
    group.finish();
}

criterion_group!(benches, bench_qcow2);
criterion_main!(benches);
