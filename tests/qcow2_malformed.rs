// SPDX-License-Identifier: GPL-2.0-or-later

//! Hand-made malformed images: each is refused (for reading, or for writing where QEMU would
//! only refuse to write) with a message naming what is wrong, the file is left unchanged, and
//! memory stays bounded whatever the sizes in the file claim.
mod qcow2_util;

use hbitmap::qcow2::{BitmapFlags, Error, Image, OpenOptions};
use hbitmap::HBitmap;
use hbitmap_testkit::qcow2::{
    be64, bitmaps_extension, put32, put64, L1_TABLE_OFFSET, REFCOUNT_TABLE_OFFSET,
};
use hbitmap_testkit::{Rng, RW};
use qcow2_util::*;

const CLUSTER: usize = 65536;
const SIZE: u64 = 64 << 20;

/// Offsets in the base image.
#[derive(Clone, Copy, Debug)]
struct Map {
    ext: usize, // bitmaps extension data
    dir: usize, // directory
    entry_b: usize,
    table_a: usize,
    table_b: usize,
    data_a: usize,
    data_b: usize,
    l1: usize,
    reftable: usize,
}

fn map_of(bytes: &[u8]) -> Map {
    let ext = bitmaps_extension(bytes).expect("no bitmaps extension");
    let dir = be64(bytes, ext + 16) as usize;
    let entry_b = dir + 32;
    let table_a = be64(bytes, dir) as usize;
    let table_b = be64(bytes, entry_b) as usize;
    Map {
        ext,
        dir,
        entry_b,
        table_a,
        table_b,
        data_a: be64(bytes, table_a) as usize,
        data_b: be64(bytes, table_b) as usize,
        l1: be64(bytes, L1_TABLE_OFFSET) as usize,
        reftable: be64(bytes, REFCOUNT_TABLE_OFFSET) as usize,
    }
}

/// Set in a child process that runs one test alone, for its peak memory.
const RSS_CHILD: &str = "HBQ_MALFORMED_RSS_CHILD";
const RSS_MARK: &str = "peak RSS growth (KiB): ";

/// Runs test `name` of this binary alone in a child process (other tests running in parallel
/// threads would count in this process's peak) and returns the growth of its peak RSS it
/// reports with [`report_rss_growth`].
fn rss_growth_in_child(name: &str) -> u64 {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(RSS_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{name} failed in its child process:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(RSS_MARK))
        .unwrap_or_else(|| panic!("{name}: no peak RSS reported:\n{stdout}"))
        .trim()
        .parse()
        .unwrap()
}

fn in_rss_child() -> bool {
    std::env::var_os(RSS_CHILD).is_some()
}

fn report_rss_growth(before: u64) {
    println!("{RSS_MARK}{}", peak_rss_kib().saturating_sub(before));
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How a case must fail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Opening at all.
    Open,
    /// Opening for writing only (read-only inspection works).
    Write,
}

type Mutation = fn(&mut Vec<u8>, &Map);

/// A malformed image is refused at open, naming `expected`; or, when the damage is confined to
/// some bitmaps, it opens read-only with `expected` among the warnings, those bitmaps are
/// refused when read (their damage named) and every other one reads.
fn refused_or_confined(
    what: &str,
    path: &std::path::Path,
    read: Result<Image, Error>,
    expected: &str,
) {
    let image = match read {
        Err(err) => {
            let err = err.to_string();
            println!("{what}: {err}");
            assert!(
                err.contains(expected),
                "{what}: '{err}' does not say '{expected}'"
            );
            return;
        }
        Ok(image) => image,
    };
    println!("{what}: readable, the damaged bitmaps refused");
    assert!(
        image.warnings().iter().any(|w| w.contains(expected)),
        "{what}: warnings {:?} do not say '{expected}'",
        image.warnings()
    );
    let report = Image::check_file(path, OpenOptions::default()).unwrap();
    assert!(!report.damaged_bitmaps.is_empty(), "{what}: {report:?}");
    for info in image.bitmaps() {
        let name = info.name.to_string();
        let read = image.inspect_bitmap(&info.name);
        if report.damaged_bitmaps.contains(&info.name) {
            let Err(err) = read else {
                panic!("{what}: damaged bitmap '{name}' was read");
            };
            assert!(err.to_string().contains("is damaged"), "{what}: {err}");
        } else if !info.in_use {
            read.unwrap_or_else(|e| panic!("{what}: intact bitmap '{name}': {e}"));
        }
    }
}

/// The image every case starts from: bitmap 'a' (granularity 64 KiB, 128 bytes of data, `auto`)
/// and bitmap 'b' (granularity 512 B): its bytes, where its structures lie, and bitmap 'a'.
fn valid_image(s: &Scratch) -> (Vec<u8>, Map, HBitmap) {
    let base = s.path("base.qcow2");
    let mut a = HBitmap::new(SIZE, 16).unwrap(); // 1024 bits: 128 bytes of data
    a.set(0, 1 << 20);
    let mut b = HBitmap::new(SIZE, 9).unwrap();
    b.set(5 << 20, 1 << 20);
    let mut image = Image::create(&base, SIZE, CLUSTER as u64).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, BitmapFlags::default()).unwrap();
    image.close().unwrap();
    let original = std::fs::read(&base).unwrap();
    let map = map_of(&original);
    (original, map, a)
}

#[test]
fn malformed_images_are_refused() {
    if !in_rss_child() {
        let grown = rss_growth_in_child("malformed_images_are_refused");
        println!("peak RSS grew by {grown} KiB");
        assert!(grown < 256 * 1024, "peak memory grew by {grown} KiB");
        return;
    }
    let s = Scratch::new("malformed");
    let (original, map, _) = valid_image(&s);

    let cases: Vec<(&str, Mutation, &str, Refused)> = vec![
        (
            "bad magic",
            |b, _| b[0] = b'X',
            "not a qcow2 image",
            Refused::Open,
        ),
        (
            "version 4",
            |b, _| put32(b, 4, 4),
            "version 4",
            Refused::Open,
        ),
        (
            "cluster_bits 8",
            |b, _| put32(b, 20, 8),
            "cluster_bits 8",
            Refused::Open,
        ),
        (
            "cluster_bits 22",
            |b, _| put32(b, 20, 22),
            "cluster_bits 22",
            Refused::Open,
        ),
        (
            "header_length 96",
            |b, _| put32(b, 100, 96),
            "header_length 96",
            Refused::Open,
        ),
        (
            "header_length 116",
            |b, _| put32(b, 100, 116),
            "not a multiple of 8",
            Refused::Open,
        ),
        (
            "refcount_order 7",
            |b, _| put32(b, 96, 7),
            "refcount_order 7",
            Refused::Open,
        ),
        (
            "refcount table past EOF",
            |b, _| put64(b, 48, 1 << 40),
            "refcount table",
            Refused::Open,
        ),
        (
            "no refcount table",
            |b, _| put32(b, 56, 0),
            "refcount_table_clusters",
            Refused::Open,
        ),
        (
            "huge refcount table",
            |b, _| put32(b, 56, 1 << 20),
            "8 MiB",
            Refused::Open,
        ),
        (
            "l1_size too large",
            |b, _| put32(b, 36, 1 << 30),
            "l1_size",
            Refused::Open,
        ),
        (
            "l1_size too small",
            |b, _| put64(b, 24, 1 << 40),
            "l1_size",
            Refused::Open,
        ),
        (
            "extension past the cluster",
            |b, m| put32(b, m.ext - 4, 70000),
            // Read as its fixed 24 bytes, the walk reaching the end marker after them.
            "its length is 70000, not 24",
            Refused::Open,
        ),
        (
            "bitmaps extension length 32",
            |b, m| put32(b, m.ext - 4, 32),
            "its length is 32, not 24",
            Refused::Open,
        ),
        (
            "extension reserved field",
            |b, m| put32(b, m.ext + 4, 1),
            "reserved field",
            Refused::Open,
        ),
        (
            "nb_bitmaps 0",
            |b, m| put32(b, m.ext, 0),
            "nb_bitmaps is 0",
            Refused::Open,
        ),
        (
            "nb_bitmaps 65536",
            |b, m| put32(b, m.ext, 65536),
            "65535",
            Refused::Open,
        ),
        (
            "nb_bitmaps 3",
            |b, m| put32(b, m.ext, 3),
            "fewer than the 3 nb_bitmaps",
            Refused::Open,
        ),
        (
            "nb_bitmaps 1",
            |b, m| put32(b, m.ext, 1),
            "more entries than the 1 nb_bitmaps",
            Refused::Open,
        ),
        (
            "directory offset misaligned",
            |b, m| put64(b, m.ext + 16, m.dir as u64 + 8),
            "bitmap_directory_offset",
            Refused::Open,
        ),
        (
            "directory size 0",
            |b, m| put64(b, m.ext + 8, 0),
            "bitmap_directory_size is 0",
            Refused::Open,
        ),
        (
            "directory size 64 MiB+",
            |b, m| put64(b, m.ext + 8, 1 << 26),
            "bitmap_directory_size 67108864 exceeds",
            Refused::Open,
        ),
        (
            "directory past EOF",
            |b, m| put64(b, m.ext + 8, 1 << 22),
            "past the end of the file",
            Refused::Open,
        ),
        (
            "directory truncated",
            |b, m| put64(b, m.ext + 8, 48),
            "truncated",
            Refused::Open,
        ),
        (
            "extra data",
            |b, m| put32(b, m.entry_b + 20, 8),
            "extra_data_size",
            Refused::Open,
        ),
        (
            "type 2",
            |b, m| b[m.entry_b + 16] = 2,
            "type 2",
            Refused::Open,
        ),
        (
            "granularity_bits 8",
            |b, m| b[m.entry_b + 17] = 8,
            "granularity_bits 8",
            Refused::Open,
        ),
        (
            "granularity_bits 32",
            |b, m| b[m.entry_b + 17] = 32,
            "granularity_bits 32",
            Refused::Open,
        ),
        (
            "reserved flag bit 2",
            |b, m| put32(b, m.entry_b + 12, 4),
            "reserved bits",
            Refused::Open,
        ),
        (
            "table size 0",
            |b, m| put32(b, m.entry_b + 8, 0),
            "bitmap_table_size is 0",
            Refused::Open,
        ),
        (
            "table size mismatch",
            |b, m| put32(b, m.entry_b + 8, 2),
            "does not match the virtual size",
            Refused::Open,
        ),
        (
            "table size beyond QEMU's limit",
            |b, m| put32(b, m.entry_b + 8, 0x0800_0001),
            "exceeds QEMU's limit",
            Refused::Open,
        ),
        (
            "table data over 512 MiB",
            |b, m| put32(b, m.entry_b + 8, 8193),
            "512 MiB",
            Refused::Open,
        ),
        (
            "table offset misaligned",
            |b, m| put64(b, m.entry_b, m.table_b as u64 + 512),
            "bitmap_table_offset",
            Refused::Open,
        ),
        (
            "table past EOF",
            |b, m| put64(b, m.entry_b, 1 << 40),
            "past the end of the file",
            Refused::Open,
        ),
        (
            "duplicate name",
            |b, m| b[m.entry_b + 24] = b'a',
            "unique",
            Refused::Open,
        ),
        (
            "padding after name",
            |b, m| b[m.entry_b + 30] = 1,
            "padding after the name",
            Refused::Open,
        ),
        (
            "table entry reserved bits",
            |b, m| b[m.table_b + 7] |= 0x02,
            "reserved bits (1-8, 56-63)",
            Refused::Open,
        ),
        (
            "table entry bit 0 with offset",
            |b, m| b[m.table_b + 7] |= 0x01,
            "bit 0",
            Refused::Open,
        ),
        (
            "data cluster misaligned",
            |b, m| put64(b, m.table_b, m.data_b as u64 + 512),
            "not cluster-aligned",
            Refused::Open,
        ),
        (
            "data cluster past EOF",
            |b, m| put64(b, m.table_b, 1 << 40),
            "past the end of the file",
            Refused::Open,
        ),
        (
            "table overlaps the L1 table",
            |b, m| put64(b, m.entry_b, m.l1 as u64),
            "overlaps the active L1 table",
            Refused::Open,
        ),
        (
            "data over the refcount table",
            |b, m| put64(b, m.table_b, m.reftable as u64),
            "the refcount table",
            Refused::Open,
        ),
        (
            "data over a refcount block",
            |b, m| {
                let block = be64(b, m.reftable);
                put64(b, m.table_b, block);
            },
            "refcount block 0",
            Refused::Open,
        ),
        (
            "data shared by two bitmaps",
            |b, m| put64(b, m.table_b, m.data_a as u64),
            "data cluster of bitmap 'a'",
            Refused::Open,
        ),
        (
            "tables shared by two bitmaps",
            |b, m| put64(b, m.entry_b, m.table_a as u64),
            "the bitmap table of bitmap 'a'",
            Refused::Open,
        ),
        (
            "data over the directory",
            |b, m| put64(b, m.table_b, m.dir as u64),
            "the bitmap directory",
            Refused::Open,
        ),
        (
            "directory over the L1 table",
            |b, m| {
                let dir: Vec<u8> = b[m.dir..m.dir + 64].to_vec();
                b[m.l1..m.l1 + 64].copy_from_slice(&dir);
                put64(b, m.ext + 16, m.l1 as u64);
            },
            "overlaps",
            Refused::Open,
        ),
        (
            "backing file offset past cluster",
            |b, _| put64(b, 8, 1 << 20),
            "backing_file_offset",
            Refused::Open,
        ),
        (
            "unknown incompatible feature",
            |b, _| b[79] |= 0x80,
            "unknown incompatible feature bit 7",
            Refused::Open,
        ),
        (
            "dirty bit",
            |b, _| b[79] |= 0x01,
            "dirty bit",
            Refused::Write,
        ),
        (
            "corrupt bit",
            |b, _| b[79] |= 0x02,
            "corrupt",
            Refused::Write,
        ),
        (
            "version 2",
            |b, _| put32(b, 4, 2),
            "version 2",
            Refused::Write,
        ),
        (
            "bitmap table counted free",
            |b, m| {
                // Refcount block at 0x20000, 16-bit entries: zero the table cluster's refcount.
                let block = be64(b, m.reftable) as usize;
                let index = m.table_b / CLUSTER;
                b[block + 2 * index] = 0;
                b[block + 2 * index + 1] = 0;
            },
            "refcount 0",
            Refused::Write,
        ),
    ];
    assert!(cases.len() >= 30);
    let rss_before = peak_rss_kib();
    for (what, mutate, expected, refused) in cases {
        let path = s.path("case.qcow2");
        let mut bytes = original.clone();
        mutate(&mut bytes, &map);
        std::fs::write(&path, &bytes).unwrap();
        let before = file_hash(&path);
        let read = Image::open(&path, OpenOptions::default());
        match refused {
            Refused::Open => {
                refused_or_confined(what, &path, read, expected);
                let report = Image::check_file(&path, OpenOptions::default()).unwrap();
                let errors = texts(report.errors());
                assert!(
                    errors.iter().any(|e| e.contains(expected)),
                    "{what}: check_file errors {errors:?}"
                );
            }
            Refused::Write => {
                // Readable: nothing in it is malformed, only writing is unsafe.
                let image = read.unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
                // The only errors: refcounts below the references (qemu-img check's
                // corruptions), which block writing.
                let errors = texts(image.check().errors());
                assert!(
                    errors.iter().all(|e| e.contains("but 1 reference")),
                    "{what}: check errors {errors:?}"
                );
            }
        }
        match Image::open(&path, RW) {
            Ok(_) => panic!("{what}: opened for writing"),
            Err(err) => {
                let text = err.to_string();
                println!("{what}: {text}");
                assert!(
                    text.contains(expected),
                    "{what}: '{text}' does not say '{expected}'"
                );
                if refused == Refused::Write {
                    assert!(matches!(err, Error::ReadOnly(_)), "{what}: {err:?}");
                }
            }
        }
        assert_eq!(file_hash(&path), before, "{what}: the file changed");
    }
    report_rss_growth(rss_before);
}

/// A stale extension (autoclear bit clear) reads as no bitmaps; the first write drops it.
#[test]
fn stale_extension_is_ignored_then_dropped() {
    let s = Scratch::new("stale");
    let path = s.path("a.qcow2");
    let mut image = Image::create(&path, SIZE, CLUSTER as u64).unwrap();
    image.add_bitmap("old", 65536, true).unwrap();
    image.close().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[95] &= !1;
    std::fs::write(&path, &bytes).unwrap();
    let image = Image::open(&path, OpenOptions::default()).unwrap();
    assert!(image.bitmaps().is_empty());
    assert!(texts(image.check().warnings())
        .iter()
        .any(|w| w.contains("stale")));
    drop(image);
    let mut image = Image::open(&path, RW).unwrap();
    image.add_bitmap("new", 65536, true).unwrap();
    image.close().unwrap();
    let image = Image::open(&path, OpenOptions::default()).unwrap();
    let names: Vec<_> = image
        .bitmaps()
        .iter()
        .map(|b| b.name.to_str().unwrap())
        .collect();
    assert_eq!(names, ["new"]);
    if have("qemu-img") {
        qemu_check(&path, true);
    }
}

/// Unknown autoclear bits are cleared before anything else is written.
#[test]
fn unknown_autoclear_bits_are_cleared() {
    let s = Scratch::new("autoclear");
    let path = s.path("a.qcow2");
    Image::create(&path, SIZE, CLUSTER as u64)
        .unwrap()
        .close()
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[88] |= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let mut image = Image::open(&path, RW).unwrap();
    image.add_bitmap("x", 65536, true).unwrap();
    image.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(be64(&bytes, 88), 1);
}

/// Every truncation of a valid image is refused or read without panicking.
#[test]
fn truncated_images_never_panic() {
    let s = Scratch::new("truncated");
    let path = s.path("a.qcow2");
    let mut image = Image::create(&path, SIZE, 4096).unwrap();
    image.add_bitmap("x", 65536, true).unwrap();
    let mut b = HBitmap::new(SIZE, 12).unwrap();
    b.set(0, 1 << 20);
    image.store_bitmap("y", &b, BitmapFlags::default()).unwrap();
    image.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = s.path("cut.qcow2");
    let mut len = 0;
    while len < bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        if let Ok(image) = Image::open(&cut, OpenOptions::default()) {
            for info in image.bitmaps().to_vec() {
                let _ = image.inspect_bitmap(&info.name);
            }
        }
        len += 509;
    }
    // And random byte flips.
    let mut rng = Rng::new(99);
    for _ in 0..300 {
        let mut copy = bytes.clone();
        for _ in 0..4 {
            let at = rng.below(copy.len() as u64) as usize;
            copy[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&cut, &copy).unwrap();
        if let Ok(mut image) = Image::open(&cut, RW) {
            for info in image.bitmaps().to_vec() {
                let _ = image.inspect_bitmap(&info.name);
            }
            let _ = image.add_bitmap("z", 65536, true);
        }
    }
}

/// Moves the L1 table to the end of the file and makes it QEMU's largest (32 MiB, 4 Mi entries),
/// every entry `entry(l1_offset)`.
fn maximal_l1(b: &mut Vec<u8>, entry: fn(u64) -> u64) {
    let at = b.len().div_ceil(CLUSTER) * CLUSTER;
    let entries = (32 << 20) / 8;
    b.resize(at + (32 << 20), 0);
    put64(b, 40, at as u64);
    put32(b, 36, entries as u32);
    let value = entry(at as u64);
    for i in 0..entries {
        put64(b, at + 8 * i, value);
    }
}

/// A virtual size of 16 EiB: u64::MAX rounded down to whole sectors.
const SIZE_16_EIB: u64 = !511;

/// What a hostile image must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Refused for reading, with a message containing this.
    Refused(&'static str),
    /// Readable, but refused for writing with a message containing this.
    WriteRefused(&'static str),
    /// A valid image (what looks hostile has a meaning in the format), read as this content of
    /// bitmap 'b': `None` all clean, `Some(())` all dirty.
    Valid(Option<()>),
}

/// Images whose sizes or pointers claim huge or self-referential structures: opening and
/// checking them must neither panic nor take long nor allocate what the claims would need, must
/// refuse them with a message naming the problem, and must leave the file unchanged.
#[test]
fn resource_bounds_of_hostile_images() {
    if !in_rss_child() {
        let grown = rss_growth_in_child("resource_bounds_of_hostile_images");
        println!("peak RSS grew by {grown} KiB");
        assert!(grown < 64 * 1024, "peak memory grew by {grown} KiB");
        return;
    }
    let s = Scratch::new("hostile");
    let (original, map, a) = valid_image(&s);
    let l2_coverage = (CLUSTER as u64) * (CLUSTER as u64 / 8);

    let cases: Vec<(&str, Mutation, Outcome)> = vec![
        (
            "bitmap table of 0xFFFFFFFF entries",
            |b, m| put32(b, m.entry_b + 8, 0xFFFF_FFFF),
            Outcome::Refused("bitmap_table_size 4294967295 exceeds QEMU's limit"),
        ),
        (
            "in-use bitmap with a table of 0xFFFFFFFF entries",
            |b, m| {
                put32(b, m.entry_b + 8, 0xFFFF_FFFF);
                put32(b, m.entry_b + 12, 1);
            },
            Outcome::Refused("bitmap_table_size 4294967295 exceeds QEMU's limit"),
        ),
        (
            "16 EiB virtual size",
            |b, _| put64(b, 24, SIZE_16_EIB),
            Outcome::Refused("l1_size 1 (offset 36) is too small"),
        ),
        (
            "16 EiB virtual size, l1_size as needed (capped at 2^32-1)",
            |b, _| {
                let needed = SIZE_16_EIB.div_ceil((CLUSTER as u64) * (CLUSTER as u64 / 8));
                put64(b, 24, SIZE_16_EIB);
                put32(b, 36, needed.min(u64::from(u32::MAX)) as u32);
            },
            Outcome::Refused("exceeds QEMU's 32 MiB L1 table limit"),
        ),
        (
            "16 EiB virtual size, l1_size at QEMU's 32 MiB cap",
            |b, _| {
                put64(b, 24, SIZE_16_EIB);
                put32(b, 36, (32 << 20) / 8);
            },
            Outcome::Refused("l1_size 4194304 (offset 36) is too small"),
        ),
        (
            "nb_bitmaps 65535, a 64 MiB directory past EOF",
            |b, m| {
                put32(b, m.ext, 65535);
                put64(b, m.ext + 8, 1024 * 65535);
            },
            Outcome::Refused("(67107840 bytes) extends past the end of the file"),
        ),
        (
            "refcount table entry 0 pointing at the refcount table",
            |b, m| put64(b, m.reftable, m.reftable as u64),
            Outcome::Refused("overlaps the refcount table"),
        ),
        (
            "refcount table entry 1 pointing at the refcount table",
            |b, m| put64(b, m.reftable + 8, m.reftable as u64),
            Outcome::Refused("overlaps the refcount table"),
        ),
        (
            // Offset 0 means "no refcount block": every cluster then has refcount 0.
            "refcount block at offset 0 (the header cluster)",
            |b, m| put64(b, m.reftable, 0),
            Outcome::WriteRefused("the header cluster at 0x0) has refcount 0"),
        ),
        (
            "refcount block inside the header cluster",
            |b, m| put64(b, m.reftable, 0x200),
            Outcome::Refused("is not cluster-aligned"),
        ),
        (
            "L1 entry pointing at the L1 table",
            |b, m| put64(b, m.l1, m.l1 as u64 | 1 << 63),
            Outcome::Refused("(L1 entry 0) overlaps the active L1 table"),
        ),
        (
            "all 4 Mi entries of a 32 MiB L1 table pointing at the L1 table",
            |b, _| maximal_l1(b, |l1| l1 | 1 << 63),
            Outcome::Refused("overlaps the L2 table at"),
        ),
        (
            "all 4 Mi entries of a 32 MiB L1 table misaligned",
            |b, _| maximal_l1(b, |_| 0x1_0200),
            Outcome::Refused("L2 table offset 0x10200 is not cluster-aligned"),
        ),
        (
            "L2 table that is a refcount block",
            |b, m| {
                let block = be64(b, m.reftable);
                put64(b, m.l1, block | 1 << 63);
            },
            Outcome::Refused("(L1 entry 0) overlaps refcount block 0"),
        ),
        (
            "bitmap table that is the bitmap directory",
            |b, m| put64(b, m.entry_b, m.dir as u64),
            Outcome::Refused("the bitmap directory"),
        ),
        (
            // Offset 0 in a bitmap table entry means "all zeros" (no data cluster).
            "bitmap data cluster at offset 0 (the header cluster)",
            |b, m| put64(b, m.table_b, 0),
            Outcome::Valid(None),
        ),
        (
            // Offset 0 with bit 0 set means "all ones".
            "bitmap data cluster at offset 0 with bit 0 set",
            |b, m| put64(b, m.table_b, 1),
            Outcome::Valid(Some(())),
        ),
        (
            "bitmap data cluster inside the header cluster",
            |b, m| put64(b, m.table_b, 0x200),
            Outcome::Refused("the data cluster offset is not cluster-aligned"),
        ),
    ];
    // The claims these images make, for the record.
    println!(
        "16 EiB at {CLUSTER}-byte clusters would need {} L1 entries",
        SIZE_16_EIB.div_ceil(l2_coverage)
    );
    let rss_before = peak_rss_kib();
    for (what, mutate, outcome) in cases {
        let path = s.path("case.qcow2");
        let mut bytes = original.clone();
        mutate(&mut bytes, &map);
        std::fs::write(&path, &bytes).unwrap();
        drop(bytes);
        let before = file_hash(&path);
        let started = std::time::Instant::now();
        let read = Image::open(&path, OpenOptions::default());
        let report = Image::check_file(&path, OpenOptions::default()).unwrap();
        let (errors, warnings) = (texts(report.errors()), texts(report.warnings()));
        // Messages are bounded too, however many entries are bad.
        assert!(
            errors.len() <= 64 && warnings.len() <= 64,
            "{what}: {} errors, {} warnings",
            errors.len(),
            warnings.len()
        );
        let open_rw = || Image::open(&path, RW);
        match outcome {
            Outcome::Refused(expected) => {
                refused_or_confined(what, &path, read, expected);
                assert!(
                    errors.iter().any(|e| e.contains(expected)),
                    "{what}: check_file errors {:?}",
                    errors
                );
                let err = open_rw().expect_err(what).to_string();
                assert!(err.contains(expected), "{what}: writing: '{err}'");
            }
            Outcome::WriteRefused(expected) => {
                let image = read.unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
                assert_eq!(image.bitmaps().len(), 2, "{what}");
                drop(image);
                // Refcounts below the references are corruption, as for qemu-img check.
                assert!(
                    errors.iter().all(|e| e.contains("reference")),
                    "{what}: {:?}",
                    errors
                );
                assert!(
                    warnings.iter().chain(&errors).any(|w| w.contains(expected)),
                    "{what}: check_file warnings {:?}, errors {:?}",
                    warnings,
                    errors
                );
                match open_rw() {
                    Err(Error::ReadOnly(text)) => {
                        println!("{what}: {text}");
                        assert!(text.contains(expected), "{what}: '{text}'");
                    }
                    other => panic!("{what}: opening for writing: {other:?}"),
                }
            }
            Outcome::Valid(dirty) => {
                let image = read.unwrap_or_else(|e| panic!("{what}: refused: {e}"));
                let content = image.inspect_bitmap("b").unwrap();
                match dirty {
                    None => assert!(content.is_empty(), "{what}"),
                    Some(()) => assert_eq!(content.count(), SIZE, "{what}"),
                }
                assert_eq!(image.inspect_bitmap("a").unwrap(), a, "{what}");
                drop(image);
                assert!(report.errors().next().is_none(), "{what}: {:?}", errors);
                println!("{what}: accepted (valid), warnings {:?}", warnings);
                drop(open_rw().unwrap_or_else(|e| panic!("{what}: writing refused: {e}")));
            }
        }
        // A bound against work proportional to what the image claims (a 16 EiB disk's tables),
        // which would take hours: loose enough for a loaded machine, where a case takes 0.1 s
        // idle and up to a few seconds under load.
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(30),
            "{what}: took {elapsed:?}"
        );
        assert_eq!(file_hash(&path), before, "{what}: the file changed");
    }
    report_rss_growth(rss_before);
}

/// Names QEMU reads but no QEMU tool writes: a NUL byte (QEMU uses the name up to it) and no
/// byte at all. They are not malformed: listed with their exact bytes, read, edited, removed,
/// and the image stays clean; creating such names is refused, as QEMU refuses it.
#[test]
fn names_with_a_nul_or_no_byte_are_read_and_edited() {
    let s = Scratch::new("odd-names");
    let (mut bytes, m, a) = valid_image(&s);
    // 'a' becomes "a\0" (the NUL takes a byte of the padding); 'b', the last entry, loses its
    // one-byte name and with it the 8 bytes of its name field.
    bytes[m.dir + 19] = 2;
    bytes[m.entry_b + 18] = 0;
    bytes[m.entry_b + 19] = 0;
    bytes[m.entry_b + 24] = 0;
    let dir_size = be64(&bytes, m.ext + 8);
    put64(&mut bytes, m.ext + 8, dir_size - 8);
    let path = s.path("odd.qcow2");
    std::fs::write(&path, &bytes).unwrap();

    let report = Image::check_file(&path, OpenOptions::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(
        texts(report.notes())
            .iter()
            .any(|n| n.contains("'a\\0'") && n.contains("NUL byte; QEMU knows the bitmap as 'a'")),
        "{report:?}"
    );
    assert!(
        texts(report.notes())
            .iter()
            .any(|n| n.contains("name is empty")),
        "{report:?}"
    );

    let rw = OpenOptions {
        write: true,
        force_share: false,
    };
    let mut image = Image::open(&path, rw).unwrap();
    let names: Vec<&[u8]> = image.bitmaps().iter().map(|b| b.name.as_bytes()).collect();
    assert_eq!(names, [&b"a\0"[..], b""]);
    assert_eq!(image.bitmaps()[0].name.to_string(), "a\\0");
    assert!(image.bitmap("a").is_none(), "the NUL is part of the name");
    assert_eq!(image.inspect_bitmap(b"a\0").unwrap(), a);
    assert!(image.load_bitmap(b"").unwrap().get(5 << 20));
    image.release_bitmap(b"").unwrap();
    image.edit_bitmap(b"", |b| b.set(0, 512)).unwrap();
    image.set_enabled(b"a\0", false).unwrap();
    image.merge_bitmap(b"", b"a\0").unwrap();
    assert!(matches!(
        image.add_bitmap(b"", 65536, true),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        image.add_bitmap(b"a\0b", 65536, true),
        Err(Error::InvalidArgument(_))
    ));
    let taken = image.add_bitmap("a", 65536, true).unwrap_err();
    assert!(
        taken
            .to_string()
            .contains("QEMU reads the name of bitmap 'a\\0' up to its NUL"),
        "{taken}"
    );
    let missing = image.remove_bitmap(b"a\xff").unwrap_err();
    assert_eq!(missing.to_string(), "no bitmap named 'a\\xff' in the image");
    image.close().unwrap();

    let image = Image::open(&path, OpenOptions::default()).unwrap();
    let merged = image.inspect_bitmap(b"a\0").unwrap();
    assert!(merged.get(0) && merged.get(5 << 20) && merged.get((1 << 20) - 1));
    assert!(!image.bitmap(b"a\0").unwrap().auto);
    drop(image);
    let mut image = Image::open(&path, rw).unwrap();
    image.remove_bitmap(b"").unwrap();
    image.remove_bitmap(b"a\0").unwrap();
    assert!(image.bitmaps().is_empty());
    assert!(matches!(
        image.add_bitmap(b"", 65536, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(image.check().is_clean());
    image.close().unwrap();
    if have("qemu-img") {
        qemu_check(&path, false);
    }
}
