// SPDX-License-Identifier: GPL-2.0-or-later

//! Bitmap tables and bitmap data clusters.
//!
//! A bitmap table entry is 0 (the cluster reads as all zeros), 1 (all ones) or the offset of a
//! data cluster (bits 9-55; bits 1-8 and 56-63 reserved, bit 0 then zero). A data cluster holds
//! `cluster_size * 8` bits of the bitmap's last level in QEMU's serialization (little-endian
//! 64-bit words, bit `k` in byte `k / 8`, bit `k % 8`), covering `cluster_size * 8 <<
//! granularity` bytes of the virtual disk. Bits past the end of the bitmap in the last cluster
//! must be zero.
#![forbid(unsafe_code)]

use crate::bitmap::{bulk_write, padding_mask};
use crate::HBitmap;
use byteorder::{BigEndian, ByteOrder, LittleEndian};

use super::error::Error;
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
    raw.chunks_exact(8).map(BigEndian::read_u64).collect()
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

/// The padding of data cluster `index` of a bitmap over `len` bytes, as the little-endian word
/// at which it starts and that word's padding bits; every later word is padding too. `None`
/// when the cluster has no padding. The rule is the bitmap's own ([`padding_mask`]), counted
/// from the cluster's first group.
fn cluster_padding(
    len: u64,
    granularity_bits: u32,
    cluster_size: u64,
    index: u64,
) -> Option<(usize, u64)> {
    let used = groups_in_cluster(len, granularity_bits, cluster_size, index);
    if used == cluster_size * 8 {
        return None;
    }
    // A cluster whose groups end on a word boundary has padding from the next word on.
    let mask = match padding_mask(used) {
        0 => u64::MAX,
        mask => mask,
    };
    Some(((used / 64) as usize, mask))
}

/// The first set padding bit of data cluster `index`, if any: bits past the bitmap's end.
pub(crate) fn padding_bit(
    data: &[u8],
    len: u64,
    granularity_bits: u32,
    cluster_size: u64,
    index: u64,
) -> Option<u64> {
    let (first_word, mask) = cluster_padding(len, granularity_bits, cluster_size, index)?;
    data.chunks_exact(8)
        .enumerate()
        .skip(first_word)
        .find_map(|(at, bytes)| {
            let word = LittleEndian::read_u64(bytes);
            let padding = if at == first_word { word & mask } else { word };
            (padding != 0).then(|| at as u64 * 64 + u64::from(padding.trailing_zeros()))
        })
}

/// Clears the padding bits of a serialized data cluster.
fn clear_padding(data: &mut [u8], len: u64, granularity_bits: u32, cluster_size: u64, index: u64) {
    if let Some((first_word, mask)) = cluster_padding(len, granularity_bits, cluster_size, index) {
        let bytes = &mut data[first_word * 8..];
        let word = LittleEndian::read_u64(bytes) & !mask;
        LittleEndian::write_u64(bytes, word);
        bytes[8..].fill(0);
    }
}

/// Reads a bitmap's data into a new byte-addressed `HBitmap` over `len` bytes.
/// Padding bits set past the bitmap's end in the last data cluster are ignored, as QEMU
/// ignores them (and writes them: it loads an all-ones entry with whole words of ones).
///
/// Data clusters are read straight into the bitmap's last level, runs of clusters that lie one
/// after the other in the file (for consecutive table entries) with one read each.
pub(crate) fn load(
    io: &dyn ImageIo,
    table: &[u64],
    len: u64,
    granularity_bits: u32,
    cluster_size: u64,
    name: &str,
) -> Result<HBitmap, Error> {
    let mut bitmap = HBitmap::new(len, granularity_bits)
        .map_err(|e| Error::Limit(format!("bitmap '{name}' cannot be held in memory: {e}")))?;
    let per_cluster = coverage(cluster_size, granularity_bits);
    // The bitmap's own rules hold the loaded words: padding bits are dropped and only the runs
    // filled are summarized when `fill` goes out of scope.
    let mut fill = bitmap.filling();
    let total_words = fill.word_count();
    let cluster_words = (cluster_size / 8) as usize;
    // The cluster holding the last word: shorter than a cluster's worth of words.
    let last = (total_words - 1) / cluster_words;
    let limit = table
        .len()
        .min(usize::try_from(len.div_ceil(per_cluster)).unwrap_or(usize::MAX));
    let mut index = 0;
    while index < limit {
        let entry = table[index];
        let offset = entry & ENTRY_OFFSET_MASK;
        let first_word = index * cluster_words;
        if offset != 0 {
            if index == last {
                let data = read_exact(io, offset, cluster_size, &format!("bitmap '{name}' data"))?;
                fill.copy_le(first_word, &data);
                index += 1;
                continue;
            }
            // A run of full clusters, contiguous in the file, before the last one.
            let mut end = index + 1;
            while end < limit
                && end != last
                && table[end] & ENTRY_OFFSET_MASK == offset + (end - index) as u64 * cluster_size
            {
                end += 1;
            }
            fill.read_le(first_word..end * cluster_words, |bytes| {
                io.pread(offset, bytes).map_err(|e| {
                    Error::io(
                        format!("reading bitmap '{name}' data at offset {offset:#x}"),
                        e,
                    )
                })
            })?;
            index = end;
        } else {
            if entry & ENTRY_ALL_ONES != 0 {
                fill.ones(first_word..(first_word + cluster_words).min(total_words));
            }
            index += 1;
        }
    }
    drop(fill);
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

/// Whether data cluster `index` of `bitmap` holds a dirty bit (padding bits past the bitmap's
/// end do not count).
fn cluster_is_dirty(bitmap: &HBitmap, index: u64, cluster_size: u64) -> bool {
    let words = bitmap.words();
    let cluster_words = (cluster_size / 8) as usize;
    let first = index as usize * cluster_words;
    let end = (first + cluster_words).min(words.len());
    if first >= end {
        return false;
    }
    let (body, tail) = if end == words.len() {
        let padding = padding_mask(bitmap.groups());
        (&words[first..end - 1], words[end - 1] & !padding)
    } else {
        (&words[first..end], 0)
    };
    tail != 0
        || body
            .chunks(64)
            .any(|chunk| chunk.iter().fold(0, |acc, &word| acc | word) != 0)
}

/// Indices of the data clusters of `bitmap` that hold a dirty bit, in order: those to store.
pub(crate) fn used_clusters(bitmap: &HBitmap, cluster_size: u64) -> Vec<u64> {
    dirty_clusters(bitmap, cluster_size)
        .into_iter()
        .filter(|&index| cluster_is_dirty(bitmap, index, cluster_size))
        .collect()
}

/// Writes data clusters `used` (indices, ascending) of `bitmap` at the offsets `placed` (one
/// per index) through `write(offset, bytes)`: clusters consecutive both in the bitmap and in
/// the file with one write each, straight from the bitmap's memory on little-endian hosts.
pub(crate) fn write_data(
    bitmap: &HBitmap,
    used: &[u64],
    placed: &[u64],
    cluster_size: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    /// Bytes serialized at a time when the memory is not the encoding (big-endian hosts).
    const CHUNK: usize = 1 << 20;
    let words = bitmap.words();
    let cluster_words = (cluster_size / 8) as usize;
    let last = ((words.len() - 1) / cluster_words) as u64;
    let mut buf = Vec::new();
    let mut j = 0;
    while j < used.len() {
        let (index, offset) = (used[j], placed[j]);
        if index == last {
            buf.resize(cluster_size as usize, 0);
            serialize_cluster(bitmap, index, cluster_size, &mut buf);
            write(offset, &buf)?;
            j += 1;
            continue;
        }
        let mut end = j + 1;
        while end < used.len()
            && used[end] != last
            && used[end] == index + (end - j) as u64
            && placed[end] == offset + (end - j) as u64 * cluster_size
        {
            end += 1;
        }
        let run = &words[index as usize * cluster_words
            ..used[end - 1] as usize * cluster_words + cluster_words];
        if cfg!(target_endian = "little") {
            write(offset, bytemuck::cast_slice(run))?;
        } else {
            let mut at = offset;
            let first = index as usize * cluster_words;
            let mut from = first;
            while from < first + run.len() {
                let to = (from + CHUNK / 8).min(first + run.len());
                buf.resize((to - from) * 8, 0);
                bitmap.read_words_le(from..to, bulk_write::as_uninit(&mut buf));
                write(at, &buf)?;
                at += buf.len() as u64;
                from = to;
            }
        }
        j = end;
    }
    Ok(())
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
