// SPDX-License-Identifier: GPL-2.0-or-later

//! Creating a new, empty qcow2 image, laid out as `qemu-img create -f qcow2` lays it out.
#![forbid(unsafe_code)]

use std::path::Path;

use super::error::Error;
use super::header::{put32, put64, EXT_FEATURE_TABLE, QCOW_MAGIC};
use super::io::{self, FileIo, ImageIo};
use super::lock::ImageLock;
use super::refcount::set_entry;
use super::Image;

const HEADER_LENGTH: u32 = 112;
const REFCOUNT_ORDER: u32 = 4;

/// QEMU's feature name table (written for clusters above 4 KiB, as QEMU does).
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Builds the bytes of a new image: header cluster, refcount table, refcount blocks and an
/// empty L1 table, every cluster counted once.
pub(crate) fn build(virtual_size: u64, cluster_size: u64) -> Result<Vec<u8>, Error> {
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cluster_size} must be a power of two from 512 bytes to 2 MiB"
        )));
    }
    if virtual_size % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "virtual size {virtual_size} must be a multiple of 512 bytes"
        )));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let l2_coverage = cluster_size * (cluster_size / 8);
    let l1_entries = virtual_size.div_ceil(l2_coverage);
    if l1_entries * 8 > 32 << 20 || virtual_size > i64::MAX as u64 {
        return Err(Error::InvalidArgument(format!(
            "virtual size {virtual_size} is too large for {cluster_size}-byte clusters (the L1 \
             table would exceed QEMU's 32 MiB limit); use larger clusters"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
    let per_block = (cluster_size * 8) >> REFCOUNT_ORDER;
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size).max(1);
        if need_blocks == blocks && need_table == table {
            break;
        }
        blocks = need_blocks;
        table = need_table;
    }
    if table * cluster_size > 8 << 20 {
        return Err(Error::InvalidArgument(
            "the refcount table would exceed QEMU's 8 MiB limit".into(),
        ));
    }
    let total = 1 + table + blocks + l1_clusters;
    let mut image = vec![0u8; (total * cluster_size) as usize];
    let table_offset = cluster_size;
    let blocks_offset = table_offset + table * cluster_size;
    let l1_offset = if l1_entries > 0 {
        blocks_offset + blocks * cluster_size
    } else {
        0
    };

    // Header.
    put32(&mut image, 0, QCOW_MAGIC);
    put32(&mut image, 4, 3);
    put32(&mut image, 20, cluster_bits);
    put64(&mut image, 24, virtual_size);
    put32(&mut image, 36, l1_entries as u32);
    put64(&mut image, 40, l1_offset);
    put64(&mut image, 48, table_offset);
    put32(&mut image, 56, table as u32);
    put32(&mut image, 96, REFCOUNT_ORDER);
    put32(&mut image, 100, HEADER_LENGTH);
    let mut pos = HEADER_LENGTH as usize;
    if cluster_size > 4096 {
        put32(&mut image, pos, EXT_FEATURE_TABLE);
        put32(&mut image, pos + 4, (FEATURES.len() * 48) as u32);
        pos += 8;
        for (kind, bit, name) in FEATURES {
            image[pos] = kind;
            image[pos + 1] = bit;
            image[pos + 2..pos + 2 + name.len()].copy_from_slice(name.as_bytes());
            pos += 48;
        }
    }
    // End of extensions: already zero.

    // Refcount table and blocks.
    for block in 0..blocks {
        put64(
            &mut image,
            (table_offset + 8 * block) as usize,
            blocks_offset + block * cluster_size,
        );
    }
    for cluster in 0..total {
        let block = cluster / per_block;
        let start = (blocks_offset + block * cluster_size) as usize;
        let data = &mut image[start..start + cluster_size as usize];
        set_entry(data, (cluster % per_block) as usize, REFCOUNT_ORDER, 1);
    }
    Ok(image)
}

/// Creates (or overwrites) `path` as an empty image and opens it for writing.
pub(crate) fn create(path: &Path, virtual_size: u64, cluster_size: u64) -> Result<Image, Error> {
    let bytes = build(virtual_size, cluster_size)?;
    let file = io::open_file(path, io::Access::Create)?;
    let lock = ImageLock::acquire(path, true)?;
    let mut io = FileIo::new(file);
    let context = format!("writing the new image {}", path.display());
    io.set_len(0).map_err(|e| Error::io(&context, e))?;
    io.pwrite(0, &bytes).map_err(|e| Error::io(&context, e))?;
    io.flush().map_err(|e| Error::io(&context, e))?;
    Image::from_parts(path.to_path_buf(), Box::new(io), Some(lock), true)
}
