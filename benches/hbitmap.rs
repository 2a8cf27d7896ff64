// SPDX-License-Identifier: GPL-2.0-or-later

//! Criterion benchmarks of the safe Rust API, on the workloads of `../shared/bench` (scaled
//! down to keep a run short): `cargo bench --bench hbitmap`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hbitmap::HBitmap;

use hbitmap_testkit::Rng;

fn random_extents(
    bits: u64,
    granularity: u32,
    extents: u64,
    max_len: u64,
    rng: &mut Rng,
) -> HBitmap {
    let mut bitmap = HBitmap::new(bits, granularity).unwrap();
    for _ in 0..extents {
        let len = 1 + rng.next_u64() % max_len;
        bitmap.set(rng.next_u64() % (bits - len), len);
    }
    bitmap
}

const BITS: u64 = 1 << 30;

fn guest_writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("guest_writes");
    let mut bitmap = HBitmap::new(BITS, 0).unwrap();
    let mut rng = Rng::new(1);
    group.bench_function("set_small_random", |b| {
        b.iter(|| {
            let len = 1 + rng.next_u64() % 16;
            bitmap.set(rng.next_u64() % (BITS - 16), len);
        })
    });
    let mut full = HBitmap::new(BITS, 0).unwrap();
    full.set(0, BITS);
    group.bench_function("reset_small_random", |b| {
        b.iter(|| {
            let len = 1 + rng.next_u64() % 16;
            full.reset(rng.next_u64() % (BITS - 16), len);
        })
    });
    group.bench_function("set_reset_large", |b| {
        let mut i = 0u64;
        b.iter(|| {
            let len = (1 << 20) + rng.next_u64() % 4096;
            let start = rng.next_u64() % (BITS - len);
            if i % 3 == 2 {
                bitmap.reset(start, len);
            } else {
                bitmap.set(start, len);
            }
            i += 1;
            black_box(bitmap.count())
        })
    });
    let sparse = random_extents(BITS, 0, 200_000, 4096, &mut rng);
    group.bench_function("get_random", |b| {
        b.iter(|| black_box(sparse.get(rng.next_u64() % BITS)))
    });
    let mut tracked = HBitmap::new(BITS, 0).unwrap();
    tracked.create_meta(4096 * 8);
    group.bench_function("meta_set", |b| {
        b.iter(|| {
            let len = 1 + rng.next_u64() % 64;
            tracked.set(rng.next_u64() % (BITS - len), len);
        })
    });
    group.finish();
}

fn backup_walks(c: &mut Criterion) {
    let mut group = c.benchmark_group("backup_walks");
    let mut rng = Rng::new(7);
    // A 1 TiB disk at 64 KiB granularity, 30% dirty in 1 MiB runs.
    let mut disk = HBitmap::new(1 << 40, 16).unwrap();
    for offset in (0..1u64 << 40).step_by(1 << 20) {
        if rng.next_u64() % 10 < 3 {
            disk.set(offset, 1 << 20);
        }
    }
    group.throughput(Throughput::Elements(disk.dirty_groups()));
    group.bench_function("iter_granularity", |b| {
        b.iter(|| disk.iter().fold(0u64, |sum, item| sum ^ item))
    });
    let scattered = random_extents(BITS, 0, 10_000, 1 << 16, &mut rng);
    group.throughput(Throughput::Elements(scattered.extents().count() as u64));
    group.bench_function("scan_extents", |b| {
        b.iter(|| scattered.extents().fold(0u64, |sum, r| sum ^ r.start))
    });
    group.finish();
}

fn bulk(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulk");
    group.sample_size(10);
    let mut rng = Rng::new(9);
    let bitmap = random_extents(BITS, 0, 2000, 1 << 20, &mut rng);
    let size = bitmap.serialization_size(0, BITS) as usize;
    let mut buf = vec![0u8; size];
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function("serialize_full", |b| {
        b.iter(|| bitmap.serialize_part(&mut buf, 0, BITS))
    });
    let mut copy = HBitmap::new(BITS, 0).unwrap();
    group.bench_function("deserialize_full", |b| {
        b.iter(|| copy.deserialize_part(&buf, 0, BITS, false))
    });
    group.bench_function("deserialize_finish", |b| {
        b.iter(|| copy.deserialize_finish())
    });
    group.throughput(Throughput::Elements(1));
    let other = random_extents(BITS, 0, 200_000, 8192, &mut rng);
    let mut result = HBitmap::new(BITS, 0).unwrap();
    group.bench_function("merge_dense", |b| {
        b.iter(|| HBitmap::merge_into(&bitmap, &other, &mut result))
    });
    group.bench_function("alloc_free_2^34", |b| {
        b.iter_batched(
            || (),
            |()| {
                let mut disk = HBitmap::new(1 << 43, 9).unwrap();
                disk.set(1 << 30, 4096);
                disk
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, guest_writes, backup_walks, bulk);
criterion_main!(benches);
