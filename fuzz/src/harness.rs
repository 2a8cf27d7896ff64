// SPDX-License-Identifier: GPL-2.0-or-later

//! Fuzz harness logic shared by the libFuzzer targets (`fuzz/fuzz_targets/`) and the plain
//! regression test `tests/fuzz_regressions.rs` (which includes this file with `#[path]`).
//! Depends only on `hbitmap`, `hbitmap-testkit` and `std`: inputs are decoded with the small
//! [`Bytes`] reader rather than `arbitrary`, so the regression test needs no extra dependency.
#![allow(dead_code)]

use std::io;
use std::sync::OnceLock;

use hbitmap::qcow2::io::{ImageIo, MemIo};
use hbitmap::qcow2::{BitmapFlags, BitmapName, Image, RepairMode};
use hbitmap::HBitmap;
use hbitmap_testkit::model::{expect_next_dirty_area, expect_next_zero, first_set, word_of};
use hbitmap_testkit::qcow2::{field, mutable_fields, put_field, CLUSTER_BITS};

// ---------------------------------------------------------------------------------------------
// Input decoding

/// Reads values from the fuzzer's bytes; past the end everything reads as zero.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// A value in `0..=max` (`max` inclusive), biased towards the ends.
    pub fn upto(&mut self, max: u64) -> u64 {
        match self.u8() % 8 {
            0 => 0,
            1 => max,
            2 => max.saturating_sub(u64::from(self.u8())),
            3 => u64::from(self.u8()).min(max),
            _ => {
                let v = self.u64();
                if max == u64::MAX {
                    v
                } else {
                    v % (max + 1)
                }
            }
        }
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

/// Writes through [`MemIo`] may not grow the "file" beyond this.
pub const MAX_MEM_FILE: usize = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Target 1: qcow2_open

/// Opens `bytes` as an image read-only, lists, inspects and loads every bitmap, runs `check`.
/// Panics only when the library does (or on a broken invariant between open and check).
///
/// The input is zero-padded to a whole number of clusters (by the header's `cluster_bits`, when
/// it is 9..=21), so that seeds can be stored with their trailing zeros trimmed: an image with
/// 2 MiB clusters is then a few hundred bytes of input instead of 8 MiB.
pub fn qcow2_open(bytes: &[u8]) {
    let io = Box::new(MemIo::with_limit(pad_to_cluster(bytes), MAX_MEM_FILE));
    let mut image = match Image::open_io(io, "fuzz.qcow2", false) {
        Ok(image) => image,
        Err(_) => return,
    };
    let _ = image.virtual_size();
    let _ = image.cluster_size();
    let _ = image.warnings().len();
    let infos = image.bitmaps().to_vec();
    for info in &infos {
        let _ = image.bitmap(&info.name);
        if let Ok(bitmap) = image.inspect_bitmap(&info.name) {
            assert_eq!(bitmap.size(), image.virtual_size(), "inspected bitmap size");
            let _ = bitmap.count();
            let _ = bitmap.sha256();
        }
        if let Ok(bitmap) = image.load_bitmap(&info.name) {
            assert_eq!(bitmap.size(), image.virtual_size(), "loaded bitmap size");
            let _ = bitmap.iter().take(1000).count();
        }
    }
    let report = image.check();
    // `open` refuses malformed structures but damage confined to some bitmaps, which it
    // reports as warnings; the check also counts every cluster's references and follows the
    // guest data map, which opening does not (refcounts below the references, malformed or
    // unusable L1 and L2 entries, COPIED flags), and looks for the files the header names.
    let warnings = image.warnings();
    let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
    assert!(
        errors.iter().all(|e| warnings.contains(e)
            || e.contains("reference")
            || e.contains("L1 table")
            || e.contains("L2 table")
            || e.contains("COPIED")
            || e.contains("cannot be opened")
            || e.contains("QEMU refuses to open the image")),
        "open succeeded but check found errors: {errors:?}"
    );
    drop(image);
    qcow2_repair(bytes, RepairMode::Leaks);
    qcow2_repair(bytes, RepairMode::All);
}

/// `check -r` on any bytes: a repair either is refused (nothing written) or leaves an image
/// that opens and checks consistent (no corruption, no leak), every intact bitmap unchanged.
pub fn qcow2_repair(bytes: &[u8], mode: RepairMode) {
    let data = pad_to_cluster(bytes);
    let intact: Vec<(BitmapName, HBitmap)> =
        match Image::open_io(Box::new(MemIo::new(data.clone())), "fuzz.qcow2", false) {
            Ok(image) => image
                .bitmaps()
                .iter()
                .filter(|b| !b.in_use)
                .filter_map(|b| Some((b.name.clone(), image.inspect_bitmap(&b.name).ok()?)))
                .collect(),
            Err(_) => Vec::new(),
        };
    let shared = std::sync::Arc::new(std::sync::Mutex::new(MemIo::with_limit(
        data.clone(),
        MAX_MEM_FILE,
    )));
    let io = Box::new(SharedIo(std::sync::Arc::clone(&shared)));
    let report = match Image::repair_io(io, "fuzz.qcow2", mode) {
        Ok(report) => report,
        // Refused: nothing may have been written.
        Err(hbitmap::qcow2::Error::Unsupported(_)) => {
            assert!(
                shared.lock().unwrap().data() == &data[..],
                "a refused repair wrote"
            );
            return;
        }
        // Not an image at all, or past the fuzzing file limit.
        Err(_) => return,
    };
    assert!(
        report.after.is_consistent(),
        "{mode:?}: the repaired image is not consistent: {:?}",
        report.after
    );
    let repaired = shared.lock().unwrap().data().to_vec();
    let image = Image::open_io(Box::new(MemIo::new(repaired)), "fuzz.qcow2", false)
        .unwrap_or_else(|e| panic!("{mode:?}: the repaired image does not open: {e}"));
    for (name, content) in intact {
        if let Some(info) = image.bitmap(&name) {
            if !info.in_use {
                assert_eq!(
                    image.inspect_bitmap(&name).ok().as_ref(),
                    Some(&content),
                    "{mode:?}: '{name}' changed"
                );
            }
        }
    }
}

/// A [`MemIo`] the caller keeps a handle to, to read what was written.
struct SharedIo(std::sync::Arc<std::sync::Mutex<MemIo>>);

impl ImageIo for SharedIo {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.lock().unwrap().pread(offset, buf)
    }
    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().pwrite(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.lock().unwrap().len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.lock().unwrap().set_len(len)
    }
}

/// `bytes` zero-padded to a multiple of the cluster size named in its header.
pub fn pad_to_cluster(bytes: &[u8]) -> Vec<u8> {
    let mut data = bytes.to_vec();
    let cluster_bits = field(bytes, CLUSTER_BITS, 4).unwrap_or(0);
    if (9..=21).contains(&cluster_bits) {
        let cluster = 1usize << cluster_bits;
        data.resize(data.len().div_ceil(cluster) * cluster, 0);
    }
    data
}

/// `bytes` without trailing zeros, if [`pad_to_cluster`] gives `bytes` back from that.
pub fn trim_for_corpus(bytes: &[u8]) -> Vec<u8> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let trimmed = bytes[..end.max(104)].to_vec();
    if pad_to_cluster(&trimmed) == bytes {
        trimmed
    } else {
        bytes.to_vec()
    }
}

/// Like [`qcow2_open`], then opens the image for writing (in memory) and exercises the
/// writing paths: store, clear, toggle, merge, remove, add. After every successful write the
/// image must still open and check without errors.
pub fn qcow2_write(bytes: &[u8], ops: &mut Bytes<'_>) {
    let io = Box::new(MemIo::with_limit(bytes.to_vec(), MAX_MEM_FILE));
    let Ok(mut image) = Image::open_io(io, "fuzz.qcow2", true) else {
        return;
    };
    let names: Vec<BitmapName> = image.bitmaps().iter().map(|b| b.name.clone()).collect();
    let pick = |ops: &mut Bytes<'_>| -> BitmapName {
        if names.is_empty() || ops.u8() % 4 == 0 {
            format!("fz{}", ops.u8() % 4).into()
        } else {
            names[usize::from(ops.u8()) % names.len()].clone()
        }
    };
    for _ in 0..4 {
        if ops.is_empty() {
            break;
        }
        let before = image.check();
        let done = match ops.u8() % 7 {
            0 => {
                let name = pick(ops);
                let granularity = 9 + u32::from(ops.u8() % 12);
                match HBitmap::new(image.virtual_size(), granularity) {
                    Ok(mut bitmap) => {
                        let size = image.virtual_size();
                        if size > 0 {
                            let start = ops.upto(size - 1);
                            let count = ops.upto(size - start);
                            bitmap.set(start, count);
                        }
                        let flags = BitmapFlags {
                            in_use: ops.u8() & 1 != 0,
                            auto: ops.u8() & 1 != 0,
                        };
                        image.store_bitmap(&name, &bitmap, flags).is_ok()
                    }
                    Err(_) => false,
                }
            }
            1 => image.clear_bitmap(&pick(ops)).is_ok(),
            2 => image.set_enabled(&pick(ops), ops.u8() & 1 != 0).is_ok(),
            3 => {
                let (a, b) = (pick(ops), pick(ops));
                image.merge_bitmap(&a, &b).is_ok()
            }
            4 => image.remove_bitmap(&pick(ops)).is_ok(),
            5 => {
                let name = pick(ops);
                image
                    .add_bitmap(&name, 1 << (9 + ops.u8() % 12), ops.u8() & 1 != 0)
                    .is_ok()
            }
            _ => image.load_bitmap(&pick(ops)).is_ok(),
        };
        let after = image.check();
        if done && before.errors().next().is_none() {
            assert!(
                after.errors().next().is_none(),
                "a successful write left errors: {:?}",
                after.findings
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target 2: qcow2_mutate

/// Builds a valid image in a temporary file and returns its bytes.
pub fn build_image(virtual_size: u64, cluster_size: u64, bitmaps: &[(&str, u32, u8)]) -> Vec<u8> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "hbitmap-fuzz-{}-{}.qcow2",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    {
        let mut image = Image::create(&path, virtual_size, cluster_size).expect("create");
        for (i, &(name, granularity_bits, pattern)) in bitmaps.iter().enumerate() {
            let mut bitmap = HBitmap::new(virtual_size, granularity_bits).expect("bitmap");
            let g = 1u64 << granularity_bits;
            let groups = virtual_size.div_ceil(g);
            match pattern {
                0 => {}
                1 => bitmap.set(0, virtual_size),
                _ => {
                    // A sparse pattern: a few runs, leaving clusters of the table empty.
                    let mut group = u64::from(pattern) % groups.max(1);
                    while group < groups {
                        let run = (1 + group % 7).min(groups - group);
                        bitmap.set(group * g, (run * g).min(virtual_size - group * g));
                        group += 3 + u64::from(pattern) * 37 + group / 2;
                    }
                }
            }
            let flags = BitmapFlags {
                in_use: false,
                auto: i % 2 == 0,
            };
            image.store_bitmap(name, &bitmap, flags).expect("store");
        }
        image.close().expect("close");
    }
    let bytes = std::fs::read(&path).expect("read back");
    let _ = std::fs::remove_file(&path);
    bytes
}

/// The base images of `qcow2_mutate`, built once.
pub fn base_images() -> &'static [Vec<u8>] {
    static IMAGES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        vec![
            build_image(1 << 20, 512, &[("a", 9, 2), ("bb", 12, 1), ("c", 16, 0)]),
            build_image(
                64 << 20,
                4096,
                &[("dirty", 16, 3), ("full", 20, 1), ("empty", 9, 0)],
            ),
            build_image(8 << 20, 65536, &[("x", 9, 5), ("y", 13, 2)]),
        ]
    })
}

/// Applies input-driven mutations to one of the base images and runs [`qcow2_open`] (and the
/// writing paths) on the result.
pub fn qcow2_mutate(data: &[u8]) {
    let mut input = Bytes::new(data);
    let bases = base_images();
    let mut img = bases[usize::from(input.u8()) % bases.len()].clone();
    let fields = mutable_fields(&img);
    let cluster = 1u64 << (field(&img, CLUSTER_BITS, 4).unwrap_or(0) as u32).min(30);
    let file_len = img.len() as u64;
    let mutations = 1 + usize::from(input.u8() % 8);
    for _ in 0..mutations {
        if input.is_empty() {
            break;
        }
        let selector = input.u16();
        if selector % 16 == 15 {
            // Raw byte poke or truncation.
            let offset = input.upto(file_len.saturating_sub(1)) as usize;
            if input.u8() % 4 == 0 {
                img.truncate(offset);
            } else if offset < img.len() {
                img[offset] = input.u8();
            }
            continue;
        }
        let Some(&chosen) = fields.get(usize::from(selector / 16) % fields.len().max(1)) else {
            continue;
        };
        let Some(old) = field(&img, chosen.offset, chosen.width) else {
            continue;
        };
        let new = match input.u8() % 12 {
            0 => 0,
            1 => u64::MAX,
            2 => old.wrapping_add(1),
            3 => old.wrapping_sub(1),
            4 => old.wrapping_add(cluster),
            5 => old.wrapping_sub(cluster),
            6 => 1u64 << (input.u8() % 64),
            7 => cluster * u64::from(input.u8()),
            8 => old ^ (1u64 << (input.u8() % 64)),
            9 => file_len,
            10 => {
                // Another field's value (e.g. a table offset into the directory).
                let other = fields[usize::from(input.u16()) % fields.len()];
                field(&img, other.offset, other.width).unwrap_or(0)
            }
            _ => input.u64(),
        };
        put_field(&mut img, chosen.offset, chosen.width, new);
    }
    qcow2_open(&img);
    qcow2_write(&img, &mut input);
}

// ---------------------------------------------------------------------------------------------
// Target 3: hbitmap_ops (C ABI against a model)

/// Runs a sequence of C-ABI operations on a bitmap and on a `Vec<bool>` model (one entry per
/// group), comparing every observable result.
///
/// Known quirk, inherited from QEMU: `deserialize_ones` on the last chunk sets the padding bits
/// past the last group; growing the bitmap afterwards turns them into dirty groups that
/// `count` does not include (and a later reset subtracts them). The fuzz target avoids growing
/// while padding bits are set; [`hbitmap_ops_strict`] does not (a known-failure regression).
pub fn hbitmap_ops(data: &[u8]) {
    hbitmap_ops_impl(data, false)
}

/// [`hbitmap_ops`] without avoiding the known padding-growth quirk.
pub fn hbitmap_ops_strict(data: &[u8]) {
    hbitmap_ops_impl(data, true)
}

fn hbitmap_ops_impl(data: &[u8], strict: bool) {
    use hbitmap::ffi;
    let mut input = Bytes::new(data);
    let granularity = u32::from(input.u8() % 64);
    // At most 2^16 groups so the model stays small.
    let max_size = max_ops_size(granularity);
    let mut size = 1 + input.upto(max_size - 1);
    let g = granularity;
    let groups_of = |size: u64| -> u64 { size.div_ceil(1u64 << g) };
    let hb = ffi::hbitmap_alloc(size, granularity as i32);
    // One entry per bit of the last level, padding bits past the last group included (whole
    // words, as deserialization writes them); `model[..groups]` are the real groups.
    let padded = |size: u64| (groups_of(size).div_ceil(64) * 64) as usize;
    let mut model = vec![false; padded(size)];
    let mut groups = groups_of(size) as usize;
    let mut steps = 0;
    while !input.is_empty() && steps < 200 {
        steps += 1;
        let op = input.u8() % 12;
        // SAFETY: `hb` is live; every argument is clamped into the documented range.
        unsafe {
            match op {
                0 | 1 => {
                    let start = input.upto(size - 1);
                    let count = input.upto(size - start);
                    if op == 0 {
                        ffi::hbitmap_set(hb, start, count);
                    } else {
                        ffi::hbitmap_reset(hb, start, count);
                    }
                    if count > 0 {
                        for grp in (start >> g)..=((start + count - 1) >> g) {
                            model[grp as usize] = op == 0;
                        }
                    }
                }
                2 => {
                    ffi::hbitmap_reset_all(hb);
                    model.fill(false);
                }
                3 => {
                    let item = input.upto(size - 1);
                    assert_eq!(
                        ffi::hbitmap_get(hb, item),
                        model[(item >> g) as usize],
                        "get({item})"
                    );
                }
                4 => {
                    let start = input.upto(size + 2);
                    let count = input.upto(u64::MAX);
                    let got = ffi::hbitmap_next_zero(hb, start, count);
                    let want = expect_next_zero(size, g, groups as u64, start, count, |w| {
                        word_of(&model, w)
                    });
                    assert_eq!(got, want, "next_zero({start}, {count}) size {size} g {g}");
                }
                5 => {
                    let (mut start, mut count) = (input.upto(size + 2), input.upto(u64::MAX));
                    let (s0, c0) = (start, count);
                    let found = ffi::hbitmap_next_dirty_area(hb, &mut start, &mut count);
                    // The iterator's first stop, padding bits included as in the original.
                    let first_dirty =
                        || match first_set(|w| word_of(&model, w), s0 >> g, model.len() as u64) {
                            Some(group) => (group << g) as i64,
                            None => -1,
                        };
                    let want = expect_next_dirty_area(size, g, s0, c0, first_dirty, |w| {
                        word_of(&model, w)
                    });
                    let got = found.then_some((start, count));
                    assert_eq!(got, want, "next_dirty_area({s0}, {c0}) size {size} g {g}");
                }
                6 => {
                    let first = input.upto(size - 1);
                    let mut iter = std::mem::MaybeUninit::<ffi::HBitmapIter>::uninit();
                    ffi::hbitmap_iter_init(iter.as_mut_ptr(), hb, first);
                    let mut iter = iter.assume_init();
                    // Padding bits set by deserialize_ones are iterated too, as in the original.
                    let want: Vec<i64> = ((first >> g)..model.len() as u64)
                        .filter(|&grp| model[grp as usize])
                        .map(|grp| (grp << g) as i64)
                        .collect();
                    let mut got = Vec::new();
                    loop {
                        let peek = ffi::hbitmap_iter_next(&mut iter, false);
                        let next = ffi::hbitmap_iter_next(&mut iter, true);
                        assert_eq!(peek, next, "iter peek vs advance");
                        if next < 0 {
                            break;
                        }
                        got.push(next);
                        assert!(got.len() <= want.len(), "iterator runs past the model");
                    }
                    assert_eq!(got, want, "iteration from {first}");
                }
                7 => {
                    let new_size = 1 + input.upto(max_ops_size(g) - 1);
                    let new_groups = groups_of(new_size) as usize;
                    if !strict && new_groups > groups && model[groups..].contains(&true) {
                        continue;
                    }
                    ffi::hbitmap_truncate(hb, new_size);
                    if new_groups < groups {
                        // Shrinking resets the groups that go away (not the padding past them).
                        model[new_groups..groups].fill(false);
                    }
                    size = new_size;
                    groups = new_groups;
                    model.resize(padded(size), false);
                }
                8 => {
                    // Merge with a second bitmap: result = hb | other.
                    let other = ffi::hbitmap_alloc(size, g as i32);
                    let start = input.upto(size - 1);
                    let count = input.upto(size - start);
                    ffi::hbitmap_set(other, start, count);
                    assert!(ffi::hbitmap_can_merge(hb, other));
                    assert!(ffi::hbitmap_merge(hb, other, hb));
                    if count > 0 {
                        for grp in (start >> g)..=((start + count - 1) >> g) {
                            model[grp as usize] = true;
                        }
                    }
                    ffi::hbitmap_free(other);
                }
                9 if ffi::hbitmap_is_serializable(hb) => {
                    // Serialize everything, deserialize into a fresh bitmap, compare.
                    let bytes = ffi::hbitmap_serialization_size(hb, 0, size) as usize;
                    let mut buf = vec![0u8; bytes];
                    ffi::hbitmap_serialize_part(hb, buf.as_mut_ptr(), 0, size);
                    let copy = ffi::hbitmap_alloc(size, g as i32);
                    ffi::hbitmap_deserialize_part(copy, buf.as_mut_ptr(), 0, size, true);
                    assert_eq!(
                        ffi::hbitmap_count(copy),
                        ffi::hbitmap_count(hb),
                        "roundtrip"
                    );
                    for (grp, &dirty) in model.iter().enumerate().take(groups) {
                        let bit = buf[grp / 8] >> (grp % 8) & 1 != 0;
                        assert_eq!(bit, dirty, "serialized bit {grp}");
                    }
                    ffi::hbitmap_free(copy);
                }
                10 if ffi::hbitmap_is_serializable(hb) => {
                    // deserialize_ones / zeroes on one aligned chunk.
                    let align = ffi::hbitmap_serialization_align(hb);
                    let chunks = size.div_ceil(align);
                    let chunk = input.upto(chunks - 1);
                    let start = chunk * align;
                    let count = (size - start).min(align);
                    let ones = input.u8() & 1 != 0;
                    if ones {
                        ffi::hbitmap_deserialize_ones(hb, start, count, true);
                    } else {
                        ffi::hbitmap_deserialize_zeroes(hb, start, count, true);
                    }
                    let first = (start >> g) as usize;
                    model[first..first + 64].fill(ones);
                }
                _ => {}
            }
            // Invariants after every step.
            let dirty = model[..groups].iter().filter(|&&d| d).count() as u64;
            assert_eq!(
                ffi::hbitmap_count(hb),
                ((u128::from(dirty)) << g) as u64,
                "count after op {op}"
            );
            assert_eq!(ffi::hbitmap_empty(hb), dirty == 0, "empty after op {op}");
        }
    }
    // SAFETY: allocated above, no meta bitmap.
    unsafe { ffi::hbitmap_free(hb) };
}

/// Sizes for `hbitmap_ops`: at most 2^16 groups, and at most 2^62 items (so that item numbers
/// stay positive as `i64` and the group rounding cannot wrap).
fn max_ops_size(g: u32) -> u64 {
    1u64 << (16 + g).min(62)
}

// ---------------------------------------------------------------------------------------------
// Target 4: deserialize_part

/// Deserializes arbitrary bytes into a bitmap in aligned chunks, then checks the count, the
/// bits and that serializing gives the same bytes back.
pub fn deserialize_part(data: &[u8]) {
    let mut input = Bytes::new(data);
    let g = u32::from(input.u8() % 24);
    // At most 2^15 groups.
    let size = 1 + input.upto((1u64 << (15 + g)) - 1);
    let chunk_words = 1 + u64::from(input.u8() % 4);
    let finish_each = input.u8() & 1 != 0;
    let mut bitmap = HBitmap::new(size, g).expect("new");
    let groups = size.div_ceil(1 << g);
    let words = groups.div_ceil(64) as usize;
    let mut bytes = input.rest().to_vec();
    bytes.resize(words * 8, 0);
    let align = bitmap.serialization_align();
    assert_eq!(align, 64 << g);
    let mut start = 0u64;
    while start < size {
        let count = (chunk_words * align).min(size - start);
        let first_word = (start / align) as usize;
        let n = count.div_ceil(align) as usize;
        assert_eq!(bitmap.serialization_size(start, count), n as u64 * 8);
        bitmap.deserialize_part(
            &bytes[first_word * 8..(first_word + n) * 8],
            start,
            count,
            finish_each,
        );
        start += count;
    }
    bitmap.deserialize_finish();
    let bit = |grp: u64| bytes[(grp / 8) as usize] >> (grp % 8) & 1 != 0;
    let popcount = (0..groups).filter(|&grp| bit(grp)).count() as u64;
    assert_eq!(bitmap.dirty_groups(), popcount, "dirty groups vs popcount");
    assert_eq!(bitmap.count(), popcount << g, "count");
    assert_eq!(bitmap.is_empty(), popcount == 0);
    // Iteration and get agree with the bytes.
    let iterated: Vec<u64> = bitmap.iter().collect();
    // Padding bits past the last group are iterated too, as in the original (they are copied
    // verbatim and only excluded from the count).
    let want: Vec<u64> = (0..words as u64 * 64)
        .filter(|&grp| bit(grp))
        .map(|grp| grp << g)
        .collect();
    assert_eq!(iterated, want, "iteration after deserialize");
    for grp in (0..groups).step_by(((groups / 64) as usize).max(1)) {
        assert_eq!(bitmap.get(grp << g), bit(grp), "get group {grp}");
    }
    // Serialize back, whole and in chunks: the same bytes, padding bits included.
    let mut out = vec![0u8; words * 8];
    bitmap.serialize_part(&mut out, 0, size);
    assert_eq!(out, bytes, "serialize_part(0, size) differs");
    let mut start = 0u64;
    while start < size {
        let count = align.min(size - start);
        let word = (start / align) as usize;
        let mut one = [0u8; 8];
        bitmap.serialize_part(&mut one, start, count);
        assert_eq!(&one[..], &bytes[word * 8..word * 8 + 8], "chunk at {start}");
        start += count;
    }
}
