// SPDX-License-Identifier: GPL-2.0-or-later

//! Reference counting over the whole image, as `qemu-img check` does it.
//!
//! Every structure is walked and every reference to a cluster counted: the header, the L1
//! tables of the active disk and of every snapshot, each L2 table once per L1 entry pointing to
//! it and each data cluster (normal, zero with an allocation, every cluster a compressed one
//! touches) once per L2 entry, the snapshot table, the refcount table and blocks, the encryption
//! header, and the bitmap directory, tables and data clusters. A cluster whose stored refcount
//! is above that count is leaked; below, the image is corrupt. L2 entries are decoded by
//! `l2_entry.rs`, as everywhere else.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};

use super::finding::{Finding, FindingKind, MoreOf, Severity, Subject};
use crate::qcow2::error::Error;
use crate::qcow2::header::{be64, read_exact, INCOMPAT_CORRUPT};
use crate::qcow2::io::ImageIo;
use crate::qcow2::l2_entry::{L2Format, Mapping, RawEntry, L2_STD_RESERVED_MASK, OFLAG_COPIED};
use crate::qcow2::layout::{
    place, ExtState, Layout, Owner, L1_OFFSET_MASK, L1_RESERVED_MASK, MAX_REPORTED,
};
use crate::qcow2::refcount::{get_entry, Refcounts};

/// How many times each cluster is referenced.
#[derive(Clone)]
pub(crate) struct References {
    cluster_bits: u32,
    /// Clusters below the end of the file, 16 bits each (as QEMU's default refcounts); a count
    /// of `u16::MAX` means the count is in `large`.
    within: Vec<u16>,
    /// Counts of `u16::MAX` and more (a compressed cluster shared by many entries...).
    large: HashMap<u64, u64>,
    /// Clusters past the end of the file that something points to.
    beyond: BTreeMap<u64, u64>,
}

impl References {
    fn new(file_len: u64, cluster_bits: u32) -> References {
        References {
            cluster_bits,
            within: vec![0; file_len.div_ceil(1 << cluster_bits) as usize],
            large: HashMap::new(),
            beyond: BTreeMap::new(),
        }
    }

    fn add_cluster(&mut self, cluster: u64, weight: u32) {
        let weight = u64::from(weight);
        match self.within.get_mut(cluster as usize) {
            Some(count) if *count < u16::MAX => {
                let total = u64::from(*count) + weight;
                if total < u64::from(u16::MAX) {
                    *count = total as u16;
                } else {
                    *count = u16::MAX;
                    self.large.insert(cluster, total);
                }
            }
            Some(_) => *self.large.entry(cluster).or_insert(0) += weight,
            None => *self.beyond.entry(cluster).or_insert(0) += weight,
        }
    }

    /// Counts one reference to every cluster of `offset..offset + len`.
    fn add(&mut self, offset: u64, len: u64) {
        self.add_weighted(offset, len, 1);
    }

    /// Takes back one reference to every cluster of `offset..offset + len` (counted before).
    pub(crate) fn remove(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            let count = self.get(cluster).saturating_sub(1);
            match self.within.get_mut(cluster as usize) {
                Some(slot) if count < u64::from(u16::MAX) => {
                    *slot = count as u16;
                    self.large.remove(&cluster);
                }
                Some(_) => {
                    self.large.insert(cluster, count);
                }
                None if count == 0 => {
                    self.beyond.remove(&cluster);
                }
                None => {
                    self.beyond.insert(cluster, count);
                }
            }
        }
    }

    /// Counts `weight` references to every cluster of `offset..offset + len`.
    fn add_weighted(&mut self, offset: u64, len: u64, weight: u32) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            self.add_cluster(cluster, weight);
        }
    }

    pub(crate) fn get(&self, cluster: u64) -> u64 {
        match self.within.get(cluster as usize) {
            Some(&u16::MAX) => self.large.get(&cluster).copied().unwrap_or(0),
            Some(&count) => u64::from(count),
            None => self.beyond.get(&cluster).copied().unwrap_or(0),
        }
    }

    /// One past the last cluster of the file or referenced past its end.
    pub(crate) fn limit(&self) -> u64 {
        let within = self.within.len() as u64;
        self.beyond
            .last_key_value()
            .map_or(within, |(&cluster, _)| within.max(cluster + 1))
    }

    /// Every referenced cluster, in order.
    fn referenced(&self) -> impl Iterator<Item = u64> + '_ {
        self.within
            .iter()
            .enumerate()
            .filter(|(_, &count)| count != 0)
            .map(|(cluster, _)| cluster as u64)
            .chain(self.beyond.keys().copied())
    }
}

/// Guest cluster statistics of the active disk, as `qemu-img check` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GuestStats {
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// The references of everything but the bitmaps extension, and what could not be mapped.
pub(crate) struct Base {
    pub refs: References,
    pub stats: GuestStats,
    /// Structures the walk could not follow: the count is then incomplete (at most
    /// `MAX_REPORTED` messages, then one summing up the rest).
    pub unmapped: Vec<Finding>,
    unmapped_count: u64,
    /// L1 and L2 entries that can be followed but break the format (reserved bits set, a
    /// compressed cluster marked COPIED...): each a corruption, as `qemu-img check` counts them
    /// (an L2 table once per L1 entry pointing to it).
    pub bad_entries: u64,
    /// Findings for `bad_entries` (at most `MAX_REPORTED`, then one summing up the rest).
    pub bad_entry_findings: Vec<Finding>,
    /// The COPIED flags of the active disk, to compare with the refcounts.
    pub copied: CopiedFlags,
    /// Where the next guest cluster of the current L2 table would be if it were contiguous.
    next_contiguous: u64,
}

/// Counts the references of everything but the bitmaps extension.
pub(crate) fn count_base(io: &dyn ImageIo, layout: &Layout) -> Result<Base, Error> {
    Counter::start(io, layout)?.finish(io, layout)
}

/// Reads the image and counts the references of everything but the bitmaps extension on the
/// same walk (see [`layout::read_counted`](crate::qcow2::layout::read_counted)).
pub(crate) fn read_and_count(
    io: &dyn ImageIo,
) -> Result<(Layout, crate::qcow2::layout::Problems, Base), Error> {
    let (layout, problems, started) = crate::qcow2::layout::read_counted(io)?;
    let base = match started {
        Some(counter) => counter?.finish(io, &layout)?,
        None => count_base(io, &layout)?,
    };
    Ok((layout, problems, base))
}

/// The reference count of everything but the bitmaps extension, fed the L2 tables by a walk
/// that reads them for another purpose too (the bitmaps' cross-links with guest data), so
/// that each is read once: [`start`](Self::start) reads the L1 tables, [`feed`](Self::feed)
/// counts an L2 table already read, [`finish`](Self::finish) reads and counts those not fed
/// and the rest of the metadata. The tables are counted in the order they are first met
/// whoever reads them (the findings come in that order).
pub(crate) struct Counter {
    base: Base,
    l2_tables: L2Tables,
    /// How many of `l2_tables.order` were counted.
    counted: usize,
}

impl Counter {
    pub(crate) fn start(io: &dyn ImageIo, layout: &Layout) -> Result<Counter, Error> {
        let header = &layout.header;
        let cluster_size = layout.cluster_size();
        let mut base = Base {
            refs: References::new(layout.file_len, header.cluster_bits),
            stats: GuestStats::default(),
            unmapped: Vec::new(),
            unmapped_count: 0,
            bad_entries: 0,
            bad_entry_findings: Vec::new(),
            copied: CopiedFlags::new(layout.file_len.div_ceil(cluster_size)),
            next_contiguous: 0,
        };
        base.refs.add(0, cluster_size);
        // Each L2 table counts once per L1 entry pointing to it, and so does every data cluster
        // in it (QEMU's check walks it again for each). It is read once here, its references
        // weighted: a hostile L1 table of 4 Mi entries all pointing to one L2 table costs one
        // read.
        let mut l2_tables = L2Tables::default();
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > 0 {
            base.refs.add(header.l1_table_offset, l1_bytes);
            l2_tables.collect(
                io,
                layout,
                header.l1_table_offset,
                l1_bytes,
                None,
                &mut base,
            )?;
        }
        for &(snapshot, offset, bytes) in &layout.snapshot_l1s {
            base.refs.add(offset, bytes);
            l2_tables.collect(io, layout, offset, bytes, Some(snapshot), &mut base)?;
        }
        Ok(Counter {
            base,
            l2_tables,
            counted: 0,
        })
    }

    /// Counts the L2 table at `l2_offset`, read by the caller, if it is the next one to count;
    /// otherwise leaves it to [`finish`](Self::finish), which reads it again.
    pub(crate) fn feed(&mut self, layout: &Layout, l2_offset: u64, table: &[u8]) {
        if self.l2_tables.order.get(self.counted) != Some(&l2_offset) {
            return;
        }
        let (weight, active) = self.l2_tables.weights[&l2_offset];
        scan_l2(layout, l2_offset, table, weight, active, &mut self.base);
        self.counted += 1;
    }

    /// Counts the L2 tables not fed, then the rest of the metadata.
    pub(crate) fn finish(mut self, io: &dyn ImageIo, layout: &Layout) -> Result<Base, Error> {
        let cluster_size = layout.cluster_size();
        let base = &mut self.base;
        for l2 in &self.l2_tables.order[self.counted..] {
            let (weight, active) = self.l2_tables.weights[l2];
            let table = read_exact(io, *l2, cluster_size, "an L2 table")?;
            scan_l2(layout, *l2, &table, weight, active, base);
        }
        for region in &layout.metadata {
            if matches!(region.owner, Owner::SnapshotTable | Owner::CryptoHeader) {
                base.refs.add(region.start, region.end - region.start);
            }
        }
        let refcounts = &layout.refcounts;
        base.refs.add(
            refcounts.table_offset,
            u64::from(refcounts.table_clusters) * cluster_size,
        );
        for (_, offset) in refcounts.blocks() {
            base.refs.add(offset, cluster_size);
        }
        if base.unmapped_count > MAX_REPORTED as u64 {
            let more = base.unmapped_count - MAX_REPORTED as u64;
            base.unmapped.push(Finding::structure(FindingKind::More {
                count: more,
                of: MoreOf::UnfollowableEntries,
            }));
        }
        if base.bad_entries > MAX_REPORTED as u64 {
            let more = base.bad_entries - MAX_REPORTED as u64;
            base.bad_entry_findings
                .push(Finding::structure(FindingKind::More {
                    count: more,
                    of: MoreOf::MalformedEntries,
                }));
        }
        Ok(self.base)
    }
}

impl Base {
    fn cannot_follow(&mut self, kind: impl FnOnce() -> FindingKind) {
        self.unmapped_count += 1;
        if self.unmapped_count <= MAX_REPORTED as u64 {
            self.unmapped.push(Finding::structure(kind()));
        }
    }

    /// Counts a malformed entry `weight` times (once per L1 entry leading to it).
    fn bad_entry(&mut self, weight: u32, kind: impl FnOnce() -> FindingKind) {
        let before = self.bad_entries;
        self.bad_entries += u64::from(weight);
        if before < MAX_REPORTED as u64 {
            self.bad_entry_findings.push(Finding::structure(kind()));
        }
    }
}

/// What the OFLAG_COPIED flags of the active disk's L1 and L2 entries say of their clusters'
/// refcounts: set means "exactly 1", clear means "not 1" (QEMU writes a cluster in place only
/// where the flag is set). Kept as one bit per cluster of the file for each meaning, so that
/// the comparison rides on the walk over the stored refcounts; a cluster met again with the
/// same meaning (an L2 table several L1 entries point to) counts again in `repeats`, so the
/// counts are per entry, as `qemu-img check` gives them.
#[derive(Clone, Default)]
pub(crate) struct CopiedFlags {
    set: Vec<u64>,
    clear: Vec<u64>,
    repeats: HashMap<(u64, bool), u64>,
    /// Entries whose flag is wrong whatever the refcounts say: a cluster of an external data
    /// file always has refcount 1.
    pub always_wrong: u64,
}

impl CopiedFlags {
    fn new(clusters: u64) -> CopiedFlags {
        let words = clusters.div_ceil(64) as usize;
        CopiedFlags {
            set: vec![0; words],
            clear: vec![0; words],
            ..CopiedFlags::default()
        }
    }

    /// Records `weight` entries pointing to `cluster` (within the file) with flag `copied`.
    fn note(&mut self, cluster: u64, copied: bool, weight: u32) {
        if weight == 0 {
            return;
        }
        let bits = if copied {
            &mut self.set
        } else {
            &mut self.clear
        };
        let Some(word) = bits.get_mut((cluster / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (cluster % 64);
        let mut extra = u64::from(weight);
        if *word & bit == 0 {
            *word |= bit;
            extra -= 1;
        }
        if extra > 0 {
            *self.repeats.entry((cluster, copied)).or_insert(0) += extra;
        }
    }

    /// Entries with meaning `copied` pointing to `cluster`.
    fn entries(&self, cluster: u64, copied: bool) -> u64 {
        let bits = if copied { &self.set } else { &self.clear };
        match bits.get((cluster / 64) as usize) {
            Some(word) if word >> (cluster % 64) & 1 != 0 => {
                1 + self.repeats.get(&(cluster, copied)).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Entries pointing to `cluster` whose flag disagrees with `refcount`.
    fn wrong(&self, cluster: u64, refcount: u64) -> u64 {
        self.entries(cluster, refcount != 1)
    }

    /// Whether any entry was recorded (no cluster of an image without L2 tables is).
    fn is_empty(&self) -> bool {
        self.always_wrong == 0
            && self.set.iter().all(|&w| w == 0)
            && self.clear.iter().all(|&w| w == 0)
    }
}

/// The L2 tables of every L1 table, in the order first met, with how many L1 entries point
/// to each (in all, and in the active L1 table).
#[derive(Default)]
struct L2Tables {
    order: Vec<u64>,
    weights: HashMap<u64, (u32, u32)>,
    /// The L2 table the last L1 entries pointed to, and how many did.
    last: Option<(u64, u64)>,
}

impl L2Tables {
    fn collect(
        &mut self,
        io: &dyn ImageIo,
        layout: &Layout,
        l1_offset: u64,
        l1_bytes: u64,
        snapshot: Option<u64>,
        base: &mut Base,
    ) -> Result<(), Error> {
        let cluster_size = layout.cluster_size();
        let l1 = read_exact(io, l1_offset, l1_bytes, "an L1 table")?;
        for (index, chunk) in l1.chunks_exact(8).enumerate() {
            let entry = be64(chunk, 0);
            let l2_offset = entry & L1_OFFSET_MASK;
            if entry & L1_RESERVED_MASK != 0 {
                base.bad_entry(1, || FindingKind::L1ReservedBits {
                    index: index as u64,
                    snapshot,
                    entry,
                });
            }
            if l2_offset == 0 {
                if entry & !L1_RESERVED_MASK != 0 {
                    // QEMU would read the header cluster as this entry's L2 table.
                    base.cannot_follow(|| FindingKind::L1FlagsWithoutTable {
                        index: index as u64,
                        snapshot,
                        entry,
                    });
                }
                continue;
            }
            if snapshot.is_none() && l2_offset + cluster_size <= layout.file_len {
                base.copied.note(
                    l2_offset >> layout.header.cluster_bits,
                    entry & OFLAG_COPIED != 0,
                    1,
                );
            }
            if l2_offset % cluster_size != 0 || l2_offset + cluster_size > layout.file_len {
                // layout::read reported it; the L2 table cannot be followed.
                base.cannot_follow(|| FindingKind::L1EntryUnfollowable {
                    index: index as u64,
                    snapshot,
                    offset: l2_offset,
                });
                continue;
            }
            // Runs of one offset (a hostile table's millions of entries) hash once.
            if self.last.is_some_and(|(offset, _)| offset == l2_offset) {
                let (_, run) = self.last.as_mut().expect("checked");
                *run += 1;
                continue;
            }
            self.flush_run(snapshot.is_none());
            self.last = Some((l2_offset, 1));
        }
        self.flush_run(snapshot.is_none());
        Ok(())
    }

    /// Adds the pending run of entries pointing to one L2 table.
    fn flush_run(&mut self, active: bool) {
        let Some((l2_offset, run)) = self.last.take() else {
            return;
        };
        let run = u32::try_from(run).unwrap_or(u32::MAX);
        let weight = self.weights.entry(l2_offset).or_insert_with(|| {
            self.order.push(l2_offset);
            (0, 0)
        });
        weight.0 = weight.0.saturating_add(run);
        if active {
            weight.1 = weight.1.saturating_add(run);
        }
    }
}

/// Counts an L2 table (`table`, read from `l2_offset`) and its data clusters `weight` times
/// (the statistics `active` times).
fn scan_l2(
    layout: &Layout,
    l2_offset: u64,
    table: &[u8],
    weight: u32,
    active: u32,
    base: &mut Base,
) {
    let format = L2Format::of(&layout.header);
    let cluster_bits = format.cluster_bits;
    let cluster_size = layout.cluster_size();
    let data_file = format.data_file;
    let extended = format.entry_bytes == 16;
    let active = u64::from(active);
    // As QEMU 10 counts it: contiguity within one L2 table.
    base.next_contiguous = 0;
    base.refs.add_weighted(l2_offset, cluster_size, weight);
    let active_entries = active as u32;
    for (i, RawEntry { entry, subclusters }) in format.entries(table).enumerate() {
        let (offset, copied, allocated) = match format.decode(entry) {
            Mapping::Compressed { offset, size } => {
                if entry & OFLAG_COPIED != 0 {
                    base.bad_entry(weight, || FindingKind::CompressedCopied {
                        index: i as u64,
                        l2_at: l2_offset,
                        entry,
                    });
                }
                if subclusters != 0 && !data_file {
                    base.bad_entry(weight, || FindingKind::CompressedSubclusters {
                        index: i as u64,
                        l2_at: l2_offset,
                        bitmap: subclusters,
                    });
                    continue;
                }
                if data_file {
                    base.cannot_follow(|| FindingKind::CompressedWithDataFile {
                        index: i as u64,
                        l2_at: l2_offset,
                    });
                    continue;
                }
                // The last sector of compressed data may lie past the end of the file (QEMU
                // does not pad it); its first byte may not.
                if offset >= layout.file_len {
                    base.cannot_follow(|| FindingKind::CompressedPastEnd {
                        index: i as u64,
                        l2_at: l2_offset,
                        offset,
                        file_len: layout.file_len,
                    });
                    continue;
                }
                base.refs.add_weighted(offset, size, weight);
                base.stats.allocated += active;
                base.stats.compressed += active;
                base.stats.fragmented += active;
                continue;
            }
            Mapping::Standard {
                offset,
                copied,
                allocated,
            } => (offset, copied, allocated),
        };
        if entry & L2_STD_RESERVED_MASK != 0 {
            base.bad_entry(weight, || FindingKind::L2ReservedBits {
                index: i as u64,
                l2_at: l2_offset,
                entry,
            });
        }
        if !allocated {
            if extended && subclusters & 0xffff_ffff != 0 {
                base.bad_entry(weight, || FindingKind::UnallocatedSubclusters {
                    index: i as u64,
                    l2_at: l2_offset,
                    bitmap: subclusters,
                });
            }
            continue;
        }
        if extended && (subclusters >> 32) & subclusters != 0 {
            base.bad_entry(weight, || FindingKind::SubclustersAllocatedAndZero {
                index: i as u64,
                l2_at: l2_offset,
                bitmap: subclusters,
            });
        }
        if data_file {
            // Clusters of an external data file have refcount 1.
            if !copied {
                base.copied.always_wrong += active;
            }
        } else if offset % cluster_size == 0 && offset + cluster_size <= layout.file_len {
            base.copied
                .note(offset >> cluster_bits, copied, active_entries);
        }
        if offset % cluster_size != 0 {
            base.cannot_follow(|| FindingKind::DataMisaligned {
                index: i as u64,
                l2_at: l2_offset,
                offset,
            });
            continue;
        }
        // With an external data file, data clusters are in that file.
        if !data_file {
            if offset + cluster_size > layout.file_len {
                // Counting clusters past the end would take memory the file does not justify,
                // and their refcounts say nothing a repair could trust.
                base.cannot_follow(|| FindingKind::DataPastEnd {
                    index: i as u64,
                    l2_at: l2_offset,
                    offset,
                    file_len: layout.file_len,
                });
                continue;
            }
            base.refs.add_weighted(offset, cluster_size, weight);
        }
        if active > 0 {
            base.stats.allocated += active;
            if base.next_contiguous != 0 && offset != base.next_contiguous {
                base.stats.fragmented += active;
            }
            base.next_contiguous = offset + cluster_size;
        }
    }
}

/// Counts the bitmaps extension: the directory (when `directory`) and the table and data
/// clusters of every bitmap `keep` selects whose table was read.
pub(crate) fn add_bitmaps(
    refs: &mut References,
    layout: &Layout,
    directory: bool,
    keep: impl Fn(usize) -> bool,
) {
    let cluster_size = layout.cluster_size();
    if directory {
        if let Some((offset, size)) = layout.directory {
            refs.add(offset, size);
        }
    }
    for (index, bitmap) in layout.bitmaps.iter().enumerate() {
        if !keep(index) || bitmap.table.is_empty() {
            continue;
        }
        refs.add(
            bitmap.entry.table_offset,
            u64::from(bitmap.entry.table_size) * 8,
        );
        for &entry in &bitmap.table {
            let data = entry & crate::qcow2::bitmap_table::ENTRY_OFFSET_MASK;
            if data != 0 {
                refs.add(data, cluster_size);
            }
        }
    }
}

/// Counts the bitmaps extension as `qemu-img check` counts it (`qcow2_check_bitmaps_refcounts`):
/// the directory, and the table and data clusters of every bitmap whose directory entry is
/// valid, trusted or not. A damaged bitmap is still listed by the directory, so its clusters are
/// not leaked, and a cluster it shares with something else is counted below its references
/// (once, however many entries point to it). Returns the corruptions this count finds by
/// itself, as QEMU counts them (a table or data cluster a cluster or more past the end of the
/// file), and, for a table with an invalid entry (a bitmap in use: QEMU rejects the others at
/// open), why `qemu-img check` fails on the image ("Check failed: Invalid argument", exit 1).
/// None of such a table's entries is counted; the bitmaps after it are.
///
/// The tables of untrusted bitmaps are read here, one distinct table at a time and at most the
/// file's length in all (tables that do not overlap fit in the file): a directory of many
/// entries pointing to one table costs one read.
pub(crate) fn add_bitmaps_as_qemu(
    io: &dyn ImageIo,
    refs: &mut References,
    layout: &Layout,
) -> Result<(u64, Option<String>), Error> {
    use crate::qcow2::bitmap_table::{decode, entry_problem, ENTRY_OFFSET_MASK};
    if layout.ext != ExtState::Valid {
        return Ok((0, None));
    }
    let cluster_size = layout.cluster_size();
    let file_len = layout.file_len;
    // QEMU's qcow2_inc_refcounts_imrt: the last cluster may be partly past the end of the file.
    let past_end = |offset: u64, len: u64| offset.saturating_add(len) >= file_len + cluster_size;
    // Counts a region; returns the corruptions (0 when counted).
    let count = |refs: &mut References, offset: u64, len: u64, weight: u32| {
        if past_end(offset, len) {
            u64::from(weight)
        } else {
            refs.add_weighted(offset, len, weight);
            0
        }
    };
    let mut corruptions = 0u64;
    if let Some((offset, size)) = layout.directory {
        corruptions += count(refs, offset, size, 1);
    }
    // Untrusted tables by (offset, entries), with how many bitmaps list each.
    let mut untrusted: BTreeMap<(u64, u32), u32> = BTreeMap::new();
    for bitmap in &layout.bitmaps {
        let entry = &bitmap.entry;
        if !bitmap.entry_valid {
            continue;
        }
        if bitmap.trusted && !bitmap.table.is_empty() {
            corruptions += count(refs, entry.table_offset, u64::from(entry.table_size) * 8, 1);
            for &data in &bitmap.table {
                let data = data & ENTRY_OFFSET_MASK;
                if data != 0 {
                    corruptions += count(refs, data, cluster_size, 1);
                }
            }
        } else {
            *untrusted
                .entry((entry.table_offset, entry.table_size))
                .or_insert(0) += 1;
        }
    }
    let mut budget = file_len;
    let mut check_fails = None;
    for ((offset, entries), weight) in untrusted {
        let bytes = u64::from(entries) * 8;
        corruptions += count(refs, offset, bytes, weight);
        // What lies past the end of the file reads as zeroes: unallocated entries.
        let within = file_len.saturating_sub(offset).min(bytes);
        if within > budget {
            return Err(Error::Corrupt(format!(
                "the bitmap tables of damaged bitmaps overlap each other too much to be counted \
                 (more bytes than the file holds); the bitmap table at {offset:#x} is one"
            )));
        }
        budget -= within;
        if within == 0 {
            continue;
        }
        let table = decode(&read_exact(io, offset, within, "a damaged bitmap's table")?);
        if let Some((i, why)) = table
            .iter()
            .enumerate()
            .find_map(|(i, &e)| entry_problem(e, cluster_size).map(|why| (i, why)))
        {
            check_fails.get_or_insert_with(|| {
                format!(
                    "QEMU opens it, but its check stops at the bitmap table at {offset:#x} of a \
                     bitmap in use, whose entry {i} ({:#x}) is invalid ({why}), and fails \
                     ('Check failed: Invalid argument')",
                    table[i]
                )
            });
            continue;
        }
        for data in table {
            let data = data & ENTRY_OFFSET_MASK;
            if data != 0 {
                corruptions += count(refs, data, cluster_size, weight);
            }
        }
    }
    Ok((corruptions, check_fails))
}

/// A cluster whose refcount differs from its references.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mismatch {
    pub cluster: u64,
    pub stored: u64,
    pub referenced: u64,
}

/// Stored refcounts against references.
pub(crate) struct Comparison {
    /// Refcount above the references.
    pub leaks: Vec<Mismatch>,
    /// Refcount below the references: corruption.
    pub under: Vec<Mismatch>,
    /// One past the highest cluster with a refcount or a reference.
    pub end_cluster: u64,
    /// Active L1 and L2 entries whose OFLAG_COPIED flag disagrees with the stored refcount.
    pub copied_wrong: u64,
    /// The same once the leaks are freed (refcounts lowered to the references).
    pub copied_wrong_after_leaks: u64,
    /// The first clusters whose entries' COPIED flag is wrong (at most `MAX_REPORTED`):
    /// cluster, stored refcount, entries.
    pub copied_examples: Vec<(u64, u64, u64)>,
}

impl Comparison {
    /// Findings for the COPIED flags that disagree with the refcounts.
    pub(crate) fn describe_copied(&self, cluster_bits: u32) -> Vec<Finding> {
        let mut out: Vec<Finding> = self
            .copied_examples
            .iter()
            .map(|&(cluster, refcount, entries)| {
                Finding::new(
                    Severity::Error,
                    Subject::Clusters {
                        first: cluster,
                        count: 1,
                    },
                    FindingKind::CopiedFlag {
                        at: cluster << cluster_bits,
                        entries,
                        refcount,
                    },
                )
            })
            .collect();
        let listed: u64 = self.copied_examples.iter().map(|e| e.2).sum();
        if self.copied_wrong > listed {
            out.push(Finding::structure(FindingKind::More {
                count: self.copied_wrong - listed,
                of: MoreOf::CopiedFlags,
            }));
        }
        out
    }
}

pub(crate) fn compare(
    io: &dyn ImageIo,
    refcounts: &Refcounts,
    refs: &References,
    copied: &CopiedFlags,
) -> Result<Comparison, Error> {
    let mut out = Comparison {
        leaks: Vec::new(),
        under: Vec::new(),
        end_cluster: 0,
        copied_wrong: copied.always_wrong,
        copied_wrong_after_leaks: copied.always_wrong,
        copied_examples: Vec::new(),
    };
    let check_copied = !copied.is_empty();
    let note_copied = |out: &mut Comparison, cluster: u64, stored: u64, referenced: u64| {
        let wrong = copied.wrong(cluster, stored);
        if wrong > 0 {
            out.copied_wrong += wrong;
            if out.copied_examples.len() < MAX_REPORTED {
                out.copied_examples.push((cluster, stored, wrong));
            }
        }
        // Freeing leaks lowers a refcount to the references; nothing else changes.
        out.copied_wrong_after_leaks += copied.wrong(cluster, stored.min(referenced));
    };
    let per_block = refcounts.per_block();
    let order = refcounts.order();
    let blocks: Vec<usize> = refcounts.blocks().map(|(index, _)| index).collect();
    // As qemu-img check: the clusters of the file and those referenced past its end. A refcount
    // past both says nothing about the image (no structure is there), so it is neither a leak
    // nor a reason to move the image's end.
    let limit = refs.limit();
    for index in blocks {
        let first = index as u64 * per_block;
        let end = (first + per_block).min(limit);
        if first >= end {
            continue;
        }
        // One block at a time, not cached: the walk's memory is the references', not a second
        // copy of every refcount.
        let block = refcounts.peek_block(io, index)?;
        for cluster in first..end {
            let stored = get_entry(&block, (cluster - first) as usize, order);
            let referenced = refs.get(cluster);
            if stored != 0 || referenced != 0 {
                out.end_cluster = out.end_cluster.max(cluster + 1);
            }
            if check_copied && referenced != 0 {
                note_copied(&mut out, cluster, stored, referenced);
            }
            let mismatch = Mismatch {
                cluster,
                stored,
                referenced,
            };
            if stored > referenced {
                out.leaks.push(mismatch);
            } else if stored < referenced {
                out.under.push(mismatch);
            }
        }
    }
    // Referenced clusters without a refcount block: refcount 0.
    for cluster in refs.referenced() {
        if !refcounts.has_block(cluster) {
            out.end_cluster = out.end_cluster.max(cluster + 1);
            let referenced = refs.get(cluster);
            if check_copied {
                note_copied(&mut out, cluster, 0, referenced);
            }
            out.under.push(Mismatch {
                cluster,
                stored: 0,
                referenced,
            });
        }
    }
    out.under.sort_by_key(|m| m.cluster);
    Ok(out)
}

/// Findings for leaked clusters, one per run of consecutive ones (at most `MAX_REPORTED`).
pub(crate) fn describe_leaks(leaks: &[Mismatch], cluster_bits: u32) -> Vec<Finding> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for leak in leaks {
        match runs.last_mut() {
            Some((_, end)) if *end == leak.cluster => *end += 1,
            _ => runs.push((leak.cluster, leak.cluster + 1)),
        }
    }
    let mut out: Vec<Finding> = runs
        .iter()
        .take(MAX_REPORTED)
        .map(|&(start, end)| {
            Finding::new(
                Severity::Leak,
                Subject::Clusters {
                    first: start,
                    count: end - start,
                },
                FindingKind::Leak {
                    at: start << cluster_bits,
                    end: end << cluster_bits,
                },
            )
        })
        .collect();
    if runs.len() > MAX_REPORTED {
        out.push(Finding::new(
            Severity::Leak,
            Subject::Structure,
            FindingKind::More {
                count: (runs.len() - MAX_REPORTED) as u64,
                of: MoreOf::LeakRuns,
            },
        ));
    }
    out
}

/// Findings for clusters whose refcount is below their references, naming what uses each
/// cluster when it is metadata.
pub(crate) fn describe_under(under: &[Mismatch], layout: &Layout) -> Vec<Finding> {
    let cluster_bits = layout.header.cluster_bits;
    let regions = layout.regions();
    let mut out: Vec<Finding> = under
        .iter()
        .take(MAX_REPORTED)
        .map(|m| {
            let at = m.cluster << cluster_bits;
            let place = regions
                .iter()
                .find(|r| r.start <= at && at < r.end)
                .map(|r| place(r, &layout.bitmaps));
            Finding::new(
                Severity::Error,
                Subject::Clusters {
                    first: m.cluster,
                    count: 1,
                },
                FindingKind::RefcountBelowReferences {
                    at,
                    place,
                    stored: m.stored,
                    referenced: m.referenced,
                },
            )
        })
        .collect();
    if under.len() > MAX_REPORTED {
        out.push(Finding::structure(FindingKind::More {
            count: (under.len() - MAX_REPORTED) as u64,
            of: MoreOf::RefcountsBelowReferences,
        }));
    }
    out
}

/// Why the image as a whole cannot be repaired by this library, if it cannot.
/// (An image with the dirty bit, whose refcounts are not maintained, is not refused here:
/// `All` rebuilds its refcounts, `Leaks` refuses it.)
pub(crate) fn refusal(layout: &Layout, structural: &[Finding], base: &Base) -> Option<String> {
    let header = &layout.header;
    if header.incompatible & INCOMPAT_CORRUPT != 0 {
        return Some(
            "the image is marked corrupt: QEMU found damage beyond the bitmaps; use 'qemu-img \
             check -r all'"
                .into(),
        );
    }
    if header.version < 3 {
        return Some(
            "qcow2 version 2 images are not repaired by this tool; use 'qemu-img check -r'".into(),
        );
    }
    if let Some(first) = structural.first() {
        return Some(format!(
            "metadata other than the bitmaps is damaged, so the clusters it uses are not known \
             completely: {first}{}",
            more(structural.len())
        ));
    }
    if let Some(first) = base.unmapped.first() {
        return Some(format!(
            "the guest data map cannot be followed completely: {first}{}",
            more(base.unmapped.len())
        ));
    }
    None
}

fn more(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::References;

    #[test]
    fn counts_past_16_bits_are_exact() {
        let mut refs = References::new(4 << 16, 16);
        refs.add_weighted(0, 1, u32::from(u16::MAX) - 1);
        assert_eq!(refs.get(0), u64::from(u16::MAX) - 1);
        refs.add(0, 1);
        assert_eq!(refs.get(0), u64::from(u16::MAX));
        refs.add_weighted(0, 1, 10);
        assert_eq!(refs.get(0), u64::from(u16::MAX) + 10);
        refs.add_weighted(1 << 16, 3 << 16, 70_000);
        assert_eq!(refs.get(3), 70_000);
        assert_eq!(refs.get(2), 70_000);
        assert_eq!(refs.get(1), 70_000);
        refs.add(10 << 16, 1);
        assert_eq!(refs.get(10), 1);
        assert_eq!(refs.referenced().collect::<Vec<_>>(), [0, 1, 2, 3, 10]);
    }
}
