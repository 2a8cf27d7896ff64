// SPDX-License-Identifier: GPL-2.0-or-later

//! L2 table entries, decoded in one place: their width (8 bytes, or 16 with extended L2
//! entries), standard entries (a host cluster, the COPIED and zero flags) and compressed
//! descriptors (a host byte range whose offset and sector count fields depend on the cluster
//! size, as QEMU's `qcow2_parse_compressed_l2_entry` reads them). The reference count, the
//! cross-link scan and the repair of the COPIED flags all read entries through this.
#![forbid(unsafe_code)]

use super::header::{be64, Header};

pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2_COMPRESSED: u64 = 1 << 62;
/// L1 and L2 entries: the cluster's refcount is exactly one (it may be written in place).
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entries without subclusters: the cluster reads as zeroes.
pub(crate) const L2_ZERO: u64 = 1;
/// Bits of a standard (not compressed) L2 entry that must be zero.
pub(crate) const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Incompatible feature bits: guest data in an external file; 128-bit L2 entries.
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// How an image's L2 entries are laid out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct L2Format {
    pub cluster_bits: u32,
    /// Bytes per entry: 8, or 16 with extended L2 entries (the second word: subclusters).
    pub entry_bytes: usize,
    /// Guest data lives in an external data file: standard offsets point into it.
    pub data_file: bool,
    /// Width of a compressed descriptor's host offset field.
    offset_bits: u32,
    /// Mask of its sector count field (additional 512-byte sectors).
    sectors_mask: u64,
}

/// One raw entry: the entry word and, with extended L2 entries, the subcluster bitmap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawEntry {
    pub entry: u64,
    pub subclusters: u64,
}

/// What an entry maps its guest cluster to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Compressed data: `size` bytes of the host file from `offset` (not cluster-aligned; the
    /// last sector may pass the end of the file).
    Compressed { offset: u64, size: u64 },
    /// A standard entry: a host cluster at `offset` (0 for none), with its COPIED flag.
    /// `allocated` tells whether the entry refers to a host cluster at all: offset 0 does not,
    /// except in an external data file, where COPIED marks guest data at that file's offset 0
    /// (a plain zero cluster is still unallocated).
    Standard {
        offset: u64,
        copied: bool,
        allocated: bool,
    },
}

impl Mapping {
    /// The host clusters a compressed descriptor touches, first and last (inclusive).
    pub(crate) fn compressed_clusters(offset: u64, size: u64, cluster_bits: u32) -> (u64, u64) {
        (offset >> cluster_bits, (offset + size - 1) >> cluster_bits)
    }
}

impl L2Format {
    pub(crate) fn of(header: &Header) -> L2Format {
        let cluster_bits = header.cluster_bits;
        L2Format {
            cluster_bits,
            entry_bytes: if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
                16
            } else {
                8
            },
            data_file: header.incompatible & INCOMPAT_DATA_FILE != 0,
            offset_bits: 62 - (cluster_bits - 8),
            sectors_mask: (1u64 << (cluster_bits - 8)) - 1,
        }
    }

    /// Entries per L2 table.
    pub(crate) fn per_table(&self) -> u64 {
        (1u64 << self.cluster_bits) / self.entry_bytes as u64
    }

    /// The entries of one L2 table, in order.
    pub(crate) fn entries<'a>(&self, table: &'a [u8]) -> impl Iterator<Item = RawEntry> + 'a {
        let extended = self.entry_bytes == 16;
        table
            .chunks_exact(self.entry_bytes)
            .map(move |raw| RawEntry {
                entry: be64(raw, 0),
                subclusters: if extended { be64(raw, 8) } else { 0 },
            })
    }

    /// Decodes an entry word.
    pub(crate) fn decode(&self, entry: u64) -> Mapping {
        if entry & L2_COMPRESSED != 0 {
            let offset = entry & ((1u64 << self.offset_bits) - 1);
            let sectors = ((entry >> self.offset_bits) & self.sectors_mask) + 1;
            Mapping::Compressed {
                offset,
                size: sectors * 512 - (offset & 511),
            }
        } else {
            let offset = entry & L2_OFFSET_MASK;
            let copied = entry & OFLAG_COPIED != 0;
            let zero_plain = entry & L2_ZERO != 0 && self.entry_bytes == 8;
            Mapping::Standard {
                offset,
                copied,
                allocated: offset != 0 || (self.data_file && copied && !zero_plain),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(cluster_bits: u32) -> L2Format {
        L2Format {
            cluster_bits,
            entry_bytes: 8,
            data_file: false,
            offset_bits: 62 - (cluster_bits - 8),
            sectors_mask: (1u64 << (cluster_bits - 8)) - 1,
        }
    }

    #[test]
    fn compressed_descriptors_follow_the_cluster_size() {
        // 64 KiB clusters: offset in bits 0..54, sector count in bits 54..62.
        let f = format(16);
        let entry = L2_COMPRESSED | (3 << 54) | 0x5_0200;
        assert_eq!(
            f.decode(entry),
            Mapping::Compressed {
                offset: 0x5_0200,
                size: 4 * 512
            }
        );
        // Not sector-aligned: the first sector is partial.
        let entry = L2_COMPRESSED | 0x5_0210;
        assert_eq!(
            f.decode(entry),
            Mapping::Compressed {
                offset: 0x5_0210,
                size: 512 - 0x10
            }
        );
        // 512-byte clusters: the sector count field is one bit wide.
        let f = format(9);
        let entry = L2_COMPRESSED | (1 << 61) | 0x1000;
        assert_eq!(
            f.decode(entry),
            Mapping::Compressed {
                offset: 0x1000,
                size: 1024
            }
        );
        assert_eq!(Mapping::compressed_clusters(0xfff0, 0x20, 16), (0, 1));
    }

    #[test]
    fn offset_zero_is_unallocated_except_in_a_data_file() {
        let mut f = format(16);
        let standard = |offset, copied, allocated| Mapping::Standard {
            offset,
            copied,
            allocated,
        };
        assert_eq!(f.decode(OFLAG_COPIED), standard(0, true, false));
        assert_eq!(
            f.decode(OFLAG_COPIED | 0x3_0000),
            standard(0x3_0000, true, true)
        );
        f.data_file = true;
        assert_eq!(f.decode(OFLAG_COPIED), standard(0, true, true));
        assert_eq!(f.decode(OFLAG_COPIED | L2_ZERO), standard(0, true, false));
        assert_eq!(f.decode(0), standard(0, false, false));
    }
}
