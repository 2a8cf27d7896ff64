// SPDX-License-Identifier: GPL-2.0-or-later

//! `check -r` in the library: what the check finds, what each repair mode changes and refuses,
//! and crash consistency: each repair is interrupted after each of its writes in turn
//! (CrashIo); every intermediate image must be at least as usable as before (no more
//! corruption, the intact bitmap unchanged) and a second repair must finish the job.
mod qcow2_util;

use std::path::Path;
use std::sync::atomic::Ordering;

use hbitmap::qcow2::io::{CrashIo, FileIo};
use hbitmap::qcow2::{
    BitmapFlags, CheckReport, EntryProblem, Error, Finding, FindingKind, Image, OpenOptions,
    RepairMode, Subject,
};
use hbitmap::HBitmap;
use hbitmap_testkit::Rng;
use qcow2_util::*;

const SIZE: u64 = 64 << 20;
const BITMAPS_EXT: u32 = 0x2385_2875;

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().unwrap())
}

fn be64(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

/// File offset of the bitmaps extension's data (nb_bitmaps, reserved, size, offset).
fn bitmaps_ext(data: &[u8]) -> usize {
    let mut at = be32(data, 100) as usize;
    loop {
        let magic = be32(data, at);
        let len = be32(data, at + 4) as usize;
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == BITMAPS_EXT {
            return at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// File offset of bitmap `name`'s directory entry.
fn directory_entry(data: &[u8], name: &str) -> usize {
    let ext = bitmaps_ext(data);
    let count = be32(data, ext);
    let mut at = be64(data, ext + 16) as usize;
    for _ in 0..count {
        let name_size = u16::from_be_bytes([data[at + 18], data[at + 19]]) as usize;
        let extra = be32(data, at + 20) as usize;
        if &data[at + 24 + extra..at + 24 + extra + name_size] == name.as_bytes() {
            return at;
        }
        at += (24 + extra + name_size).div_ceil(8) * 8;
    }
    panic!("no bitmap '{name}'");
}

fn patch(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut data = std::fs::read(path).unwrap();
    change(&mut data);
    std::fs::write(path, data).unwrap();
}

fn writable(path: &Path) -> Image {
    Image::open(
        path,
        OpenOptions {
            write: true,
            force_share: false,
        },
    )
    .unwrap()
}

fn check(path: &Path) -> CheckReport {
    Image::check_file(path, OpenOptions::default()).unwrap()
}

/// A bitmap's name, in_use and auto flags, and dirty extents.
type BitmapState = (String, bool, bool, Vec<(u64, u64)>);

/// The bitmaps of an image that opens, with their flags and content.
fn bitmaps(path: &Path) -> Vec<BitmapState> {
    let image = Image::open(path, OpenOptions::default())
        .unwrap_or_else(|e| panic!("{} does not open: {e}", path.display()));
    image
        .bitmaps()
        .iter()
        .map(|info| {
            let content = extents(&image.inspect_bitmap(&info.name).unwrap());
            (info.name.to_string(), info.in_use, info.auto, content)
        })
        .collect()
}

/// Leaks as an interrupted store leaves them: new clusters counted, the header never switched.
/// Returns how many clusters the interrupted store leaked.
fn leak_some_clusters(path: &Path, seed: u64) -> u64 {
    let bitmap = random_bitmap(&mut Rng::new(seed), SIZE, 12, 30);
    let io = CrashIo::new(FileIo::new(rw_file(path)), u64::MAX);
    let counter = io.writes();
    let mut image = Image::open_io(Box::new(io), path, true).unwrap();
    image.store_bitmap("lost", &bitmap, AUTO).unwrap();
    drop(image);
    let writes = counter.load(Ordering::SeqCst);
    // Undo through the library's own remove, then crash a new store just before its header.
    writable(path).remove_bitmap("lost").unwrap();
    let io = CrashIo::new(FileIo::new(rw_file(path)), writes - 2);
    let mut image = Image::open_io(Box::new(io), path, true).unwrap();
    assert!(image.store_bitmap("lost", &bitmap, AUTO).is_err());
    drop(image);
    let leaks = check(path).leaks;
    assert!(leaks > 0, "the interrupted store leaked nothing");
    leaks
}

/// An image with an intact bitmap 'a', 'b' left in use (loaded and never stored, as by a
/// crashed QEMU), 'c' whose table offset is misaligned (QEMU refuses to open such an image),
/// and leaked clusters. Returns 'a'.
fn damaged_image(path: &Path) -> HBitmap {
    damaged_image_with(path, 65536)
}

fn damaged_image_with(path: &Path, cluster_size: u64) -> HBitmap {
    damaged_image_counted(path, cluster_size).0
}

/// [`damaged_image_with`], also returning how many clusters are leaked: those of the
/// interrupted store and every cluster of 'c', whose table can no longer be followed.
fn damaged_image_counted(path: &Path, cluster_size: u64) -> (HBitmap, u64) {
    let mut rng = Rng::new(21);
    let a = random_bitmap(&mut rng, SIZE, 12, 40);
    let b = random_bitmap(&mut rng, SIZE, 14, 20);
    let c = random_bitmap(&mut rng, SIZE, 16, 20);
    let mut image = Image::create(path, SIZE, cluster_size).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, AUTO).unwrap();
    image.store_bitmap("c", &c, BitmapFlags::default()).unwrap();
    image.close().unwrap();
    let mut leaked = leak_some_clusters(path, 22);
    let mut image = writable(path);
    let _ = image.load_bitmap("b").unwrap();
    drop(image);
    patch(path, |data| {
        let entry = directory_entry(data, "c");
        let table = be64(data, entry);
        let entries = be32(data, entry + 8) as usize;
        let table_bytes = 8 * entries as u64;
        leaked += table_bytes.div_ceil(cluster_size);
        leaked += (0..entries)
            .filter(|&i| be64(data, table as usize + 8 * i) & 0x00ff_ffff_ffff_fe00 != 0)
            .count() as u64;
        data[entry..entry + 8].copy_from_slice(&(table + 8).to_be_bytes());
    });
    (a, leaked)
}

#[test]
fn check_reports_and_changes_nothing() {
    let s = Scratch::new("repair-check");
    let path = s.path("damaged.qcow2");
    let (_, leaked) = damaged_image_counted(&path, 65536);
    let before = file_hash(&path);
    let report = check(&path);
    // One corruption, c's misaligned table; b in use is a state (a warning).
    assert_eq!(report.corruptions, 1, "{report:?}");
    let errors: Vec<&Finding> = report.errors().collect();
    assert_eq!(errors.len(), 1, "{report:?}");
    assert_eq!(errors[0].subject, Subject::Bitmap("c".into()), "{report:?}");
    assert!(
        matches!(
            errors[0].kind,
            FindingKind::BadEntry {
                problem: EntryProblem::TableOffset(_),
                ..
            }
        ),
        "{report:?}"
    );
    // The rendering of that finding.
    let text = errors[0].to_string();
    assert!(
        text.starts_with("bitmap 'c' (directory entry at ")
            && text.contains("): bitmap_table_offset 0x")
            && text.ends_with(" is not a nonzero multiple of the cluster size"),
        "{text}"
    );
    assert_eq!(report.leaks, leaked, "{report:?}");
    assert_eq!(report.check_errors, 0);
    assert_eq!(report.in_use_bitmaps, ["b"]);
    assert_eq!(report.damaged_bitmaps, ["c"]);
    assert!(report
        .warnings()
        .any(|w| w.subject == Subject::Bitmap("b".into()) && w.kind == FindingKind::InUse));
    assert!(report.unrepairable.is_none(), "{report:?}");
    let runs: u64 = report
        .leaked()
        .map(|run| match (&run.subject, &run.kind) {
            (&Subject::Clusters { count, .. }, &FindingKind::Leak { at, end }) => {
                assert_eq!(end - at, count * 65536, "{run:?}");
                count
            }
            _ => panic!("not a run of leaked clusters: {run:?}"),
        })
        .sum();
    assert_eq!(
        runs, leaked,
        "the leaked runs add up: {:?}",
        report.findings
    );
    // The rendering of a run.
    let text: Vec<String> = report.leaked().map(ToString::to_string).collect();
    let counted: u64 = text
        .iter()
        .map(|run| run.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, leaked, "{text:?}");
    assert_eq!(file_hash(&path), before, "check wrote to the image");
}

#[test]
fn repair_all_keeps_intact_bitmaps_and_removes_the_rest() {
    let s = Scratch::new("repair-all");
    let path = s.path("damaged.qcow2");
    let a = damaged_image(&path);
    let report = Image::repair_file(&path, RepairMode::All).unwrap();
    let changes = report.changes.join("\n");
    for expected in [
        "removed bitmap 'b': marked in use",
        "removed bitmap 'c': damaged",
        "bitmap_table_offset 0x",
        "is not a nonzero multiple of the cluster size",
        "wrote a new bitmap directory",
        "leaked cluster",
    ] {
        assert!(changes.contains(expected), "{expected}: {changes}");
    }
    // 'c' only: 'b' in use is a state, not damage.
    assert_eq!(report.corruptions_fixed, 1);
    assert!(report.leaks_fixed > 0);
    assert!(report.before.corruptions > 0);
    assert!(report.after.is_clean(), "{:?}", report.after);
    assert_eq!(
        bitmaps(&path),
        [("a".to_string(), false, true, extents(&a))],
        "the intact bitmap changed"
    );
    if have("qemu-img") {
        qemu_check(&path, false);
    }
    // A second repair finds nothing to do.
    let again = Image::repair_file(&path, RepairMode::All).unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
}

#[test]
fn repair_leaks_refuses_damaged_bitmaps_and_frees_leaks_otherwise() {
    let s = Scratch::new("repair-leaks");
    let path = s.path("damaged.qcow2");
    damaged_image(&path);
    let before = file_hash(&path);
    match Image::repair_file(&path, RepairMode::Leaks) {
        Err(Error::Unsupported(why)) => {
            assert!(why.contains("'-r all'") && why.contains("damaged"), "{why}")
        }
        other => panic!("repair -r leaks of a damaged bitmap: {other:?}"),
    }
    assert_eq!(file_hash(&path), before, "a refused repair wrote");

    // Leaks and an in-use bitmap only: -r leaks frees the leaks and leaves the bitmaps.
    let path = s.path("leaky.qcow2");
    let mut image = Image::create(&path, SIZE, 65536).unwrap();
    let a = random_bitmap(&mut Rng::new(31), SIZE, 12, 40);
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &a, AUTO).unwrap();
    image.close().unwrap();
    leak_some_clusters(&path, 32);
    let _ = writable(&path).load_bitmap("b").unwrap();
    let kept = bitmaps(&path);
    let report = Image::repair_file(&path, RepairMode::Leaks).unwrap();
    assert!(report.leaks_fixed > 0);
    assert_eq!(report.corruptions_fixed, 0);
    assert!(report.after.is_consistent(), "{:?}", report.after);
    assert_eq!(report.after.in_use_bitmaps, ["b"]);
    assert_eq!(bitmaps(&path), kept);
    if have("qemu-img") {
        qemu_check(&path, false);
    }
}

/// A stale extension (autoclear bit 0 cleared) and an unreadable one (nb_bitmaps wrong): both
/// are dropped, and what their bitmaps used is freed.
#[test]
fn stale_and_unreadable_extensions_are_dropped() {
    let s = Scratch::new("repair-ext");
    for (name, mode, change) in [
        (
            "stale",
            RepairMode::Leaks,
            (|data: &mut Vec<u8>| data[95] &= !1) as fn(&mut Vec<u8>),
        ),
        ("unreadable", RepairMode::All, |data: &mut Vec<u8>| {
            // The reserved field set: QEMU refuses the extension, nothing in it is trusted.
            let ext = bitmaps_ext(data);
            data[ext + 4..ext + 8].copy_from_slice(&7u32.to_be_bytes());
        }),
    ] {
        let path = s.path(&format!("{name}.qcow2"));
        let mut image = Image::create(&path, SIZE, 65536).unwrap();
        let a = random_bitmap(&mut Rng::new(41), SIZE, 12, 40);
        image.store_bitmap("a", &a, AUTO).unwrap();
        image.close().unwrap();
        patch(&path, change);
        let report = check(&path);
        assert!(report.leaks > 0, "{name}: {report:?}");
        if name == "stale" {
            assert!(
                report.stale_extension && report.corruptions == 0,
                "{report:?}"
            );
        } else {
            assert!(
                report.broken_extension && report.corruptions > 0,
                "{report:?}"
            );
        }
        let repaired = Image::repair_file(&path, mode).unwrap();
        let changes = repaired.changes.join("\n");
        assert!(
            changes.contains(name) && changes.contains("freed"),
            "{name}: {changes}"
        );
        assert!(repaired.after.is_clean(), "{name}: {:?}", repaired.after);
        assert!(bitmaps(&path).is_empty());
        if have("qemu-img") {
            qemu_check(&path, false);
        }
    }
}

/// Runs `mode` on a copy of `base`, crashed before each of its writes in turn. After each
/// crash the image must have no more corruption than before, the intact bitmap 'a' must read
/// back unchanged when the image opens, and a second repair must reach the same final state
/// as an uninterrupted one.
fn crash_each_write(name: &str, base: &Path, dir: &Path, mode: RepairMode) -> u64 {
    crash_each_write_keeping(name, base, dir, mode, Some("a"))
}

/// As `crash_each_write`, with `intact` the bitmap that must survive (None: none does).
fn crash_each_write_keeping(
    name: &str,
    base: &Path,
    dir: &Path,
    mode: RepairMode,
    intact: Option<&str>,
) -> u64 {
    let work = dir.join(format!("{name}-work.qcow2"));
    let before = check(base);
    std::fs::copy(base, &work).unwrap();
    let io = CrashIo::new(FileIo::new(rw_file(&work)), u64::MAX);
    let counter = io.writes();
    Image::repair_io(Box::new(io), &work, mode).unwrap();
    let writes = counter.load(Ordering::SeqCst);
    assert!(writes > 0, "{name}: the repair wrote nothing");
    let done = bitmaps(&work);
    assert!(check(&work).is_consistent());
    let kept: Vec<_> = done
        .iter()
        .filter(|b| Some(b.0.as_str()) == intact)
        .cloned()
        .collect();
    assert_eq!(
        kept.len(),
        usize::from(intact.is_some()),
        "{name}: {intact:?}"
    );
    for crash_at in 0..writes {
        std::fs::copy(base, &work).unwrap();
        let io = CrashIo::new(FileIo::new(rw_file(&work)), crash_at);
        assert!(
            Image::repair_io(Box::new(io), &work, mode).is_err(),
            "{name}: the crash at write {crash_at} went unnoticed"
        );
        let now = check(&work);
        assert!(
            now.corruptions <= before.corruptions && now.check_errors == 0,
            "{name}: crash before write {crash_at} of {writes}: {now:?}"
        );
        // An image QEMU found free of corruption stays so (leaks allowed) at every crash point.
        if before.corruptions == 0 && have("qemu-img") {
            qemu_check(&work, true);
        }
        if let (Ok(image), Some(intact)) = (Image::open(&work, OpenOptions::default()), intact) {
            let content = extents(&image.inspect_bitmap(intact).unwrap());
            assert_eq!(
                content, kept[0].3,
                "{name}: crash at {crash_at} changed '{intact}'"
            );
        }
        let again = Image::repair_file(&work, mode)
            .unwrap_or_else(|e| panic!("{name}: repair after a crash at {crash_at}: {e}"));
        assert!(again.after.is_consistent(), "{name}: {:?}", again.after);
        assert_eq!(
            bitmaps(&work),
            done,
            "{name}: crash at {crash_at}, repaired again"
        );
        if have("qemu-img") {
            qemu_check(&work, false);
        }
    }
    writes
}

#[test]
fn crash_during_each_repair() {
    let s = Scratch::new("repair-crash");
    let damaged = s.path("damaged.qcow2");
    damaged_image(&damaged);
    let mut total = crash_each_write("all", &damaged, &s.dir, RepairMode::All);
    // 512-byte clusters: a refcount block covers 128 KiB, so the leaks span several blocks.
    let small = s.path("damaged-512.qcow2");
    damaged_image_with(&small, 512);
    total += crash_each_write("all-512", &small, &s.dir, RepairMode::All);

    let leaky = s.path("leaky.qcow2");
    let mut image = Image::create(&leaky, SIZE, 65536).unwrap();
    let a = random_bitmap(&mut Rng::new(51), SIZE, 12, 40);
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.close().unwrap();
    leak_some_clusters(&leaky, 52);
    total += crash_each_write("leaks", &leaky, &s.dir, RepairMode::Leaks);

    // Leaks spread over many refcount blocks (512-byte clusters: 256 clusters a block): the
    // bitmaps of a stale extension, then of an unreadable one, are freed block by block.
    for (name, mode, change) in [
        (
            "stale",
            RepairMode::Leaks,
            (|data: &mut Vec<u8>| data[95] &= !1) as fn(&mut Vec<u8>),
        ),
        ("unreadable", RepairMode::All, |data: &mut Vec<u8>| {
            let ext = bitmaps_ext(data);
            data[ext + 4..ext + 8].copy_from_slice(&9u32.to_be_bytes());
        }),
    ] {
        let path = s.path(&format!("{name}.qcow2"));
        let size = 1 << 30;
        let mut image = Image::create(&path, size, 512).unwrap();
        // A dirty granule every 4 KiB: each 512-byte data cluster (2 MiB of disk) is stored.
        let mut bitmap = HBitmap::new(size, 9).unwrap();
        for granule in 0..size / 4096 {
            bitmap.set(granule * 4096, 512);
        }
        for index in 0..3 {
            image
                .store_bitmap(format!("b{index}"), &bitmap, AUTO)
                .unwrap();
        }
        image.close().unwrap();
        patch(&path, change);
        let leaks = check(&path).leaks;
        assert!(leaks > 512, "{name}: only {leaks} leaked clusters");
        total += crash_each_write_keeping(name, &path, &s.dir, mode, None);
    }
    println!("{total} interrupted writes checked");
}

/// A bitmap left in use whose clusters have refcount 0 is removed by -r all; until the header
/// switch that removes it, no new cluster may be placed on its clusters (free as the refcounts
/// say): after a crash at any write, while the old directory lists it, it reads back as before.
#[test]
fn uncounted_bitmap_clusters_stay_untouched_until_removed() {
    let s = Scratch::new("repair-uncounted");
    let base = s.path("base.qcow2");
    let mut rng = Rng::new(71);
    let a = random_bitmap(&mut rng, SIZE, 12, 40);
    let c = random_bitmap(&mut rng, SIZE, 12, 40);
    // c first: its clusters come before the hole its directory leaves when a is stored.
    let mut image = Image::create(&base, SIZE, 65536).unwrap();
    image.store_bitmap("c", &c, AUTO).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.close().unwrap();
    // Uncount every cluster of c (its table and data): the lowest free clusters are then its.
    patch(&base, |data| {
        let table_offset = be64(data, directory_entry(data, "c")) as usize;
        let table_size = be32(data, directory_entry(data, "c") + 8) as usize;
        let reftable = be64(data, 48) as usize;
        let block = be64(data, reftable) as usize;
        let mut clusters = vec![table_offset / 65536];
        for i in 0..table_size {
            let entry = be64(data, table_offset + 8 * i) & 0x00ff_ffff_ffff_fe00;
            if entry != 0 {
                clusters.push(entry as usize / 65536);
            }
        }
        for cluster in clusters {
            data[block + 2 * cluster..block + 2 * cluster + 2].copy_from_slice(&[0, 0]);
        }
        // Flag in_use, as a QEMU killed while tracking it leaves it.
        let flags = directory_entry(data, "c") + 12;
        data[flags + 3] |= 1;
    });
    let report = check(&base);
    assert!(report.corruptions > 0, "{report:?}");
    let work = s.path("work.qcow2");
    std::fs::copy(&base, &work).unwrap();
    let io = CrashIo::new(FileIo::new(rw_file(&work)), u64::MAX);
    let counter = io.writes();
    let repaired = Image::repair_io(Box::new(io), &work, RepairMode::All).unwrap();
    assert!(
        repaired
            .changes
            .iter()
            .any(|c| c.contains("removed bitmap 'c': marked in use")),
        "{:?}",
        repaired.changes
    );
    let writes = counter.load(Ordering::SeqCst);
    let mut listed = 0;
    for crash_at in 0..writes {
        std::fs::copy(&base, &work).unwrap();
        let io = CrashIo::new(FileIo::new(rw_file(&work)), crash_at);
        let _ = Image::repair_io(Box::new(io), &work, RepairMode::All);
        let image = Image::open(&work, OpenOptions::default()).unwrap();
        assert_eq!(image.inspect_bitmap("a").unwrap(), a, "crash at {crash_at}");
        if image.bitmap("c").is_some() {
            listed += 1;
            assert_eq!(
                image.inspect_bitmap("c").unwrap(),
                c,
                "crash at {crash_at} of {writes}: 'c' was overwritten before its removal"
            );
        }
    }
    assert!(listed > 0, "no crash point left 'c' listed");
}

/// ENOSPC and EIO at each write and each flush of a repair in turn: the repair fails with that
/// errno, leaves no more corruption than before and the intact bitmap as it was, and a second
/// repair reaches the same image as an uninterrupted one.
#[test]
fn enospc_and_eio_at_each_write_and_flush_of_a_repair() {
    let s = Scratch::new("repair-faults");
    let base = s.path("damaged.qcow2");
    damaged_image(&base);
    let faults_checked = faults_at_each_write("damaged", &base, &s.dir, RepairMode::All, Some("a"));
    assert!(faults_checked >= 8, "only {faults_checked} faults injected");
    println!("{faults_checked} injected faults checked");
}

/// ENOSPC and EIO at each write and each flush of a repair of `base` in turn: the error is
/// reported with its errno, the image has no more corruption than before, bitmap `intact`
/// reads back unchanged whenever the image opens, and a second repair reaches the same
/// bitmaps as an uninterrupted one. Returns how many faults were injected.
fn faults_at_each_write(
    name: &str,
    base: &Path,
    dir: &Path,
    mode: RepairMode,
    intact: Option<&str>,
) -> u64 {
    use hbitmap::qcow2::io::{FailingIo, Faults};

    let before = check(base);
    let work = dir.join(format!("{name}-faults.qcow2"));
    std::fs::copy(base, &work).unwrap();
    Image::repair_file(&work, mode).unwrap();
    let done = bitmaps(&work);
    let kept = intact.map(|intact| {
        let state = done
            .iter()
            .find(|b| b.0 == intact)
            .unwrap_or_else(|| panic!("{name}: the repair dropped '{intact}'"));
        (intact, state.3.clone())
    });
    let mut faults_checked = 0;
    for errno in [libc::ENOSPC, libc::EIO] {
        for on_flush in [false, true] {
            for index in 0.. {
                std::fs::copy(base, &work).unwrap();
                let faults = Faults {
                    write: (!on_flush).then_some(index),
                    flush: on_flush.then_some(index),
                    errno: Some(errno),
                    ..Faults::default()
                };
                let io = FailingIo::new(FileIo::new(rw_file(&work)), faults);
                let what = format!(
                    "{name}: errno {errno} at {} {index}",
                    if on_flush { "flush" } else { "write" }
                );
                match Image::repair_io(Box::new(io), &work, mode) {
                    // The fault was never reached: every write and flush was tried.
                    Ok(_) => break,
                    Err(error) => assert_eq!(error.errno(), errno, "{what}: {error}"),
                }
                faults_checked += 1;
                let now = check(&work);
                assert!(
                    now.corruptions <= before.corruptions && now.check_errors == 0,
                    "{what}: {now:?}"
                );
                if let (Ok(image), Some((intact, kept))) =
                    (Image::open(&work, OpenOptions::default()), &kept)
                {
                    let content = extents(&image.inspect_bitmap(intact).unwrap());
                    assert_eq!(&content, kept, "{what}");
                }
                let again = Image::repair_file(&work, mode)
                    .unwrap_or_else(|e| panic!("{what}: second repair: {e}"));
                assert!(again.after.is_consistent(), "{what}: {:?}", again.after);
                assert_eq!(bitmaps(&work), done, "{what}");
            }
        }
    }
    faults_checked
}

/// The repairs of a damaged bitmaps extension whose bitmaps are intact (a wrong length, a count
/// or size off, a second extension) keep them at every crash point and every injected fault.
#[test]
fn extension_repairs_keep_the_bitmaps_at_each_crash_and_fault() {
    let s = Scratch::new("repair-ext-kept");
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, RepairMode, Damage); 3] = [
        ("length", RepairMode::All, |data| {
            let ext = bitmaps_ext(data);
            data[ext - 4..ext].copy_from_slice(&16u32.to_be_bytes());
        }),
        ("count", RepairMode::All, |data| {
            let ext = bitmaps_ext(data);
            let nb = be32(data, ext) + 1;
            data[ext..ext + 4].copy_from_slice(&nb.to_be_bytes());
        }),
        ("second", RepairMode::Leaks, |data| {
            // The extension again in front of itself: QEMU reads both and uses the last.
            let ext = bitmaps_ext(data) - 8;
            let copy = data[ext..ext + 32].to_vec();
            let end = 65536 - 32;
            data.copy_within(ext..end, ext + 32);
            data[ext..ext + 32].copy_from_slice(&copy);
        }),
    ];
    let (mut crashes, mut faults) = (0, 0);
    for (name, mode, change) in cases {
        let path = s.path(&format!("{name}.qcow2"));
        let mut rng = Rng::new(81);
        let mut image = Image::create(&path, SIZE, 65536).unwrap();
        for bitmap in ["a", "b"] {
            let content = random_bitmap(&mut rng, SIZE, 12, 40);
            image.store_bitmap(bitmap, &content, AUTO).unwrap();
        }
        image.close().unwrap();
        let intact = bitmaps(&path);
        patch(&path, change);
        crashes += crash_each_write_keeping(name, &path, &s.dir, mode, Some("a"));
        faults += faults_at_each_write(name, &path, &s.dir, mode, Some("a"));
        let work = s.path("done.qcow2");
        std::fs::copy(&path, &work).unwrap();
        Image::repair_file(&work, mode).unwrap();
        assert_eq!(bitmaps(&work), intact, "{name}: both bitmaps kept");
    }
    println!("{crashes} interrupted writes, {faults} injected faults checked");
}

/// A dirty lazy-refcounts image (QEMU aborted after its writes): `-r all` rebuilds the
/// refcounts. At every crash point and injected fault the image stays repairable, and once
/// repaired it is clean for qemu-img, holds the guest data QEMU wrote, and has no bitmap left
/// (QEMU had the one it held in use).
#[test]
fn refcount_rebuild_at_each_crash_and_fault() {
    if !have_all("refcount_rebuild", &["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("repair-rebuild");
    let path = s.path("dirty.qcow2");
    let path_str = path.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            path_str,
            "64M",
        ],
    );
    run("qemu-img", &["bitmap", "--add", path_str, "b"]);
    // qemu-io's abort ends the process without a clean close: the dirty bit stays.
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 9 0 3M",
            "-c",
            "write -P 10 40M 1M",
        ])
        .args(["-c", "abort", path_str])
        .output()
        .unwrap();
    assert_ne!(
        std::fs::read(&path).unwrap()[79] & 1,
        0,
        "the dirty bit is set"
    );
    let report = check(&path);
    assert!(report.corruptions > 0, "{report:?}");
    let data_intact = |image: &Path| {
        let image = image.to_str().unwrap();
        run(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 9 0 3M", image],
        );
        run(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 10 40M 1M", image],
        );
    };
    let crashes = crash_each_write_keeping("rebuild", &path, &s.dir, RepairMode::All, None);
    let faults = faults_at_each_write("rebuild", &path, &s.dir, RepairMode::All, None);
    // The guest data after a crash at each write and a second repair.
    let work = s.path("work.qcow2");
    for crash_at in 0..crashes {
        std::fs::copy(&path, &work).unwrap();
        let io = CrashIo::new(FileIo::new(rw_file(&work)), crash_at);
        assert!(Image::repair_io(Box::new(io), &work, RepairMode::All).is_err());
        Image::repair_file(&work, RepairMode::All).unwrap();
        qemu_check(&work, false);
        data_intact(&work);
    }
    std::fs::copy(&path, &work).unwrap();
    let repaired = Image::repair_file(&work, RepairMode::All).unwrap();
    assert!(repaired.after.is_clean(), "{:?}", repaired.after);
    assert_eq!(
        repaired.corruptions_fixed, report.corruptions,
        "{repaired:?}"
    );
    assert_eq!(
        std::fs::read(&work).unwrap()[79] & 1,
        0,
        "the dirty bit is cleared"
    );
    qemu_check(&work, false);
    data_intact(&work);
    println!("{crashes} interrupted writes, {faults} injected faults checked");
}
