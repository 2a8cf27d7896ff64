// SPDX-License-Identifier: GPL-2.0-or-later

//! Reference counting over the whole image, as `qemu-img check` does it, and the repairs of
//! `check -r leaks|all`.
//!
//! Every structure is walked and every reference to a cluster counted: the header, the L1
//! tables of the active disk and of every snapshot, each L2 table once per L1 entry pointing to
//! it and each data cluster (normal, zero with an allocation, every cluster a compressed one
//! touches) once per L2 entry, the snapshot table, the refcount table and blocks, the encryption
//! header, and the bitmap directory, tables and data clusters. A cluster whose stored refcount
//! is above that count is leaked; below, the image is corrupt.
//!
//! A repair lowers refcounts only to the count of a complete walk, so it never frees a
//! referenced cluster; where the walk cannot be complete (damaged metadata other than the
//! bitmaps', a dirty or corrupt image) it refuses and says why. `All` first removes the bitmaps
//! that cannot be trusted in one header switch to a new directory (the crash-safe path of every
//! bitmap change), then walks the image again and frees what only they used.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::Error;
use super::header::{be64, read_exact, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::io::ImageIo;
use super::layout::ExtState;
use super::layout::{
    describe, Layout, Owner, INCOMPAT_DATA_FILE, INCOMPAT_EXTENDED_L2, L1_OFFSET_MASK,
    L1_RESERVED_MASK, L2_COMPRESSED, L2_OFFSET_MASK, L2_STD_RESERVED_MASK, L2_ZERO, MAX_REPORTED,
    OFLAG_COPIED,
};
use super::refcount::Refcounts;
use super::{clusters_of, layout, FileIo, Image, ImageLock, RepairMode, RepairReport};

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
    pub unmapped: Vec<String>,
    unmapped_count: u64,
    /// L1 and L2 entries that can be followed but break the format (reserved bits set, a
    /// compressed cluster marked COPIED...): each a corruption, as `qemu-img check` counts them
    /// (an L2 table once per L1 entry pointing to it).
    pub bad_entries: u64,
    /// Messages for `bad_entries` (at most `MAX_REPORTED`, then one summing up the rest).
    pub bad_entry_messages: Vec<String>,
    /// The COPIED flags of the active disk, to compare with the refcounts.
    pub copied: CopiedFlags,
    /// Where the next guest cluster of the current L2 table would be if it were contiguous.
    next_contiguous: u64,
}

/// Counts the references of everything but the bitmaps extension.
pub(crate) fn count_base(io: &dyn ImageIo, layout: &Layout) -> Result<Base, Error> {
    let header = &layout.header;
    let cluster_size = layout.cluster_size();
    let mut base = Base {
        refs: References::new(layout.file_len, header.cluster_bits),
        stats: GuestStats::default(),
        unmapped: Vec::new(),
        unmapped_count: 0,
        bad_entries: 0,
        bad_entry_messages: Vec::new(),
        copied: CopiedFlags::new(layout.file_len.div_ceil(cluster_size)),
        next_contiguous: 0,
    };
    base.refs.add(0, cluster_size);
    // Each L2 table counts once per L1 entry pointing to it, and so does every data cluster in
    // it (QEMU's check walks it again for each). It is read once here, its references weighted:
    // a hostile L1 table of 4 Mi entries all pointing to one L2 table costs one read.
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
    for l2 in &l2_tables.order {
        let (weight, active) = l2_tables.weights[l2];
        scan_l2(io, layout, *l2, weight, active, &mut base)?;
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
        base.unmapped.push(format!(
            "... and {more} more entries that cannot be followed"
        ));
    }
    if base.bad_entries > MAX_REPORTED as u64 {
        let more = base.bad_entries - MAX_REPORTED as u64;
        base.bad_entry_messages
            .push(format!("... and {more} more malformed L1 or L2 entries"));
    }
    Ok(base)
}

impl Base {
    fn cannot_follow(&mut self, message: impl FnOnce() -> String) {
        self.unmapped_count += 1;
        if self.unmapped_count <= MAX_REPORTED as u64 {
            self.unmapped.push(message());
        }
    }

    /// Counts a malformed entry `weight` times (once per L1 entry leading to it).
    fn bad_entry(&mut self, weight: u32, message: impl FnOnce() -> String) {
        let before = self.bad_entries;
        self.bad_entries += u64::from(weight);
        if before < MAX_REPORTED as u64 {
            self.bad_entry_messages.push(message());
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
                base.bad_entry(1, || {
                    format!(
                        "L1 table entry {index} of {} ({entry:#x}) has reserved bits set",
                        disk_name(snapshot)
                    )
                });
            }
            if l2_offset == 0 {
                if entry & !L1_RESERVED_MASK != 0 {
                    // QEMU would read the header cluster as this entry's L2 table.
                    base.cannot_follow(|| {
                        format!(
                            "L1 table entry {index} of {} ({entry:#x}) has flags but no L2 \
                             table offset",
                            disk_name(snapshot)
                        )
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
                base.cannot_follow(|| {
                    format!(
                    "L1 table entry {index} of {} points to an L2 table at {l2_offset:#x} that \
                     is misaligned or past the end of the file",
                    disk_name(snapshot)
                )
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

fn disk_name(snapshot: Option<u64>) -> String {
    match snapshot {
        None => "the active disk".to_string(),
        Some(index) => format!("snapshot {index}"),
    }
}

/// Counts an L2 table and its data clusters `weight` times (the statistics `active` times).
fn scan_l2(
    io: &dyn ImageIo,
    layout: &Layout,
    l2_offset: u64,
    weight: u32,
    active: u32,
    base: &mut Base,
) -> Result<(), Error> {
    let header = &layout.header;
    let cluster_bits = header.cluster_bits;
    let cluster_size = layout.cluster_size();
    let data_file = header.incompatible & INCOMPAT_DATA_FILE != 0;
    let entry_bytes = if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
        16
    } else {
        8
    };
    let offset_bits = 62 - (cluster_bits - 8);
    let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
    let active = u64::from(active);
    // As QEMU 10 counts it: contiguity within one L2 table.
    base.next_contiguous = 0;
    base.refs.add_weighted(l2_offset, cluster_size, weight);
    let table = read_exact(io, l2_offset, cluster_size, "an L2 table")?;
    let active_entries = active as u32;
    for (i, raw) in table.chunks_exact(entry_bytes).enumerate() {
        let entry = be64(raw, 0);
        let subclusters = if entry_bytes == 16 { be64(raw, 8) } else { 0 };
        if entry & L2_COMPRESSED == 0 && entry & L2_STD_RESERVED_MASK != 0 {
            base.bad_entry(weight, || {
                format!("entry {i} of the L2 table at {l2_offset:#x} ({entry:#x}) has reserved bits set")
            });
        }
        if entry & L2_COMPRESSED != 0 {
            if entry & OFLAG_COPIED != 0 {
                base.bad_entry(weight, || {
                    format!(
                        "entry {i} of the L2 table at {l2_offset:#x} ({entry:#x}) is a \
                         compressed cluster marked COPIED, which compressed clusters never are"
                    )
                });
            }
            if subclusters != 0 && !data_file {
                base.bad_entry(weight, || {
                    format!(
                        "entry {i} of the L2 table at {l2_offset:#x} is a compressed cluster \
                         with a non-zero subcluster allocation bitmap ({subclusters:#x})"
                    )
                });
                continue;
            }
            if data_file {
                base.cannot_follow(|| {
                    format!(
                    "the L2 table at {l2_offset:#x} has a compressed cluster in entry {i}, which \
                     an image with an external data file cannot have"
                )
                });
                continue;
            }
            let offset = entry & ((1u64 << offset_bits) - 1);
            let sectors = ((entry >> offset_bits) & sectors_mask) + 1;
            let size = sectors * 512 - (offset & 511);
            // The last sector of compressed data may lie past the end of the file (QEMU does
            // not pad it); its first byte may not.
            if offset >= layout.file_len {
                base.cannot_follow(|| {
                    format!(
                        "entry {i} of the L2 table at {l2_offset:#x} points to compressed data at \
                         {offset:#x}, past the end of the file ({} bytes)",
                        layout.file_len
                    )
                });
                continue;
            }
            base.refs.add_weighted(offset, size, weight);
            base.stats.allocated += active;
            base.stats.compressed += active;
            base.stats.fragmented += active;
            continue;
        }
        let offset = entry & L2_OFFSET_MASK;
        // Offset 0 is unallocated, except in an external data file, where COPIED marks guest
        // cluster data at the data file's offset 0 (a plain zero cluster is still unallocated).
        let zero_plain = entry & L2_ZERO != 0 && entry_bytes == 8;
        let copied = entry & OFLAG_COPIED != 0;
        if offset == 0 && !(data_file && copied && !zero_plain) {
            if entry_bytes == 16 && subclusters & 0xffff_ffff != 0 {
                base.bad_entry(weight, || {
                    format!(
                        "entry {i} of the L2 table at {l2_offset:#x} is unallocated but its \
                         subcluster bitmap ({subclusters:#x}) marks subclusters allocated"
                    )
                });
            }
            continue;
        }
        if entry_bytes == 16 && (subclusters >> 32) & subclusters != 0 {
            base.bad_entry(weight, || {
                format!(
                    "entry {i} of the L2 table at {l2_offset:#x} has a subcluster bitmap \
                     ({subclusters:#x}) marking subclusters both allocated and zero"
                )
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
            base.cannot_follow(|| {
                format!(
                    "entry {i} of the L2 table at {l2_offset:#x} points to a data cluster at \
                 {offset:#x} that is not cluster-aligned"
                )
            });
            continue;
        }
        // With an external data file, data clusters are in that file.
        if !data_file {
            if offset + cluster_size > layout.file_len {
                // Counting clusters past the end would take memory the file does not justify,
                // and their refcounts say nothing a repair could trust.
                base.cannot_follow(|| {
                    format!(
                        "entry {i} of the L2 table at {l2_offset:#x} points to a data cluster at \
                         {offset:#x}, past the end of the file ({} bytes)",
                        layout.file_len
                    )
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
    Ok(())
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
            let data = entry & super::bitmap_table::ENTRY_OFFSET_MASK;
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
    use super::bitmap_table::{decode, entry_problem, ENTRY_OFFSET_MASK};
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
    /// Messages for the COPIED flags that disagree with the refcounts.
    pub(crate) fn describe_copied(&self, cluster_bits: u32) -> Vec<String> {
        let mut out: Vec<String> = self
            .copied_examples
            .iter()
            .map(|&(cluster, refcount, entries)| {
                format!(
                    "{entries} entr{} of the active disk for the cluster at {:#x} {} the COPIED \
                     flag {}, but its refcount is {refcount}",
                    if entries == 1 { "y" } else { "ies" },
                    cluster << cluster_bits,
                    if entries == 1 { "has" } else { "have" },
                    if refcount == 1 { "clear" } else { "set" },
                )
            })
            .collect();
        let listed: u64 = self.copied_examples.iter().map(|e| e.2).sum();
        if self.copied_wrong > listed {
            out.push(format!(
                "... and {} more entries whose COPIED flag disagrees with the refcount",
                self.copied_wrong - listed
            ));
        }
        out
    }
}

pub(crate) fn compare(
    io: &dyn ImageIo,
    refcounts: &mut Refcounts,
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
    let blocks: Vec<usize> = refcounts.blocks().map(|(index, _)| index).collect();
    // As qemu-img check: the clusters of the file and those referenced past its end. A refcount
    // past both says nothing about the image (no structure is there), so it is neither a leak
    // nor a reason to move the image's end.
    let limit = refs.limit();
    for index in blocks {
        let first = index as u64 * per_block;
        for cluster in first..(first + per_block).min(limit) {
            let stored = refcounts.get(io, cluster)?;
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

/// Messages for leaked clusters, one per run of consecutive ones (at most `MAX_REPORTED`).
pub(crate) fn describe_leaks(leaks: &[Mismatch], cluster_bits: u32) -> Vec<String> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for leak in leaks {
        match runs.last_mut() {
            Some((_, end)) if *end == leak.cluster => *end += 1,
            _ => runs.push((leak.cluster, leak.cluster + 1)),
        }
    }
    let mut out: Vec<String> = runs
        .iter()
        .take(MAX_REPORTED)
        .map(|&(start, end)| {
            let count = end - start;
            format!(
                "{count} leaked cluster{} at {:#x}..{:#x}: refcount above the references",
                if count == 1 { "" } else { "s" },
                start << cluster_bits,
                end << cluster_bits
            )
        })
        .collect();
    if runs.len() > MAX_REPORTED {
        out.push(format!(
            "... and {} more runs of leaked clusters",
            runs.len() - MAX_REPORTED
        ));
    }
    out
}

/// Messages for clusters whose refcount is below their references, naming what uses each
/// cluster when it is metadata.
pub(crate) fn describe_under(under: &[Mismatch], layout: &Layout) -> Vec<String> {
    let cluster_bits = layout.header.cluster_bits;
    let regions = layout.regions();
    let mut out: Vec<String> = under
        .iter()
        .take(MAX_REPORTED)
        .map(|m| {
            let at = m.cluster << cluster_bits;
            let owner = regions
                .iter()
                .find(|r| r.start <= at && at < r.end)
                .map(|r| format!(" ({})", describe(r, &layout.bitmaps)))
                .unwrap_or_default();
            format!(
                "the cluster at {at:#x}{owner} has refcount {} but {} reference{}: it could be \
                 handed out while in use",
                m.stored,
                m.referenced,
                if m.referenced == 1 { "" } else { "s" }
            )
        })
        .collect();
    if under.len() > MAX_REPORTED {
        out.push(format!(
            "... and {} more clusters whose refcount is below their references",
            under.len() - MAX_REPORTED
        ));
    }
    out
}

/// Why the image as a whole cannot be repaired by this library, if it cannot.
/// (An image with the dirty bit, whose refcounts are not maintained, is not refused here:
/// `All` rebuilds its refcounts, `Leaks` refuses it.)
pub(crate) fn refusal(layout: &Layout, structural: &[String], base: &Base) -> Option<String> {
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

/// The repairs of an image, through the same writing machinery as every bitmap change.
impl Image {
    /// Repairs an image as `qemu-img check -r` does (see [`RepairMode`]), holding QEMU's write
    /// lock. Also for images too damaged to open: every change is named in the report.
    /// Refused ([`Error::Unsupported`], nothing written) when the clusters in use cannot be
    /// known completely: damaged metadata other than the bitmaps', a dirty or corrupt image, a
    /// version 2 image, clusters other than the bitmaps' counted below their references, or (for
    /// [`RepairMode::Leaks`]) damaged bitmaps.
    ///
    /// Crash-consistent: bitmaps are removed by the one header switch of every bitmap change,
    /// and refcounts are only ever lowered to the references a complete walk found, so an
    /// interruption at any write leaves the image as it was, repaired, or with fewer leaks.
    pub fn repair_file(path: impl AsRef<Path>, mode: RepairMode) -> Result<RepairReport, Error> {
        let path = path.as_ref();
        let lock = ImageLock::acquire(path, true)?;
        let file = super::io::open_file(path, super::io::Access::Write)?;
        Image::repair_with(
            path.to_path_buf(),
            Box::new(FileIo::new(file)),
            Some(lock),
            mode,
        )
    }

    /// [`repair_file`](Self::repair_file) through any [`ImageIo`] (no locking): for fault
    /// injection in tests.
    pub fn repair_io(
        io: Box<dyn ImageIo>,
        path: impl Into<PathBuf>,
        mode: RepairMode,
    ) -> Result<RepairReport, Error> {
        Image::repair_with(path.into(), io, None, mode)
    }

    fn repair_with(
        path: PathBuf,
        io: Box<dyn ImageIo>,
        lock: Option<ImageLock>,
        mode: RepairMode,
    ) -> Result<RepairReport, Error> {
        let (layout, _) = layout::read(&*io)?;
        let mut image = Image {
            path,
            io,
            _lock: lock,
            writable: true,
            layout,
            infos: Vec::new(),
            warnings: Vec::new(),
            poisoned: None,
            pending: Vec::new(),
            header_attempted: false,
            tracked: Vec::new(),
        };
        image.refresh_infos();
        let report = image.repair_in_place(mode)?;
        image.close()?;
        Ok(report)
    }

    /// Repairs this image, open for writing (see [`repair_file`](Self::repair_file)). The
    /// bitmaps this handle loaded and marks in use are in use for a reason: they stay.
    pub fn repair(&mut self, mode: RepairMode) -> Result<RepairReport, Error> {
        self.ensure_writable()?;
        self.repair_in_place(mode)
    }

    fn repair_in_place(&mut self, mode: RepairMode) -> Result<RepairReport, Error> {
        const IN_USE_REASON: &str = "marked in use";
        self.ensure_writable()?;
        let before = Self::check_io(&*self.io);
        let refuse = |image: &Image, why: String| {
            Error::Unsupported(format!(
                "refusing to repair {}: {why}",
                image.path.display()
            ))
        };
        let mut rebuilt = Vec::new();
        if self.layout.header.incompatible & INCOMPAT_DIRTY != 0 {
            if mode == RepairMode::Leaks {
                return Err(refuse(
                    self,
                    "the image has the dirty bit set: its refcounts are not maintained (lazy \
                     refcounts), so leaks cannot be told from clusters not counted yet; '-r all' \
                     rebuilds them"
                        .into(),
                ));
            }
            self.write_op(|image| image.rebuild_refcounts(&mut rebuilt))?;
        }
        // What the rebuild fixed: every refcount it made right.
        let after_rebuild = (!rebuilt.is_empty()).then(|| Self::check_io(&*self.io));
        let (layout, problems) = layout::read(&*self.io)?;
        let base = count_base(&*self.io, &layout)?;
        let structural: Vec<String> = problems.structural_errors().cloned().collect();
        if let Some(why) = refusal(&layout, &structural, &base) {
            return Err(refuse(self, why));
        }
        self.layout = layout;
        self.refresh_infos();
        let cluster_bits = self.layout.header.cluster_bits;
        let cluster_size = self.cluster_size();
        let ext = self.layout.ext;
        // Why each bitmap goes (None: it stays).
        let mut removal: Vec<Option<String>> = self
            .layout
            .bitmaps
            .iter()
            .map(|b| {
                if !b.trusted {
                    Some(format!(
                        "damaged: {}",
                        b.damage
                            .as_deref()
                            .unwrap_or("its entry or table is invalid")
                    ))
                } else if mode == RepairMode::All
                    && b.entry.in_use()
                    && !self.tracked.contains(&b.entry.name)
                {
                    Some(format!(
                        "{IN_USE_REASON}: it was not saved properly, so its content cannot be \
                         trusted"
                    ))
                } else {
                    None
                }
            })
            .collect();
        let mut directory_problem = match ext {
            ExtState::Broken => Some(format!(
                "the bitmaps extension is unreadable ({}); dropped it with every bitmap it listed",
                problems
                    .errors
                    .get(problems.bitmap_errors.start)
                    .cloned()
                    .unwrap_or_default()
            )),
            ExtState::Stale => Some(
                "dropped the stale bitmaps extension (autoclear bit 0 was clear: a program \
                 without bitmap support modified the image, so its bitmaps were void)"
                    .into(),
            ),
            _ if self.layout.directory_damaged => Some(format!(
                "the bitmap directory at {:#x} shares clusters with other data; wrote a new one",
                self.layout.directory.map_or(0, |d| d.0)
            )),
            _ => self
                .layout
                .ext_damage
                .as_ref()
                .map(|why| format!("{why}; wrote the extension and the directory anew")),
        };
        if mode == RepairMode::Leaks {
            if let Some(why) = removal.iter().flatten().next() {
                return Err(refuse(
                    self,
                    format!("a bitmap is {why}; its clusters are not known ('-r all' removes it)"),
                ));
            }
            if ext == ExtState::Broken
                || self.layout.directory_damaged
                || self.layout.ext_damage.is_some()
            {
                return Err(refuse(
                    self,
                    "the bitmaps extension is damaged; its clusters are not known ('-r all' \
                     drops it)"
                        .into(),
                ));
            }
        }
        // A bitmap or directory cluster counted below its references may have been handed out
        // for something else: that bitmap (or the directory) cannot be trusted either.
        // The base count is used once as it is; only a retry (rare) counts it again, which
        // keeps one copy of the per-cluster counts in memory.
        let mut base_refs = Some(base.refs);
        // Clusters of one intact bitmap that nothing counted (refcount 0): `All` counts them,
        // as qemu-img check -r all does, rather than dropping the bitmap.
        let mut uncounted: Vec<u64> = Vec::new();
        loop {
            let mut refs = match base_refs.take() {
                Some(refs) => refs,
                None => count_base(&*self.io, &self.layout)?.refs,
            };
            let count_directory = ext == ExtState::Valid && directory_problem.is_none();
            add_bitmaps(&mut refs, &self.layout, count_directory, |i| {
                removal[i].is_none()
            });
            let mut comparison = compare(
                &*self.io,
                &mut self.layout.refcounts,
                &refs,
                &CopiedFlags::default(),
            )?;
            comparison
                .under
                .retain(|m| uncounted.binary_search(&m.cluster).is_err());
            let Some(first) = comparison.under.first() else {
                break;
            };
            // Which kept bitmaps use each cluster: one map, not a scan per mismatch.
            let mut users: std::collections::HashMap<u64, Vec<usize>> =
                std::collections::HashMap::new();
            for (index, bitmap) in self.layout.bitmaps.iter().enumerate() {
                if removal[index].is_some() {
                    continue;
                }
                for (offset, len) in clusters_of(bitmap, cluster_size) {
                    let last = (offset + len.max(1) - 1) >> cluster_bits;
                    for cluster in (offset >> cluster_bits)..=last {
                        users.entry(cluster).or_default().push(index);
                    }
                }
            }
            let mut blamed = false;
            for mismatch in &comparison.under {
                let at = mismatch.cluster << cluster_bits;
                let why = format!(
                    "its cluster at {at:#x} has refcount {} but {} references",
                    mismatch.stored, mismatch.referenced
                );
                if count_directory {
                    let (offset, size) = self.layout.directory.unwrap_or((0, 0));
                    if at + cluster_size > offset && at < offset + size {
                        directory_problem = Some(format!(
                            "the bitmap directory at {offset:#x} was counted wrong ({why}); \
                             wrote a new one"
                        ));
                        blamed = true;
                    }
                }
                let users = users.get(&mismatch.cluster).map_or(&[][..], Vec::as_slice);
                // Kept bitmaps never share a cluster with anything (that is a cross-link, and
                // they would not be kept): one user, counted nowhere, is that bitmap's alone.
                if let [_] = users {
                    if mode == RepairMode::All
                        && mismatch.stored == 0
                        && mismatch.referenced == 1
                        && self.layout.refcounts.has_block(mismatch.cluster)
                    {
                        uncounted.push(mismatch.cluster);
                        blamed = true;
                        continue;
                    }
                }
                for &index in users {
                    if removal[index].is_none() {
                        removal[index] = Some(format!("counted wrong: {why}"));
                    }
                    blamed = true;
                }
            }
            uncounted.sort_unstable();
            if !blamed || mode == RepairMode::Leaks {
                return Err(refuse(
                    self,
                    format!(
                        "{}{}; raising refcounts is left to 'qemu-img check -r all'",
                        describe_under(std::slice::from_ref(first), &self.layout)[0],
                        if comparison.under.len() > 1 {
                            format!(" (and {} more such clusters)", comparison.under.len() - 1)
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }

        let mut report = RepairReport {
            changes: rebuilt,
            ..RepairReport::default()
        };
        if let Some(after) = after_rebuild {
            report.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
            report.leaks_fixed = before.leaks.saturating_sub(after.leaks);
        }
        report.before = before;
        if !uncounted.is_empty() {
            let raised = self.write_op(|image| {
                for &cluster in &uncounted {
                    image.layout.refcounts.raise_to_one(&*image.io, cluster)?;
                }
                image.layout.refcounts.write_dirty(&mut *image.io)?;
                image.flush("flushing the raised refcounts")
            });
            if let Err(error) = raised {
                self.reload(error.to_string());
                return Err(error);
            }
            report.corruptions_fixed += uncounted.len() as u64;
            let count = uncounted.len();
            report.changes.push(format!(
                "counted {count} cluster{} of intact bitmaps that had refcount 0 (raised to 1):",
                if count == 1 { "" } else { "s" }
            ));
            report.changes.extend(
                uncounted
                    .iter()
                    .take(MAX_REPORTED)
                    .map(|&cluster| format!("  the cluster at {:#x}", cluster << cluster_bits)),
            );
        }
        let removing = removal.iter().any(Option::is_some);
        if removing || directory_problem.is_some() {
            let mut kept = Vec::new();
            for (bitmap, why) in self.layout.bitmaps.iter().zip(&removal) {
                match why {
                    None => kept.push(bitmap.clone()),
                    Some(why) => report
                        .changes
                        .push(format!("removed bitmap '{}': {why}", bitmap.name())),
                }
            }
            let kept_count = kept.len();
            // Until the header switch the old directory still lists the removed bitmaps: the
            // new directory must not land on a cluster they point to, counted or not.
            let cluster_size = self.cluster_size();
            let file_len = self.layout.file_len;
            let mut untouchable: Vec<(u64, u64)> = self.layout.directory.into_iter().collect();
            for (bitmap, why) in self.layout.bitmaps.iter().zip(&removal) {
                if why.is_some() {
                    untouchable.push((
                        bitmap.entry.table_offset,
                        u64::from(bitmap.entry.table_size) * 8,
                    ));
                    untouchable.extend(clusters_of(bitmap, cluster_size));
                }
            }
            // Only what lies in the file: a damaged entry may point anywhere.
            let untouchable: Vec<(u64, u64)> = untouchable
                .into_iter()
                .filter(|&(offset, _)| offset < file_len)
                .map(|(offset, len)| (offset, len.min(file_len - offset)))
                .collect();
            self.layout.refcounts.reserve(&untouchable);
            // Nothing is freed here: the walk below frees what nothing references any more.
            self.write_op(|image| image.commit_with(kept, Vec::new(), false))?;
            // A bitmap in use is a state, not damage: its removal is a change, not a fix.
            report.corruptions_fixed += removal
                .iter()
                .flatten()
                .filter(|why| !why.starts_with(IN_USE_REASON))
                .count() as u64;
            if let Some(change) = directory_problem {
                report.corruptions_fixed += u64::from(ext != ExtState::Stale);
                report.changes.push(change);
            }
            report.changes.push(match self.layout.directory {
                Some((offset, _)) => format!(
                    "wrote a new bitmap directory at {offset:#x} listing the {kept_count} \
                     bitmap{} kept",
                    if kept_count == 1 { "" } else { "s" }
                ),
                None => "the image has no bitmaps extension any more".into(),
            });
        }
        let ignored = self.layout.header.ignored_bitmaps_exts.len();
        if ignored > 0 {
            // No new directory was written (that would have dropped them): the header alone.
            self.write_op(|image| {
                let ext = image.current_ext();
                image.write_header(ext, image.layout.header.autoclear)
            })?;
            report.changes.push(format!(
                "dropped {ignored} bitmaps extension{} that QEMU ignores (only the last counts)",
                if ignored == 1 { "" } else { "s" }
            ));
        }
        let fixed = self.fix_leaks(&mut report.changes);
        if let Err(error) = &fixed {
            self.reload(error.to_string());
        }
        report.leaks_fixed += fixed?;
        self.refresh_infos();
        report.after = Self::check_io(&*self.io);
        // As qemu-img: COPIED flags are fixed against the repaired refcounts, by '-r leaks' only
        // where nothing else is wrong (the refcounts are then known to be right).
        let after = &report.after;
        if after.copied_flag_errors > 0
            && after.check_errors == 0
            && (mode == RepairMode::All
                || (after.leaks == 0 && after.corruptions == after.copied_flag_errors))
        {
            let fixed = self.fix_copied_flags(&mut report.changes);
            if let Err(error) = &fixed {
                self.reload(error.to_string());
            }
            report.corruptions_fixed += fixed?;
            report.after = Self::check_io(&*self.io);
        }
        self.warnings = report.after.warnings.clone();
        Ok(report)
    }

    /// Sets the OFLAG_COPIED flag of every active L1 and L2 entry whose cluster has refcount 1
    /// and clears it elsewhere, as `qemu-img check -r` does; returns how many entries it
    /// changed. Each entry is one 8-byte write, valid whether or not it lands.
    fn fix_copied_flags(&mut self, changes: &mut Vec<String>) -> Result<u64, Error> {
        let header = self.layout.header.clone();
        let cluster_bits = header.cluster_bits;
        let cluster_size = self.cluster_size();
        let file_len = self.layout.file_len;
        let data_file = header.incompatible & INCOMPAT_DATA_FILE != 0;
        let entry_bytes = if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            16
        } else {
            8
        };
        let with_flag = |entry: u64, copied: bool| {
            if copied {
                entry | OFLAG_COPIED
            } else {
                entry & !OFLAG_COPIED
            }
        };
        let l1 = read_exact(
            &*self.io,
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            "the L1 table",
        )?;
        let (mut l1_fixed, mut l2_fixed) = (0u64, 0u64);
        for (index, chunk) in l1.chunks_exact(8).enumerate() {
            let entry = be64(chunk, 0);
            let l2_offset = entry & L1_OFFSET_MASK;
            if l2_offset == 0
                || l2_offset % cluster_size != 0
                || l2_offset + cluster_size > file_len
            {
                continue;
            }
            let refcount = self
                .layout
                .refcounts
                .get(&*self.io, l2_offset >> cluster_bits)?;
            if (refcount == 1) != (entry & OFLAG_COPIED != 0) {
                let at = header.l1_table_offset + 8 * index as u64;
                let fixed = with_flag(entry, refcount == 1);
                self.write(at, &fixed.to_be_bytes(), "an L1 table entry")?;
                l1_fixed += 1;
            }
            let table = read_exact(&*self.io, l2_offset, cluster_size, "an L2 table")?;
            for (i, raw) in table.chunks_exact(entry_bytes).enumerate() {
                let entry = be64(raw, 0);
                if entry & L2_COMPRESSED != 0 {
                    continue;
                }
                let offset = entry & L2_OFFSET_MASK;
                let copied = entry & OFLAG_COPIED != 0;
                let zero_plain = entry & L2_ZERO != 0 && entry_bytes == 8;
                if offset == 0 && !(data_file && copied && !zero_plain) {
                    continue;
                }
                let refcount = if data_file {
                    1
                } else if offset % cluster_size == 0 && offset + cluster_size <= file_len {
                    self.layout
                        .refcounts
                        .get(&*self.io, offset >> cluster_bits)?
                } else {
                    continue;
                };
                if (refcount == 1) != copied {
                    let at = l2_offset + (i * entry_bytes) as u64;
                    let fixed = with_flag(entry, refcount == 1);
                    self.write(at, &fixed.to_be_bytes(), "an L2 table entry")?;
                    l2_fixed += 1;
                }
            }
        }
        if l1_fixed + l2_fixed == 0 {
            return Ok(0);
        }
        self.flush("flushing the repaired COPIED flags")?;
        changes.push(format!(
            "set or cleared the COPIED flag of {l1_fixed} L1 and {l2_fixed} L2 entries of the \
             active disk to match their clusters' refcounts"
        ));
        Ok(l1_fixed + l2_fixed)
    }

    /// Walks the image again and lowers every refcount above its references; returns how many
    /// clusters it changed.
    fn fix_leaks(&mut self, changes: &mut Vec<String>) -> Result<u64, Error> {
        let (layout, problems) = layout::read(&*self.io)?;
        let mut base = count_base(&*self.io, &layout)?;
        let structural: Vec<String> = problems.structural_errors().cloned().collect();
        if let Some(why) = refusal(&layout, &structural, &base) {
            return Err(Error::Corrupt(format!(
                "{}: not freeing leaked clusters: {why}",
                self.path.display()
            )));
        }
        if let Some(bitmap) = layout.bitmaps.iter().find(|b| !b.trusted) {
            return Err(Error::Corrupt(format!(
                "{}: not freeing leaked clusters: bitmap '{}' is damaged",
                self.path.display(),
                bitmap.name()
            )));
        }
        let directory = layout.ext == ExtState::Valid;
        add_bitmaps(&mut base.refs, &layout, directory, |_| true);
        self.layout = layout;
        let comparison = compare(
            &*self.io,
            &mut self.layout.refcounts,
            &base.refs,
            &CopiedFlags::default(),
        )?;
        if !comparison.under.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: not freeing leaked clusters: {}",
                self.path.display(),
                describe_under(&comparison.under, &self.layout)[0]
            )));
        }
        if comparison.leaks.is_empty() {
            return Ok(0);
        }
        for leak in &comparison.leaks {
            self.layout
                .refcounts
                .lower(&*self.io, leak.cluster, leak.referenced)?;
        }
        self.layout.refcounts.write_dirty(&mut *self.io)?;
        self.flush("flushing the repaired refcounts")?;
        let count = comparison.leaks.len() as u64;
        changes.push(format!(
            "freed {count} leaked cluster{} (refcount lowered to the references found):",
            if count == 1 { "" } else { "s" }
        ));
        changes.extend(
            describe_leaks(&comparison.leaks, self.layout.header.cluster_bits)
                .into_iter()
                .map(|run| format!("  {run}")),
        );
        Ok(count)
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
