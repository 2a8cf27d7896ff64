// SPDX-License-Identifier: GPL-2.0-or-later

//! The qcow2 header (versions 2 and 3, big-endian), its extensions and feature bits.
//!
//! The header is kept as the raw bytes read from the file so that unknown additional fields are
//! preserved; the fields this library uses are parsed out of it. Rewriting the header renders
//! the whole first cluster again: the header, every extension in the order found (the bitmaps
//! extension replaced, added or dropped), the end marker and the backing file name, as QEMU's
//! `qcow2_update_header` does.
#![forbid(unsafe_code)]

use super::error::{corrupt, Error};
use super::io::ImageIo;
use byteorder::{BigEndian, ByteOrder};

pub(crate) const QCOW_MAGIC: u32 = 0x5146_49fb;
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_HEADER_LEN: u32 = 104;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// The bitmaps extension's fixed length.
pub(crate) const BITMAPS_EXT_LEN: u64 = 24;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_KNOWN: u64 = 0x1f;
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub(crate) const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub(crate) const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Offsets of header fields.
pub(crate) mod field {
    pub(crate) const BACKING_FILE_OFFSET: usize = 8;
    pub(crate) const BACKING_FILE_SIZE: usize = 16;
    pub(crate) const REFCOUNT_TABLE_OFFSET: usize = 48;
    pub(crate) const INCOMPATIBLE: usize = 72;
    pub(crate) const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub(crate) const AUTOCLEAR: usize = 88;
}

/// One header extension, as found in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Extension {
    pub magic: u32,
    /// File offset of the extension's data.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The bitmaps extension's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub reserved: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExt {
    pub(crate) fn parse(data: &[u8]) -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: be32(data, 0),
            reserved: be32(data, 4),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.directory_size.to_be_bytes());
        out.extend_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

/// A parsed qcow2 header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    /// The header's bytes (`header_length` of them; 72 for version 2).
    pub raw: Vec<u8>,
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Every extension but the end marker, in file order; of several bitmaps extensions only
    /// the last, the one QEMU uses.
    pub extensions: Vec<Extension>,
    pub backing_file: Option<Vec<u8>>,
    /// Header offsets of the bitmaps extensions before the last one: QEMU reads each and keeps
    /// the last, and the next header write drops them (the specification allows one).
    pub ignored_bitmaps_exts: Vec<u64>,
    /// The length the bitmaps extension states when it is not its fixed 24 bytes (QEMU refuses
    /// such an image): its fields are read as the 24 bytes there, the walk going on past them.
    pub bitmaps_ext_stated_len: Option<u64>,
}

pub(crate) fn be16(buf: &[u8], at: usize) -> u16 {
    BigEndian::read_u16(&buf[at..])
}

pub(crate) fn be32(buf: &[u8], at: usize) -> u32 {
    BigEndian::read_u32(&buf[at..])
}

pub(crate) fn be64(buf: &[u8], at: usize) -> u64 {
    BigEndian::read_u64(&buf[at..])
}

pub(crate) fn put32(buf: &mut [u8], at: usize, value: u32) {
    BigEndian::write_u32(&mut buf[at..], value);
}

pub(crate) fn put64(buf: &mut [u8], at: usize, value: u64) {
    BigEndian::write_u64(&mut buf[at..], value);
}

pub(crate) fn read_exact(
    io: &dyn ImageIo,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, Error> {
    let len = usize::try_from(len).map_err(|_| corrupt(format!("{what}: size {len} too large")))?;
    let mut buf = vec![0u8; len];
    io.pread(offset, &mut buf)
        .map_err(|e| Error::io(format!("reading {what} at offset {offset:#x}"), e))?;
    Ok(buf)
}

fn pad8(len: u64) -> u64 {
    (len + 7) & !7
}

impl Header {
    /// Reads and checks the header and its extensions. `file_len` bounds every read.
    pub(crate) fn read(io: &dyn ImageIo, file_len: u64) -> Result<Header, Error> {
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(corrupt(format!(
                "not a qcow2 image: the file has {file_len} bytes, fewer than a qcow2 header's 72"
            )));
        }
        let first = read_exact(io, 0, u64::from(V2_HEADER_LEN), "the qcow2 header")?;
        let magic = be32(&first, 0);
        if magic != QCOW_MAGIC {
            return Err(corrupt(format!(
                "not a qcow2 image: magic {magic:#010x} at offset 0 is not QFI\\xfb"
            )));
        }
        let version = be32(&first, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported(format!(
                "header: qcow2 version {version} is not supported (only 2 and 3 are)"
            )));
        }
        let cluster_bits = be32(&first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "header: cluster_bits {cluster_bits} (offset 20) is out of range: QEMU supports \
                 9 to 21 (512 B to 2 MiB clusters)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, autoclear, refcount_order, header_length);
        let raw;
        if version == 2 {
            incompatible = 0;
            autoclear = 0;
            refcount_order = 4;
            header_length = V2_HEADER_LEN;
            raw = first;
        } else {
            if file_len < u64::from(V3_HEADER_LEN) {
                return Err(corrupt(format!(
                    "header: the file has {file_len} bytes, fewer than a version 3 header's 104"
                )));
            }
            let v3 = read_exact(io, 0, u64::from(V3_HEADER_LEN), "the qcow2 header")?;
            header_length = be32(&v3, 100);
            if header_length < V3_HEADER_LEN {
                return Err(corrupt(format!(
                    "header: header_length {header_length} (offset 100) is below 104"
                )));
            }
            if header_length % 8 != 0 {
                return Err(corrupt(format!(
                    "header: header_length {header_length} (offset 100) is not a multiple of 8"
                )));
            }
            if u64::from(header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header: header_length {header_length} (offset 100) exceeds the cluster \
                     size {cluster_size}"
                )));
            }
            if u64::from(header_length) > file_len {
                return Err(corrupt(format!(
                    "header: header_length {header_length} (offset 100) extends past the end of \
                     the file ({file_len} bytes)"
                )));
            }
            raw = read_exact(io, 0, u64::from(header_length), "the qcow2 header")?;
            incompatible = be64(&raw, 72);
            autoclear = be64(&raw, 88);
            refcount_order = be32(&raw, 96);
        }
        let mut header = Header {
            version,
            backing_file_offset: be64(&raw, 8),
            backing_file_size: be32(&raw, 16),
            cluster_bits,
            size: be64(&raw, 24),
            crypt_method: be32(&raw, 32),
            l1_size: be32(&raw, 36),
            l1_table_offset: be64(&raw, 40),
            refcount_table_offset: be64(&raw, 48),
            refcount_table_clusters: be32(&raw, 56),
            nb_snapshots: be32(&raw, 60),
            snapshots_offset: be64(&raw, 64),
            incompatible,
            autoclear,
            refcount_order,
            header_length,
            extensions: Vec::new(),
            ignored_bitmaps_exts: Vec::new(),
            bitmaps_ext_stated_len: None,
            backing_file: None,
            raw,
        };
        if refcount_order > 6 {
            return Err(corrupt(format!(
                "header: refcount_order {refcount_order} (offset 96) exceeds 6 (64-bit refcounts)"
            )));
        }
        if header.crypt_method > 2 {
            return Err(Error::Unsupported(format!(
                "header: crypt_method {} (offset 32) is unknown (0 none, 1 AES, 2 LUKS)",
                header.crypt_method
            )));
        }
        if header.version == 3 {
            let compression_type = if header.header_length > 104 {
                header.raw[104]
            } else {
                0
            };
            let flagged = header.incompatible & INCOMPAT_COMPRESSION != 0;
            if compression_type > 1 {
                return Err(Error::Unsupported(format!(
                    "header: compression_type {compression_type} (offset 104) is unknown"
                )));
            }
            if flagged != (compression_type != 0) {
                return Err(corrupt(format!(
                    "header: compression_type {compression_type} (offset 104) disagrees with \
                     incompatible feature bit 3 (compression type) being {}",
                    if flagged { "set" } else { "clear" }
                )));
            }
        }
        if header.backing_file_offset > cluster_size {
            return Err(corrupt(format!(
                "header: backing_file_offset {:#x} (offset 8) lies beyond the first cluster",
                header.backing_file_offset
            )));
        }
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            cluster_size
        };
        let end = ext_end.min(file_len);
        let walked = header.read_extensions(io, end, false);
        let short_bitmaps = header
            .bitmaps_ext()
            .is_some_and(|e| (e.data.len() as u64) < BITMAPS_EXT_LEN);
        if walked.is_err() || short_bitmaps {
            // A bitmaps extension shorter than its fixed 24 bytes throws the walk off: read it
            // as 24 bytes, and take that reading if the walk then reaches the end.
            let mut fixed = header.clone();
            fixed.extensions.clear();
            fixed.ignored_bitmaps_exts.clear();
            if fixed.read_extensions(io, end, true).is_ok()
                && fixed.bitmaps_ext_stated_len.is_some()
            {
                header = fixed;
            } else {
                walked?;
            }
        } else if let Some(ext) = header
            .extensions
            .iter_mut()
            .find(|e| e.magic == EXT_BITMAPS && e.data.len() as u64 > BITMAPS_EXT_LEN)
        {
            // Longer: the fields are its first 24 bytes.
            header.bitmaps_ext_stated_len = Some(ext.data.len() as u64);
            ext.data.truncate(BITMAPS_EXT_LEN as usize);
        }
        if header.crypt_method == 2 && header.crypto_area().is_none() {
            // QEMU refuses to open it ("Missing CRYPTO header for crypt method 2").
            return Err(corrupt(format!(
                "header: crypt_method 2 (LUKS, offset 32) needs the encryption header extension \
                 ({EXT_CRYPTO:#010x}, 16 bytes), which the image lacks"
            )));
        }
        if header.backing_file_offset != 0 {
            let len = u64::from(header.backing_file_size);
            if len > 1023 || len > cluster_size - header.backing_file_offset {
                return Err(corrupt(format!(
                    "header: backing_file_size {len} (offset 16) is too long (at most 1023 bytes, \
                     within the first cluster)"
                )));
            }
            if header.backing_file_offset + len > file_len {
                return Err(corrupt(format!(
                    "header: the backing file name at {:#x} ({len} bytes) extends past the end of \
                     the file",
                    header.backing_file_offset
                )));
            }
            header.backing_file = Some(read_exact(
                io,
                header.backing_file_offset,
                len,
                "the backing file name",
            )?);
        }
        Ok(header)
    }

    /// Reads the header extensions up to `end`; with `fixed_bitmaps_len`, a bitmaps extension
    /// is read as its fixed 24 bytes whatever its length says.
    fn read_extensions(
        &mut self,
        io: &dyn ImageIo,
        end: u64,
        fixed_bitmaps_len: bool,
    ) -> Result<(), Error> {
        let mut offset = u64::from(self.header_length);
        while offset < end {
            if end - offset < 8 {
                return Err(corrupt(format!(
                    "header extension at offset {offset:#x}: truncated (its 8-byte type and \
                     length do not fit before offset {end:#x})"
                )));
            }
            let head = read_exact(io, offset, 8, "a header extension")?;
            let magic = be32(&head, 0);
            let mut len = u64::from(be32(&head, 4));
            let data_offset = offset + 8;
            if fixed_bitmaps_len && magic == EXT_BITMAPS && len != BITMAPS_EXT_LEN {
                self.bitmaps_ext_stated_len = Some(len);
                len = BITMAPS_EXT_LEN;
            }
            if len > end - data_offset {
                return Err(corrupt(format!(
                    "header extension {magic:#010x} at offset {offset:#x}: length {len} extends \
                     past the end of the header extension area ({end:#x})"
                )));
            }
            if magic == EXT_END {
                return Ok(());
            }
            if magic == EXT_BITMAPS {
                // QEMU reads every one and keeps the last.
                if let Some(earlier) = self.extensions.iter().position(|e| e.magic == EXT_BITMAPS) {
                    let ignored = self.extensions.remove(earlier);
                    self.ignored_bitmaps_exts.push(ignored.offset - 8);
                }
            }
            let data = read_exact(io, data_offset, len, "a header extension")?;
            self.extensions.push(Extension {
                magic,
                offset: data_offset,
                data,
            });
            offset = data_offset + pad8(len);
        }
        Ok(())
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The bitmaps extension, if present.
    pub(crate) fn bitmaps_ext(&self) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.magic == EXT_BITMAPS)
    }

    /// The name the feature name table gives incompatible feature bit `bit`, if any.
    pub(crate) fn incompatible_feature_name(&self, bit: u32) -> Option<String> {
        let table = self
            .extensions
            .iter()
            .find(|e| e.magic == EXT_FEATURE_TABLE)?;
        // Entries of 48 bytes: type (0: incompatible), bit number, 46-byte NUL-padded name.
        table
            .data
            .chunks_exact(48)
            .find(|entry| entry[0] == 0 && u32::from(entry[1]) == bit)
            .map(|entry| {
                let name = &entry[2..];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..len]).into_owned()
            })
    }

    /// The external data file's name, if the header names one.
    pub(crate) fn data_file_name(&self) -> Option<Vec<u8>> {
        self.extensions
            .iter()
            .find(|e| e.magic == EXT_DATA_FILE)
            .map(|e| e.data.clone())
    }

    /// The LUKS header area (offset, length), if the image has one.
    pub(crate) fn crypto_area(&self) -> Option<(u64, u64)> {
        self.extensions
            .iter()
            .find(|e| e.magic == EXT_CRYPTO && e.data.len() == 16)
            .map(|e| (be64(&e.data, 0), be64(&e.data, 8)))
    }

    /// Renders the first cluster with the given bitmaps extension (None drops it), autoclear
    /// bits and refcount table location.
    pub(crate) fn render(
        &self,
        bitmaps: Option<BitmapsExt>,
        autoclear: u64,
        refcount_table: (u64, u32),
    ) -> Result<Vec<u8>, Error> {
        let cluster_size = self.cluster_size() as usize;
        let mut out = vec![0u8; cluster_size];
        let header_len = self.raw.len();
        out[..header_len].copy_from_slice(&self.raw);
        put64(&mut out, field::REFCOUNT_TABLE_OFFSET, refcount_table.0);
        put32(&mut out, field::REFCOUNT_TABLE_CLUSTERS, refcount_table.1);
        if self.version >= 3 {
            put64(&mut out, field::AUTOCLEAR, autoclear);
        }
        let mut pos = header_len;
        let no_room = || {
            Error::Limit(format!(
                "the header extensions no longer fit in the first cluster ({cluster_size} bytes)"
            ))
        };
        let put_ext = |out: &mut Vec<u8>, pos: &mut usize, magic: u32, data: &[u8]| {
            let total = 8 + pad8(data.len() as u64) as usize;
            if *pos + total + 8 > cluster_size {
                return Err(no_room());
            }
            put32(out, *pos, magic);
            put32(out, *pos + 4, data.len() as u32);
            out[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
            *pos += total;
            Ok(())
        };
        let mut placed = false;
        for ext in &self.extensions {
            if ext.magic == EXT_BITMAPS {
                if let Some(new) = bitmaps {
                    put_ext(&mut out, &mut pos, EXT_BITMAPS, &new.to_bytes())?;
                }
                placed = true;
            } else {
                put_ext(&mut out, &mut pos, ext.magic, &ext.data)?;
            }
        }
        if !placed {
            if let Some(new) = bitmaps {
                put_ext(&mut out, &mut pos, EXT_BITMAPS, &new.to_bytes())?;
            }
        }
        // The end marker: 8 zero bytes, already there.
        pos += 8;
        if let Some(name) = &self.backing_file {
            if pos + name.len() > cluster_size {
                return Err(no_room());
            }
            out[pos..pos + name.len()].copy_from_slice(name);
            put64(&mut out, field::BACKING_FILE_OFFSET, pos as u64);
            put32(&mut out, field::BACKING_FILE_SIZE, name.len() as u32);
        }
        Ok(out)
    }

    /// Brings the parsed fields up to date with a rendered first cluster that was written.
    pub(crate) fn apply_rendered(&mut self, rendered: &[u8], bitmaps: Option<BitmapsExt>) {
        let header_len = self.raw.len();
        self.raw.copy_from_slice(&rendered[..header_len]);
        self.backing_file_offset = be64(&self.raw, field::BACKING_FILE_OFFSET);
        self.refcount_table_offset = be64(&self.raw, field::REFCOUNT_TABLE_OFFSET);
        self.refcount_table_clusters = be32(&self.raw, field::REFCOUNT_TABLE_CLUSTERS);
        if self.version >= 3 {
            self.autoclear = be64(&self.raw, field::AUTOCLEAR);
        }
        // The rendered header has one bitmaps extension, of the right length.
        self.ignored_bitmaps_exts.clear();
        self.bitmaps_ext_stated_len = None;
        let had = self.extensions.iter().position(|e| e.magic == EXT_BITMAPS);
        match (had, bitmaps) {
            (Some(index), Some(new)) => self.extensions[index].data = new.to_bytes(),
            (Some(index), None) => {
                self.extensions.remove(index);
            }
            (None, Some(new)) => self.extensions.push(Extension {
                magic: EXT_BITMAPS,
                offset: 0,
                data: new.to_bytes(),
            }),
            (None, None) => {}
        }
    }

    /// Clears incompatible feature bits in the header to be rendered next.
    pub(crate) fn clear_incompatible(&mut self, bits: u64) {
        self.incompatible &= !bits;
        put64(&mut self.raw, field::INCOMPATIBLE, self.incompatible);
    }

    /// Records a new refcount table location (already written to the file).
    pub(crate) fn set_refcount_table(&mut self, offset: u64, clusters: u32) {
        self.refcount_table_offset = offset;
        self.refcount_table_clusters = clusters;
        put64(&mut self.raw, field::REFCOUNT_TABLE_OFFSET, offset);
        put32(&mut self.raw, field::REFCOUNT_TABLE_CLUSTERS, clusters);
    }
}
