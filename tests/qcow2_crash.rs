// SPDX-License-Identifier: GPL-2.0-or-later

//! Crash consistency: a change is interrupted after each of its writes in turn (CrashIo), and
//! every intermediate image must open with the old or the new bitmaps, with no corruption for
//! `qemu-img check` (leaks allowed).
mod qcow2_util;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use hbitmap::qcow2::io::{CrashIo, FileIo};
use hbitmap::qcow2::{BitmapFlags, Image, OpenOptions};
use hbitmap::HBitmap;
use hbitmap_testkit::qcow2::{be32, REFCOUNT_TABLE_CLUSTERS};
use hbitmap_testkit::{Rng, RW};
use qcow2_util::*;

type State = BTreeMap<String, (bool, bool, Vec<(u64, u64)>)>;

fn state(path: &Path) -> State {
    let image = Image::open(path, OpenOptions::default())
        .unwrap_or_else(|e| panic!("{} does not open: {e}", path.display()));
    let mut out = BTreeMap::new();
    for info in image.bitmaps() {
        let content = extents(&image.inspect_bitmap(&info.name).unwrap());
        out.insert(info.name.to_string(), (info.in_use, info.auto, content));
    }
    out
}

fn crash_each_write(name: &str, base: &Path, dir: &Path, op: &dyn Fn(&mut Image)) -> usize {
    let work = dir.join(format!("{name}-work.qcow2"));
    let old = state(base);
    std::fs::copy(base, &work).unwrap();
    let file = rw_file(&work);
    let io = CrashIo::new(FileIo::new(file), u64::MAX);
    let counter = io.writes();
    let mut image = Image::open_io(Box::new(io), &work, true).unwrap();
    op(&mut image);
    drop(image);
    let writes = counter.load(Ordering::SeqCst);
    let new = state(&work);
    assert!(old != new, "{name}: the operation changed nothing");
    let check = have("qemu-img");
    for crash_at in 0..writes {
        std::fs::copy(base, &work).unwrap();
        let file = rw_file(&work);
        let io = CrashIo::new(FileIo::new(file), crash_at);
        let mut image = Image::open_io(Box::new(io), &work, true).unwrap();
        op(&mut image);
        drop(image);
        let now = state(&work);
        assert!(
            now == old || now == new,
            "{name}: crash before write {crash_at} of {writes} left neither the old nor the new \
             bitmaps (name, in use): {:?}",
            now.iter()
                .map(|(name, state)| (name, state.0))
                .collect::<Vec<_>>()
        );
        if check {
            qemu_check(&work, true);
        }
    }
    writes as usize
}

fn base_image(path: &Path, size: u64) -> (HBitmap, HBitmap) {
    let mut rng = Rng::new(11);
    let a = random_bitmap(&mut rng, size, 12, 40);
    let b = random_bitmap(&mut rng, size, 14, 20);
    let mut image = Image::create(path, size, 65536).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, BitmapFlags::default()).unwrap();
    image.close().unwrap();
    (a, b)
}

#[test]
fn crash_during_each_change() {
    let s = Scratch::new("crash");
    let base = s.path("base.qcow2");
    let size = 256 << 20;
    base_image(&base, size);
    let mut rng = Rng::new(12);
    let c = random_bitmap(&mut rng, size, 10, 60);
    let a2 = random_bitmap(&mut rng, size, 12, 40);
    let mut total = 0;
    total += crash_each_write("store-new", &base, &s.dir, &|image| {
        let _ = image.store_bitmap("c", &c, AUTO);
    });
    total += crash_each_write("replace", &base, &s.dir, &|image| {
        let _ = image.store_bitmap("a", &a2, AUTO);
    });
    total += crash_each_write("remove", &base, &s.dir, &|image| {
        let _ = image.remove_bitmap("b");
    });
    total += crash_each_write("load-marks-in-use", &base, &s.dir, &|image| {
        let _ = image.load_bitmap("a");
    });
    total += crash_each_write("disable", &base, &s.dir, &|image| {
        let _ = image.set_enabled("a", false);
    });
    total += crash_each_write("merge", &base, &s.dir, &|image| {
        let _ = image.merge_bitmap("b", "a");
    });
    println!("{total} interrupted writes checked");
}

/// Bitmap over `size` bytes at granularity 512 with one dirty bit in each of `clusters`
/// consecutive 2 MiB stretches from `first` on: one data cluster each with 512-byte clusters.
fn spread_bitmap(size: u64, first: u64, clusters: u64) -> HBitmap {
    let mut bitmap = HBitmap::new(size, 9).unwrap();
    for i in first..first + clusters {
        bitmap.set(i * (2 << 20) + 4096, 512);
    }
    bitmap
}

fn be32_at(path: &Path, offset: usize) -> u32 {
    be32(&std::fs::read(path).unwrap(), offset)
}

/// With 512-byte clusters and 64-bit refcounts a refcount table cluster covers 2 MiB: a store
/// that crosses that needs a larger refcount table (and new refcount blocks); a crash anywhere
/// in that must be harmless too.
#[test]
fn crash_while_growing_refcounts() {
    if !have_all("crash_while_growing_refcounts", &["qemu-img"]) {
        return;
    }
    let s = Scratch::new("crash-grow");
    let base = s.path("base.qcow2");
    let size = 1 << 30;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        base.to_str().unwrap(),
        &size.to_string(),
    ]);
    // Fill the file up to just below what the refcount table covers.
    let table_clusters = be32_at(&base, REFCOUNT_TABLE_CLUSTERS);
    let coverage = u64::from(table_clusters) * (512 / 8) * 64 * 512;
    let mut image = Image::open(&base, RW).unwrap();
    let mut round = 0;
    loop {
        let len = std::fs::metadata(&base).unwrap().len();
        let room = coverage.saturating_sub(len) / 512;
        if room < 40 {
            break;
        }
        let clusters = (room - 30).min(500);
        let filler = spread_bitmap(size, 0, clusters);
        image
            .store_bitmap(format!("filler{round}"), &filler, BitmapFlags::default())
            .unwrap();
        round += 1;
    }
    image.close().unwrap();
    qemu_check(&base, false);
    assert_eq!(be32_at(&base, REFCOUNT_TABLE_CLUSTERS), table_clusters);
    let big = spread_bitmap(size, 0, 60);
    let writes = crash_each_write("grow", &base, &s.dir, &|image| {
        if let Err(e) = image.store_bitmap("big", &big, BitmapFlags::default()) {
            let _ = e;
        }
    });
    let work = s.dir.join("grow-work.qcow2");
    std::fs::copy(&base, &work).unwrap();
    let mut image = Image::open(&work, RW).unwrap();
    image
        .store_bitmap("big", &big, BitmapFlags::default())
        .unwrap();
    image.close().unwrap();
    assert!(
        be32_at(&work, REFCOUNT_TABLE_CLUSTERS) > table_clusters,
        "the refcount table did not grow"
    );
    qemu_check(&work, false);
    println!("{writes} interrupted writes checked");
}

/// A stale extension (autoclear bit cleared by a program without bitmap support) is dropped by
/// the next write, in one header write.
#[test]
fn crash_while_dropping_a_stale_extension() {
    let s = Scratch::new("crash-stale");
    let base = s.path("base.qcow2");
    let size = 16 << 20;
    base_image(&base, size);
    // Clear autoclear bit 0 (header offset 88, big-endian: the last byte is 95).
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[95] &= !1;
    std::fs::write(&base, &bytes).unwrap();
    assert!(state(&base).is_empty());
    let mut rng = Rng::new(14);
    let c = random_bitmap(&mut rng, size, 12, 10);
    crash_each_write("stale", &base, &s.dir, &|image| {
        let _ = image.store_bitmap("c", &c, BitmapFlags::default());
    });
}

/// A bitmap table longer than a refcount block's worth of clusters (512-byte clusters, 64-bit
/// refcounts: 64 per block), in an image qemu-img made: the refcount blocks created after the
/// run and the table growth, interrupted at each write.
#[test]
fn crash_while_allocating_runs_longer_than_a_refcount_block() {
    if !have_all(
        "crash_while_allocating_runs_longer_than_a_refcount_block",
        &["qemu-img"],
    ) {
        return;
    }
    let s = Scratch::new("crash-long-run");
    let base = s.path("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        base.to_str().unwrap(),
        "16G",
    ]);
    let writes = crash_each_write("long-table", &base, &s.dir, &|image| {
        let _ = image.add_bitmap("b", 512, true);
    });
    let mut image = Image::open(&base, RW).unwrap();
    image.add_bitmap("b", 512, true).unwrap();
    // A 128-cluster table: two refcount blocks' worth.
    assert_eq!(image.bitmap("b").unwrap().table_size, 128 * 64);
    image.close().unwrap();
    qemu_check(&base, false);
    println!("{writes} interrupted writes checked");
}

/// The library operation behind each `qbitmap` command that changes an image, crashed at each
/// of its writes: every intermediate image holds the old or the new bitmaps. In particular an
/// offline edit (`set`, `reset`) never leaves a bitmap marked in use, which QEMU would treat as
/// inconsistent and the next backup would lose.
#[test]
fn crash_during_each_qbitmap_command() {
    let s = Scratch::new("crash-commands");
    let base = s.path("base.qcow2");
    let size = 64 << 20;
    base_image(&base, size);
    let mut rng = Rng::new(15);
    let imported = random_bitmap(&mut rng, size, 16, 30);
    /// A command's name and its library operation.
    type Op<'a> = (&'a str, &'a dyn Fn(&mut Image));
    let commands: [Op; 10] = [
        ("set", &|image| {
            let _ = image.edit_bitmap("a", |bitmap| bitmap.set(size / 2 - 12345, 3 << 20));
        }),
        ("reset", &|image| {
            let _ = image.edit_bitmap("a", |bitmap| bitmap.reset(0, size / 2));
        }),
        ("import-new", &|image| {
            let _ = image.store_bitmap("i", &imported, AUTO);
        }),
        ("import-replace", &|image| {
            let _ = image.store_bitmap("b", &imported, BitmapFlags::default());
        }),
        ("merge", &|image| {
            let _ = image.merge_bitmap("b", "a");
        }),
        ("clear", &|image| {
            let _ = image.clear_bitmap("a");
        }),
        ("add", &|image| {
            let _ = image.add_bitmap("n", 65536, true);
        }),
        ("remove", &|image| {
            let _ = image.remove_bitmap("a");
        }),
        ("enable", &|image| {
            let _ = image.set_enabled("b", true);
        }),
        ("disable", &|image| {
            let _ = image.set_enabled("a", false);
        }),
    ];
    let mut total = 0;
    for (name, op) in commands {
        total += crash_each_write(name, &base, &s.dir, op);
    }
    println!("{total} interrupted writes checked");
}
