// SPDX-License-Identifier: GPL-2.0-or-later

//! Memory footprint of huge, sparse bitmaps, read from the process's anonymous RSS: creating one
//! costs nothing until bits are set, and moving one through (de)serialization or `reset_all`
//! costs memory for its dirty part only. One test, so nothing else allocates meanwhile.

#![cfg(target_os = "linux")]

use hbitmap::HBitmap;

const MIB: u64 = 1 << 20;

/// Anonymous resident memory of this process, in bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("RssAnon in kB");
    kib * 1024
}

/// Runs `step` and returns it result and how much anonymous RSS grew meanwhile.
fn growth<T>(step: impl FnOnce() -> T) -> (T, u64) {
    let before = rss_anon();
    let result = step();
    (result, rss_anon().saturating_sub(before))
}

#[test]
fn sparse_bitmaps_cost_memory_for_their_dirty_part_only() {
    // 2^34 items at granularity 0: 2 GiB of last level.
    let items = 1u64 << 34;
    let (mut bitmap, grew) = growth(|| HBitmap::new(items, 0).unwrap());
    assert!(grew < MIB, "creating: {grew} bytes");

    // One dirty 64 KiB stretch of last level in every 16 MiB: 1/256 of it.
    let stride = 16 * MIB * 8;
    let ((), grew) = growth(|| {
        for start in (0..items).step_by(stride as usize) {
            bitmap.set(start, 64 * 1024 * 8);
        }
    });
    let dirty = items / 8 / 256;
    assert!(grew < dirty + 16 * MIB, "setting {dirty} bytes: {grew}");

    // 256 MiB of it serialized (the buffer takes what it takes), then deserialized into a fresh
    // bitmap.
    let chunk = 1u64 << 31;
    let len = bitmap.serialization_size(0, chunk) as usize;
    let mut buf = vec![0u8; len];
    bitmap.serialize_part(&mut buf, 0, chunk);
    let (copy, grew) = growth(|| {
        let mut copy = HBitmap::new(items, 0).unwrap();
        copy.deserialize_part(&buf, 0, chunk, true);
        copy
    });
    assert!(grew < 32 * MIB, "deserializing {len} bytes: {grew}");
    assert_eq!(copy.count(), bitmap.count() / 8);
    let (copy, grew) = growth(|| {
        let mut copy = HBitmap::new(items, 0).unwrap();
        copy.deserialize_zeroes(0, items, true);
        copy
    });
    assert!(grew < MIB, "deserializing zeroes: {grew}");
    assert_eq!(copy.count(), 0);

    // Clearing touches only the dirty pages.
    let ((), grew) = growth(|| bitmap.reset_all());
    assert!(grew < MIB, "reset_all: {grew}");
    assert_eq!(bitmap.count(), 0);
}
