// SPDX-License-Identifier: GPL-2.0-or-later

//! Cluster reference counts: the refcount table and refcount blocks, for every refcount width
//! (`refcount_order` 0 to 6, 1 to 64 bits), allocation and freeing.
//!
//! Blocks are read on demand and cached; changes are made in the cache and written back by
//! [`Refcounts::write_dirty`], whole blocks at a time. Allocation takes the first run of free
//! clusters (refcount 0), which reuses freed clusters before extending the file. Missing
//! refcount blocks a run needs are placed right after the data of the run, in the same free
//! run (never inside the data, which would break the run and search again forever), counted,
//! written and flushed before the table entries that point to them. A refcount table too small
//! for a run is replaced, once, by one large enough (and at least 1.5 times larger), placed
//! with the refcount blocks describing it in the first clusters the old table did not cover;
//! the header is switched to it in one write and only then is the old table freed.
#![forbid(unsafe_code)]

use byteorder::{BigEndian, ByteOrder};
use std::collections::{BTreeSet, HashMap};

use super::error::{corrupt, Error};
use super::header::{field, read_exact};
use super::io::ImageIo;

/// QEMU's limit on the refcount table's size.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must stay below 2^56.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
const REFTABLE_RESERVED: u64 = 0x1ff;

/// Whether `offset..offset + len` reaches past `file_len` (or past 2^64).
pub(crate) fn past_end(offset: u64, len: u64, file_len: u64) -> bool {
    match offset.checked_add(len) {
        Some(end) => end > file_len,
        None => true,
    }
}

/// Reads entry `index` of a refcount block of width `2^order` bits.
pub(crate) fn get_entry(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0 => u64::from((block[index / 8] >> (index % 8)) & 1),
        1 => u64::from((block[index / 4] >> (2 * (index % 4))) & 3),
        2 => u64::from((block[index / 2] >> (4 * (index % 2))) & 0xf),
        3 => u64::from(block[index]),
        4 => u64::from(BigEndian::read_u16(&block[2 * index..])),
        5 => u64::from(BigEndian::read_u32(&block[4 * index..])),
        _ => BigEndian::read_u64(&block[8 * index..]),
    }
}

/// Writes entry `index` of a refcount block of width `2^order` bits (`value` must fit).
pub(crate) fn set_entry(block: &mut [u8], index: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = bits * (index % per_byte);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[index] = value as u8,
        4 => BigEndian::write_u16(&mut block[2 * index..], value as u16),
        5 => BigEndian::write_u32(&mut block[4 * index..], value as u32),
        _ => BigEndian::write_u64(&mut block[8 * index..], value),
    }
}

/// The refcount structures of an image.
#[derive(Debug, Clone)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    pub table_offset: u64,
    pub table_clusters: u32,
    /// Block offsets, one per table entry.
    table: Vec<u64>,
    cache: HashMap<usize, Vec<u8>>,
    dirty: BTreeSet<usize>,
    /// No free cluster lies below this index.
    free_hint: u64,
    /// Bumped whenever the table moves or a block is created.
    pub generation: u64,
    /// Cluster ranges (first, end), sorted and disjoint, never handed out although their
    /// refcount is 0 (a repair's: what the bitmaps it removes point to until its header switch).
    reserved: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Reads and checks the refcount table: within QEMU's 8 MiB limit and the file, every
    /// entry's reserved bits zero and every block within the file.
    pub(crate) fn load(
        io: &dyn ImageIo,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> Result<Refcounts, Error> {
        let cluster_size = 1u64 << cluster_bits;
        if table_clusters == 0 {
            return Err(corrupt(
                "header: refcount_table_clusters (offset 56) is 0: the image has no refcount table",
            ));
        }
        let bytes = u64::from(table_clusters) * cluster_size;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "header: refcount table of {table_clusters} clusters ({bytes} bytes) exceeds \
                 QEMU's 8 MiB limit"
            )));
        }
        if table_offset % cluster_size != 0 || table_offset == 0 {
            return Err(corrupt(format!(
                "header: refcount_table_offset {table_offset:#x} (offset 48) is not a nonzero \
                 multiple of the cluster size"
            )));
        }
        if past_end(table_offset, bytes, file_len) {
            return Err(corrupt(format!(
                "header: the refcount table at {table_offset:#x} ({bytes} bytes) extends past \
                 the end of the file ({file_len} bytes)"
            )));
        }
        let raw = read_exact(io, table_offset, bytes, "the refcount table")?;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (index, chunk) in raw.chunks_exact(8).enumerate() {
            let entry = BigEndian::read_u64(chunk);
            if entry & REFTABLE_RESERVED != 0 || entry % cluster_size != 0 {
                return Err(corrupt(format!(
                    "refcount table entry {index} at {:#x}: {entry:#x} is not cluster-aligned \
                     (reserved bits 0-8 must be zero)",
                    table_offset + 8 * index as u64
                )));
            }
            if entry != 0 && past_end(entry, cluster_size, file_len) {
                return Err(corrupt(format!(
                    "refcount table entry {index} at {:#x}: refcount block {entry:#x} lies past \
                     the end of the file ({file_len} bytes)",
                    table_offset + 8 * index as u64
                )));
            }
            table.push(entry);
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table_offset,
            table_clusters,
            table,
            cache: HashMap::new(),
            dirty: BTreeSet::new(),
            free_hint: 0,
            generation: 0,
            reserved: Vec::new(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub(crate) fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// Offsets of the refcount blocks (nonzero table entries) with their table index.
    pub(crate) fn blocks(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.table
            .iter()
            .enumerate()
            .filter(|(_, &offset)| offset != 0)
            .map(|(index, &offset)| (index, offset))
    }

    /// Clusters the table can describe.
    pub(crate) fn covered_clusters(&self) -> u64 {
        self.table.len() as u64 * self.per_block()
    }

    fn load_block(&mut self, io: &dyn ImageIo, index: usize) -> Result<(), Error> {
        if !self.cache.contains_key(&index) {
            let block = read_exact(
                io,
                self.table[index],
                self.cluster_size(),
                "a refcount block",
            )?;
            self.cache.insert(index, block);
        }
        Ok(())
    }

    /// Refcount order: entries are `1 << order` bits wide.
    pub(crate) fn order(&self) -> u32 {
        self.order
    }

    /// The bytes of block `index` (a nonzero table entry): the cached copy when there is one
    /// (it may hold changes not written yet), else read from the file without caching it, so
    /// that a walk over every block keeps one in memory at a time.
    pub(crate) fn peek_block(
        &self,
        io: &dyn ImageIo,
        index: usize,
    ) -> Result<std::borrow::Cow<'_, [u8]>, Error> {
        Ok(match self.cache.get(&index) {
            Some(block) => std::borrow::Cow::Borrowed(block),
            None => std::borrow::Cow::Owned(read_exact(
                io,
                self.table[index],
                self.cluster_size(),
                "a refcount block",
            )?),
        })
    }

    /// The refcount of cluster `cluster` (by index), caching the block it is in.
    pub(crate) fn get(&mut self, io: &dyn ImageIo, cluster: u64) -> Result<u64, Error> {
        let per_block = self.per_block();
        let index = cluster / per_block;
        if index >= self.table.len() as u64 {
            return Ok(0);
        }
        let index = index as usize;
        if self.table[index] == 0 {
            return Ok(0);
        }
        self.load_block(io, index)?;
        Ok(get_entry(
            &self.cache[&index],
            (cluster % per_block) as usize,
            self.order,
        ))
    }

    /// Keeps the clusters of every `(offset, len)` byte range from being allocated, whatever
    /// their refcount (replacing what was reserved before).
    pub(crate) fn reserve(&mut self, ranges: &[(u64, u64)]) {
        let mut clusters: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(offset, len)| {
                (
                    offset >> self.cluster_bits,
                    (offset.saturating_add(len - 1) >> self.cluster_bits) + 1,
                )
            })
            .collect();
        clusters.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(clusters.len());
        for (first, end) in clusters {
            match merged.last_mut() {
                Some(last) if first <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((first, end)),
            }
        }
        self.reserved = merged;
    }

    fn is_reserved(&self, cluster: u64) -> bool {
        let after = self
            .reserved
            .partition_point(|&(first, _)| first <= cluster);
        after > 0 && self.reserved[after - 1].1 > cluster
    }

    /// Whether a reserved cluster lies at or after `cluster`.
    fn reserved_from(&self, cluster: u64) -> bool {
        self.reserved.last().is_some_and(|&(_, end)| end > cluster)
    }

    /// Whether the refcount block describing cluster `cluster` exists.
    pub(crate) fn has_block(&self, cluster: u64) -> bool {
        let index = cluster / self.per_block();
        index < self.table.len() as u64 && self.table[index as usize] != 0
    }

    /// Lowers the refcount of a cluster whose block exists to `value` (in the cache; written by
    /// [`write_dirty`](Self::write_dirty)).
    pub(crate) fn lower(
        &mut self,
        io: &dyn ImageIo,
        cluster: u64,
        value: u64,
    ) -> Result<(), Error> {
        let current = self.get(io, cluster)?;
        if value >= current {
            return Err(Error::InvalidArgument(format!(
                "lowering the refcount of cluster {:#x} from {current} to {value}",
                cluster << self.cluster_bits
            )));
        }
        self.set(io, cluster, value)?;
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Raises the refcount of a cluster whose block exists from 0 to 1 (in the cache; written
    /// by [`write_dirty`](Self::write_dirty)): a repair's, for a cluster that one intact
    /// structure uses and nothing counted.
    pub(crate) fn raise_to_one(&mut self, io: &dyn ImageIo, cluster: u64) -> Result<(), Error> {
        let current = self.get(io, cluster)?;
        if current != 0 {
            return Err(Error::InvalidArgument(format!(
                "raising the refcount of cluster {:#x} from {current} to 1",
                cluster << self.cluster_bits
            )));
        }
        self.set(io, cluster, 1)
    }

    /// Sets the refcount of a cluster whose block exists.
    fn set(&mut self, io: &dyn ImageIo, cluster: u64, value: u64) -> Result<(), Error> {
        let per_block = self.per_block();
        let index = (cluster / per_block) as usize;
        self.load_block(io, index)?;
        let order = self.order;
        let block = self.cache.get_mut(&index).expect("loaded above");
        set_entry(block, (cluster % per_block) as usize, order, value);
        self.dirty.insert(index);
        Ok(())
    }

    /// Writes every changed block back (whole blocks).
    pub(crate) fn write_dirty(&mut self, io: &mut dyn ImageIo) -> Result<(), Error> {
        let dirty: Vec<usize> = self.dirty.iter().copied().collect();
        for index in dirty {
            let offset = self.table[index];
            io.pwrite(offset, &self.cache[&index])
                .map_err(|e| Error::io(format!("writing refcount block at {offset:#x}"), e))?;
            self.dirty.remove(&index);
        }
        Ok(())
    }

    /// Finds the first run of `count` free clusters from the hint on.
    fn find_free_run(&mut self, io: &dyn ImageIo, count: u64) -> Result<u64, Error> {
        let mut start = self.free_hint.max(1);
        let mut run = 0;
        let mut cluster = start;
        let mut seen_free = false;
        while run < count {
            if (cluster + 1) << self.cluster_bits > MAX_HOST_OFFSET {
                return Err(Error::Limit(
                    "no free cluster below the 2^56-byte host offset limit".into(),
                ));
            }
            // Past the table's coverage every cluster is free: finish the run at once.
            if cluster >= self.covered_clusters() && !self.reserved_from(cluster) {
                return Ok(if run == 0 { cluster } else { start });
            }
            if self.get(io, cluster)? == 0 && !self.is_reserved(cluster) {
                if run == 0 {
                    start = cluster;
                }
                // Every cluster between the hint and the first free one is in use: later
                // searches need not look at them again.
                if !seen_free {
                    seen_free = true;
                    self.free_hint = cluster;
                }
                run += 1;
            } else {
                run = 0;
            }
            cluster += 1;
        }
        Ok(start)
    }

    /// Allocates `count` contiguous clusters (refcount set to 1 in the cache) and returns the
    /// offset of the first. Refcount blocks the run needs are created right after it, in the
    /// same free run (never inside it); a refcount table too small for the run is grown first.
    /// Both are written at once (a table growth switches the header's refcount table fields).
    /// Work is linear in the clusters allocated and the metadata created.
    pub(crate) fn alloc(&mut self, io: &mut dyn ImageIo, count: u64) -> Result<u64, Error> {
        if count == 0 {
            return Err(Error::InvalidArgument("allocating zero clusters".into()));
        }
        // Refcount blocks to place after the run: each pass needs at least as many as the last
        // (a longer run touches no fewer ranges), so this settles within a few passes.
        let mut blocks = 0;
        loop {
            let start = self.find_free_run(io, count + blocks)?;
            let end = start + count + blocks;
            if self.table_too_small(io, end)? {
                continue;
            }
            let missing = self.missing_blocks(start, end);
            if missing.len() as u64 > blocks {
                blocks = missing.len() as u64;
                continue;
            }
            let data_end = start + count;
            self.create_blocks(io, &missing, data_end)?;
            self.set_range(io, start, data_end, 1)?;
            if self.free_hint == start {
                self.free_hint = data_end + missing.len() as u64;
            }
            return Ok(start << self.cluster_bits);
        }
    }

    /// Grows the table when it cannot describe clusters below `end`; returns whether it did.
    fn table_too_small(&mut self, io: &mut dyn ImageIo, end: u64) -> Result<bool, Error> {
        let needed = (end - 1) / self.per_block() + 1;
        if needed <= self.table.len() as u64 {
            return Ok(false);
        }
        self.grow_table(io, needed)?;
        Ok(true)
    }

    /// Table indices without a refcount block among those covering clusters `start..end`.
    fn missing_blocks(&self, start: u64, end: u64) -> Vec<usize> {
        let per_block = self.per_block();
        ((start / per_block)..=((end - 1) / per_block))
            .map(|index| index as usize)
            .filter(|&index| self.table[index] == 0)
            .collect()
    }

    /// Allocates the first run of free clusters from the hint on, of at most `max` clusters
    /// (refcounts set to 1 in the cache); returns its offset and length in clusters. Like
    /// [`alloc`](Self::alloc) it may grow the table, and it takes the refcount blocks the run
    /// needs from the run's own tail.
    pub(crate) fn alloc_run(
        &mut self,
        io: &mut dyn ImageIo,
        max: u64,
    ) -> Result<(u64, u64), Error> {
        if max == 0 {
            return Err(Error::InvalidArgument("allocating zero clusters".into()));
        }
        loop {
            let start = self.find_free_run(io, 1)?;
            let covered = self.covered_clusters();
            let mut count = 1;
            while count < max {
                let cluster = start + count;
                if cluster >= covered && !self.reserved_from(cluster) {
                    // Past the table's coverage every cluster is free.
                    count = max;
                    break;
                }
                if self.get(io, cluster)? != 0 || self.is_reserved(cluster) {
                    break;
                }
                count += 1;
            }
            // find_free_run checked that the first cluster ends below the limit.
            count = count.min((MAX_HOST_OFFSET >> self.cluster_bits) - start);
            let end = start + count;
            if self.table_too_small(io, end)? {
                continue;
            }
            let missing = self.missing_blocks(start, end);
            let blocks = missing.len() as u64;
            let data_end = end - blocks;
            self.create_blocks(io, &missing, data_end)?;
            if data_end == start {
                // The run held only its own refcount blocks: search again.
                continue;
            }
            self.set_range(io, start, data_end, 1)?;
            if self.free_hint == start {
                self.free_hint = end;
            }
            return Ok((start << self.cluster_bits, data_end - start));
        }
    }

    /// Sets the refcount of every cluster of `first..end` (whose blocks exist) to `value`, one
    /// block at a time.
    fn set_range(
        &mut self,
        io: &dyn ImageIo,
        first: u64,
        end: u64,
        value: u64,
    ) -> Result<(), Error> {
        let per_block = self.per_block();
        let order = self.order;
        let mut cluster = first;
        while cluster < end {
            let index = (cluster / per_block) as usize;
            let block_end = ((index as u64 + 1) * per_block).min(end);
            self.load_block(io, index)?;
            let block = self.cache.get_mut(&index).expect("loaded above");
            for c in cluster..block_end {
                set_entry(block, (c % per_block) as usize, order, value);
            }
            self.dirty.insert(index);
            cluster = block_end;
        }
        Ok(())
    }

    /// Creates the refcount blocks for table entries `indices` in the free clusters `at..`,
    /// whose blocks are among the existing ones and these. The blocks, with their own clusters
    /// counted, are written and flushed before the table entries that point to them: a crash
    /// leaves at worst leaked clusters.
    fn create_blocks(
        &mut self,
        io: &mut dyn ImageIo,
        indices: &[usize],
        at: u64,
    ) -> Result<(), Error> {
        if indices.is_empty() {
            return Ok(());
        }
        if indices.contains(&0) {
            return Err(corrupt(
                "refcount table entry 0 is empty: the header cluster has no refcount",
            ));
        }
        let end = at + indices.len() as u64;
        if end << self.cluster_bits > MAX_HOST_OFFSET {
            return Err(Error::Limit(
                "no room for a refcount block below 2^56 bytes".into(),
            ));
        }
        for (k, &index) in indices.iter().enumerate() {
            self.table[index] = (at + k as u64) << self.cluster_bits;
            self.cache
                .insert(index, vec![0u8; self.cluster_size() as usize]);
            self.dirty.insert(index);
        }
        self.generation += 1;
        self.set_range(io, at, end, 1)?;
        self.write_dirty(io)?;
        io.flush()
            .map_err(|e| Error::io("flushing new refcount blocks", e))?;
        for &index in indices {
            let entry_offset = self.table_offset + 8 * index as u64;
            io.pwrite(entry_offset, &self.table[index].to_be_bytes())
                .map_err(|e| {
                    Error::io(
                        format!("writing refcount table entry {index} at {entry_offset:#x}"),
                        e,
                    )
                })?;
        }
        Ok(())
    }

    /// Replaces the refcount table by a larger one (about 1.5 times, and at least `needed`
    /// entries), placed with the blocks that describe it in the first clusters the old table
    /// does not cover.
    fn grow_table(&mut self, io: &mut dyn ImageIo, needed: u64) -> Result<(), Error> {
        let cluster_size = self.cluster_size();
        let per_block = self.per_block();
        let entries_per_cluster = cluster_size / 8;
        let old_len = self.table.len() as u64;
        let area = old_len * per_block; // first uncovered cluster
        let wanted = (old_len + (old_len / 2).max(1)).max(needed);
        let mut table_clusters = wanted.div_ceil(entries_per_cluster);
        let mut blocks = 1u64;
        loop {
            let needed_blocks = (blocks + table_clusters).div_ceil(per_block);
            let entries = table_clusters * entries_per_cluster;
            if needed_blocks > blocks {
                blocks = needed_blocks;
            } else if entries < old_len + blocks {
                table_clusters += 1;
            } else {
                break;
            }
        }
        let table_bytes = table_clusters * cluster_size;
        if table_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::Limit(format!(
                "the refcount table would grow to {table_bytes} bytes, past QEMU's 8 MiB limit"
            )));
        }
        let area_offset = area << self.cluster_bits;
        let area_end = (area + blocks + table_clusters) << self.cluster_bits;
        if area_end > MAX_HOST_OFFSET {
            return Err(Error::Limit(
                "no room to grow the refcount table below 2^56 bytes".into(),
            ));
        }
        // The new blocks, counting every cluster of the area.
        let mut new_blocks = Vec::new();
        for block in 0..blocks {
            let mut data = vec![0u8; cluster_size as usize];
            let first = area + block * per_block;
            for cluster in first..(first + per_block).min(area + blocks + table_clusters) {
                set_entry(&mut data, (cluster - first) as usize, self.order, 1);
            }
            new_blocks.push(data);
        }
        let mut new_table = self.table.clone();
        new_table.resize((table_clusters * entries_per_cluster) as usize, 0);
        for block in 0..blocks {
            new_table[(old_len + block) as usize] = (area + block) << self.cluster_bits;
        }
        for (block, data) in new_blocks.iter().enumerate() {
            let offset = area_offset + ((block as u64) << self.cluster_bits);
            io.pwrite(offset, data).map_err(|e| {
                Error::io(format!("writing a new refcount block at {offset:#x}"), e)
            })?;
        }
        let table_offset = area_offset + (blocks << self.cluster_bits);
        let mut raw = Vec::with_capacity(table_bytes as usize);
        for entry in &new_table {
            raw.extend_from_slice(&entry.to_be_bytes());
        }
        io.pwrite(table_offset, &raw).map_err(|e| {
            Error::io(
                format!("writing the new refcount table at {table_offset:#x}"),
                e,
            )
        })?;
        io.flush()
            .map_err(|e| Error::io("flushing the new refcount table", e))?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        io.pwrite(field::REFCOUNT_TABLE_OFFSET as u64, &fields)
            .map_err(|e| Error::io("switching the header to the new refcount table", e))?;
        io.flush()
            .map_err(|e| Error::io("flushing the header after growing the refcount table", e))?;
        let old_offset = self.table_offset;
        let old_clusters = u64::from(self.table_clusters);
        self.table = new_table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters as u32;
        self.generation += 1;
        for (block, data) in new_blocks.into_iter().enumerate() {
            self.cache.insert((old_len as usize) + block, data);
        }
        self.free(io, old_offset, old_clusters << self.cluster_bits)?;
        Ok(())
    }

    /// Decrements the refcount of every cluster of `offset..offset + len` (in the cache).
    pub(crate) fn free(&mut self, io: &dyn ImageIo, offset: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            let value = self.get(io, cluster)?;
            if value == 0 {
                return Err(corrupt(format!(
                    "freeing cluster {:#x}: its refcount is already 0",
                    cluster << self.cluster_bits
                )));
            }
            self.set(io, cluster, value - 1)?;
            if value == 1 && cluster < self.free_hint {
                self.free_hint = cluster;
            }
        }
        Ok(())
    }
}
