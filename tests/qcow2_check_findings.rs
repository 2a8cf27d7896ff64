// SPDX-License-Identifier: GPL-2.0-or-later

//! `check` and `check -r` on images whose damage lies in the guest data map or the refcounts'
//! edges, compared figure by figure with `qemu-img check` on the same file: OFLAG_COPIED
//! flags that disagree with the refcounts, reserved bits in L1 and L2 entries, refcounts past
//! the end of the file, guest data at offset 0 of an external data file; and what is not an
//! image at all (a FIFO must be refused, not hang).
mod qcow2_util;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hbitmap::qcow2::{CheckReport, Error, FindingKind, Image, RepairMode, Severity, Subject};
use hbitmap_testkit::qcow2::{be32, be64, put64, CLUSTER_BITS, L1_TABLE_OFFSET, RO};
use qcow2_util::*;

const COPIED: u64 = 1 << 63;

/// `qemu-img check --output=json`: its exit code and the JSON text.
fn qemu_check_json(path: &Path) -> (i32, String) {
    let output = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .expect("running qemu-img check");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The number after `"key":` in qemu-img's JSON (0 when absent, as qemu-img omits zeroes).
fn json_u64(json: &str, key: &str) -> u64 {
    let Some(at) = json.find(&format!("\"{key}\":")) else {
        return 0;
    };
    json[at + key.len() + 3..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number for {key} in {json}"))
}

fn check(path: &Path) -> CheckReport {
    Image::check_file(path, RO).unwrap()
}

/// Our figures equal qemu-img check's on the same file, exit status included.
fn assert_same_figures(path: &Path) -> CheckReport {
    let (code, json) = qemu_check_json(path);
    let ours = check(path);
    let ours_code = i32::from(ours.qemu_img_status());
    assert_eq!(
        ours_code, code,
        "exit status: ours {ours:#?}\nqemu-img {json}"
    );
    if code == 1 {
        // qemu-img could not open the image: it has no figures.
        return ours;
    }
    assert_eq!(
        ours.corruptions,
        json_u64(&json, "corruptions"),
        "{ours:#?}\n{json}"
    );
    assert_eq!(ours.leaks, json_u64(&json, "leaks"), "{ours:#?}\n{json}");
    if let Some(end) = ours.image_end_offset {
        assert_eq!(
            end,
            json_u64(&json, "image-end-offset"),
            "{ours:#?}\n{json}"
        );
    }
    if let Some(allocated) = ours.allocated_clusters {
        assert_eq!(allocated, json_u64(&json, "allocated-clusters"), "{json}");
    }
    ours
}

/// A 64 KiB-cluster image with `clusters` guest clusters written.
fn image_with_data(scratch: &Scratch, name: &str, clusters: u64) -> std::path::PathBuf {
    let path = scratch.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]);
    let write = format!("write -P 0x5a 0 {}", clusters * 65536);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", &write, path.to_str().unwrap()],
    );
    path
}

/// File offsets of the first L1 entry and of the first L2 entry of the active disk.
fn first_entries(data: &[u8]) -> (usize, usize) {
    let l1 = be64(data, L1_TABLE_OFFSET) as usize;
    let l2 = (be64(data, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (l1, l2)
}

fn patch(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut data = std::fs::read(path).unwrap();
    change(&mut data);
    std::fs::write(path, data).unwrap();
}

/// The refcount entry (16-bit refcounts) of `cluster`, as a file offset.
fn refcount_entry(data: &[u8], cluster: u64) -> usize {
    let cluster_bits = be32(data, CLUSTER_BITS);
    let per_block = (1u64 << cluster_bits) / 2;
    let table = be64(data, 48) as usize;
    let block = be64(data, table + 8 * (cluster / per_block) as usize) as usize;
    assert_ne!(block, 0, "no refcount block for cluster {cluster}");
    block + 2 * (cluster % per_block) as usize
}

fn put16(data: &mut [u8], at: usize, value: u16) {
    data[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[test]
fn copied_flags_that_disagree_are_counted_and_fixed() {
    if !have_all("copied_flags", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("copied");
    for (name, target) in [("l2", "L2"), ("l1", "L1")] {
        let path = image_with_data(&scratch, &format!("{name}.qcow2"), 4);
        patch(&path, |data| {
            let (l1, l2) = first_entries(data);
            let at = if target == "L1" { l1 } else { l2 + 8 };
            let entry = be64(data, at);
            assert_ne!(
                entry & COPIED,
                0,
                "QEMU sets COPIED on a cluster of refcount 1"
            );
            put64(data, at, entry & !COPIED);
        });
        let report = assert_same_figures(&path);
        assert_eq!(report.copied_flag_errors, 1, "{target}: {report:#?}");
        assert_eq!(report.corruptions, 1);
        let repaired = Image::repair_file(&path, RepairMode::Leaks).unwrap();
        assert_eq!(repaired.corruptions_fixed, 1, "{repaired:#?}");
        assert!(repaired.after.is_consistent(), "{:#?}", repaired.after);
        qemu_check(&path, false);
    }
}

/// `-r leaks` lowers a refcount from 2 to 1 where the COPIED flag is clear: the flag must follow,
/// as `qemu-img check -r leaks` makes it, or the image is left corrupt.
#[test]
fn a_leak_fixed_to_refcount_one_gets_its_copied_flag() {
    if !have_all("leak_fix_copied", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("leak-copied");
    let path = image_with_data(&scratch, "a.qcow2", 4);
    patch(&path, |data| {
        let (_, l2) = first_entries(data);
        let entry = be64(data, l2);
        put64(data, l2, entry & !COPIED);
        let cluster = (entry & 0x00ff_ffff_ffff_fe00) >> 16;
        let at = refcount_entry(data, cluster);
        put16(data, at, 2);
    });
    let before = assert_same_figures(&path);
    assert_eq!((before.leaks, before.corruptions), (1, 0), "{before:#?}");
    let twin = scratch.path("twin.qcow2");
    std::fs::copy(&path, &twin).unwrap();
    let repaired = Image::repair_file(&path, RepairMode::Leaks).unwrap();
    assert_eq!(repaired.leaks_fixed, 1);
    assert_eq!(repaired.corruptions_fixed, 1, "{repaired:#?}");
    assert!(repaired.after.is_consistent(), "{:#?}", repaired.after);
    qemu_check(&path, false);
    // qemu-img's own repair reaches the same bytes.
    let output = Command::new("qemu-img")
        .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
        .arg(&twin)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&twin).unwrap());
}

#[test]
fn reserved_bits_in_l1_and_l2_entries_are_corruptions() {
    if !have_all("reserved_bits", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("reserved");
    for (name, bit) in [("l2", 1u64 << 1), ("l2-high", 1 << 57), ("l1", 1 << 3)] {
        let path = image_with_data(&scratch, &format!("{name}.qcow2"), 2);
        patch(&path, |data| {
            let (l1, l2) = first_entries(data);
            let at = if name == "l1" { l1 } else { l2 };
            let entry = be64(data, at);
            put64(data, at, entry | bit);
        });
        let report = assert_same_figures(&path);
        assert_eq!(report.corruptions, 1, "{name}: {report:#?}");
        let found = report.errors().any(|e| {
            e.subject == Subject::Structure
                && if name == "l1" {
                    matches!(
                        e.kind,
                        FindingKind::L1ReservedBits {
                            index: 0,
                            snapshot: None,
                            ..
                        }
                    )
                } else {
                    matches!(e.kind, FindingKind::L2ReservedBits { index: 0, .. })
                }
        });
        assert!(found, "{report:#?}");
        // The rendering: one text, whatever prints it.
        assert!(
            report
                .errors()
                .any(|e| e.to_string().contains("reserved bits")),
            "{report:#?}"
        );
    }
}

/// An L1 entry holding only the COPIED flag points to no L2 table: a corruption (qemu-img
/// exit 2), and the walk cannot vouch for the clusters the old table used, so `-r leaks` must
/// not free them: it refuses without writing.
#[test]
fn an_l1_entry_with_flags_and_no_offset_is_refused() {
    if !have_all("l1_flags_only", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("l1-flags");
    let path = image_with_data(&scratch, "a.qcow2", 16);
    patch(&path, |data| {
        let (l1, _) = first_entries(data);
        put64(data, l1, COPIED);
    });
    let (code, _) = qemu_check_json(&path);
    assert_eq!(code, 2);
    let report = check(&path);
    assert!(report.corruptions > 0, "{report:#?}");
    assert!(report.unrepairable.is_some());
    let before = std::fs::read(&path).unwrap();
    let refused = Image::repair_file(&path, RepairMode::Leaks).unwrap_err();
    assert!(matches!(refused, Error::Unsupported(_)), "{refused}");
    assert!(
        refused.to_string().contains("no L2 table offset"),
        "{refused}"
    );
    assert!(std::fs::read(&path).unwrap() == before);
}

/// A refcount for a cluster past the end of the file (nothing there, nothing points there) is
/// neither a leak nor part of the image, as qemu-img counts: no write for `-r leaks`.
#[test]
fn a_refcount_past_the_end_of_the_file_is_not_a_leak() {
    if !have_all("refcount_past_end", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("past-end");
    let path = image_with_data(&scratch, "a.qcow2", 2);
    patch(&path, |data| {
        let file_clusters = (data.len() as u64).div_ceil(65536);
        let at = refcount_entry(data, file_clusters + 3);
        put16(data, at, 1);
    });
    let report = assert_same_figures(&path);
    assert_eq!(report.leaks, 0, "{report:#?}");
    let before = std::fs::read(&path).unwrap();
    let repaired = Image::repair_file(&path, RepairMode::Leaks).unwrap();
    assert_eq!(repaired.leaks_fixed, 0);
    assert!(std::fs::read(&path).unwrap() == before);
}

/// Guest cluster 0 stored at offset 0 of an external data file is an L2 entry holding only
/// COPIED: allocated all the same.
#[test]
fn external_data_file_counts_the_cluster_at_offset_zero() {
    if !have_all("data_file_zero", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("data-file");
    for raw in ["off", "on"] {
        let path = scratch.path(&format!("{raw}.qcow2"));
        let data = scratch.path(&format!("{raw}.data"));
        let options = format!("data_file={},data_file_raw={raw}", data.display());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &options,
            path.to_str().unwrap(),
            "4M",
        ]);
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 1M",
                path.to_str().unwrap(),
            ],
        );
        let report = assert_same_figures(&path);
        // data_file_raw maps every cluster of the raw data file: guest cluster 0 at offset 0.
        let allocated = if raw == "on" { 64 } else { 16 };
        assert_eq!(
            report.allocated_clusters,
            Some(allocated),
            "data_file_raw={raw}"
        );
    }
}

/// A FIFO (or any file whose reads block) given as an image is refused at once, by every entry
/// point, instead of hanging.
#[test]
fn a_fifo_is_refused_without_hanging() {
    let scratch = Scratch::new("fifo");
    let fifo = scratch.path("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let fifo_for_thread = fifo.clone();
    let (done, results) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let path = &fifo_for_thread;
        let errors = [
            Image::open(path, RO).err(),
            Image::check_file(path, RO).err(),
            Image::repair_file(path, RepairMode::Leaks).err(),
            Image::create(path, 1 << 20, 65536).err(),
        ];
        let _ = done.send(errors);
    });
    let started = Instant::now();
    let errors = results
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("still blocked after {:?}", started.elapsed()));
    for error in errors {
        let error = error.expect("a FIFO must be refused");
        assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
        assert!(error.to_string().contains("is a FIFO"), "{error}");
    }
    let Err(dir) = Image::open(&scratch.dir, RO) else {
        panic!("a directory is refused");
    };
    assert!(dir.to_string().contains("is a directory"), "{dir}");
}

/// What qemu-img check cannot even open is a check error (exit 1), not a clean image: a missing
/// backing file, a missing external data file, LUKS encryption without its header extension.
#[test]
fn images_qemu_cannot_open_are_check_errors() {
    if !have_all("cannot_open", &["qemu-img"]) {
        return;
    }
    let scratch = Scratch::new("cannot-open");
    let base = scratch.path("base.qcow2");
    let top = scratch.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        top.to_str().unwrap(),
    ]);
    assert_eq!(assert_same_figures(&top).qemu_img_status(), 0);
    std::fs::remove_file(&base).unwrap();
    let report = assert_same_figures(&top);
    assert!(report.qemu_cannot_open.is_some(), "{report:#?}");
    let first = report.errors().next().expect("an error");
    assert_eq!(first.subject, Subject::Structure);
    assert!(
        matches!(
            &first.kind,
            FindingKind::MissingFile { what: "backing file", name, .. } if name == "base.qcow2"
        ),
        "{report:#?}"
    );
    assert!(
        first.to_string().contains("backing file 'base.qcow2'"),
        "{report:#?}"
    );

    let image = scratch.path("ext.qcow2");
    let data = scratch.path("ext.data");
    let options = format!("data_file={}", data.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &options,
        image.to_str().unwrap(),
        "4M",
    ]);
    assert_eq!(assert_same_figures(&image).qemu_img_status(), 0);
    std::fs::remove_file(&data).unwrap();
    let report = assert_same_figures(&image);
    assert!(
        matches!(
            report.errors().next().map(|e| &e.kind),
            Some(FindingKind::MissingFile {
                what: "external data file",
                ..
            })
        ),
        "{report:#?}"
    );
    // The open image says the same.
    let open = Image::open(&image, RO).unwrap();
    assert_eq!(open.check().qemu_img_status(), 1);

    let luks = scratch.path("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        luks.to_str().unwrap(),
        "1M",
    ]);
    assert!(
        check(&luks).is_consistent(),
        "the metadata is checked without the secret"
    );
    patch(&luks, |data| {
        let at = hbitmap_testkit::qcow2::extensions(data)
            .into_iter()
            .find(|e| e.magic == 0x0537_be77)
            .expect("a LUKS header extension")
            .offset;
        hbitmap_testkit::qcow2::put32(data, at, 0x1234_5678);
    });
    let report = assert_same_figures(&luks);
    let first = report.errors().next().expect("an error");
    assert!(
        matches!(&first.kind, FindingKind::Unreadable { detail } if detail.contains("crypt_method 2")),
        "{report:#?}"
    );
    assert!(matches!(Image::open(&luks, RO), Err(Error::Corrupt(_))));
}

/// One damaged bitmap does not hide the others: the image opens read-only, every bitmap is
/// listed, the intact one reads as QEMU serves it, the damaged one is refused naming its damage,
/// and writing waits for a repair.
#[test]
fn an_intact_bitmap_reads_beside_a_damaged_one() {
    if !have_all(
        "intact_beside_damaged",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let scratch = Scratch::new("beside-damaged");
    let path = image_with_data(&scratch, "a.qcow2", 4);
    let mut image = Image::open(&path, hbitmap_testkit::qcow2::RW).unwrap();
    for name in ["intact", "damaged"] {
        image.add_bitmap(name, 65536, true).unwrap();
        image
            .edit_bitmap(name, |b| {
                b.set(1 << 20, 3 << 20);
                b.set(40 << 20, 65536);
            })
            .unwrap();
    }
    image.close().unwrap();
    let expected = qemu_extents(&scratch.dir, &path, "intact");
    // The damaged bitmap's first data cluster becomes a guest data cluster: a cross-link.
    patch(&path, |data| {
        let (_, l2) = first_entries(data);
        let guest = be64(data, l2) & 0x00ff_ffff_ffff_fe00;
        let (first, _) = first_data(data, "damaged");
        put64(data, first, guest);
    });
    let report = check(&path);
    assert_eq!(report.damaged_bitmaps, ["damaged"], "{report:#?}");
    let image = Image::open(&path, RO).expect("damage confined to one bitmap");
    assert_eq!(image.bitmaps().len(), 2);
    let intact = image.inspect_bitmap("intact").unwrap();
    assert_eq!(extents(&intact), expected);
    assert_eq!(qemu_extents(&scratch.dir, &path, "intact"), expected);
    let Err(refused) = image.inspect_bitmap("damaged") else {
        panic!("a damaged bitmap must not read as data");
    };
    assert!(matches!(refused, Error::Corrupt(_)), "{refused}");
    assert!(
        refused.to_string().contains("'damaged' is damaged"),
        "{refused}"
    );
    assert!(image.warnings().iter().any(|w| w.contains("'damaged'")));
    drop(image);
    assert!(Image::open(&path, hbitmap_testkit::qcow2::RW).is_err());
}

/// An image QEMU wrote data to, with two bitmaps holding dirty data: 'keep' and 'other'.
fn two_bitmaps(scratch: &Scratch, file: &str) -> std::path::PathBuf {
    let path = image_with_data(scratch, file, 2);
    let mut image = Image::open(&path, hbitmap_testkit::qcow2::RW).unwrap();
    for name in ["keep", "other"] {
        image.add_bitmap(name, 65536, true).unwrap();
        image
            .edit_bitmap(name, |b| b.set(8 << 20, 1 << 20))
            .unwrap();
    }
    image.close().unwrap();
    path
}

/// The table entry offset and data cluster offset of a bitmap's first data cluster.
fn first_data(data: &[u8], name: &str) -> (usize, u64) {
    let entry = hbitmap_testkit::qcow2::directory_entry(data, name);
    let table = be64(data, entry) as usize;
    (0..be32(data, entry + 8) as usize)
        .map(|i| table + 8 * i)
        .find_map(|at| {
            let cluster = be64(data, at) & 0x00ff_ffff_ffff_fe00;
            (cluster > 1).then_some((at, cluster))
        })
        .expect("a data cluster")
}

/// An intact bitmap whose data cluster has refcount 0 is kept by `-r all`: the refcount is
/// raised, as qemu-img check -r all raises it, and the bitmap reads as before.
#[test]
fn an_intact_bitmap_with_an_uncounted_cluster_is_kept() {
    if !have_all("uncounted_kept", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("uncounted");
    let path = two_bitmaps(&scratch, "a.qcow2");
    let before = Image::open(&path, RO)
        .unwrap()
        .inspect_bitmap("keep")
        .unwrap();
    patch(&path, |data| {
        let (_, cluster) = first_data(data, "keep");
        let at = refcount_entry(data, cluster >> 16);
        put16(data, at, 0);
    });
    let report = assert_same_figures(&path);
    assert_eq!(report.corruptions, 1, "{report:#?}");
    let twin = scratch.path("twin.qcow2");
    std::fs::copy(&path, &twin).unwrap();
    let repaired = Image::repair_file(&path, RepairMode::All).unwrap();
    assert_eq!(repaired.corruptions_fixed, 1, "{repaired:#?}");
    assert!(repaired.after.is_clean(), "{:#?}", repaired.after);
    qemu_check(&path, false);
    let image = Image::open(&path, RO).unwrap();
    assert_eq!(image.bitmaps().len(), 2);
    assert_eq!(
        extents(&image.inspect_bitmap("keep").unwrap()),
        extents(&before)
    );
    // qemu-img check -r all keeps it too (it lays the refcounts out anew, so the bytes differ).
    let output = Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", "-f", "qcow2"])
        .arg(&twin)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let theirs = Image::open(&twin, RO)
        .unwrap()
        .inspect_bitmap("keep")
        .unwrap();
    assert_eq!(extents(&theirs), extents(&before));
}

/// A bitmap in use whose table points into a consistent bitmap's data cluster: the in-use one
/// is to blame (it was not saved properly); `-r all` removes it and keeps the other to the byte.
#[test]
fn a_bitmap_in_use_pointing_into_an_intact_one_does_not_take_it_along() {
    if !have_all("in_use_cross_link", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("in-use-link");
    let path = two_bitmaps(&scratch, "a.qcow2");
    let before = Image::open(&path, RO)
        .unwrap()
        .inspect_bitmap("keep")
        .unwrap();
    patch(&path, |data| {
        let (_, keep) = first_data(data, "keep");
        let (at, _) = first_data(data, "other");
        let entry = be64(data, at);
        put64(data, at, (entry & !0x00ff_ffff_ffff_fe00) | keep);
        let dir = hbitmap_testkit::qcow2::directory_entry(data, "other");
        let flags = be32(data, dir + 12);
        hbitmap_testkit::qcow2::put32(data, dir + 12, flags | 1);
    });
    let report = check(&path);
    assert_eq!(report.damaged_bitmaps, ["other"], "{report:#?}");
    let image = Image::open(&path, RO).unwrap();
    assert_eq!(
        extents(&image.inspect_bitmap("keep").unwrap()),
        extents(&before)
    );
    drop(image);
    let repaired = Image::repair_file(&path, RepairMode::All).unwrap();
    assert!(repaired.after.is_clean(), "{:#?}", repaired.after);
    qemu_check(&path, false);
    let image = Image::open(&path, RO).unwrap();
    let names: Vec<String> = image.bitmaps().iter().map(|b| b.name.to_string()).collect();
    assert_eq!(names, ["keep"]);
    assert_eq!(
        extents(&image.inspect_bitmap("keep").unwrap()),
        extents(&before)
    );
}

/// File offset (of the 8-byte header) of the bitmaps extension.
fn bitmaps_ext_at(data: &[u8]) -> usize {
    hbitmap_testkit::qcow2::extensions(data)
        .into_iter()
        .find(|e| e.magic == hbitmap_testkit::qcow2::BITMAPS_EXTENSION)
        .expect("a bitmaps extension")
        .offset
}

/// The bitmaps (name, extents) an image holds, read by this library.
fn contents(path: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let image = Image::open(path, RO).unwrap();
    image
        .bitmaps()
        .iter()
        .map(|b| {
            let bitmap = image.inspect_bitmap(&b.name).unwrap();
            (b.name.to_string(), extents(&bitmap))
        })
        .collect()
}

/// `-r leaks` refuses without writing; `-r all` keeps every bitmap as it was; QEMU then opens
/// the image, lists the bitmaps and finds it clean.
fn repaired_keeping_every_bitmap(path: &Path, expected: &[(String, Vec<(u64, u64)>)]) {
    let before = std::fs::read(path).unwrap();
    let refused = Image::repair_file(path, RepairMode::Leaks).unwrap_err();
    assert!(matches!(refused, Error::Unsupported(_)), "{refused}");
    assert!(std::fs::read(path).unwrap() == before, "-r leaks wrote");
    let repaired = Image::repair_file(path, RepairMode::All).unwrap();
    assert!(repaired.after.is_clean(), "{repaired:#?}");
    assert!(
        repaired
            .changes
            .iter()
            .any(|c| c.contains("wrote the extension and the directory anew")),
        "{:?}",
        repaired.changes
    );
    assert_eq!(contents(path), expected);
    qemu_check(path, false);
    let names: Vec<String> = qemu_bitmaps(path).into_iter().map(|b| b.0).collect();
    let ours: Vec<String> = expected.iter().map(|b| b.0.clone()).collect();
    assert_eq!(names, ours);
}

/// A bitmaps extension whose length says 16 instead of its fixed 24 (QEMU cannot open the
/// image): its fields are still there, and `-r all` writes the header anew keeping the bitmaps.
#[test]
fn a_bitmaps_extension_of_the_wrong_length_is_repaired() {
    if !have_all("ext_length", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("ext-length");
    let path = two_bitmaps(&scratch, "a.qcow2");
    let expected = contents(&path);
    patch(&path, |data| {
        let at = bitmaps_ext_at(data);
        hbitmap_testkit::qcow2::put32(data, at + 4, 16);
    });
    let (code, _) = qemu_check_json(&path);
    assert_eq!(code, 1, "QEMU cannot open it");
    let report = check(&path);
    assert!(report.corruptions > 0, "{report:#?}");
    let first = report.errors().next().expect("an error");
    assert_eq!(
        (first.severity, &first.subject),
        (Severity::Error, &Subject::Extension)
    );
    assert!(
        matches!(first.kind, FindingKind::ExtensionLength { stated: 16, .. }),
        "{report:#?}"
    );
    assert!(
        first.to_string().contains("its length is 16, not 24"),
        "{report:#?}"
    );
    repaired_keeping_every_bitmap(&path, &expected);
}

/// nb_bitmaps off by one, bitmap_directory_size off by 8 or 32, while every directory entry is
/// intact: the entries are read from the directory's clusters and `-r all` keeps their bitmaps.
#[test]
fn a_directory_count_or_size_off_keeps_the_intact_entries() {
    if !have_all("directory_off", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("dir-off");
    let cases: [(&str, i64, i64); 5] = [
        ("one more bitmap", 1, 0),
        ("one bitmap fewer", -1, 0),
        ("8 bytes more", 0, 8),
        ("32 bytes more", 0, 32),
        ("8 bytes fewer", 0, -8),
    ];
    for (what, count, size) in cases {
        let path = two_bitmaps(&scratch, "a.qcow2");
        let expected = contents(&path);
        patch(&path, |data| {
            let ext = bitmaps_ext_at(data) + 8;
            let nb = be32(data, ext);
            hbitmap_testkit::qcow2::put32(data, ext, (i64::from(nb) + count) as u32);
            let dir_size = be64(data, ext + 8);
            put64(data, ext + 8, (dir_size as i64 + size) as u64);
        });
        let report = check(&path);
        assert!(
            report.corruptions > 0 && report.broken_extension,
            "{what}: {report:#?}"
        );
        repaired_keeping_every_bitmap(&path, &expected);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Two bitmaps extensions: QEMU reads both and uses the last, and so do we (the image opens,
/// its figures are qemu-img's); `-r leaks` drops the ignored one and frees what only it used.
#[test]
fn a_second_bitmaps_extension_is_read_as_qemu_reads_it() {
    if !have_all("two_extensions", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("two-ext");
    let path = two_bitmaps(&scratch, "a.qcow2");
    // The extension as it is now, then a new directory (the old one's clusters freed).
    let old_ext = {
        let data = std::fs::read(&path).unwrap();
        let at = bitmaps_ext_at(&data);
        data[at..at + 32].to_vec()
    };
    qemu_img(&["bitmap", "--add", path.to_str().unwrap(), "third"]);
    let expected = contents(&path);
    assert_eq!(expected.len(), 3);
    patch(&path, |data| {
        let at = bitmaps_ext_at(data);
        let cluster = 65536;
        let tail: Vec<u8> = data[at..cluster - 32].to_vec();
        data[at..at + 32].copy_from_slice(&old_ext);
        data[at + 32..cluster].copy_from_slice(&tail);
    });
    let names: Vec<String> = qemu_bitmaps(&path).into_iter().map(|b| b.0).collect();
    assert_eq!(
        names,
        ["keep", "other", "third"],
        "QEMU uses the last extension"
    );
    let report = assert_same_figures(&path);
    assert!(
        report.warnings().any(|w| w.subject == Subject::Extension
            && matches!(w.kind, FindingKind::IgnoredExtension { .. })),
        "{report:#?}"
    );
    assert_eq!(contents(&path), expected);
    let repaired = Image::repair_file(&path, RepairMode::Leaks).unwrap();
    assert!(repaired.after.is_clean(), "{repaired:#?}");
    assert!(
        repaired
            .changes
            .iter()
            .any(|c| c.contains("that QEMU ignores")),
        "{:?}",
        repaired.changes
    );
    let data = std::fs::read(&path).unwrap();
    let count = hbitmap_testkit::qcow2::extensions(&data)
        .iter()
        .filter(|e| e.magic == hbitmap_testkit::qcow2::BITMAPS_EXTENSION)
        .count();
    assert_eq!(count, 1);
    assert_eq!(contents(&path), expected);
    qemu_check(&path, false);
}

/// Marks bitmap `name` in use (flag bit 0 of its directory entry).
fn mark_in_use(data: &mut [u8], name: &str) {
    let dir = hbitmap_testkit::qcow2::directory_entry(data, name);
    let flags = be32(data, dir + 12);
    hbitmap_testkit::qcow2::put32(data, dir + 12, flags | 1);
}

/// Points the table entry of bitmap `name`'s first data cluster at `cluster`, keeping its flags.
fn redirect_first_data(data: &mut [u8], name: &str, cluster: u64) {
    let (at, _) = first_data(data, name);
    let entry = be64(data, at);
    put64(data, at, (entry & !0x00ff_ffff_ffff_fe00) | cluster);
}

/// Guest data of the first `clusters` 64 KiB clusters still reads as pattern 0x5a.
fn guest_data_intact(path: &Path, clusters: u64) {
    let read = format!("read -P 0x5a 0 {}", clusters * 65536);
    let output = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", &read])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
}

/// A bitmap in use whose table entry points at the active L2 table: qemu-img check counts its
/// table and data clusters like any other bitmap's, so the L2 table has one reference more than
/// its refcount (1 corruption, exit 2) and the bitmap's own data cluster is leaked. The table is
/// still referenced by the directory: not a leak. `-r leaks` refuses (the bitmap's clusters are
/// not known), `-r all` removes that bitmap only and leaves the image clean.
#[test]
fn an_in_use_bitmap_pointing_at_the_active_l2_table_is_a_corruption() {
    if !have_all("in_use_on_l2", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("in-use-l2");
    let path = two_bitmaps(&scratch, "a.qcow2");
    let keep = contents(&path)[0].clone();
    assert_eq!(keep.0, "keep");
    patch(&path, |data| {
        let l2 = be64(data, be64(data, L1_TABLE_OFFSET) as usize) & 0x00ff_ffff_ffff_fe00;
        redirect_first_data(data, "other", l2);
        mark_in_use(data, "other");
    });
    let report = assert_same_figures(&path);
    assert_eq!((report.corruptions, report.leaks), (1, 1), "{report:#?}");
    assert_eq!(report.qemu_img_status(), 2);
    assert_eq!(report.damaged_bitmaps, ["other"], "{report:#?}");
    // Damage confined to one bitmap: the image opens read-only and lists both.
    assert_eq!(report.bitmaps, Some(2));
    assert_eq!(Image::open(&path, RO).unwrap().bitmaps().len(), 2);
    // The one leak is the bitmap's own data cluster, not its table.
    let table = {
        let data = std::fs::read(&path).unwrap();
        be64(
            &data,
            hbitmap_testkit::qcow2::directory_entry(&data, "other"),
        )
    };
    assert!(report.leaked().next().is_some(), "{report:#?}");
    assert!(
        report.leaked().all(|run| match run.kind {
            FindingKind::Leak { at, end } => !(at..end).contains(&table),
            _ => false,
        }),
        "{report:#?}"
    );
    let before = std::fs::read(&path).unwrap();
    let refused = Image::repair_file(&path, RepairMode::Leaks).unwrap_err();
    assert!(matches!(refused, Error::Unsupported(_)), "{refused}");
    assert!(std::fs::read(&path).unwrap() == before, "-r leaks wrote");
    let repaired = Image::repair_file(&path, RepairMode::All).unwrap();
    assert!(repaired.after.is_clean(), "{repaired:#?}");
    qemu_check(&path, false);
    assert_eq!(contents(&path), [keep]);
    guest_data_intact(&path, 2);
}

/// Damaged bitmaps counted as qemu-img check counts them: their tables and data clusters are
/// referenced (not leaked), and a cluster shared with guest data, with an intact bitmap or with
/// compressed data is one corruption however many entries point to it (16 compressed clusters
/// share one host cluster here). In use or not, the figures are qemu-img's: 1 corruption, 1
/// leak (the damaged bitmap's own data cluster).
#[test]
fn damaged_bitmaps_are_counted_as_qemu_img_counts_them() {
    if !have_all("damaged_counts", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("damaged-counts");
    for target in ["guest data", "an intact bitmap", "compressed data"] {
        for in_use in [false, true] {
            let path = scratch.path("a.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]);
            let compressed = target == "compressed data";
            let write = if compressed {
                "write -c -P 0x5a 0 1M"
            } else {
                "write -P 0x5a 0 128k"
            };
            run(
                "qemu-io",
                &["-f", "qcow2", "-c", write, path.to_str().unwrap()],
            );
            let mut image = Image::open(&path, hbitmap_testkit::qcow2::RW).unwrap();
            for name in ["keep", "other"] {
                image.add_bitmap(name, 65536, true).unwrap();
                image
                    .edit_bitmap(name, |b| b.set(8 << 20, 1 << 20))
                    .unwrap();
            }
            image.close().unwrap();
            patch(&path, |data| {
                let (_, l2) = first_entries(data);
                let cluster = match target {
                    "guest data" => be64(data, l2) & 0x00ff_ffff_ffff_fe00,
                    "an intact bitmap" => first_data(data, "keep").1,
                    _ => {
                        // Compressed descriptors with 64 KiB clusters: offset in bits 0..54.
                        let host = |i: usize| (be64(data, l2 + 8 * i) & ((1 << 54) - 1)) >> 16;
                        assert_ne!(be64(data, l2) & (1 << 62), 0, "compressed");
                        assert!(
                            (0..16).all(|i| host(i) == host(0)),
                            "16 compressed clusters in one host cluster"
                        );
                        host(0) << 16
                    }
                };
                redirect_first_data(data, "other", cluster);
                if in_use {
                    mark_in_use(data, "other");
                }
            });
            let report = assert_same_figures(&path);
            assert_eq!(
                (report.corruptions, report.leaks),
                (1, 1),
                "{target}, in use {in_use}: {report:#?}"
            );
            // Two consistent bitmaps sharing a cluster: which one is wrong is not known here
            // (the repair tells them apart), so both are listed.
            assert!(
                report.damaged_bitmaps.iter().any(|b| b == "other"),
                "{target}: {report:#?}"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// A bitmap in use whose table lies past the end of the file counts one corruption, as
/// qemu-img check counts a region a cluster or more past the end, and its old table is leaked;
/// one whose table holds an invalid entry makes qemu-img check fail (exit 1), and ours says so.
#[test]
fn in_use_bitmaps_with_unreadable_tables_are_counted_as_qemu_img_counts_them() {
    if !have_all("in_use_unreadable", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("in-use-unreadable");
    for case in ["table past the end", "invalid table entry"] {
        let path = two_bitmaps(&scratch, "a.qcow2");
        patch(&path, |data| {
            let entry = hbitmap_testkit::qcow2::directory_entry(data, "other");
            if case == "table past the end" {
                put64(data, entry, 1 << 30);
            } else {
                let (at, _) = first_data(data, "other");
                put64(data, at, 0xdead_beef_0000_0003);
            }
            mark_in_use(data, "other");
        });
        let report = assert_same_figures(&path);
        if case == "table past the end" {
            assert_eq!(
                (report.qemu_img_status(), report.corruptions, report.leaks),
                (2, 1, 2),
                "{case}: {report:#?}"
            );
        } else {
            assert_eq!(report.qemu_img_status(), 1, "{case}: {report:#?}");
            let why = report.qemu_cannot_open.as_deref().unwrap_or_default();
            assert!(why.contains("its check stops"), "{case}: {report:#?}");
        }
        // Either way -r all removes the bitmap and leaves the image clean.
        let repaired = Image::repair_file(&path, RepairMode::All).unwrap();
        assert!(repaired.after.is_clean(), "{case}: {repaired:#?}");
        qemu_check(&path, false);
        assert_eq!(contents(&path).len(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Counts the reads of each offset (one `pread` per structure read).
struct CountingIo {
    inner: hbitmap::qcow2::io::FileIo,
    reads: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, usize>>>,
}

impl hbitmap::qcow2::io::ImageIo for CountingIo {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        *self.reads.lock().unwrap().entry(offset).or_insert(0) += 1;
        self.inner.pread(offset, buf)
    }
    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.pwrite(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// One walk: on an image with a bitmap, whose clusters are checked against every guest data
/// cluster, the check reads each L2 table once, for that and for the reference count alike,
/// and its figures are still qemu-img's.
#[test]
fn check_reads_each_l2_table_once() {
    if !have_all("l2_once", &["qemu-img", "qemu-io"]) {
        return;
    }
    let scratch = Scratch::new("l2-once");
    let path = scratch.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4G"]);
    // One L2 table per 512 MiB: four of them.
    for at in ["0", "1G", "2G", "3G"] {
        let write = format!("write -P 0x5a {at} 64k");
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", &write, path.to_str().unwrap()],
        );
    }
    let mut image = Image::open(&path, hbitmap_testkit::qcow2::RW).unwrap();
    image.add_bitmap("b", 65536, true).unwrap();
    image.edit_bitmap("b", |b| b.set(0, 1 << 30)).unwrap();
    image.close().unwrap();
    let data = std::fs::read(&path).unwrap();
    let l1 = be64(&data, L1_TABLE_OFFSET) as usize;
    let l2_tables: Vec<u64> = (0..8)
        .map(|i| be64(&data, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00)
        .filter(|&offset| offset != 0)
        .collect();
    assert_eq!(l2_tables.len(), 4);

    let reads = std::sync::Arc::default();
    let io = CountingIo {
        inner: hbitmap::qcow2::io::FileIo::new(std::fs::File::open(&path).unwrap()),
        reads: std::sync::Arc::clone(&reads),
    };
    let image = Image::open_io(Box::new(io), &path, false).unwrap();
    reads.lock().unwrap().clear();
    let report = image.check();
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.bitmaps, Some(1));
    let reads = reads.lock().unwrap();
    for offset in &l2_tables {
        assert_eq!(reads.get(offset), Some(&1), "the L2 table at {offset:#x}");
    }
    drop(image);
    assert_same_figures(&path);
}
