// SPDX-License-Identifier: GPL-2.0-or-later

//! Reading and validating an image's structures: header, refcounts, the metadata map (L1/L2
//! tables of the active disk and of every snapshot, refcount table and blocks, snapshot table
//! and snapshot L1 tables, LUKS header) here, and the bitmaps extension with its directory,
//! tables and data clusters (`layout/bitmaps.rs`), which must share no cluster with any of those
//! nor with guest data.
//!
//! Every size read from the file is checked against the file's length and QEMU's limits before
//! anything is allocated for it, and bitmap tables are read only once they are known not to
//! overlap each other or other metadata, so memory stays proportional to the file. Guest data
//! clusters are not kept: every L2 table is scanned once against the set of bitmap clusters.
//! Problems are collected rather than returned at the first one, for
//! [`check`](super::Image::check). What is wrong with a bitmap marked in use is only a warning:
//! QEMU never trusts such a bitmap's table, and it must stay listable and removable.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use super::bitmap_dir::{self, DirEntry};
use super::bitmap_table;
use super::check::count::Counter;
use super::check::finding::{Finding, FindingKind, MoreOf, Place, Severity, Subject};
use super::error::{corrupt, Error};
use super::header::{
    be16, be32, be64, read_exact, BitmapsExt, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_KNOWN,
};
use super::io::ImageIo;
use super::l2_entry::{L2Format, Mapping, INCOMPAT_DATA_FILE};
use super::name::BitmapName;
use super::refcount::{get_entry, past_end, Refcounts};

mod bitmaps;
use bitmaps::read_bitmaps;

const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_SNAPSHOTS: u64 = 65536;
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * MAX_SNAPSHOTS;
const MAX_SNAPSHOT_EXTRA: u64 = 1024;
const SNAPSHOT_HEADER: u64 = 40;
pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
pub(crate) const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Overlaps reported at most, then summarized.
pub(crate) const MAX_REPORTED: usize = 20;

/// What a region of the file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    Header,
    L1Table,
    L2Table(u64),
    RefcountTable,
    RefcountBlock(usize),
    SnapshotTable,
    SnapshotL1(u64),
    /// An L2 table of a snapshot (not shared with the active disk): snapshot, L1 entry.
    SnapshotL2(u64, u64),
    CryptoHeader,
    Directory,
    BitmapTable(usize),
    BitmapData(usize, u64),
}

/// A cluster-aligned range of the file and what uses it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub start: u64,
    /// Exclusive, rounded up to a cluster boundary.
    pub end: u64,
    pub owner: Owner,
}

/// One bitmap: its directory entry and its table (empty if it could not be read).
#[derive(Clone, Debug)]
pub(crate) struct Bitmap {
    pub entry: DirEntry,
    pub table: Vec<u64>,
    /// Nothing wrong was found with its entry, name, table or clusters (an in-use bitmap may
    /// still be trusted in this sense: its clusters are known).
    pub trusted: bool,
    /// What is wrong with it, when it is not trusted: the first problem found.
    pub damage: Option<Damage>,
    /// Whether its directory entry passes QEMU's checks (`check_dir_entry`): `qemu-img check`
    /// then counts its table and data clusters whether or not the bitmap is trusted here.
    pub entry_valid: bool,
}

/// Why a bitmap is not trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Damage {
    /// The first finding about it (an error, or a warning for a bitmap in use).
    Found(Finding),
    /// Its clusters overlap other data, in an overlap past those reported one by one.
    UnreportedOverlap,
    /// Its entry or table is invalid (a duplicate name found before any other problem).
    Invalid,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Found(finding) => finding.fmt(f),
            Damage::UnreportedOverlap => f.write_str("its clusters overlap other data"),
            Damage::Invalid => f.write_str("its entry or table is invalid"),
        }
    }
}

impl Bitmap {
    pub(crate) fn name(&self) -> String {
        self.entry.display_name()
    }
}

/// State of the bitmaps extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExtState {
    Absent,
    /// Present but the autoclear bit is clear: ignored, dropped by the next write.
    Stale,
    Valid,
    /// Present and counted but unreadable (its fields or directory are malformed).
    Broken,
}

/// An L2 table to scan for guest data clusters.
pub(crate) struct L2Ref {
    offset: u64,
    /// None for the active disk.
    snapshot: Option<u64>,
    l1_index: u64,
}

/// Everything read from an image.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub header: Header,
    pub file_len: u64,
    pub refcounts: Refcounts,
    pub ext: ExtState,
    /// Offset and size of the bitmap directory, when the extension is valid.
    pub directory: Option<(u64, u64)>,
    pub bitmaps: Vec<Bitmap>,
    /// Metadata other than the bitmaps': where new clusters must never go.
    pub metadata: Vec<Region>,
    /// Snapshot L1 tables: snapshot index, offset, bytes (`l1_size * 8`).
    pub snapshot_l1s: Vec<(u64, u64, u64)>,
    /// The bitmap directory shares a cluster with other metadata or guest data.
    pub directory_damaged: bool,
    /// What is wrong with the bitmaps extension's own fields when the bitmaps could still be
    /// read (a wrong length, a count or size that disagrees with the intact entries of the
    /// directory): QEMU refuses such an image; `check -r all` writes the extension anew.
    pub ext_damage: Option<String>,
}

impl Layout {
    /// Every metadata region: the metadata map's, the bitmap directory, and each bitmap's
    /// table and data clusters (those of bitmaps whose table was read).
    pub(crate) fn regions(&self) -> Vec<Region> {
        let cluster_size = self.cluster_size();
        let mut regions = self.metadata.clone();
        if let Some((offset, size)) = self.directory {
            regions.push(Region {
                start: offset,
                end: round_up(offset + size, cluster_size),
                owner: Owner::Directory,
            });
        }
        for (index, bitmap) in self.bitmaps.iter().enumerate() {
            if bitmap.table.is_empty() {
                continue;
            }
            regions.push(table_region(bitmap, index, cluster_size));
            for (i, &entry) in bitmap.table.iter().enumerate() {
                let data = entry & bitmap_table::ENTRY_OFFSET_MASK;
                if data != 0 {
                    regions.push(Region {
                        start: data,
                        end: data + cluster_size,
                        owner: Owner::BitmapData(index, i as u64),
                    });
                }
            }
        }
        regions
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Updates the metadata map after the refcount table moved or blocks were added.
    pub(crate) fn refresh_refcount_regions(&mut self) {
        let cluster_size = self.cluster_size();
        self.metadata
            .retain(|r| !matches!(r.owner, Owner::RefcountTable | Owner::RefcountBlock(_)));
        let table = &self.refcounts;
        self.metadata.push(Region {
            start: table.table_offset,
            end: table.table_offset + u64::from(table.table_clusters) * cluster_size,
            owner: Owner::RefcountTable,
        });
        for (index, offset) in table.blocks() {
            self.metadata.push(Region {
                start: offset,
                end: offset + cluster_size,
                owner: Owner::RefcountBlock(index),
            });
        }
        self.metadata.sort_by_key(|r| (r.start, r.end));
    }

    /// The virtual disk size QEMU uses for bitmaps (`bdrv_getlength`: whole sectors).
    pub(crate) fn virtual_len(&self) -> u64 {
        self.header.size / 512 * 512
    }
}

/// Problems found while reading.
#[derive(Clone, Debug, Default)]
pub(crate) struct Problems {
    /// What was found, in order: errors (the image is malformed), warnings (worth knowing;
    /// reading works) and notes (harmless: not problems at all).
    pub findings: Vec<Finding>,
    /// Reading works but writing is refused (with these reasons).
    pub write_blockers: Vec<String>,
    /// The first problem for which QEMU refuses to open the image while loading its bitmaps
    /// (the extension's fields, a directory entry, a name, the table or data of a bitmap not in
    /// use): `qemu-img check` then cannot check it (exit 1), and neither says `check`, though
    /// it reads and can repair what is readable.
    pub qemu_refuses: Option<String>,
    /// Clusters that a bitmap shares with something else, for the cross-links reported as
    /// errors: `qemu-img check` counts such a cluster once, as a refcount below its
    /// references, not once per message or per entry pointing to it.
    pub cross_link_clusters: Vec<u64>,
}

impl Problems {
    /// Records `message` as a reason QEMU refuses the image, if it is the first.
    pub(crate) fn qemu_refuses(&mut self, message: &str) {
        self.qemu_refuses.get_or_insert_with(|| message.to_string());
    }

    pub(crate) fn push(&mut self, severity: Severity, subject: Subject, kind: FindingKind) {
        self.findings.push(Finding::new(severity, subject, kind));
    }

    /// The findings of one severity, in order.
    pub(crate) fn of(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity == severity)
    }

    pub(crate) fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.of(Severity::Error)
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    /// Whether opening the image, even read-only, is refused: errors beyond damage confined to
    /// some bitmaps (the others stay readable, as QEMU lists and serves them).
    pub(crate) fn refuse_opening(&self, layout: &Layout) -> bool {
        let confined = self.structural_errors().next().is_none()
            && layout.ext == ExtState::Valid
            && !layout.directory_damaged
            && layout.ext_damage.is_none()
            && layout.bitmaps.iter().any(|b| !b.trusted);
        self.has_errors() && !confined
    }

    /// Errors that do not concern the bitmaps extension.
    pub(crate) fn structural_errors(&self) -> impl Iterator<Item = &Finding> {
        self.errors().filter(|f| !f.subject.is_bitmaps())
    }

    /// The first error that concerns the bitmaps extension.
    pub(crate) fn first_bitmaps_error(&self) -> Option<&Finding> {
        self.errors().find(|f| f.subject.is_bitmaps())
    }

    /// Errors reporting clusters a bitmap shares with something else (cross-links).
    pub(crate) fn cross_link_errors(&self) -> usize {
        self.errors().filter(|f| f.kind.is_cross_link()).count()
    }

    /// Pairs of bitmaps whose names QEMU reads as one (up to a NUL byte): reading works here,
    /// but QEMU refuses to open the image, so `check` counts each as a corruption.
    pub(crate) fn name_clashes(&self) -> u64 {
        self.findings
            .iter()
            .filter(|f| matches!(f.kind, FindingKind::NameClash { .. }))
            .count() as u64
    }
}

/// Whether a finding is one of the refcount warnings reading makes (metadata clusters whose
/// refcount is 0 or, for bitmap clusters, above 1): a full reference count reports these
/// precisely.
pub(crate) fn is_refcount_warning(finding: &Finding) -> bool {
    matches!(
        finding.kind,
        FindingKind::RefcountZero { .. } | FindingKind::BitmapRefcountAboveOne { .. }
    )
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// Where a region lies, for findings.
pub(crate) fn place(region: &Region, bitmaps: &[Bitmap]) -> Place {
    let at = region.start;
    let name = |index: usize| {
        bitmaps
            .get(index)
            .map(|b| BitmapName::from(b.entry.name.as_slice()))
            .unwrap_or_else(|| BitmapName::from(format!("#{index}").as_bytes()))
    };
    match region.owner {
        Owner::Header => Place::Header,
        Owner::L1Table => Place::L1Table { at },
        Owner::L2Table(l1_index) => Place::L2Table { at, l1_index },
        Owner::RefcountTable => Place::RefcountTable { at },
        Owner::RefcountBlock(index) => Place::RefcountBlock {
            index: index as u64,
            at,
        },
        Owner::SnapshotTable => Place::SnapshotTable { at },
        Owner::SnapshotL1(snapshot) => Place::SnapshotL1 { snapshot, at },
        Owner::SnapshotL2(snapshot, l1_index) => Place::SnapshotL2 {
            snapshot,
            l1_index,
            at,
        },
        Owner::CryptoHeader => Place::EncryptionHeader { at },
        Owner::Directory => Place::Directory { at },
        Owner::BitmapTable(b) => Place::BitmapTable {
            bitmap: name(b),
            at,
        },
        Owner::BitmapData(b, entry) => {
            let table = bitmaps.get(b).map(|b| b.entry.table_offset).unwrap_or(0);
            Place::BitmapData {
                bitmap: name(b),
                at,
                entry,
                entry_at: table + 8 * entry,
            }
        }
    }
}

fn is_bitmap_owner(owner: Owner) -> bool {
    matches!(
        owner,
        Owner::Directory | Owner::BitmapTable(_) | Owner::BitmapData(..)
    )
}

/// One overlap found: what to report (None for one past `MAX_REPORTED`, reported only summed
/// up) and the bitmaps involved.
struct Overlap {
    kind: Option<FindingKind>,
    bitmaps: Vec<usize>,
    /// The bitmap directory is one of the two.
    directory: bool,
    /// The clusters the two share (for a summary: those of every overlap it sums up).
    clusters: Vec<u64>,
}

/// The clusters `a` and `b` share (regions are cluster-aligned).
fn shared_clusters(a: &Region, b: &Region, cluster_bits: u32) -> std::ops::Range<u64> {
    let start = a.start.max(b.start) >> cluster_bits;
    let end = a.end.min(b.end).div_ceil(1 << cluster_bits);
    start..end.max(start)
}

fn bitmap_of(owner: Owner) -> Option<usize> {
    match owner {
        Owner::BitmapTable(b) | Owner::BitmapData(b, _) => Some(b),
        _ => None,
    }
}

/// Finds overlapping regions; `report` filters which pairs are reported. The first
/// `MAX_REPORTED` are reported; the others are summed up in one more (with their bitmaps).
/// `of_bitmaps`: the overlaps are the bitmaps' (cross-links), not among other metadata.
fn overlaps(
    regions: &mut [Region],
    bitmaps: &[Bitmap],
    of_bitmaps: bool,
    cluster_bits: u32,
    report: impl Fn(&Region, &Region) -> bool,
) -> Vec<Overlap> {
    regions.sort_by_key(|r| (r.start, r.end));
    let mut found = Vec::new();
    let mut unreported = Overlap {
        kind: None,
        bitmaps: Vec::new(),
        directory: false,
        clusters: Vec::new(),
    };
    let mut count = 0usize;
    let mut widest: Option<usize> = None;
    for index in 0..regions.len() {
        let region = regions[index];
        if let Some(w) = widest {
            let other = regions[w];
            let same_l2 = matches!(region.owner, Owner::L2Table(_))
                && matches!(other.owner, Owner::L2Table(_))
                && region.start == other.start;
            if region.start < other.end && !same_l2 && report(&region, &other) {
                let involved: Vec<usize> = [region.owner, other.owner]
                    .into_iter()
                    .filter_map(bitmap_of)
                    .collect();
                let directory = region.owner == Owner::Directory || other.owner == Owner::Directory;
                let shared = shared_clusters(&region, &other, cluster_bits);
                count += 1;
                if count <= MAX_REPORTED {
                    let (first, second) = (place(&region, bitmaps), place(&other, bitmaps));
                    found.push(Overlap {
                        kind: Some(if of_bitmaps {
                            FindingKind::CrossLink { first, second }
                        } else {
                            FindingKind::Overlap { first, second }
                        }),
                        bitmaps: involved,
                        directory,
                        clusters: shared.collect(),
                    });
                } else {
                    unreported.bitmaps.extend(involved);
                    unreported.directory |= directory;
                    unreported.clusters.extend(shared);
                }
            }
            if region.end > other.end {
                widest = Some(index);
            }
        } else {
            widest = Some(index);
        }
    }
    if count > MAX_REPORTED {
        unreported.kind = Some(FindingKind::More {
            count: (count - MAX_REPORTED) as u64,
            of: if of_bitmaps {
                MoreOf::BitmapOverlaps
            } else {
                MoreOf::Overlaps
            },
        });
        found.push(unreported);
    }
    found
}

/// Reads the image. Fatal problems (no usable header or refcount table) are returned as
/// errors; the others are collected in [`Problems`].
pub(crate) fn read(io: &dyn ImageIo) -> Result<(Layout, Problems), Error> {
    read_with(io, false).map(|(layout, problems, _)| (layout, problems))
}

/// The reference count [`read_counted`] started while reading, or why it could not start.
/// None when no L2 table was read for the bitmaps (no bitmaps, an external data file), or
/// when the metadata other than the bitmaps' is damaged (a count would follow garbage).
pub(crate) type Started = Option<Result<Counter, Error>>;

/// [`read`], also counting the references of everything but the bitmaps extension (to finish
/// with [`Counter::finish`]) on the walk that reads the L2 tables for the bitmaps'
/// cross-links with guest data, if it runs: each L2 table is then read once.
pub(crate) fn read_counted(io: &dyn ImageIo) -> Result<(Layout, Problems, Started), Error> {
    read_with(io, true)
}

fn read_with(io: &dyn ImageIo, count: bool) -> Result<(Layout, Problems, Started), Error> {
    let file_len = io
        .len()
        .map_err(|e| Error::io("getting the image file's size", e))?;
    let header = Header::read(io, file_len)?;
    let cluster_size = header.cluster_size();
    let mut problems = Problems::default();

    let unknown = header.incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        // Such a feature may change how anything in the file is to be read: QEMU refuses to
        // open the image at all, and so do we, for reading too.
        let bits: Vec<String> = (0..64)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| match header.incompatible_feature_name(bit) {
                Some(name) => format!("{bit} ('{}')", name.escape_debug()),
                None => bit.to_string(),
            })
            .collect();
        return Err(Error::Unsupported(format!(
            "header: unknown incompatible feature bit{} {} ({unknown:#x}, offset 72) set: the \
             image may not be interpretable without them, and QEMU refuses to open it",
            if bits.len() == 1 { "" } else { "s" },
            bits.join(", ")
        )));
    }
    for (bit, kind) in [
        (INCOMPAT_DIRTY, FindingKind::DirtyBit),
        (INCOMPAT_CORRUPT, FindingKind::CorruptBit),
    ] {
        if header.incompatible & bit != 0 {
            let finding = Finding::new(Severity::Warning, Subject::Structure, kind);
            problems.write_blockers.push(finding.to_string());
            problems.findings.push(finding);
        }
    }
    if header.version < 3 {
        problems.write_blockers.push(
            "qcow2 version 2 (compat=0.10) images cannot hold persistent bitmaps (they have no \
             autoclear feature bits); upgrade with 'qemu-img amend -o compat=1.1'"
                .into(),
        );
    }
    if header.autoclear & !AUTOCLEAR_KNOWN != 0 {
        problems.push(
            Severity::Warning,
            Subject::Structure,
            FindingKind::UnknownAutoclearBits {
                bits: header.autoclear & !AUTOCLEAR_KNOWN,
            },
        );
    }

    let refcounts = Refcounts::load(
        io,
        header.cluster_bits,
        header.refcount_order,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        file_len,
    )?;

    let mut metadata = Vec::new();
    let region = |start: u64, len: u64, owner: Owner| Region {
        start,
        end: round_up(start.saturating_add(len), cluster_size),
        owner,
    };
    metadata.push(region(0, cluster_size, Owner::Header));
    metadata.push(region(
        refcounts.table_offset,
        u64::from(refcounts.table_clusters) * cluster_size,
        Owner::RefcountTable,
    ));
    for (index, offset) in refcounts.blocks() {
        metadata.push(region(offset, cluster_size, Owner::RefcountBlock(index)));
    }

    // The active L1 table and the L2 tables it points to.
    let mut seen = HashSet::new();
    let mut l2_tables = Vec::new();
    let l1_bytes = u64::from(header.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(corrupt(format!(
            "header: l1_size {} (offset 36) exceeds QEMU's 32 MiB L1 table limit",
            header.l1_size
        )));
    }
    let l2_coverage = cluster_size * (cluster_size / 8);
    let needed_l1 = header.size.div_ceil(l2_coverage);
    if u64::from(header.l1_size) < needed_l1 {
        return Err(corrupt(format!(
            "header: l1_size {} (offset 36) is too small for the virtual size {} (needs {})",
            header.l1_size, header.size, needed_l1
        )));
    }
    if l1_bytes > 0 {
        if header.l1_table_offset % cluster_size != 0 || header.l1_table_offset == 0 {
            return Err(corrupt(format!(
                "header: l1_table_offset {:#x} (offset 40) is not a nonzero multiple of the \
                 cluster size",
                header.l1_table_offset
            )));
        }
        if past_end(header.l1_table_offset, l1_bytes, file_len) {
            return Err(corrupt(format!(
                "header: the L1 table at {:#x} ({l1_bytes} bytes) extends past the end of the \
                 file ({file_len} bytes)",
                header.l1_table_offset
            )));
        }
        metadata.push(region(header.l1_table_offset, l1_bytes, Owner::L1Table));
        let l1 = read_exact(io, header.l1_table_offset, l1_bytes, "the L1 table")?;
        // An L1 table has up to 4 Mi entries: memory must follow the distinct L2 tables and a
        // bounded number of messages, not the entries. Entries sharing an L2 table (which the
        // overlap check tolerates) give one region, the first entry's.
        let mut bad = 0usize;
        for (index, chunk) in l1.chunks_exact(8).enumerate() {
            let offset = be64(chunk, 0) & L1_OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            let misaligned = offset % cluster_size != 0;
            if !misaligned && offset.saturating_add(cluster_size) <= file_len {
                if seen.insert(offset) {
                    metadata.push(region(offset, cluster_size, Owner::L2Table(index as u64)));
                    l2_tables.push(L2Ref {
                        offset,
                        snapshot: None,
                        l1_index: index as u64,
                    });
                }
                continue;
            }
            bad += 1;
            if bad <= MAX_REPORTED {
                let at = header.l1_table_offset + 8 * index as u64;
                let l1_index = index as u64;
                problems.findings.push(Finding::structure(if misaligned {
                    FindingKind::L2TableMisaligned {
                        l1_index,
                        at,
                        offset,
                    }
                } else {
                    FindingKind::L2TablePastEnd {
                        l1_index,
                        at,
                        offset,
                        file_len,
                    }
                }));
            }
        }
        if bad > MAX_REPORTED {
            problems
                .findings
                .push(Finding::structure(FindingKind::More {
                    count: (bad - MAX_REPORTED) as u64,
                    of: MoreOf::InvalidL1Entries,
                }));
        }
    }

    // Snapshots: the table and each snapshot's L1 table.
    let mut snapshot_l1s = Vec::new();
    if header.nb_snapshots > 0 {
        let l1_tables = read_snapshots(io, &header, file_len, &mut metadata, &mut problems)?;
        snapshot_l1s.clone_from(&l1_tables);
        for (snapshot, l1_offset, l1_bytes) in l1_tables {
            let l1 = read_exact(io, l1_offset, l1_bytes, "a snapshot's L1 table")?;
            for (index, chunk) in l1.chunks_exact(8).enumerate() {
                let offset = be64(chunk, 0) & L1_OFFSET_MASK;
                if offset == 0 || !seen.insert(offset) {
                    continue;
                }
                if offset % cluster_size != 0 || offset.saturating_add(cluster_size) > file_len {
                    problems
                        .findings
                        .push(Finding::structure(FindingKind::SnapshotL2Invalid {
                            snapshot,
                            l1_index: index as u64,
                            at: l1_offset + 8 * index as u64,
                            offset,
                        }));
                    continue;
                }
                let owner = Owner::SnapshotL2(snapshot, index as u64);
                metadata.push(region(offset, cluster_size, owner));
                l2_tables.push(L2Ref {
                    offset,
                    snapshot: Some(snapshot),
                    l1_index: index as u64,
                });
            }
        }
    }
    if let Some((offset, len)) = header.crypto_area() {
        if offset % cluster_size != 0 || offset.saturating_add(len) > file_len {
            problems
                .findings
                .push(Finding::structure(FindingKind::EncryptionAreaInvalid {
                    offset,
                    len,
                }));
        } else if len > 0 {
            metadata.push(region(offset, len, Owner::CryptoHeader));
        }
    }

    let mut layout = Layout {
        header,
        file_len,
        refcounts,
        ext: ExtState::Absent,
        directory: None,
        bitmaps: Vec::new(),
        metadata,
        snapshot_l1s,
        directory_damaged: false,
        ext_damage: None,
    };
    // Overlaps among the other metadata (bitmap ones are reported by read_bitmaps, before
    // these).
    let found = overlaps(
        &mut layout.metadata.clone(),
        &[],
        false,
        layout.header.cluster_bits,
        |_, _| true,
    );
    let damaged = problems.structural_errors().next().is_some()
        || found.iter().any(|overlap| overlap.kind.is_some());
    // Started by the walk that scans the L2 tables for bitmap clusters, if it runs (without
    // bitmaps the count is made afterwards, as its memory is then not added to this walk's).
    let mut counter: Started = None;
    read_bitmaps(
        io,
        &mut layout,
        &mut problems,
        &l2_tables,
        (count && !damaged).then_some(&mut counter),
    )?;
    for overlap in found {
        let Some(kind) = overlap.kind else { continue };
        let subject = match overlap.clusters[..] {
            [first, ..] => Subject::Clusters {
                first,
                count: overlap.clusters.len() as u64,
            },
            [] => Subject::Structure,
        };
        problems.push(Severity::Error, subject, kind);
    }

    check_refcounts(io, &mut layout, &mut problems)?;
    layout.metadata.sort_by_key(|r| (r.start, r.end));
    Ok((layout, problems, counter))
}

fn read_snapshots(
    io: &dyn ImageIo,
    header: &Header,
    file_len: u64,
    metadata: &mut Vec<Region>,
    problems: &mut Problems,
) -> Result<Vec<(u64, u64, u64)>, Error> {
    let cluster_size = header.cluster_size();
    let count = u64::from(header.nb_snapshots);
    let mut l1_tables = Vec::new();
    let offset = header.snapshots_offset;
    if count > MAX_SNAPSHOTS {
        return Err(corrupt(format!(
            "header: nb_snapshots {count} (offset 60) exceeds QEMU's limit of {MAX_SNAPSHOTS}"
        )));
    }
    if offset % cluster_size != 0 || offset == 0 {
        return Err(corrupt(format!(
            "header: snapshots_offset {offset:#x} (offset 64) is not a nonzero multiple of the \
             cluster size"
        )));
    }
    let mut pos = offset;
    let limit = offset.saturating_add(MAX_SNAPSHOTS_SIZE).min(file_len);
    for index in 0..count {
        // Entries start 8-byte aligned; the last one is not padded (QEMU writes its real size,
        // and a snapshot table written last ends the file there).
        pos = round_up(pos, 8);
        if pos.saturating_add(SNAPSHOT_HEADER) > limit {
            return Err(corrupt(format!(
                "snapshot table: entry {index} at {pos:#x} extends past the end of the file or \
                 QEMU's 64 MiB snapshot table limit"
            )));
        }
        let head = read_exact(io, pos, SNAPSHOT_HEADER, "the snapshot table")?;
        let l1_offset = be64(&head, 0);
        let l1_size = u64::from(be32(&head, 8));
        let id_size = u64::from(be16(&head, 12));
        let name_size = u64::from(be16(&head, 14));
        let extra = u64::from(be32(&head, 36));
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(format!(
                "snapshot table: entry {index} at {pos:#x} has {extra} bytes of extra data, more \
                 than QEMU's limit of {MAX_SNAPSHOT_EXTRA}"
            )));
        }
        let size = SNAPSHOT_HEADER + extra + id_size + name_size;
        if pos + size > limit {
            return Err(corrupt(format!(
                "snapshot table: entry {index} at {pos:#x} ({size} bytes) extends past the end \
                 of the file or QEMU's 64 MiB snapshot table limit"
            )));
        }
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES
            || l1_offset % cluster_size != 0
            || (l1_bytes > 0 && l1_offset.saturating_add(l1_bytes) > file_len)
        {
            problems
                .findings
                .push(Finding::structure(FindingKind::SnapshotL1Invalid {
                    snapshot: index,
                    entry_at: pos,
                    l1_offset,
                    l1_size,
                }));
        } else if l1_bytes > 0 {
            metadata.push(Region {
                start: l1_offset,
                end: round_up(l1_offset + l1_bytes, cluster_size),
                owner: Owner::SnapshotL1(index),
            });
            l1_tables.push((index, l1_offset, l1_bytes));
        }
        pos += size;
    }
    metadata.push(Region {
        start: offset,
        end: round_up(pos, cluster_size),
        owner: Owner::SnapshotTable,
    });
    Ok(l1_tables)
}

fn table_region(bitmap: &Bitmap, index: usize, cluster_size: u64) -> Region {
    let start = bitmap.entry.table_offset;
    Region {
        start,
        end: round_up(start + u64::from(bitmap.entry.table_size) * 8, cluster_size),
        owner: Owner::BitmapTable(index),
    }
}

/// Bitmap clusters that are also guest data clusters (of the active disk or of a snapshot),
/// found by scanning every L2 table once. With `counter`, the reference count is started
/// there and fed each table read. Memory follows the bitmap clusters, not the disk.
#[allow(clippy::too_many_arguments)]
fn guest_cross_links(
    io: &dyn ImageIo,
    layout: &Layout,
    bitmaps: &[Bitmap],
    entry_ok: &[bool],
    directory: &Region,
    data_regions: &[Region],
    l2_tables: &[L2Ref],
    counter: Option<&mut Started>,
) -> Result<Vec<Overlap>, Error> {
    let header = &layout.header;
    // With an external data file, L2 entries point into that file, not this one.
    if header.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Ok(Vec::new());
    }
    let cluster_bits = header.cluster_bits;
    let cluster_size = header.cluster_size();
    let mut owned: HashMap<u64, Region> = HashMap::new();
    let tables = bitmaps
        .iter()
        .enumerate()
        .filter(|&(index, _)| entry_ok[index])
        .map(|(index, bitmap)| table_region(bitmap, index, cluster_size));
    for region in std::iter::once(*directory)
        .chain(tables)
        .chain(data_regions.iter().copied())
    {
        for cluster in (region.start >> cluster_bits)..(region.end >> cluster_bits) {
            owned.entry(cluster).or_insert(region);
        }
    }
    if owned.is_empty() {
        return Ok(Vec::new());
    }
    // One bit per cluster of the file, set for the bitmap clusters: the 16 Mi entries of a
    // 1 TiB disk's L2 tables are mostly tested against it, not hashed.
    let mut bits = vec![0u64; layout.file_len.div_ceil(cluster_size).div_ceil(64) as usize];
    for &cluster in owned.keys() {
        if let Some(word) = bits.get_mut((cluster / 64) as usize) {
            *word |= 1 << (cluster % 64);
        }
    }
    let maybe_owned = |cluster: u64| match bits.get((cluster / 64) as usize) {
        Some(word) => word >> (cluster % 64) & 1 != 0,
        // Past the file: only the map knows.
        None => true,
    };
    let format = L2Format::of(header);
    let per_l2 = format.per_table();
    let mut found = Vec::new();
    let mut count = 0usize;
    let mut counter =
        counter.and_then(|slot| slot.insert(Counter::start(io, layout)).as_mut().ok());
    for l2 in l2_tables {
        let table = read_exact(io, l2.offset, cluster_size, "an L2 table")?;
        if let Some(counter) = counter.as_deref_mut() {
            counter.feed(layout, l2.offset, &table);
        }
        for (i, raw) in format.entries(&table).enumerate() {
            let (first, last) = match format.decode(raw.entry) {
                Mapping::Compressed { offset, size } => {
                    Mapping::compressed_clusters(offset, size, cluster_bits)
                }
                Mapping::Standard { offset: 0, .. } => continue,
                Mapping::Standard { offset, .. } => {
                    (offset >> cluster_bits, offset >> cluster_bits)
                }
            };
            for cluster in first..=last {
                if !maybe_owned(cluster) {
                    continue;
                }
                let Some(region) = owned.get(&cluster) else {
                    continue;
                };
                count += 1;
                if count > MAX_REPORTED {
                    found.push(Overlap {
                        kind: None,
                        bitmaps: bitmap_of(region.owner).into_iter().collect(),
                        directory: region.owner == Owner::Directory,
                        clusters: vec![cluster],
                    });
                    continue;
                }
                let virtual_offset = (l2.l1_index * per_l2 + i as u64) << cluster_bits;
                found.push(Overlap {
                    kind: Some(FindingKind::GuestCrossLink {
                        place: place(region, bitmaps),
                        cluster_at: cluster << cluster_bits,
                        virtual_offset,
                        snapshot: l2.snapshot,
                        l2_at: l2.offset,
                        entry: i as u64,
                    }),
                    bitmaps: bitmap_of(region.owner).into_iter().collect(),
                    directory: region.owner == Owner::Directory,
                    clusters: vec![cluster],
                });
            }
        }
    }
    if count > MAX_REPORTED {
        found.push(Overlap {
            kind: Some(FindingKind::More {
                count: (count - MAX_REPORTED) as u64,
                of: MoreOf::GuestCrossLinks,
            }),
            bitmaps: Vec::new(),
            directory: false,
            clusters: Vec::new(),
        });
    }
    Ok(found)
}

/// Every metadata cluster must be counted (refcount at least 1): an uncounted cluster would be
/// handed out by the next allocation. Uncounted clusters block writing; for bitmap clusters a
/// refcount above 1 is worth a warning.
fn check_refcounts(
    io: &dyn ImageIo,
    layout: &mut Layout,
    problems: &mut Problems,
) -> Result<(), Error> {
    let cluster_bits = layout.header.cluster_bits;
    let regions = layout.regions();
    // Every cluster of every region, in file order, so that each refcount block is read once
    // and not kept (the walk over a large image's scattered L2 tables would otherwise cache
    // every block).
    let mut clusters: Vec<(u64, usize)> = Vec::new();
    for (index, region) in regions.iter().enumerate() {
        clusters.extend(
            ((region.start >> cluster_bits)..(region.end >> cluster_bits)).map(|c| (c, index)),
        );
    }
    clusters.sort_unstable();
    let refcounts = &layout.refcounts;
    let per_block = refcounts.per_block();
    let mut block: Option<(u64, std::borrow::Cow<'_, [u8]>)> = None;
    let mut reported = 0usize;
    for (cluster, index) in clusters {
        let region = &regions[index];
        let block_index = cluster / per_block;
        let count = if !refcounts.has_block(cluster) {
            0
        } else {
            if block.as_ref().is_none_or(|(at, _)| *at != block_index) {
                block = Some((block_index, refcounts.peek_block(io, block_index as usize)?));
            }
            let (_, bytes) = block.as_ref().expect("just read");
            get_entry(bytes, (cluster % per_block) as usize, refcounts.order())
        };
        let at = cluster << cluster_bits;
        let subject = Subject::Clusters {
            first: cluster,
            count: 1,
        };
        if count == 0 {
            reported += 1;
            if reported <= MAX_REPORTED {
                let place = place(region, &layout.bitmaps);
                let finding = Finding::new(
                    Severity::Warning,
                    subject,
                    FindingKind::RefcountZero { at, place },
                );
                problems.write_blockers.push(finding.to_string());
                problems.findings.push(finding);
            }
        } else if count > 1 && is_bitmap_owner(region.owner) {
            let place = place(region, &layout.bitmaps);
            problems.push(
                Severity::Warning,
                subject,
                FindingKind::BitmapRefcountAboveOne {
                    at,
                    place,
                    refcount: count,
                },
            );
        }
    }
    Ok(())
}
