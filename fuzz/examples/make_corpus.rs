// SPDX-License-Identifier: GPL-2.0-or-later

//! Writes seed images for `qcow2_open` and `qcow2_mutate`: every cluster size from 512 B to
//! 2 MiB, with a few bitmaps, small virtual sizes so the files stay small.
//!
//! `cargo run --example make_corpus -- [OUT_DIR]` (default: `corpus`, relative to `fuzz/`).
use hbitmap_fuzz::harness::{build_image, trim_for_corpus};

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let open_dir = std::path::Path::new(&out).join("qcow2_open");
    let mutate_dir = std::path::Path::new(&out).join("qcow2_mutate");
    std::fs::create_dir_all(&open_dir).unwrap();
    std::fs::create_dir_all(&mutate_dir).unwrap();
    for cluster_bits in 9..=21u32 {
        let cluster = 1u64 << cluster_bits;
        // A tiny disk for large clusters; a few MiB for small ones (several table entries).
        let sizes: &[u64] = if cluster_bits <= 12 {
            &[1 << 20, 4 << 20]
        } else {
            &[64 << 10, 1 << 20]
        };
        for (k, &size) in sizes.iter().enumerate() {
            let bitmaps: &[(&str, u32, u8)] = match k {
                0 => &[("a", 9, 2), ("full", 12, 1), ("empty", 16, 0)],
                _ => &[("bitmap0", 9, 3), ("b1", 10, 5)],
            };
            let bytes = trim_for_corpus(&build_image(size, cluster, bitmaps));
            let name = format!("c{cluster_bits}-s{size}-{k}.qcow2");
            std::fs::write(open_dir.join(&name), &bytes).unwrap();
            println!("{name}: {} bytes", bytes.len());
        }
        // An image without bitmaps.
        let bytes = trim_for_corpus(&build_image(64 << 10, cluster, &[]));
        std::fs::write(open_dir.join(format!("c{cluster_bits}-plain.qcow2")), &bytes).unwrap();
    }
    // qcow2_mutate takes mutation scripts, not images: a few seeds selecting each base image.
    for base in 0..3u8 {
        for (i, script) in [
            vec![base],
            vec![base, 0, 0x10, 0x00, 2],
            vec![base, 3, 0x30, 0x01, 9, 0xff, 0x00, 6, 20, 0x00, 0x02, 4],
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(mutate_dir.join(format!("seed-{base}-{i}")), script).unwrap();
        }
    }
}
