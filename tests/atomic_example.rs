// SPDX-License-Identifier: GPL-2.0-or-later

//! `examples/vmm_dirty_log.rs` end to end: writer threads marking an `AtomicHBitmap`, harvests
//! while they write, the result stored in a qcow2 image; then QEMU's own export of the bitmap
//! (`qemu-nbd -B` read by `nbdinfo --json --map=qemu:dirty-bitmap:NAME`) must give exactly the
//! extents written, rounded out to the 64 KiB granularity.
mod qcow2_util;

#[allow(dead_code)]
#[path = "../examples/vmm_dirty_log.rs"]
mod example;

use std::process::{Command, Stdio};

use qcow2_util::{have_all, qemu_check, Scratch};

/// The writes as byte extents `(offset, length)`, rounded out to pages and merged.
fn expected_extents(writes: &[(u64, u64)], disk_size: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(offset, length)| {
            let start = offset / example::PAGE * example::PAGE;
            let end = (offset + length).div_ceil(example::PAGE) * example::PAGE;
            (start, end.min(disk_size))
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// The dirty extents of bitmap `name` as QEMU exports them, from nbdinfo's JSON map.
fn qemu_json_extents(scratch: &Scratch, image: &std::path::Path, name: &str) -> Vec<(u64, u64)> {
    let socket = scratch.path("nbd.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", name, "-k"])
        .arg(&socket)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting qemu-nbd");
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let output = Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", socket.display()))
        .output()
        .expect("running nbdinfo");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        output.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nbdinfo's JSON");
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for extent in map.as_array().expect("a JSON array of extents") {
        let field = |key: &str| {
            extent[key]
                .as_u64()
                .unwrap_or_else(|| panic!("{key} in {extent}"))
        };
        let (offset, length, kind) = (field("offset"), field("length"), field("type"));
        if kind & 1 == 0 || length == 0 {
            continue;
        }
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += length,
            _ => extents.push((offset, length)),
        }
    }
    extents
}

#[test]
fn qemu_exports_what_the_threads_marked() {
    if !have_all(
        "qemu_exports_what_the_threads_marked",
        &["qemu-img", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let scratch = Scratch::new("atomic-example");
    let image = scratch.path("disk.qcow2");
    // 4 GiB + 1 sector: the last page is partial.
    let disk_size = (4 << 30) + 512;
    let outcome = example::run(&image, disk_size, "vmm-dirty", 3, 3000).unwrap();
    assert_eq!(outcome.writes.len(), 9000);
    let expected = expected_extents(&outcome.writes, disk_size);
    assert!(expected.len() > 100, "{} extents", expected.len());
    assert_eq!(qemu_json_extents(&scratch, &image, "vmm-dirty"), expected);
    qemu_check(&image, false);
    println!(
        "{} writes in {} extents, {} harvests while writing",
        outcome.writes.len(),
        expected.len(),
        outcome.passes
    );
}
