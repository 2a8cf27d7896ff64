// SPDX-License-Identifier: GPL-2.0-or-later

//! qcow2 images as bytes: the open options every test uses, big-endian field readers and
//! patchers, the header extensions, and the fields a structure-aware fuzzer may mutate.
//!
//! Tests that hand-craft malformed images and the fuzzer both need to find fields in a valid
//! image; they find them here, with one reading of the format.

use hbitmap::qcow2::OpenOptions;

/// Read-write, taking QEMU's locks.
pub const RW: OpenOptions = OpenOptions {
    write: true,
    force_share: false,
};

/// Read-only, taking QEMU's locks.
pub const RO: OpenOptions = OpenOptions {
    write: false,
    force_share: false,
};

/// Read-only without taking or checking locks, like `qemu-img -U`.
pub const RO_FORCE_SHARE: OpenOptions = OpenOptions {
    write: false,
    force_share: true,
};

/// Header: `cluster_bits`, 4 bytes.
pub const CLUSTER_BITS: usize = 20;
/// Header: `l1_size`, 4 bytes.
pub const L1_SIZE: usize = 36;
/// Header: `l1_table_offset`, 8 bytes.
pub const L1_TABLE_OFFSET: usize = 40;
/// Header: `refcount_table_offset`, 8 bytes.
pub const REFCOUNT_TABLE_OFFSET: usize = 48;
/// Header: `refcount_table_clusters`, 4 bytes.
pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
/// Header (version 3): `header_length`, 4 bytes.
pub const HEADER_LENGTH: usize = 100;
/// The magic of the bitmaps header extension.
pub const BITMAPS_EXTENSION: u32 = 0x2385_2875;

/// The big-endian field of `width` bytes at `offset`; `None` when it does not fit in `bytes`.
pub fn field(bytes: &[u8], offset: usize, width: usize) -> Option<u64> {
    let end = offset.checked_add(width)?;
    let field = bytes.get(offset..end)?;
    Some(field.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

/// Writes `value` as the big-endian field of `width` bytes at `offset` (its low bytes when it
/// does not fit).
pub fn put_field(bytes: &mut [u8], offset: usize, width: usize, value: u64) {
    for (i, byte) in bytes[offset..offset + width].iter_mut().enumerate() {
        *byte = (value >> (8 * (width - 1 - i))) as u8;
    }
}

/// The 32-bit field at `offset`; panics past the end.
pub fn be32(bytes: &[u8], offset: usize) -> u32 {
    field(bytes, offset, 4).unwrap_or_else(|| panic!("no 32-bit field at {offset}")) as u32
}

/// The 64-bit field at `offset`; panics past the end.
pub fn be64(bytes: &[u8], offset: usize) -> u64 {
    field(bytes, offset, 8).unwrap_or_else(|| panic!("no 64-bit field at {offset}"))
}

pub fn put32(bytes: &mut [u8], offset: usize, value: u32) {
    put_field(bytes, offset, 4, value.into());
}

pub fn put64(bytes: &mut [u8], offset: usize, value: u64) {
    put_field(bytes, offset, 8, value);
}

/// A header extension: where its 8-byte header (magic, then length) starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    pub magic: u32,
    pub offset: usize,
    pub len: usize,
}

impl Extension {
    /// Where its data starts.
    pub fn data(&self) -> usize {
        self.offset + 8
    }
}

/// The header extensions, in file order, ending with the end marker (magic 0) when the walk
/// reaches it. The walk stops at the end of `bytes` or of the first cluster, so it terminates
/// on damaged images too.
pub fn extensions(bytes: &[u8]) -> Vec<Extension> {
    let cluster = 1usize << field(bytes, CLUSTER_BITS, 4).unwrap_or(0).min(30);
    // A version 2 header has no length field and is 72 bytes long.
    let mut offset = (field(bytes, HEADER_LENGTH, 4).unwrap_or(0) as usize).max(72);
    let mut out = Vec::new();
    while offset + 8 <= bytes.len() && offset < cluster {
        let magic = be32(bytes, offset);
        let len = be32(bytes, offset + 4) as usize;
        out.push(Extension { magic, offset, len });
        if magic == 0 {
            break;
        }
        offset += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// The data of the bitmaps extension, if the image has one.
pub fn bitmaps_extension(bytes: &[u8]) -> Option<usize> {
    extensions(bytes)
        .iter()
        .find(|e| e.magic == BITMAPS_EXTENSION)
        .map(Extension::data)
}

/// The file offset of the directory entry of the bitmap named `name`; panics when the image
/// has no bitmaps extension or no such bitmap.
pub fn directory_entry(bytes: &[u8], name: impl AsRef<[u8]>) -> usize {
    let name = name.as_ref();
    let ext = bitmaps_extension(bytes).expect("no bitmaps extension");
    let count = be32(bytes, ext);
    let mut entry = be64(bytes, ext + 16) as usize;
    for _ in 0..count {
        let name_size = field(bytes, entry + 18, 2).expect("a directory entry") as usize;
        let extra = be32(bytes, entry + 20) as usize;
        let start = entry + 24 + extra;
        if bytes.get(start..start + name_size) == Some(name) {
            return entry;
        }
        entry += (24 + extra + name_size).div_ceil(8) * 8;
    }
    panic!("no directory entry for {}", String::from_utf8_lossy(name));
}

/// A field the fuzzer may mutate: offset and width in bytes (big-endian).
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub offset: usize,
    pub width: usize,
}

/// Parses a (valid) image enough to list its mutable fields: header, extension headers, the
/// bitmaps extension, directory entries, bitmap table entries, refcount table and blocks, L1.
///
/// The order is part of the fuzz corpus's meaning (inputs pick fields by index): append, do not
/// reorder.
pub fn mutable_fields(img: &[u8]) -> Vec<Field> {
    let be = |offset: usize, width: usize| field(img, offset, width).unwrap_or(0);
    let mut out = Vec::new();
    let mut add = |offset: usize, width: usize| {
        if offset + width <= img.len() {
            out.push(Field { offset, width });
        }
    };
    // Header (version 3).
    for &(o, w) in &[
        (0, 4),
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (80, 8),
        (88, 8),
        (96, 4),
        (100, 4),
    ] {
        add(o, w);
    }
    let cluster = 1usize << (be(CLUSTER_BITS, 4) as u32).min(30);
    // Refcount table and first blocks (16-bit refcounts).
    let rt = be(REFCOUNT_TABLE_OFFSET, 8) as usize;
    let rt_clusters = be(REFCOUNT_TABLE_CLUSTERS, 4) as usize;
    for i in 0..(rt_clusters * cluster / 8).min(64) {
        let entry = be(rt + i * 8, 8) as usize;
        add(rt + i * 8, 8);
        if entry != 0 {
            for j in 0..(cluster / 2).min(256) {
                add(entry + j * 2, 2);
            }
        }
    }
    // L1 table.
    let l1 = be(L1_TABLE_OFFSET, 8) as usize;
    for i in 0..(be(L1_SIZE, 4) as usize).min(16) {
        add(l1 + i * 8, 8);
    }
    // Extensions: magic and length of each.
    let extensions = extensions(img);
    for extension in &extensions {
        add(extension.offset, 4);
        add(extension.offset + 4, 4);
    }
    let Some(ext) = extensions
        .iter()
        .find(|e| e.magic == BITMAPS_EXTENSION)
        .map(Extension::data)
    else {
        return out;
    };
    for &(o, w) in &[(0, 4), (4, 4), (8, 8), (16, 8)] {
        add(ext + o, w);
    }
    let nb = be(ext, 4) as usize;
    let dir = be(ext + 16, 8) as usize;
    let mut e = dir;
    for _ in 0..nb.min(64) {
        if e + 24 > img.len() {
            break;
        }
        for &(o, w) in &[(0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)] {
            add(e + o, w);
        }
        let table = be(e, 8) as usize;
        let table_size = be(e + 8, 4) as usize;
        for i in 0..table_size.min(64) {
            add(table + i * 8, 8);
        }
        let name_size = be(e + 18, 2) as usize;
        let extra = be(e + 20, 4) as usize;
        if name_size > 0 {
            add(e + 24 + extra, 1);
        }
        e += (24 + extra + name_size).div_ceil(8) * 8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_what_was_put() {
        let mut bytes = [0u8; 12];
        put32(&mut bytes, 0, 0x0102_0304);
        put64(&mut bytes, 4, 0x1122_3344_5566_7788);
        assert_eq!(bytes[..4], [1, 2, 3, 4], "big-endian");
        assert_eq!(be32(&bytes, 0), 0x0102_0304);
        assert_eq!(be64(&bytes, 4), 0x1122_3344_5566_7788);
        assert_eq!(field(&bytes, 10, 2), Some(0x7788));
        assert_eq!(field(&bytes, 11, 2), None, "past the end");
        assert_eq!(field(&bytes, usize::MAX, 2), None, "offset overflow");
    }

    #[test]
    fn finds_the_bitmaps_extension_and_its_entries() {
        let dir = std::env::temp_dir().join(format!("hbitmap-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("two-bitmaps.qcow2");
        let mut image = hbitmap::qcow2::Image::create(&path, 1 << 20, 512).unwrap();
        let flags = hbitmap::qcow2::BitmapFlags {
            in_use: false,
            auto: true,
        };
        for (name, granularity_bits) in [("first", 9), ("second", 12)] {
            let bitmap = hbitmap::HBitmap::new(1 << 20, granularity_bits).unwrap();
            image.store_bitmap(name, &bitmap, flags).unwrap();
        }
        image.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        let magics: Vec<u32> = extensions(&bytes).iter().map(|e| e.magic).collect();
        assert_eq!(magics.last(), Some(&0), "the walk ends at the end marker");
        let ext = bitmaps_extension(&bytes).expect("a bitmaps extension");
        assert_eq!(be32(&bytes, ext), 2, "nb_bitmaps");
        // Entry fields: granularity_bits at 17.
        let second = directory_entry(&bytes, "second");
        assert_eq!(field(&bytes, second + 17, 1), Some(12));
        let first = directory_entry(&bytes, b"first");
        assert_eq!(field(&bytes, first + 17, 1), Some(9));
        assert_eq!(first, be64(&bytes, ext + 16) as usize, "the first entry");
    }
}
