// SPDX-License-Identifier: GPL-2.0-or-later

//! The bitmap directory: one variable-length entry per bitmap.
//!
//! ```text
//!  0 -  7  bitmap_table_offset     12 - 15  flags (bit 0 in_use, bit 1 auto)
//!  8 - 11  bitmap_table_size       16       type (1: dirty tracking)
//! 17       granularity_bits        18 - 19  name_size
//! 20 - 23  extra_data_size         then extra data, the name, zero padding to 8 bytes
//! ```
#![forbid(unsafe_code)]

use super::header::{be16, be32, be64, put32, put64};

/// Flag bit 0: the bitmap was not saved correctly and may be inconsistent.
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks every write (enabled).
pub(crate) const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU refuses (bit 2, extra_data_compatible, included: QEMU supports no extra data).
pub(crate) const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub(crate) const TYPE_DIRTY_TRACKING: u8 = 1;
/// Entry header size.
pub(crate) const ENTRY_HEADER: usize = 24;
/// QEMU's limits.
pub(crate) const MAX_NAME_SIZE: usize = 1023;
pub(crate) const MIN_GRANULARITY_BITS: u32 = 9;
pub(crate) const MAX_GRANULARITY_BITS: u32 = 31;
pub(crate) const MAX_TABLE_SIZE: u64 = 0x800_0000;
pub(crate) const MAX_PHYS_SIZE: u64 = 0x2000_0000;
pub(crate) const MAX_BITMAPS: u64 = 65535;
pub(crate) const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS;

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub bitmap_type: u8,
    pub granularity_bits: u8,
    /// The name's bytes as stored.
    pub name: Vec<u8>,
    /// Offset of the entry inside the directory.
    pub dir_pos: u64,
}

impl DirEntry {
    /// The name for messages: escaped (see [`BitmapName::escaped`](super::BitmapName::escaped)).
    pub(crate) fn display_name(&self) -> String {
        super::name::escape(&self.name)
    }

    pub(crate) fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
}

/// Size of an entry with a name of `name_size` bytes and no extra data.
pub(crate) fn entry_size(name_size: usize) -> u64 {
    ((ENTRY_HEADER + name_size + 7) & !7) as u64
}

/// Splits a directory into entries, checking only its framing (QEMU's `bitmap_list_load`):
/// every entry fits, their number matches `nb_bitmaps`, they end exactly at the directory's
/// end, extra data is absent (QEMU supports none) and the padding is zero. Errors name the entry
/// and its directory offset.
pub(crate) fn parse(dir: &[u8], nb_bitmaps: u32, dir_offset: u64) -> Result<Vec<DirEntry>, String> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let at = dir_offset + pos as u64;
        if dir.len() - pos < ENTRY_HEADER {
            return Err(format!(
                "bitmap directory: entry {} at {at:#x} is truncated ({} bytes left of the \
                 directory, an entry needs at least 24)",
                entries.len(),
                dir.len() - pos
            ));
        }
        if entries.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(format!(
                "bitmap directory: more entries than the {nb_bitmaps} nb_bitmaps of the bitmaps \
                 extension (entry {} at {at:#x})",
                entries.len()
            ));
        }
        let e = &dir[pos..];
        let name_size = usize::from(be16(e, 18));
        let extra_size = be32(e, 20);
        let table_offset = be64(e, 0);
        let name_guess = || {
            let end = (ENTRY_HEADER + extra_size as usize + name_size).min(e.len());
            let start = (ENTRY_HEADER + extra_size as usize).min(end);
            super::name::escape(&e[start..end])
        };
        if extra_size != 0 {
            return Err(format!(
                "bitmap directory entry {} at {at:#x}: extra_data_size is {extra_size}; bitmap \
                 extra data is not supported (QEMU refuses it too)",
                entries.len()
            ));
        }
        let size = entry_size(name_size) as usize;
        if size > dir.len() - pos {
            return Err(format!(
                "bitmap directory entry {} at {at:#x}: its {size} bytes (name_size {name_size}) \
                 extend past the end of the directory",
                entries.len()
            ));
        }
        let name = e[ENTRY_HEADER..ENTRY_HEADER + name_size].to_vec();
        if e[ENTRY_HEADER + name_size..size].iter().any(|&b| b != 0) {
            return Err(format!(
                "bitmap '{}' (directory entry at {at:#x}): the padding after the name is not zero",
                name_guess()
            ));
        }
        entries.push(DirEntry {
            table_offset,
            table_size: be32(e, 8),
            flags: be32(e, 12),
            bitmap_type: e[16],
            granularity_bits: e[17],
            name,
            dir_pos: pos as u64,
        });
        pos += size;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(format!(
            "bitmap directory: {} entries found, fewer than the {nb_bitmaps} nb_bitmaps of the \
             bitmaps extension",
            entries.len()
        ));
    }
    Ok(entries)
}

/// The entries a damaged directory still holds, for a repair: read from the start of the
/// directory's clusters while they parse (a well-formed header, no extra data, zero padding)
/// and up to one more than `nb_bitmaps` says, stopping at zero bytes (the clusters' unused
/// end). `None` when no entry parses.
pub(crate) fn salvage(clusters: &[u8], nb_bitmaps: u32) -> Option<Vec<DirEntry>> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    let most = (u64::from(nb_bitmaps) + 1).min(MAX_BITMAPS) as usize;
    while entries.len() < most && clusters.len() - pos >= ENTRY_HEADER {
        let e = &clusters[pos..];
        if e[..ENTRY_HEADER].iter().all(|&b| b == 0) {
            break;
        }
        let name_size = usize::from(be16(e, 18));
        let size = entry_size(name_size) as usize;
        if be32(e, 20) != 0 || name_size == 0 || size > e.len() {
            break;
        }
        if e[ENTRY_HEADER + name_size..size].iter().any(|&b| b != 0) {
            break;
        }
        entries.push(DirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            bitmap_type: e[16],
            granularity_bits: e[17],
            name: e[ENTRY_HEADER..ENTRY_HEADER + name_size].to_vec(),
            dir_pos: pos as u64,
        });
        pos += size;
    }
    (!entries.is_empty()).then_some(entries)
}

/// Encodes a directory (no extra data; zero padding).
pub(crate) fn serialize(entries: &[DirEntry]) -> Vec<u8> {
    let size: u64 = entries.iter().map(|e| entry_size(e.name.len())).sum();
    let mut out = vec![0u8; size as usize];
    let mut pos = 0usize;
    for entry in entries {
        let e = &mut out[pos..];
        put64(e, 0, entry.table_offset);
        put32(e, 8, entry.table_size);
        put32(e, 12, entry.flags);
        e[16] = entry.bitmap_type;
        e[17] = entry.granularity_bits;
        e[18..20].copy_from_slice(&(entry.name.len() as u16).to_be_bytes());
        put32(e, 20, 0);
        e[ENTRY_HEADER..ENTRY_HEADER + entry.name.len()].copy_from_slice(&entry.name);
        pos += entry_size(entry.name.len()) as usize;
    }
    out
}

/// Checks the name of a bitmap to create: 1 to 1023 bytes, no NUL, as QEMU requires of a new
/// bitmap (a NUL could not pass through its C strings; any other byte is accepted).
pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("a bitmap name must not be empty".into());
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "bitmap name of {} bytes is too long (at most {MAX_NAME_SIZE})",
            name.len()
        ));
    }
    if name.contains(&0) {
        return Err("a bitmap name must not contain a NUL byte".into());
    }
    Ok(())
}
