// SPDX-License-Identifier: GPL-2.0-or-later

//! The qcow2 API on its own: create, store, load, flags, merge, errors, fault recovery.
mod qcow2_util;

use std::sync::atomic::Ordering;

use hbitmap::qcow2::io::{CrashIo, FailingIo, Faults, FileIo};
use hbitmap::qcow2::{BitmapFlags, Error, Image};
use hbitmap::HBitmap;
use hbitmap_testkit::{Rng, RO, RO_FORCE_SHARE, RW};
use qcow2_util::*;

#[test]
fn store_load_roundtrip_and_flags() {
    let s = Scratch::new("api-roundtrip");
    let p = s.path("a.qcow2");
    let size = 100 << 20;
    let mut image = Image::create(&p, size, 65536).unwrap();
    assert_eq!(image.virtual_size(), size);
    assert_eq!(image.cluster_size(), 65536);
    assert!(image.bitmaps().is_empty());
    let mut rng = Rng::new(1);
    let a = random_bitmap(&mut rng, size, 12, 100);
    let b = random_bitmap(&mut rng, size, 16, 10);
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, BitmapFlags::default()).unwrap();
    image.add_bitmap("c", 1 << 20, true).unwrap();
    let names: Vec<_> = image.bitmaps().iter().map(|b| b.name.clone()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let info = image.bitmap("b").unwrap();
    assert_eq!(
        (info.granularity, info.auto, info.in_use, info.bitmap_type),
        (65536, false, false, 1)
    );
    assert!(image.check().errors().next().is_none());
    image.close().unwrap();

    let mut image = Image::open(&p, RW).unwrap();
    assert_eq!(extents(&image.inspect_bitmap("a").unwrap()), extents(&a));
    // Loading for tracking marks the bitmap in use on disk until it is stored back.
    let loaded = image.load_bitmap("b").unwrap();
    assert_eq!(loaded, b);
    assert!(image.bitmap("b").unwrap().in_use);
    drop(image);
    let image = Image::open(&p, RO).unwrap();
    assert!(image.bitmap("b").unwrap().in_use);
    let err = Image::open(&p, RO).unwrap().bitmaps().len();
    assert_eq!(err, 3);
    drop(image);
    let mut image = Image::open(&p, RW).unwrap();
    match image.load_bitmap("b") {
        Err(Error::InUse(message)) => assert!(message.contains("in use"), "{message}"),
        other => panic!("loading an in-use bitmap: {other:?}"),
    }
    assert_eq!(image.inspect_bitmap("b").unwrap(), b);
    assert!(matches!(image.clear_bitmap("b"), Err(Error::InUse(_))));
    assert!(matches!(image.set_enabled("b", true), Err(Error::InUse(_))));
    image.store_bitmap("b", &loaded, AUTO).unwrap();
    assert!(!image.bitmap("b").unwrap().in_use);
    assert!(image.bitmap("b").unwrap().auto);
    image.set_enabled("b", false).unwrap();
    assert!(!image.bitmap("b").unwrap().auto);
    image.clear_bitmap("a").unwrap();
    assert!(image.inspect_bitmap("a").unwrap().is_empty());
    assert!(image.bitmap("a").unwrap().auto);
    image.remove_bitmap("c").unwrap();
    assert!(image.bitmap("c").is_none());
    assert!(matches!(image.remove_bitmap("c"), Err(Error::NotFound(_))));
    assert!(matches!(
        image.add_bitmap("a", 65536, true),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        image.add_bitmap("x", 256, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        image.add_bitmap("x", 3000, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        image.add_bitmap("", 65536, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        image.add_bitmap("n".repeat(1024), 65536, true),
        Err(Error::InvalidArgument(_))
    ));
    image.add_bitmap("n".repeat(1023), 65536, true).unwrap();
    let wrong = HBitmap::new(size - 512, 12).unwrap();
    assert!(matches!(
        image.store_bitmap("w", &wrong, AUTO),
        Err(Error::InvalidArgument(_))
    ));
    image.close().unwrap();
    if have("qemu-img") {
        qemu_check(&p, false);
    }
}

#[test]
fn merge_within_and_across_images() {
    let s = Scratch::new("api-merge");
    let size = 64 << 20;
    let (p1, p2) = (s.path("1.qcow2"), s.path("2.qcow2"));
    let mut rng = Rng::new(2);
    let a = random_bitmap(&mut rng, size, 12, 40);
    let b = random_bitmap(&mut rng, size, 16, 10);
    let c = random_bitmap(&mut rng, size, 9, 30);
    let mut one = Image::create(&p1, size, 65536).unwrap();
    one.store_bitmap("a", &a, AUTO).unwrap();
    one.store_bitmap("b", &b, AUTO).unwrap();
    // Different granularities: every dirty range of the source dirties the target.
    one.merge_bitmap("a", "b").unwrap();
    let mut expected = b.clone();
    for r in a.extents() {
        expected.set(r.start, r.end - r.start);
    }
    assert_eq!(one.inspect_bitmap("b").unwrap(), expected);
    let mut two = Image::create(&p2, size, 4096).unwrap();
    two.store_bitmap("c", &c, AUTO).unwrap();
    one.close().unwrap();
    let one = Image::open(&p1, RO).unwrap();
    two.merge_bitmap_from(&one, "a", "c").unwrap();
    let mut expected = c.clone();
    for r in a.extents() {
        expected.set(r.start, r.end - r.start);
    }
    assert_eq!(two.inspect_bitmap("c").unwrap(), expected);
    assert!(matches!(
        two.merge_bitmap("zz", "c"),
        Err(Error::NotFound(_))
    ));
    let p3 = s.path("3.qcow2");
    let other = Image::create(&p3, size * 2, 65536).unwrap();
    drop(other);
    let other = Image::open(&p3, RO).unwrap();
    assert!(matches!(
        two.merge_bitmap_from(&other, "a", "c"),
        Err(Error::InvalidArgument(_))
    ));
    two.close().unwrap();
    if have("qemu-img") {
        qemu_check(&p1, false);
        qemu_check(&p2, false);
    }
}

#[test]
fn read_only_refuses_writes_and_locks_exclude() {
    let s = Scratch::new("api-ro");
    let p = s.path("a.qcow2");
    Image::create(&p, 1 << 20, 65536).unwrap().close().unwrap();
    let mut ro = Image::open(&p, RO).unwrap();
    assert!(matches!(
        ro.add_bitmap("a", 65536, true),
        Err(Error::ReadOnly(_))
    ));
    // A reader keeps writers out; two readers are fine.
    let ro2 = Image::open(&p, RO).unwrap();
    assert!(matches!(Image::open(&p, RW), Err(Error::Locked(_))));
    drop((ro, ro2));
    let rw = Image::open(&p, RW).unwrap();
    match Image::open(&p, RO) {
        Err(Error::Locked(message)) => assert!(message.contains("write"), "{message}"),
        other => panic!("reading while a writer holds the image: {other:?}"),
    }
    assert!(matches!(Image::open(&p, RW), Err(Error::Locked(_))));
    Image::open(&p, RO_FORCE_SHARE).unwrap();
    if have("qemu-img") {
        let out = std::process::Command::new("qemu-img")
            .args(["info"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "qemu-img info must fail while we write"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lock"), "{err}");
        qemu_img(&["info", "-U", p.to_str().unwrap()]);
    }
    drop(rw);
    Image::open(&p, RW).unwrap();
}

#[test]
fn replacing_reuses_space() {
    let s = Scratch::new("api-reuse");
    let p = s.path("a.qcow2");
    let size = 256 << 20;
    let mut image = Image::create(&p, size, 65536).unwrap();
    let mut rng = Rng::new(3);
    let mut len_after_first = 0;
    for round in 0..20 {
        let bitmap = random_bitmap(&mut rng, size, 9, 200);
        image.store_bitmap("x", &bitmap, AUTO).unwrap();
        image.store_bitmap("y", &bitmap, AUTO).unwrap();
        if round == 1 {
            len_after_first = std::fs::metadata(&p).unwrap().len();
        }
        if round % 7 == 6 {
            image.remove_bitmap("y").unwrap();
        }
    }
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(
        len <= len_after_first * 2,
        "the file grew from {len_after_first} to {len}"
    );
    image.close().unwrap();
    if have("qemu-img") {
        qemu_check(&p, false);
    }
}

#[test]
fn failed_writes_leave_the_image_usable() {
    let s = Scratch::new("api-fail");
    let p = s.path("a.qcow2");
    let size = 32 << 20;
    let mut rng = Rng::new(4);
    let a = random_bitmap(&mut rng, size, 12, 30);
    let mut image = Image::create(&p, size, 65536).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.close().unwrap();
    let b = random_bitmap(&mut rng, size, 12, 30);
    // How many writes storing `b` makes, counted on a copy: each must be a fault point.
    let copy = s.path("copy.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    let counting = CrashIo::new(FileIo::new(rw_file(&copy)), u64::MAX);
    let writes = counting.writes();
    let mut image = Image::open_io(Box::new(counting), &copy, true).unwrap();
    image.store_bitmap("b", &b, AUTO).unwrap();
    let writes = writes.load(Ordering::Relaxed);
    assert!(
        writes >= 3,
        "a store writes data, a table, a directory and a header"
    );
    drop(image);
    let (mut failed, mut late) = (0, 0);
    for index in 0..writes + 2 {
        let file = rw_file(&p);
        let io = FailingIo::new(
            FileIo::new(file),
            Faults {
                write: Some(index),
                ..Faults::default()
            },
        );
        let mut image = Image::open_io(Box::new(io), &p, true).unwrap();
        let result = image.store_bitmap("b", &b, AUTO);
        // A fault at any of its writes up to the header switch fails the store; one after it
        // (freeing the replaced clusters) leaves the change made and the clusters leaked, with
        // a warning; past its writes, none fires.
        if index >= writes {
            assert!(result.is_ok(), "no fault past write {writes}: {result:?}");
        } else if result.is_ok() {
            assert!(
                image
                    .warnings()
                    .iter()
                    .any(|w| w.contains("could not be freed")),
                "fault at write {index} of {writes} went unnoticed"
            );
            late += 1;
        }
        if result.is_err() {
            failed += 1;
            // The handle recovered the old state, and a retry works (the fault was one-shot).
            assert!(image.bitmap("b").is_none());
            image.store_bitmap("b", &b, AUTO).unwrap();
        }
        drop(image);
        if have("qemu-img") {
            qemu_check(&p, true);
        }
        let mut image = Image::open(&p, RW).unwrap();
        assert_eq!(image.inspect_bitmap("a").unwrap(), a);
        assert_eq!(image.inspect_bitmap("b").unwrap(), b);
        image.remove_bitmap("b").unwrap();
    }
    assert_eq!(failed + late, writes);
    assert!(failed >= 3, "{failed} of {writes} faults failed the store");
    // A failing flush.
    let file = rw_file(&p);
    let io = FailingIo::new(
        FileIo::new(file),
        Faults {
            flush: Some(0),
            ..Faults::default()
        },
    );
    let mut image = Image::open_io(Box::new(io), &p, true).unwrap();
    assert!(image.store_bitmap("b", &b, AUTO).is_err());
}

/// The edits bindings call without an `HBitmap` of their own: `ensure_bitmap` (add, exist-ok),
/// `set_range`, `import_bitmap`, `dirty_bytes_at`; each checked against the same change made
/// on an `HBitmap`, and refused arguments leave the file as it was.
#[test]
fn edits_without_a_bitmap_of_the_caller() {
    let s = Scratch::new("api-edits");
    let p = s.path("a.qcow2");
    let size = (64 << 20) + 512; // a partial last granule
    let mut image = Image::create(&p, size, 65536).unwrap();

    assert!(image.ensure_bitmap("a", 65536, true).unwrap());
    assert!(!image.ensure_bitmap("a", 65536, true).unwrap());
    assert!(matches!(
        image.ensure_bitmap("a", 4096, true),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        image.ensure_bitmap("a", 65536, false),
        Err(Error::Exists(_))
    ));

    let mut rng = Rng::new(7);
    let mut model = HBitmap::new(size, 16).unwrap();
    for _ in 0..40 {
        let offset = rng.below(size);
        let length = rng.below((size - offset).min(3 << 20) + 1);
        image.set_range("a", offset, length, true).unwrap();
        model.set(offset, length);
        // Resets of whole granules only.
        let start = rng.below(size >> 16) << 16;
        let granules = rng.below(((size - start) >> 16).min(8) + 1);
        image.set_range("a", start, granules << 16, false).unwrap();
        model.reset(start, granules << 16);
    }
    assert_eq!(image.inspect_bitmap("a").unwrap(), model);
    let index = image.bitmaps().iter().position(|b| b.name == "a").unwrap();
    let dirty: u64 = model.extents().map(|e| e.end - e.start).sum();
    assert_eq!(image.dirty_bytes_at(index).unwrap(), dirty);
    assert_eq!(hbitmap::qcow2::dirty_bytes(&model), dirty);

    let before = std::fs::read(&p).unwrap();
    for (offset, length, dirty) in [
        (size - 1, 2, true),
        (u64::MAX, 2, true),
        (4096, 65536, false),
        (0, 65536 + 1, false),
    ] {
        let result = image.set_range("a", offset, length, dirty);
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{offset}+{length}: {result:?}"
        );
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a refused set_range wrote"
    );
    // The last, partial granule: reset up to the end is whole granules.
    image.set_range("a", size - 512, 512, true).unwrap();
    model.set(size - 512, 512);
    assert_eq!(image.inspect_bitmap("a").unwrap(), model);
    image.set_range("a", 64 << 20, 512, false).unwrap();
    model.reset(64 << 20, 512);
    assert_eq!(image.inspect_bitmap("a").unwrap(), model);

    // import: any order, overlaps, granularity kept from the existing bitmap.
    let ranges = [(5 << 20, 100), (0, 4096), (4096, 4096), (size - 1, 1)];
    image
        .import_bitmap("i", Some(4096), ranges, BitmapFlags::default())
        .unwrap();
    let mut expected = HBitmap::new(size, 12).unwrap();
    for (offset, length) in ranges {
        expected.set(offset, length);
    }
    assert_eq!(image.inspect_bitmap("i").unwrap(), expected);
    assert!(!image.bitmap("i").unwrap().auto);
    image.import_bitmap("i", None, [(0, 1)], AUTO).unwrap();
    assert_eq!(image.bitmap("i").unwrap().granularity, 4096);
    assert!(image.bitmap("i").unwrap().auto);
    let before = std::fs::read(&p).unwrap();
    assert!(matches!(
        image.import_bitmap("i", None, [(0, 1), (size, 1)], AUTO),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        image.import_bitmap("j", Some(1000), [(0, 1)], AUTO),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(std::fs::read(&p).unwrap(), before, "a refused import wrote");

    // In use: no dirty count, no set.
    let _loaded = image.load_bitmap("a").unwrap();
    assert!(matches!(image.dirty_bytes_at(index), Err(Error::InUse(_))));
    assert!(matches!(
        image.set_range("a", 0, 1, true),
        Err(Error::InUse(_))
    ));
    image.release_bitmap("a").unwrap();
    image.close().unwrap();
}
