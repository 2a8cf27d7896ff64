//! Bitmap tables and bitmap data clusters.
//!
//! A bitmap table entry is 0 (the cluster reads as all zeros), 1 (all ones) or the offset of a
//! data cluster (bits 9-55; bits 1-8 and 56-63 reserved, bit 0 then zero). A data cluster holds
//! `cluster_size * 8` bits of the bitmap's last level in QEMU's serialization (little-endian
//! 64-bit words, bit `k` in byte `k / 8`, bit `k % 8`), covering `cluster_size * 8 <<
//! granularity` bytes of the virtual disk. Bits past the end of the bitmap in the last cluster
//! must be zero.
#![forbid(unsafe_code)]

use crate::HBitmap;

use super::error::{corrupt, Error};
use super::header::read_exact;
use super::io::ImageIo;

pub(crate) const ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
pub(crate) const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const ENTRY_ALL_ONES: u64 = 1;

/// Bytes of the virtual disk described by one data cluster.
pub(crate) fn coverage(cluster_size: u64, granularity_bits: u32) -> u64 {
    (cluster_size * 8) << granularity_bits
}

/// Groups (bits) of a bitmap over `len` bytes.
pub(crate) fn groups(len: u64, granularity_bits: u32) -> u64 {
    len.div_ceil(1u64 << granularity_bits)
}

/// Bytes of serialized data (whole 64-bit words) of a bitmap over `len` bytes.
pub(crate) fn data_bytes(len: u64, granularity_bits: u32) -> u64 {
    groups(len, granularity_bits).div_ceil(64) * 8
}

/// Table entries a bitmap over `len` bytes needs (QEMU's `size_to_clusters` of its
/// serialization size).
pub(crate) fn table_size_for(len: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    data_bytes(len, granularity_bits).div_ceil(cluster_size)
}

/// Why a table entry is invalid, if it is.
pub(crate) fn entry_problem(entry: u64, cluster_size: u64) -> Option<&'static str> {
    if entry & ENTRY_RESERVED != 0 {
        return Some("reserved bits (1-8, 56-63) are set");
    }
    let offset = entry & ENTRY_OFFSET_MASK;
    if offset != 0 {
        if entry & ENTRY_ALL_ONES != 0 {
            return Some("bit 0 (all ones) is set together with a data cluster offset");
        }
        if offset % cluster_size != 0 {
            return Some("the data cluster offset is not cluster-aligned");
        }
    }
    None
}

/// Decodes a big-endian table.
pub(crate) fn decode(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Encodes a table, zero-padded to whole clusters.
pub(crate) fn encode(table: &[u64], cluster_size: u64) -> Vec<u8> {
    let bytes = (table.len() as u64 * 8).div_ceil(cluster_size) * cluster_size;
    let mut out = vec![0u8; bytes as usize];
    for (chunk, entry) in out.chunks_exact_mut(8).zip(table) {
        chunk.copy_from_slice(&entry.to_be_bytes());
    }
    out
}

/// Groups described by data cluster `index` of a bitmap over `len` bytes.
fn groups_in_cluster(len: u64, granularity_bits: u32, cluster_size: u64, index: u64) -> u64 {
    let per_cluster = cluster_size * 8;
    let total = groups(len, granularity_bits);
    total.saturating_sub(index * per_cluster).min(per_cluster)
}

/// The first set padding bit of data cluster `index`, if any: bits past the bitmap's end.
pub(crate) fn padding_bit(
    data: &[u8],
    len: u64,
    granularity_bits: u32,
    cluster_size: u64,
    index: u64,
) -> Option<u64> {
    let used = groups_in_cluster(len, granularity_bits, cluster_size, index);
    let first_byte = (used / 8) as usize;
    if used % 8 != 0 {
        let mask = !((1u8 << (used % 8)) - 1);
        if data[first_byte] & mask != 0 {
            let bit = (data[first_byte] & mask).trailing_zeros() as u64;
            return Some(first_byte as u64 * 8 + bit);
        }
        return data[first_byte + 1..]
            .iter()
            .position(|&b| b != 0)
            .map(|p| {
                (first_byte + 1 + p) as u64 * 8 + data[first_byte + 1 + p].trailing_zeros() as u64
            });
    }
    data[first_byte..]
        .iter()
        .position(|&b| b != 0)
        .map(|p| (first_byte + p) as u64 * 8 + data[first_byte + p].trailing_zeros() as u64)
}

/// Clears the padding bits of a serialized data cluster.
fn clear_padding(data: &mut [u8], len: u64, granularity_bits: u32, cluster_size: u64, index: u64) {
    let used = groups_in_cluster(len, granularity_bits, cluster_size, index);
    let mut first_byte = (used / 8) as usize;
    if used % 8 != 0 {
        data[first_byte] &= (1u8 << (used % 8)) - 1;
        first_byte += 1;
    }
    data[first_byte..].fill(0);
}

/// Reads a bitmap's data into a new byte-addressed `HBitmap` over `len` bytes.
/// `check_padding` refuses a last data cluster with bits set past the bitmap's end.
pub(crate) fn load(
    io: &dyn ImageIo,
    table: &[u64],
    len: u64,
    granularity_bits: u32,
    cluster_size: u64,
    name: &str,
    check_padding: bool,
) -> Result<HBitmap, Error> {
    let mut bitmap = HBitmap::new(len, granularity_bits)
        .map_err(|e| Error::Limit(format!("bitmap '{name}' cannot be held in memory: {e}")))?;
    let per_cluster = coverage(cluster_size, granularity_bits);
    let mut ones: Option<Vec<u8>> = None;
    for (index, &entry) in table.iter().enumerate() {
        let index = index as u64;
        let start = index * per_cluster;
        if start >= len {
            break;
        }
        let count = (len - start).min(per_cluster);
        let offset = entry & ENTRY_OFFSET_MASK;
        let is_last = start + count == len;
        if offset != 0 {
            let mut data = read_exact(io, offset, cluster_size, &format!("bitmap '{name}' data"))?;
            if let Some(bit) = padding_bit(&data, len, granularity_bits, cluster_size, index) {
                if check_padding {
                    return Err(corrupt(format!(
                        "bitmap '{name}': data cluster at {offset:#x} (table entry {index}) has \
                         padding bit {bit} set past the end of the bitmap (padding must be zero)"
                    )));
                }
                clear_padding(&mut data, len, granularity_bits, cluster_size, index);
            }
            bitmap.deserialize_part(&data, start, count, false);
        } else if entry & ENTRY_ALL_ONES != 0 {
            if is_last {
                // Whole words would also set the padding bits: give exact ones instead.
                let buf = ones.get_or_insert_with(|| vec![0xff; cluster_size as usize]);
                let mut data = buf.clone();
                clear_padding(&mut data, len, granularity_bits, cluster_size, index);
                bitmap.deserialize_part(&data, start, count, false);
            } else {
                bitmap.deserialize_ones(start, count, false);
            }
        }
    }
    bitmap.deserialize_finish();
    Ok(bitmap)
}

/// Serializes data cluster `index` of `bitmap` into `buf` (a cluster), padding cleared.
/// Returns whether any bit is set.
pub(crate) fn serialize_cluster(
    bitmap: &HBitmap,
    index: u64,
    cluster_size: u64,
    buf: &mut [u8],
) -> bool {
    let len = bitmap.size();
    let granularity_bits = bitmap.granularity();
    let per_cluster = coverage(cluster_size, granularity_bits);
    let start = index * per_cluster;
    let count = (len - start).min(per_cluster);
    buf.fill(0);
    let bytes = bitmap.serialization_size(start, count) as usize;
    bitmap.serialize_part(&mut buf[..bytes], start, count);
    clear_padding(buf, len, granularity_bits, cluster_size, index);
    buf.iter().any(|&b| b != 0)
}

/// Indices of the data clusters of `bitmap` that hold a dirty bit, in order.
pub(crate) fn dirty_clusters(bitmap: &HBitmap, cluster_size: u64) -> Vec<u64> {
    let len = bitmap.size();
    let per_cluster = coverage(cluster_size, bitmap.granularity());
    let mut out = Vec::new();
    let mut from = 0u64;
    while from < len {
        let Some(item) = bitmap.iter_from(from).next() else {
            break;
        };
        if item >= len {
            break;
        }
        let index = item / per_cluster;
        out.push(index);
        from = match (index + 1).checked_mul(per_cluster) {
            Some(next) => next,
            None => break,
        };
    }
    out
}
