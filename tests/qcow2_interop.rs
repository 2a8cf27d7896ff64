// SPDX-License-Identifier: GPL-2.0-or-later

//! Interoperation with QEMU 10's tools, both ways:
//! - bitmaps QEMU made (qemu-img bitmap, and qemu-storage-daemon tracking guest writes through
//!   NBD) read by us give exactly the extents QEMU exports (qemu-nbd -B + nbdinfo --map);
//! - bitmaps we store (random content, granularities, cluster sizes, refcount widths, odd and
//!   multi-TiB sizes, hundreds of bitmaps) are listed by qemu-img info, exported identically by
//!   qemu-nbd and pass qemu-img check; QEMU then edits our images and we read its result.
mod qcow2_util;

use std::path::Path;
use std::process::Command;

use hbitmap::qcow2::{BitmapFlags, Error, Image};
use hbitmap::HBitmap;
use hbitmap_testkit::{Rng, RO, RO_FORCE_SHARE, RW};
use qcow2_util::*;

fn ours(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let image = Image::open(path, RO).unwrap();
    image
        .bitmaps()
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.in_use {
                flags.push("in-use".to_string());
            }
            if b.auto {
                flags.push("auto".to_string());
            }
            (b.name.to_string(), b.granularity, flags)
        })
        .collect()
}

fn create(path: &Path, size: u64, cluster: u64, refcount_bits: u32) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster},refcount_bits={refcount_bits}"),
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
}

#[test]
fn qemu_img_bitmaps_are_read() {
    if !have_all("qemu_img_bitmaps_are_read", &["qemu-img"]) {
        return;
    }
    let s = Scratch::new("from-qemu-img");
    let p = s.path("a.qcow2");
    let ps = p.to_str().unwrap();
    create(&p, 1 << 30, 65536, 16);
    qemu_img(&["bitmap", "--add", ps, "plain"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", ps, "small"]);
    qemu_img(&["bitmap", "--add", "--disable", "-g", "1M", ps, "off"]);
    qemu_img(&["bitmap", "--add", ps, "gone"]);
    qemu_img(&["bitmap", "--remove", ps, "gone"]);
    qemu_img(&["bitmap", "--disable", ps, "plain"]);
    qemu_img(&["bitmap", "--enable", ps, "off"]);
    assert_eq!(ours(&p), qemu_bitmaps(&p));
    let image = Image::open(&p, RO).unwrap();
    for info in image.bitmaps() {
        assert!(image.inspect_bitmap(&info.name).unwrap().is_empty());
    }
    assert!(image.check().is_clean(), "{:?}", image.check());
}

#[test]
fn bitmaps_tracked_by_qemu_are_read_exactly() {
    if !have_all(
        "bitmaps_tracked_by_qemu_are_read_exactly",
        &[
            "qemu-img",
            "qemu-storage-daemon",
            "qemu-io",
            "qemu-nbd",
            "nbdinfo",
        ],
    ) {
        return;
    }
    let s = Scratch::new("from-qsd");
    let p = s.path("a.qcow2");
    let size: u64 = 512 << 20;
    create(&p, size, 65536, 16);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "65536",
        p.to_str().unwrap(),
        "early",
    ]);
    let mut qsd = Qsd::start(&s.dir, &p);
    for (name, granularity) in [("g512", 512), ("g4k", 4096), ("g2m", 2 << 20)] {
        qsd.qmp_ok(&format!(
            r#"{{"execute":"block-dirty-bitmap-add","arguments":{{"node":"fmt0","name":"{name}","persistent":true,"granularity":{granularity}}}}}"#
        ));
    }
    let mut rng = Rng::new(21);
    let mut expected = HBitmap::new(size, 9).unwrap();
    for i in 0..40 {
        let offset = rng.below(size / 512 - 300) * 512;
        let length = (1 + rng.below(256)) * 512;
        qsd.write(offset, length);
        expected.set(offset, length);
        if i == 20 {
            // A bitmap disabled half-way, and a merge done by QEMU.
            qsd.qmp_ok(r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"fmt0","name":"g2m"}}"#);
        }
    }
    qsd.qmp_ok(r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"fmt0","name":"merged","persistent":true,"granularity":65536,"disabled":true}}"#);
    qsd.qmp_ok(r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"fmt0","target":"merged","bitmaps":["g4k","g512"]}}"#);
    qsd.quit();
    assert_eq!(ours(&p), qemu_bitmaps(&p));
    let image = Image::open(&p, RO).unwrap();
    for info in image.bitmaps() {
        let bitmap = image.inspect_bitmap(&info.name).unwrap();
        assert_eq!(bitmap.size(), size);
        assert_eq!(1u64 << bitmap.granularity(), info.granularity);
        let qemu = qemu_extents(&s.dir, &p, &info.name.to_string());
        assert_eq!(extents(&bitmap), qemu, "bitmap {}", info.name);
    }
    // The 512-byte bitmap is exactly what was written.
    assert_eq!(
        extents(&image.inspect_bitmap("g512").unwrap()),
        extents(&expected)
    );
    assert!(!image.bitmap("g2m").unwrap().auto);
    assert!(image.bitmap("g512").unwrap().auto);
    drop(image);
    // QEMU's image edited by us: merge, then QEMU reads it back.
    let mut image = Image::open(&p, RW).unwrap();
    image.merge_bitmap("g512", "early").unwrap();
    image.close().unwrap();
    qemu_check(&p, false);
    let image = Image::open(&p, RO).unwrap();
    let early = image.inspect_bitmap("early").unwrap();
    assert_eq!(extents(&early), qemu_extents(&s.dir, &p, "early"));
}

#[test]
fn in_use_bitmaps_from_a_crashed_qemu() {
    if !have_all(
        "in_use_bitmaps_from_a_crashed_qemu",
        &["qemu-img", "qemu-storage-daemon", "qemu-io"],
    ) {
        return;
    }
    let s = Scratch::new("in-use");
    let p = s.path("a.qcow2");
    create(&p, 64 << 20, 65536, 16);
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "tracked"]);
    let qsd = Qsd::start(&s.dir, &p);
    qsd.write(0, 65536);
    // While QEMU holds the image, we may neither write nor (without force-share) read.
    match Image::open(&p, RW) {
        Err(Error::Locked(message)) => assert!(message.contains("lock"), "{message}"),
        other => panic!("opening an image QEMU writes: {other:?}"),
    }
    assert!(matches!(Image::open(&p, RO), Err(Error::Locked(_))));
    let shared = Image::open(&p, RO_FORCE_SHARE).unwrap();
    assert!(shared.bitmap("tracked").unwrap().in_use);
    drop(shared);
    drop(qsd); // killed: the bitmap stays in use
    let image = Image::open(&p, RO).unwrap();
    assert!(image.bitmap("tracked").unwrap().in_use);
    assert_eq!(ours(&p), qemu_bitmaps(&p));
    drop(image);
    let mut image = Image::open(&p, RW).unwrap();
    match image.load_bitmap("tracked") {
        Err(Error::InUse(message)) => assert!(message.contains("in use"), "{message}"),
        other => panic!("loading an in-use bitmap: {other:?}"),
    }
    image.inspect_bitmap("tracked").unwrap();
    image.remove_bitmap("tracked").unwrap();
    image.close().unwrap();
    qemu_check(&p, false);
    assert!(qemu_bitmaps(&p).is_empty());
}

/// Stores random bitmaps in an image made by qemu-img and checks QEMU agrees.
#[allow(clippy::too_many_arguments)]
fn store_and_compare(
    s: &Scratch,
    case: &str,
    size: u64,
    cluster: u64,
    refcount_bits: u32,
    grans: &[u32],
    seed: u64,
    nbd: bool,
) {
    let p = s.path(&format!("{case}.qcow2"));
    create(&p, size, cluster, refcount_bits);
    let mut rng = Rng::new(seed);
    let mut image = Image::open(&p, RW).unwrap();
    let mut stored = Vec::new();
    for (i, &bits) in grans.iter().enumerate() {
        let runs = 1 + rng.below(60);
        let bitmap = random_bitmap(&mut rng, size, bits, runs);
        let name = format!("bm{i}-{bits}");
        let flags = BitmapFlags {
            in_use: false,
            auto: i % 2 == 0,
        };
        image.store_bitmap(&name, &bitmap, flags).unwrap();
        stored.push((name, bitmap));
    }
    // Replace one, to exercise freeing.
    if let Some((name, bitmap)) = stored.first_mut() {
        *bitmap = random_bitmap(&mut rng, size, bitmap.granularity(), 30);
        image.store_bitmap(name, bitmap, AUTO).unwrap();
    }
    image.close().unwrap();
    qemu_check(&p, false);
    let listed = qemu_bitmaps(&p);
    assert_eq!(listed, ours(&p), "{case}");
    assert_eq!(listed.len(), stored.len());
    let image = Image::open(&p, RO).unwrap();
    for (name, bitmap) in &stored {
        let back = image.inspect_bitmap(name).unwrap();
        assert_eq!(extents(&back), extents(bitmap), "{case}: {name}");
    }
    drop(image);
    if nbd {
        for (name, bitmap) in stored.iter().take(2) {
            assert_eq!(
                qemu_extents(&s.dir, &p, name),
                extents(bitmap),
                "{case}: {name}"
            );
        }
    }
}

#[test]
fn our_bitmaps_across_cluster_sizes_and_refcount_widths() {
    if !have_all(
        "our_bitmaps_across_cluster_sizes_and_refcount_widths",
        &["qemu-img", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let s = Scratch::new("to-qemu");
    let cases: [(u64, u32, u64); 11] = [
        (512, 1, 7 << 20),
        (512, 64, 33 << 20),
        (1024, 2, 10_000 * 512),
        (4096, 4, 100 << 20),
        (4096, 8, 12_345 * 512),
        (16384, 32, 200 << 20),
        (65536, 16, 1 << 30),
        (65536, 64, 777 * 1024 * 1024 + 512),
        (262_144, 1, 3 << 30),
        (1 << 20, 16, 1 << 30),
        (2 << 20, 8, 5 << 30),
    ];
    for (i, (cluster, refcount_bits, size)) in cases.into_iter().enumerate() {
        let grans = [9 + (i as u32 % 4), 12, 16, 20 + (i as u32 % 5)];
        let grans: Vec<u32> = grans
            .into_iter()
            .filter(|&g| size.div_ceil(1 << g).div_ceil(8) <= 2 << 20)
            .collect();
        store_and_compare(
            &s,
            &format!("c{cluster}-r{refcount_bits}"),
            size,
            cluster,
            refcount_bits,
            &grans,
            100 + i as u64,
            i % 3 == 0,
        );
    }
}

#[test]
fn multi_tib_sparse_images() {
    if !have_all(
        "multi_tib_sparse_images",
        &["qemu-img", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let s = Scratch::new("tib");
    store_and_compare(&s, "4t", 4 << 40, 65536, 16, &[16, 20], 31, true);
    store_and_compare(
        &s,
        "16t-2m",
        (16 << 40) + 512,
        2 << 20,
        16,
        &[17, 24],
        32,
        true,
    );
}

#[test]
fn hundreds_of_bitmaps() {
    if !have_all("hundreds_of_bitmaps", &["qemu-img"]) {
        return;
    }
    let s = Scratch::new("hundreds");
    let p = s.path("a.qcow2");
    let size = 256 << 20;
    create(&p, size, 4096, 16);
    let mut image = Image::open(&p, RW).unwrap();
    let mut rng = Rng::new(41);
    for i in 0..300 {
        let runs = rng.below(5);
        let bitmap = random_bitmap(&mut rng, size, 16, runs);
        image
            .store_bitmap(
                format!("bitmap-{i:03}-{}", "x".repeat(i % 50)),
                &bitmap,
                BitmapFlags {
                    in_use: false,
                    auto: i % 3 == 0,
                },
            )
            .unwrap();
    }
    for i in (0..300).step_by(7) {
        image
            .remove_bitmap(format!("bitmap-{i:03}-{}", "x".repeat(i % 50)))
            .unwrap();
    }
    image.close().unwrap();
    qemu_check(&p, false);
    let listed = qemu_bitmaps(&p);
    assert_eq!(listed.len(), 300 - 300usize.div_ceil(7));
    assert_eq!(listed, ours(&p));
}

#[test]
fn qemu_edits_our_images() {
    if !have_all(
        "qemu_edits_our_images",
        &["qemu-img", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let s = Scratch::new("qemu-edits");
    let p = s.path("a.qcow2");
    let ps = p.to_str().unwrap();
    let size = 300 << 20;
    let mut rng = Rng::new(51);
    let a = random_bitmap(&mut rng, size, 16, 30);
    let b = random_bitmap(&mut rng, size, 16, 30);
    let mut image = Image::create(&p, size, 65536).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, BitmapFlags::default()).unwrap();
    image.add_bitmap("c", 65536, false).unwrap();
    image.close().unwrap();
    qemu_check(&p, false);
    qemu_img(&["bitmap", "--add", ps, "q"]);
    qemu_img(&["bitmap", "--merge", "a", ps, "q"]);
    qemu_img(&["bitmap", "--merge", "b", ps, "q"]);
    qemu_img(&["bitmap", "--clear", ps, "a"]);
    qemu_img(&["bitmap", "--remove", ps, "c"]);
    qemu_img(&["bitmap", "--enable", ps, "b"]);
    let image = Image::open(&p, RO).unwrap();
    let names: Vec<_> = image
        .bitmaps()
        .iter()
        .map(|b| b.name.to_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "q"]);
    assert!(image.inspect_bitmap("a").unwrap().is_empty());
    assert!(image.bitmap("b").unwrap().auto);
    let mut union = a.clone();
    union.merge(&b);
    assert_eq!(image.inspect_bitmap("q").unwrap(), union);
    assert!(image.check().is_clean(), "{:?}", image.check());
    drop(image);
    // Our create is accepted by QEMU's check and extents agree after QEMU's edits.
    assert_eq!(qemu_extents(&s.dir, &p, "q"), extents(&union));
    let out = Command::new("qemu-img")
        .args(["check", ps])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn our_create_matches_qemu_img() {
    if !have_all("our_create_matches_qemu_img", &["qemu-img"]) {
        return;
    }
    let s = Scratch::new("create");
    for (size, cluster) in [
        (0u64, 65536u64),
        (1 << 20, 512),
        (100 << 30, 4096),
        (10 << 40, 2 << 20),
        (12_345 * 512, 65536),
    ] {
        let p = s.path("ours.qcow2");
        Image::create(&p, size, cluster).unwrap().close().unwrap();
        qemu_check(&p, false);
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"cluster-size\": {cluster}")),
            "{info}"
        );
        assert!(info.contains("\"refcount-bits\": 16"), "{info}");
        assert!(info.contains("\"compat\": \"1.1\""), "{info}");
        // QEMU can write data into it.
        if size > 0 {
            run(
                "qemu-io",
                &["-f", "qcow2", "-c", "write 0 64k", p.to_str().unwrap()],
            );
            qemu_check(&p, false);
        }
    }
    assert!(matches!(
        Image::create(s.path("x"), 1000, 65536),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Image::create(s.path("x"), 1 << 20, 1000),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Image::create(s.path("x"), 1 << 40, 512),
        Err(Error::InvalidArgument(_))
    ));
}

/// Images with guest data, internal snapshots, a backing file (whose name moves when the
/// header grows), extended L2 entries, zstd compression and LUKS encryption keep working.
#[test]
fn images_with_other_features() {
    if !have_all("images_with_other_features", &["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("features");
    let base = s.path("base.qcow2");
    let bs = base.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", bs, "64M"]);
    // An external data file: only guest data lives there, bitmaps stay in the qcow2 file.
    let data_file = format!("data_file={}", s.path("datafile.raw").display());
    let variants: [(&str, &[&str]); 6] = [
        ("datafile", &["-o", &data_file]),
        (
            "backing",
            &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
        ),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("zstd", &["-o", "compression_type=zstd,cluster_size=4k"]),
        ("v3-lazy", &["-o", "lazy_refcounts=on"]),
        (
            "luks",
            &[
                "--object",
                "secret,id=sec0,data=hunter2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ],
        ),
    ];
    let mut rng = Rng::new(61);
    for (name, options) in variants {
        let p = s.path(&format!("{name}.qcow2"));
        let ps = p.to_str().unwrap().to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(options);
        args.push(&ps);
        args.push("64M");
        qemu_img(&args);
        if name == "datafile" {
            // Neither compression nor internal snapshots go with a data file.
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 7 1M 300k", &ps]);
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 8 1M 64k", &ps]);
        } else if name != "luks" {
            run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 7 1M 300k",
                    "-c",
                    "write -c 0 128k",
                    &ps,
                ],
            );
            qemu_img(&["snapshot", "-c", "snap1", &ps]);
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 8 1M 64k", &ps]);
        }
        let bitmap = random_bitmap(&mut rng, 64 << 20, 13, 20);
        let mut image = Image::open(&p, RW).unwrap_or_else(|e| panic!("{name}: {e}"));
        image.store_bitmap("x", &bitmap, AUTO).unwrap();
        image
            .add_bitmap("a-rather-long-bitmap-name-to-grow-the-header", 65536, true)
            .unwrap();
        image.close().unwrap();
        if name == "luks" {
            let opts = format!("driver=qcow2,file.filename={ps},encrypt.key-secret=sec0");
            let out = qemu_img(&[
                "check",
                "--object",
                "secret,id=sec0,data=hunter2",
                "--image-opts",
                &opts,
            ]);
            assert!(out.contains("No errors were found"), "{out}");
            let info = qemu_img(&[
                "info",
                "--object",
                "secret,id=sec0,data=hunter2",
                "--image-opts",
                &opts,
            ]);
            assert!(
                info.contains("name: x") && info.contains("encrypt"),
                "{info}"
            );
        } else {
            qemu_check(&p, false);
            assert_eq!(ours(&p), qemu_bitmaps(&p), "{name}");
        }
        let image = Image::open(&p, RO).unwrap();
        assert_eq!(image.inspect_bitmap("x").unwrap(), bitmap, "{name}");
        if name == "backing" {
            let info = qemu_img(&["info", "-U", &ps]);
            assert!(info.contains("backing file: base.qcow2"), "{info}");
        }
        assert!(image
            .bitmap("a-rather-long-bitmap-name-to-grow-the-header")
            .is_some());
        if name != "luks" {
            drop(image);
            if name == "datafile" && have("qemu-nbd") && have("nbdinfo") {
                assert_eq!(qemu_extents(&s.dir, &p, "x"), extents(&bitmap), "{name}");
            }
            // The guest data (in the data file for "datafile") is untouched.
            run(
                "qemu-io",
                &[
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    "read -P 8 1M 64k",
                    "-c",
                    "read -P 7 1088k 236k",
                    &ps,
                ],
            );
        }
    }
}
