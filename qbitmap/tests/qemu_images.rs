// SPDX-License-Identifier: GPL-2.0-or-later

//! Images made or accepted by QEMU 10's own tools (qemu-img, qemu-io), handled by `qbitmap` as
//! QEMU handles them or more strictly: internal snapshots, unknown incompatible features, in-use
//! bitmaps whose table is gone, QEMU's default granularity, padding bits QEMU writes, bitmap
//! clusters cross-linked with guest data, and allocation on small clusters and wide refcounts.
//! Each case compares `qbitmap check` with `qemu-img check` on the same image. Tests print why
//! and pass when a QEMU tool is absent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hbitmap_testkit::qcow2::{be64, bitmaps_extension, directory_entry, extensions, put64};
use hbitmap_testkit::tools::{self, have, qemu_bitmaps, run, text};
use serde_json::Value;
use tempfile::TempDir;

/// The magic of the feature name table header extension.
const FEATURE_NAME_TABLE: u32 = 0x6803_f857;

const QBITMAP: &str = env!("CARGO_BIN_EXE_qbitmap");

fn qbitmap(args: &[&str]) -> Output {
    tools::output(QBITMAP, args)
}

/// Runs qbitmap, expecting success; returns stdout.
fn ok(args: &[&str]) -> String {
    tools::run(QBITMAP, args)
}

/// Runs qbitmap, expecting exit status 1; returns stdout and stderr.
fn fails(args: &[&str]) -> String {
    tools::run_expecting(QBITMAP, args, 1)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img check`: its exit status (0 clean, 2 corruptions, 3 leaks only) and output.
fn qemu_check(path: &Path) -> (i32, String) {
    let output = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(path)])
        .output()
        .unwrap();
    (output.status.code().unwrap_or(-1), text(&output))
}

/// `qbitmap check`: its exit status and output.
fn our_check(path: &Path) -> (i32, String) {
    let output = qbitmap(&["check", s(path)]);
    (output.status.code().unwrap_or(-1), text(&output))
}

/// Both checks find the image clean.
fn both_clean(path: &Path) {
    let (code, out) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check: {out}");
    let (code, out) = our_check(path);
    assert_eq!(code, 0, "qbitmap check: {out}");
}

/// A scratch directory with a qcow2 image made by qemu-img create.
fn qemu_image(size: &str, options: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([s(&path), size]);
    run("qemu-img", &args);
    (dir, path)
}

fn our_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let list: Value = serde_json::from_str(&ok(&["list", s(path), "--output=json"])).unwrap();
    list["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect()
}

/// Changes the image file in place.
fn patch(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut data = fs::read(path).unwrap();
    change(&mut data);
    fs::write(path, data).unwrap();
}

/// The bitmap table offset of bitmap `name`.
fn table_offset(path: &Path, name: &str) -> usize {
    let data = fs::read(path).unwrap();
    be64(&data, directory_entry(&data, name)) as usize
}

// ---------------------------------------------------------------------------------------------

/// QEMU does not pad the last snapshot table entry; a table written last ends the file there.
#[test]
fn snapshot_table_at_the_end_of_the_file() {
    if !have(
        "snapshot_table_at_the_end_of_the_file",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("1G", "");
    run("qemu-io", &["-c", "write 0 1M", s(&path)]);
    run("qemu-img", &["snapshot", "-c", "snap1", s(&path)]);
    let data = fs::read(&path).unwrap();
    let snapshots = be64(&data, 64) as usize;
    assert!(
        snapshots + 40 < data.len() && data.len() % 8 != 0,
        "the snapshot table should end the file unpadded ({} bytes)",
        data.len()
    );
    both_clean(&path);
    assert!(our_bitmaps(&path).is_empty());
    ok(&["add", s(&path), "first"]);
    ok(&["set", s(&path), "first", "0", "64K"]);
    assert_eq!(our_bitmaps(&path), qemu_bitmaps(&path));
    both_clean(&path);
    // QEMU still finds its snapshot.
    assert!(run("qemu-img", &["snapshot", "-l", s(&path)]).contains("snap1"));
}

/// QEMU refuses to open an image with unknown incompatible features; so must we, for reading
/// too, naming the bits.
#[test]
fn unknown_incompatible_features_refuse_reads() {
    if !have("unknown_incompatible_features_refuse_reads", &["qemu-img"]) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    patch(&path, |data| {
        let bits = be64(data, 72) | 1 << 5 | 1 << 40;
        put64(data, 72, bits);
        // Name bit 5 in the feature name table, as a newer QEMU would (its first entry,
        // incompatible bit 0, becomes incompatible bit 5).
        let entry = extensions(data)
            .iter()
            .find(|e| e.magic == FEATURE_NAME_TABLE)
            .expect("a feature name table")
            .data();
        assert_eq!(&data[entry..entry + 2], &[0, 0]);
        data[entry + 1] = 5;
        data[entry + 2..entry + 48].fill(0);
        data[entry + 2..entry + 16].copy_from_slice(b"future feature");
    });
    let qemu = Command::new("qemu-img")
        .args(["info", s(&path)])
        .output()
        .unwrap();
    assert!(!qemu.status.success());
    assert!(
        text(&qemu).contains("Unsupported qcow2 feature"),
        "{}",
        text(&qemu)
    );
    let (code, qemu) = qemu_check(&path);
    assert_eq!(code, 1, "{qemu}");
    for args in [
        vec!["list", s(&path)],
        vec!["dump", s(&path), "b"],
        vec!["dump", "--force", s(&path), "b"],
        vec!["check", s(&path)],
        vec!["remove", s(&path), "b"],
    ] {
        let out = fails(&args);
        assert!(
            out.contains("incompatible feature bits 5 ('future feature'), 40"),
            "qbitmap {args:?}: {out}"
        );
    }
}

/// A crash can leave an in-use bitmap whose table is not in the file: QEMU never reads an
/// in-use bitmap's table, lists it and lets it be removed. So do we.
#[test]
fn in_use_bitmap_whose_table_lies_past_the_end() {
    if !have("in_use_bitmap_whose_table_lies_past_the_end", &["qemu-img"]) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-img", &["bitmap", "--add", s(&path), "lost"]);
    run("qemu-img", &["bitmap", "--add", s(&path), "keep"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", s(&path), "unreadable"],
    );
    patch(&path, |data| {
        let entry = directory_entry(data, "lost");
        put64(data, entry, 1 << 30);
        data[entry + 15] |= 1; // in_use
                               // An in-use bitmap's table is never read: garbage in it does not matter.
        let entry = directory_entry(data, "unreadable");
        let table = be64(data, entry) as usize;
        put64(data, table, 0xdead_beef_0000_0003);
        data[entry + 15] |= 1;
    });
    assert_eq!(our_bitmaps(&path), qemu_bitmaps(&path));
    // qemu-img check counts the table past the end as a corruption, and fails at the table
    // holding reserved bits (exit 1); so do we, naming both.
    let (code, qemu) = qemu_check(&path);
    assert_eq!(code, 1, "{qemu}");
    let (code, ours) = our_check(&path);
    assert_eq!(code, 1, "{ours}");
    assert!(
        ours.contains("'lost'") && ours.contains("0x40000000") && ours.contains("past the end"),
        "{ours}"
    );
    assert!(
        ours.contains("its check stops at the bitmap table"),
        "{ours}"
    );
    ok(&["dump", s(&path), "keep"]);
    ok(&["remove", s(&path), "lost"]);
    ok(&["remove", s(&path), "unreadable"]);
    assert_eq!(our_bitmaps(&path), qemu_bitmaps(&path));
    assert_eq!(our_bitmaps(&path).len(), 1);
    // The unreadable table's clusters are leaked, not freed blindly.
    let (code, qemu) = qemu_check(&path);
    assert!(code == 0 || code == 3, "{qemu}");
    run("qemu-img", &["check", "-q", "-r", "leaks", s(&path)]);
    both_clean(&path);
}

/// `qbitmap add` without -g picks QEMU's default: the cluster size clamped to 4 KiB..64 KiB.
#[test]
fn default_granularity_is_qemus() {
    if !have("default_granularity_is_qemus", &["qemu-img"]) {
        return;
    }
    for (cluster, expected) in [
        (512u64, 4096u64),
        (4096, 4096),
        (16384, 16384),
        (65536, 65536),
        (2 << 20, 65536),
    ] {
        let (_dir, path) = qemu_image("64M", &format!("cluster_size={cluster}"));
        run("qemu-img", &["bitmap", "--add", s(&path), "qemu"]);
        ok(&["add", s(&path), "ours"]);
        let empty = path.with_extension("json");
        fs::write(&empty, "[]").unwrap();
        ok(&["import", s(&path), "imported", s(&empty)]);
        let bitmaps = qemu_bitmaps(&path);
        assert_eq!(bitmaps.len(), 3);
        for (name, granularity, _) in &bitmaps {
            assert_eq!(
                *granularity, expected,
                "bitmap {name} with {cluster}-byte clusters"
            );
        }
        both_clean(&path);
    }
}

/// QEMU loads an all-ones table entry with its padding bits set and writes them back: such an
/// image is read (padding ignored, a note in check) and our writes clear them.
#[test]
fn padding_bits_qemu_writes() {
    if !have("padding_bits_qemu_writes", &["qemu-img", "qemu-io"]) {
        return;
    }
    // 100 granules of 64 KiB: not a multiple of 64.
    let (_dir, path) = qemu_image(&(100 * 65536).to_string(), "");
    run("qemu-img", &["bitmap", "--add", s(&path), "full"]);
    run("qemu-img", &["bitmap", "--add", s(&path), "other"]);
    let table = table_offset(&path, "full");
    patch(&path, |data| put64(data, table, 1));
    // QEMU loads the bitmap, tracks a write and stores it on close.
    run("qemu-io", &["-c", "write 0 512", s(&path)]);
    let data = fs::read(&path).unwrap();
    let table = be64(&data, directory_entry(&data, "full")) as usize;
    let cluster = be64(&data, table) as usize;
    assert!(cluster > 1, "QEMU stored a data cluster");
    // Bits 100..127 of the cluster are padding: QEMU set them.
    assert_ne!(data[cluster + 12] & 0xf0, 0, "QEMU wrote padding bits");
    assert_eq!(qemu_check(&path).0, 0);

    let (code, ours) = our_check(&path);
    assert_eq!(code, 0, "{ours}");
    assert!(ours.contains("NOTE") && ours.contains("padding"), "{ours}");
    let list: Value = serde_json::from_str(&ok(&["list", s(&path), "--output=json"])).unwrap();
    assert_eq!(list["bitmaps"][0]["dirty-bytes"], 100 * 65536);
    let dump: Value =
        serde_json::from_str(&ok(&["dump", s(&path), "full", "--output=json"])).unwrap();
    assert_eq!(dump["extents"][0]["length"], 100 * 65536);
    ok(&["remove", s(&path), "other"]);
    // A write of ours stores the bitmap without its padding bits.
    ok(&["reset", s(&path), "full", "0", "64K"]);
    let data = fs::read(&path).unwrap();
    let table = be64(&data, directory_entry(&data, "full")) as usize;
    let cluster = be64(&data, table) as usize;
    assert_eq!(data[cluster + 12], 0x0f);
    assert!(data[cluster + 13..cluster + 65536].iter().all(|&b| b == 0));
    let (code, ours) = our_check(&path);
    assert_eq!(code, 0, "{ours}");
    assert!(!ours.contains("NOTE"), "{ours}");
    assert_eq!(qemu_check(&path).0, 0);
}

/// Host offset of the guest cluster at virtual offset 0.
fn guest_cluster(path: &Path) -> u64 {
    let map: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(path)])).unwrap();
    map[0]["offset"].as_u64().expect("allocated")
}

/// A bitmap table entry pointing at a guest data cluster: check names both, and no write frees
/// or overwrites the guest's cluster.
#[test]
fn bitmap_cluster_cross_linked_with_guest_data() {
    if !have(
        "bitmap_cluster_cross_linked_with_guest_data",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    run("qemu-io", &["-c", "write -P 0xab 0 64k", s(&path)]);
    let guest = guest_cluster(&path);
    let table = table_offset(&path, "b");
    let data = fs::read(&path).unwrap();
    assert!(be64(&data, table) > 1, "QEMU stored a data cluster");
    patch(&path, |data| put64(data, table, guest));
    // QEMU sees a refcount error (two references, refcount 1).
    let (code, qemu) = qemu_check(&path);
    assert_eq!(code, 2, "{qemu}");
    let (code, ours) = our_check(&path);
    assert_eq!(code, 2, "{ours}");
    assert!(
        ours.contains(&format!("{guest:#x}")) && ours.contains("guest data"),
        "{ours}"
    );
    for args in [
        vec!["clear", s(&path), "b"],
        vec!["remove", s(&path), "b"],
        vec!["set", s(&path), "b", "0", "64K"],
        vec!["add", s(&path), "other"],
    ] {
        let out = fails(&args);
        assert!(out.contains("guest data"), "qbitmap {args:?}: {out}");
    }
    run("qemu-io", &["-r", "-c", "read -P 0xab 0 64k", s(&path)]);
    let (code, after) = qemu_check(&path);
    assert_eq!((code, after), (2, qemu));
    // -r leaks refuses: the damaged bitmap's clusters are not known.
    let out = fails(&["check", "-r", "leaks", s(&path)]);
    assert!(
        out.contains("refusing to repair") && out.contains("-r all"),
        "{out}"
    );
    // -r all removes the bitmap and frees only what it alone used: the guest's cluster stays.
    repair_all_and_verify(&path, &["removed bitmap 'b'"]);
    run("qemu-io", &["-r", "-c", "read -P 0xab 0 64k", s(&path)]);
}

/// Also a bitmap cluster shared with a snapshot's L2 table or data.
#[test]
fn bitmap_cluster_cross_linked_with_a_snapshot() {
    if !have(
        "bitmap_cluster_cross_linked_with_a_snapshot",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0xcd 0 64k", s(&path)]);
    let guest = guest_cluster(&path);
    run("qemu-img", &["snapshot", "-c", "snap", s(&path)]);
    // The active layer moves on; the old cluster belongs to the snapshot alone.
    run("qemu-io", &["-c", "write -P 0xef 0 64k", s(&path)]);
    assert_ne!(guest_cluster(&path), guest);
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    run("qemu-io", &["-c", "write 64k 64k", s(&path)]);
    let table = table_offset(&path, "b");
    patch(&path, |data| put64(data, table, guest));
    let (code, qemu) = qemu_check(&path);
    assert_eq!(code, 2, "{qemu}");
    let (code, ours) = our_check(&path);
    assert_eq!(code, 2, "{ours}");
    assert!(
        ours.contains(&format!("{guest:#x}")) && ours.contains("snapshot"),
        "{ours}"
    );
    fails(&["clear", s(&path), "b"]);
    repair_all_and_verify(&path, &["removed bitmap 'b'"]);
    run("qemu-img", &["snapshot", "-a", "snap", s(&path)]);
    run("qemu-io", &["-r", "-c", "read -P 0xcd 0 64k", s(&path)]);
}

/// Runs `qbitmap check -r all`: every expected change is named, the guest data compares equal
/// with a copy taken before (`qemu-img compare`, every snapshot included), `qemu-img check` is
/// clean (exit 0: no corruption, no leak), QEMU opens it (`qemu-img info`, `qemu-io`), and our
/// check agrees.
fn repair_all_and_verify(path: &Path, expected: &[&str]) -> String {
    let before = path.with_extension("before.qcow2");
    fs::copy(path, &before).unwrap();
    repair_all_and_compare(path, &before, expected)
}

/// `repair_all_and_verify` against `before`, a copy QEMU can open taken before the damage.
fn repair_all_and_compare(path: &Path, before: &Path, expected: &[&str]) -> String {
    let before = before.to_path_buf();
    let output = qbitmap(&["check", "-r", "all", s(path)]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(0), "check -r all: {out}");
    for change in expected {
        assert!(
            out.contains(&format!("Repaired: {change}")),
            "{change}: {out}"
        );
    }
    let (code, qemu) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check after check -r all: {qemu}");
    assert!(qemu.contains("No errors were found"), "{qemu}");
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(&before), s(path)],
    );
    let snapshots = |p: &Path| -> Vec<String> {
        let info: Value =
            serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(p)])).unwrap();
        info["snapshots"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|snap| snap["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = snapshots(&before);
    assert_eq!(snapshots(path), names);
    // qemu-img compare reads the active disk only: each snapshot is converted and compared.
    for name in names {
        let raw = |p: &Path, tag: &str| {
            let out = p.with_extension(format!("{tag}.raw"));
            let option = format!("snapshot.name={name}");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    "-l",
                    &option,
                    s(p),
                    s(&out),
                ],
            );
            let bytes = fs::read(&out).unwrap();
            fs::remove_file(&out).unwrap();
            bytes
        };
        assert!(
            raw(&before, "before") == raw(path, "after"),
            "snapshot {name} differs after check -r all"
        );
    }
    run("qemu-io", &["-c", "quit", s(path)]);
    let (code, ours) = our_check(path);
    assert_eq!(code, 0, "qbitmap check after -r all: {ours}");
    fs::remove_file(&before).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Allocation

/// Adds a bitmap with qbitmap and with qemu-img to copies of one image; qbitmap must not take
/// much longer nor grow the file much more than QEMU does, and both checks stay clean.
fn add_like_qemu(size: &str, options: &str, granularity: &str, time_limit: Duration) {
    let (dir, path) = qemu_image(size, options);
    let theirs = dir.path().join("qemu.qcow2");
    fs::copy(&path, &theirs).unwrap();
    let before = fs::metadata(&path).unwrap().len();

    let started = Instant::now();
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", granularity, s(&theirs), "b"],
    );
    let qemu_time = started.elapsed();
    let started = Instant::now();
    ok(&["add", "-g", granularity, s(&path), "b"]);
    let our_time = started.elapsed();
    let qemu_growth = fs::metadata(&theirs).unwrap().len() - before;
    let our_growth = fs::metadata(&path).unwrap().len() - before;
    eprintln!(
        "{options} {size} -g {granularity}: qbitmap {our_time:?} +{our_growth} bytes, qemu-img \
         {qemu_time:?} +{qemu_growth} bytes"
    );
    assert!(
        our_time < time_limit,
        "{options}: qbitmap add took {our_time:?}"
    );
    // QEMU writes an empty bitmap's table on close only; we write it at once: the table,
    // the directory, their refcount blocks and a grown refcount table.
    let table = table_offset(&path, "b") as u64;
    assert!(table < fs::metadata(&path).unwrap().len());
    assert!(
        our_growth <= 2 * qemu_growth.max(1 << 17),
        "{options}: the file grew by {our_growth} bytes (qemu-img: {qemu_growth})"
    );
    both_clean(&path);
    assert_eq!(our_bitmaps(&path), qemu_bitmaps(&path));
    // A dirty bitmap as well: every data cluster allocated.
    ok(&["set", s(&path), "b", "0", size]);
    both_clean(&path);
}

#[test]
fn allocation_with_512_byte_clusters() {
    if !have("allocation_with_512_byte_clusters", &["qemu-img"]) {
        return;
    }
    // A 256-cluster table, more than a refcount block (256 entries) describes.
    add_like_qemu("32G", "cluster_size=512", "512", Duration::from_secs(5));
}

#[test]
fn allocation_with_64_bit_refcounts() {
    if !have("allocation_with_64_bit_refcounts", &["qemu-img"]) {
        return;
    }
    // 64 entries per refcount block: runs of many blocks and several refcount table growths.
    // A 128-cluster table: two blocks' worth.
    add_like_qemu(
        "16G",
        "cluster_size=512,refcount_bits=64",
        "512",
        Duration::from_secs(5),
    );
    add_like_qemu(
        "64G",
        "cluster_size=4096,refcount_bits=64",
        "512",
        Duration::from_secs(5),
    );
}

#[test]
fn allocation_with_1_bit_refcounts_and_2_mib_clusters() {
    if !have("allocation_with_1_bit_refcounts", &["qemu-img"]) {
        return;
    }
    add_like_qemu(
        "64G",
        "cluster_size=2M,refcount_bits=1",
        "512",
        Duration::from_secs(5),
    );
}

#[test]
fn allocation_for_every_cluster_size_and_refcount_width() {
    if !have(
        "allocation_for_every_cluster_size_and_refcount_width",
        &["qemu-img"],
    ) {
        return;
    }
    // Setting the whole disk allocates every data cluster in runs; with small clusters and
    // wide refcounts they are longer than a refcount block's worth.
    for (cluster, size, granularity) in [
        (512, "8G", "512"),
        (4096, "64G", "4K"),
        (65536, "64G", "4K"),
        (2 << 20, "64G", "4K"),
    ] {
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            add_like_qemu(
                size,
                &format!("cluster_size={cluster},refcount_bits={bits}"),
                granularity,
                Duration::from_secs(5),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// check -r on images QEMU's tools leave behind

#[path = "../../tests/qcow2_util/mod.rs"]
mod qcow2_util;

/// A qemu-storage-daemon killed with SIGKILL while it holds a persistent bitmap: QEMU marked it
/// in use when it loaded it, and never stored it. check reports it (a state, exit 0, as
/// qemu-img check); -r leaks keeps it; -r all removes it and keeps a bitmap added since, to the
/// byte, and the guest data QEMU wrote stays.
#[test]
fn qsd_killed_while_holding_a_bitmap() {
    if !have(
        "qsd_killed_while_holding_a_bitmap",
        &["qemu-img", "qemu-io", "qemu-storage-daemon"],
    ) {
        return;
    }
    let (dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0x11 0 1M", s(&path)]);
    run("qemu-img", &["bitmap", "--add", s(&path), "tracked"]);
    let mut qsd = qcow2_util::Qsd::start(dir.path(), &path);
    qsd.qmp_ok(
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"fmt0","name":"added","persistent":true}}"#,
    );
    qsd.write(2 << 20, 1 << 20);
    // A repair takes QEMU's write lock: refused while QEMU has the image, which is unchanged.
    let before = fs::read(&path).unwrap();
    let out = fails(&["check", "-r", "all", s(&path)]);
    assert!(out.contains("lock") && out.contains("QEMU"), "{out}");
    assert!(fs::read(&path).unwrap() == before, "a refused repair wrote");
    drop(qsd); // SIGKILL: nothing is stored
    let info = qemu_bitmaps(&path);
    assert_eq!(
        info,
        [(
            "tracked".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    let (code, qemu) = qemu_check(&path);
    assert_eq!(code, 0, "{qemu}");
    let output = qbitmap(&["check", s(&path), "--output=json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["in-use-bitmaps"], serde_json::json!(["tracked"]));
    assert_eq!(report["corruptions"], 0);
    assert_eq!(report["leaks"], 0);
    // The figures qemu-img check gives.
    let theirs: Value =
        serde_json::from_str(&run("qemu-img", &["check", "--output=json", s(&path)])).unwrap();
    for key in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "check-errors",
    ] {
        assert_eq!(report[key], theirs[key], "{key}: {report} against {theirs}");
    }
    // -r leaks has nothing to do and keeps the in-use bitmap.
    let out = ok(&["check", "-r", "leaks", s(&path)]);
    assert!(out.contains("Nothing to repair"), "{out}");
    assert_eq!(qemu_bitmaps(&path).len(), 1);

    ok(&["add", s(&path), "fresh"]);
    ok(&["set", s(&path), "fresh", "3M", "5M"]);
    let fresh = ok(&["dump", s(&path), "fresh", "--output=json"]);
    repair_all_and_verify(&path, &["removed bitmap 'tracked': marked in use"]);
    assert_eq!(ok(&["dump", s(&path), "fresh", "--output=json"]), fresh);
    assert_eq!(
        qemu_bitmaps(&path),
        [("fresh".to_string(), 65536, vec!["auto".to_string()])]
    );
    run("qemu-io", &["-r", "-c", "read -P 0x5a 2M 1M", s(&path)]);
    run("qemu-io", &["-r", "-c", "read -P 0x11 0 1M", s(&path)]);
    // QEMU uses the repaired image's bitmap again.
    run("qemu-io", &["-c", "write 8M 64k", s(&path)]);
    both_clean(&path);
}

/// ENOSPC injected into QEMU's own bitmap store (blkdebug fails the cluster allocation made
/// when qemu-io closes the image): QEMU leaves every bitmap in use. -r all removes them and
/// leaves an image qemu-img check finds clean, with the same guest data.
#[test]
fn enospc_in_qemus_bitmap_store() {
    if !have("enospc_in_qemus_bitmap_store", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0x22 0 1M", s(&path)]);
    run("qemu-img", &["bitmap", "--add", s(&path), "enabled"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&path), "disabled"],
    );
    ok(&["set", s(&path), "disabled", "0", "3M"]);
    // The write goes to allocated clusters: the only allocation is the store's, at close.
    let options = format!(
        "driver=qcow2,file.driver=blkdebug,file.image.filename={},\
         file.inject-error.0.event=cluster_alloc,file.inject-error.0.errno=28,\
         file.inject-error.0.once=on,file.inject-error.0.immediately=off",
        s(&path)
    );
    let output = Command::new("qemu-io")
        .args(["--image-opts", "-c", "write -P 0x33 0 64k", &options])
        .output()
        .unwrap();
    let _ = output; // qemu-io reports the write; the store's failure only shows in the image
    let flags: Vec<Vec<String>> = qemu_bitmaps(&path).into_iter().map(|b| b.2).collect();
    assert!(
        flags.iter().all(|f| f.contains(&"in-use".to_string())) && flags.len() == 2,
        "QEMU's failed store left {flags:?}"
    );
    let (code, ours) = our_check(&path);
    assert_eq!(code, 0, "{ours}");
    let out = repair_all_and_verify(
        &path,
        &[
            "removed bitmap 'enabled': marked in use",
            "removed bitmap 'disabled': marked in use",
            "the image has no bitmaps extension any more",
        ],
    );
    assert!(out.contains("leaked cluster"), "{out}");
    assert!(qemu_bitmaps(&path).is_empty());
    run("qemu-io", &["-r", "-c", "read -P 0x33 0 64k", s(&path)]);
}

/// Damaged bitmaps QEMU refuses to open the image for (a bitmap table entry with reserved bits,
/// a bitmap whose table overlaps the L1 table, a directory entry with an unknown flag): -r all
/// removes them, keeps the intact bitmap, and QEMU opens the image again.
#[test]
fn damaged_bitmaps_qemu_refuses() {
    if !have("damaged_bitmaps_qemu_refuses", &["qemu-img", "qemu-io"]) {
        return;
    }
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "reserved bits in a table entry",
            |data| {
                let table = be64(data, directory_entry(data, "broken")) as usize;
                let entry = be64(data, table);
                put64(data, table, entry | 0x1fe);
            },
            "removed bitmap 'broken': damaged",
        ),
        (
            "a table over the L1 table",
            |data| {
                let l1 = be64(data, 40);
                let entry = directory_entry(data, "broken");
                put64(data, entry, l1);
            },
            "removed bitmap 'broken': damaged",
        ),
        (
            "an unknown flag",
            |data| {
                let entry = directory_entry(data, "broken");
                data[entry + 15] |= 4;
            },
            "removed bitmap 'broken': damaged",
        ),
    ];
    for (what, damage, expected) in cases {
        let (_dir, path) = qemu_image("64M", "");
        run("qemu-io", &["-c", "write -P 0x44 0 2M", s(&path)]);
        run("qemu-img", &["snapshot", "-c", "snap", s(&path)]);
        run("qemu-io", &["-c", "write -P 0x45 1M 2M", s(&path)]);
        ok(&["add", s(&path), "intact"]);
        ok(&["set", s(&path), "intact", "1M", "7M"]);
        ok(&["add", s(&path), "broken"]);
        ok(&["set", s(&path), "broken", "0", "64M"]);
        let intact = ok(&["dump", s(&path), "intact", "--output=json"]);
        let pristine = path.with_extension("pristine.qcow2");
        fs::copy(&path, &pristine).unwrap();
        patch(&path, damage);
        let refused = Command::new("qemu-io")
            .args(["-c", "quit", s(&path)])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{what}: QEMU opened the image");
        // As qemu-img check, which cannot open it: exit 1.
        let (code, ours) = our_check(&path);
        assert_eq!(code, 1, "{what}: {ours}");
        assert_eq!(qemu_check(&path).0, 1, "{what}");
        repair_all_and_compare(&path, &pristine, &[expected]);
        assert_eq!(
            ok(&["dump", s(&path), "intact", "--output=json"]),
            intact,
            "{what}"
        );
        assert_eq!(qemu_bitmaps(&path).len(), 1, "{what}");
    }
}

/// `check --output=json` gives qemu-img check's figures on an image with normal, compressed and
/// zero clusters, an internal snapshot sharing some of them and a bitmap; then with a leak
/// (the header cluster's refcount raised), which both count, and `-r leaks` frees.
#[test]
fn check_figures_match_qemu_img() {
    if !have("check_figures_match_qemu_img", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0x11 0 3M", s(&path)]);
    run("qemu-io", &["-c", "write -c -P 0x22 8M 1M", s(&path)]);
    run("qemu-io", &["-c", "write -z 20M 128k", s(&path)]);
    run("qemu-img", &["snapshot", "-c", "s1", s(&path)]);
    run("qemu-io", &["-c", "write -P 0x33 1M 1M", s(&path)]);
    run("qemu-io", &["-c", "write -c -P 0x44 9M 64k", s(&path)]);
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    run("qemu-io", &["-c", "write -P 0x55 30M 64k", s(&path)]);
    let compare = |expect_leaks: u64| {
        let ours = qbitmap(&["check", s(&path), "--output=json"]);
        let report: Value = serde_json::from_slice(&ours.stdout).unwrap();
        let theirs = Command::new("qemu-img")
            .args(["check", "--output=json", s(&path)])
            .output()
            .unwrap();
        assert_eq!(ours.status.code(), theirs.status.code(), "{report}");
        let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
        for key in [
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
            "check-errors",
        ] {
            assert_eq!(report[key], theirs[key], "{key}: {report} against {theirs}");
        }
        // qemu-img leaves zero counts out.
        assert_eq!(
            report["leaks"],
            theirs.get("leaks").cloned().unwrap_or(0.into())
        );
        assert_eq!(report["leaks"], expect_leaks);
        assert_eq!(report["corruptions"], 0);
        assert!(report["compressed-clusters"].as_u64().unwrap() > 0);
    };
    compare(0);
    patch(&path, |data| {
        let table = be64(data, 48) as usize;
        let block = be64(data, table) as usize;
        assert_eq!(&data[block..block + 2], &[0, 1]);
        data[block + 1] = 2;
    });
    compare(1);
    let out = ok(&["check", "-r", "leaks", s(&path)]);
    assert!(out.contains("Repaired: freed 1 leaked cluster"), "{out}");
    compare(0);
    both_clean(&path);
}

/// Several L2 tables, each full (preallocation=metadata): QEMU counts contiguity within one L2
/// table, and so do we.
#[test]
fn check_figures_match_qemu_img_across_l2_tables() {
    if !have(
        "check_figures_match_qemu_img_across_l2_tables",
        &["qemu-img"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("2G", "preallocation=metadata");
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    let ours: Value = serde_json::from_str(&ok(&["check", s(&path), "--output=json"])).unwrap();
    let theirs: Value =
        serde_json::from_str(&run("qemu-img", &["check", "--output=json", s(&path)])).unwrap();
    for key in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "check-errors",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}: {ours} against {theirs}");
    }
    assert_eq!(ours["allocated-clusters"], 32768);
    // qemu-img leaves zero counts out.
    let fragmented = theirs
        .get("fragmented-clusters")
        .cloned()
        .unwrap_or(0.into());
    assert_eq!(
        ours["fragmented-clusters"], fragmented,
        "{ours} against {theirs}"
    );
}

/// The figures on other geometries: extended L2 entries, 512-byte clusters with 1-bit
/// refcounts (where QEMU's own `snapshot -c` fails on a refcount overflow and leaks clusters:
/// both checks count the same leaks, and -r leaks frees them), 64-bit refcounts.
#[test]
fn check_figures_and_leaks_on_other_geometries() {
    if !have(
        "check_figures_and_leaks_on_other_geometries",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    for options in [
        "extended_l2=on,cluster_size=128k",
        "cluster_size=512,refcount_bits=1",
        "refcount_bits=64",
    ] {
        let (_dir, path) = qemu_image("64M", options);
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 3M",
                "-c",
                "write -c 8M 1M",
                "-c",
                "write -z 20M 256k",
                s(&path),
            ],
        );
        let snapshot = Command::new("qemu-img")
            .args(["snapshot", "-c", "s", s(&path)])
            .output()
            .unwrap();
        run("qemu-io", &["-c", "write 1M 1M", s(&path)]);
        let ours = qbitmap(&["check", s(&path), "--output=json"]);
        let report: Value = serde_json::from_slice(&ours.stdout).unwrap();
        let theirs = Command::new("qemu-img")
            .args(["check", "--output=json", s(&path)])
            .output()
            .unwrap();
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{options}: {report}"
        );
        let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
        for key in [
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
            "check-errors",
        ] {
            assert_eq!(report[key], theirs[key], "{options}: {key}");
        }
        let leaks = theirs.get("leaks").cloned().unwrap_or(0.into());
        assert_eq!(report["leaks"], leaks, "{options}");
        if snapshot.status.success() {
            assert_eq!(leaks, 0, "{options}");
            continue;
        }
        // QEMU's failed snapshot left leaked clusters: -r leaks frees exactly those.
        assert!(leaks.as_u64().unwrap() > 0, "{options}: {theirs}");
        let before = path.with_extension("before.qcow2");
        fs::copy(&path, &before).unwrap();
        let report: Value =
            serde_json::from_str(&ok(&["check", "-r", "leaks", s(&path), "--output=json"]))
                .unwrap();
        assert_eq!(report["leaks-fixed"], leaks, "{options}");
        both_clean(&path);
        run("qemu-img", &["compare", s(&before), s(&path)]);
    }
}

/// An image with lazy refcounts left dirty by a killed qemu-storage-daemon: its refcounts are
/// not maintained. -r leaks refuses without a write (leaks cannot be told from clusters not
/// counted yet); -r all rebuilds them from a complete walk, as qemu-img check -r all does, and
/// removes the bitmap QEMU had in use; the guest data is what QEMU's own repair gives.
#[test]
fn dirty_image_is_rebuilt() {
    if !have(
        "dirty_image_is_rebuilt",
        &["qemu-img", "qemu-io", "qemu-storage-daemon"],
    ) {
        return;
    }
    let (dir, path) = qemu_image("64M", "lazy_refcounts=on");
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    let qsd = qcow2_util::Qsd::start(dir.path(), &path);
    qsd.write(0, 1 << 20);
    drop(qsd); // SIGKILL
    let data = fs::read(&path).unwrap();
    assert_ne!(data[79] & 1, 0, "QEMU left the dirty bit clear");
    let out = fails(&["check", "-r", "leaks", s(&path)]);
    assert!(
        out.contains("refusing to repair") && out.contains("dirty bit"),
        "-r leaks: {out}"
    );
    assert!(fs::read(&path).unwrap() == data, "-r leaks wrote");
    let theirs = path.with_extension("qemu.qcow2");
    fs::copy(&path, &theirs).unwrap();
    let repaired = Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", s(&theirs)])
        .output()
        .unwrap();
    assert_eq!(repaired.status.code(), Some(0), "{}", text(&repaired));
    repair_all_and_compare(
        &path,
        &theirs,
        &[
            "rebuilt the refcounts from a complete walk",
            "removed bitmap 'b': marked in use",
        ],
    );
    assert_eq!(
        fs::read(&path).unwrap()[79] & 1,
        0,
        "the dirty bit is cleared"
    );
    assert!(qemu_bitmaps(&path).is_empty());
}

/// A bitmaps extension whose directory offset points at the L1 table (QEMU refuses to open the
/// image): -r all drops the extension and frees what only its bitmaps used; the L1 table, which
/// the directory "shared", stays, and so does the guest data.
#[test]
fn unreadable_directory_over_the_l1_table() {
    if !have(
        "unreadable_directory_over_the_l1_table",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0x66 0 1M", s(&path)]);
    run("qemu-img", &["bitmap", "--add", s(&path), "b"]);
    let pristine = path.with_extension("pristine.qcow2");
    fs::copy(&path, &pristine).unwrap();
    patch(&path, |data| {
        let l1 = be64(data, 40);
        let ext = bitmaps_extension(data).expect("a bitmaps extension");
        put64(data, ext + 16, l1);
    });
    let refused = Command::new("qemu-io")
        .args(["-c", "quit", s(&path)])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "QEMU opened the image");
    // As qemu-img check, which cannot open it: exit 1.
    let (code, ours) = our_check(&path);
    assert_eq!(code, 1, "{ours}");
    assert_eq!(qemu_check(&path).0, 1);
    let out = fails(&["check", "-r", "leaks", s(&path)]);
    assert!(out.contains("bitmaps extension is damaged"), "{out}");
    repair_all_and_compare(
        &path,
        &pristine,
        &[
            "the bitmaps extension is unreadable",
            "the image has no bitmaps extension any more",
            "freed 2 leaked clusters",
        ],
    );
    assert!(qemu_bitmaps(&path).is_empty());
    run("qemu-io", &["-r", "-c", "read -P 0x66 0 1M", s(&path)]);
}

/// A guest data cluster past the end of the file (the file was cut after QEMU wrote it): the
/// guest data map cannot be followed, so -r is refused without a write, naming the entry.
#[test]
fn guest_data_past_the_end_is_not_repaired() {
    if !have(
        "guest_data_past_the_end_is_not_repaired",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let (_dir, path) = qemu_image("64M", "");
    run("qemu-io", &["-c", "write -P 0x77 32M 64k", s(&path)]);
    let guest = {
        let map: Value =
            serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&path)])).unwrap();
        map.as_array()
            .unwrap()
            .iter()
            .find_map(|extent| extent["offset"].as_u64().filter(|_| extent["data"] == true))
            .expect("an allocated cluster")
    };
    let len = fs::metadata(&path).unwrap().len();
    assert!(
        guest + 65536 >= len,
        "the guest cluster is not the file's last"
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(guest)
        .unwrap();
    let (code, ours) = our_check(&path);
    assert_eq!(code, 2, "{ours}");
    assert!(ours.contains("past the end of the file"), "{ours}");
    let before = fs::read(&path).unwrap();
    for mode in ["leaks", "all"] {
        let out = fails(&["check", "-r", mode, s(&path)]);
        assert!(
            out.contains("refusing to repair")
                && out.contains("cannot be followed")
                && out.contains(&format!("{guest:#x}")),
            "-r {mode}: {out}"
        );
        assert!(fs::read(&path).unwrap() == before, "-r {mode} wrote");
    }
}
