// SPDX-License-Identifier: GPL-2.0-or-later

//! Rebuilding the refcount structure of an image whose refcounts are not maintained: QEMU with
//! lazy refcounts sets the dirty bit and leaves refcounts behind the allocations until a clean
//! close; a QEMU killed in between leaves them too low or too high. `check -r all` counts every
//! reference with a complete walk and writes a new refcount table and blocks holding exactly
//! those counts, as `qemu-img check -r all` does.
//!
//! Crash-safe by construction: the new table and blocks go past the end of everything the image
//! uses (the old structure's refcounts know nothing of those clusters, and QEMU rebuilds a dirty
//! image's refcounts anyway), and one header write switches to them and clears the dirty bit.
//! Before it the image is as it was; after it the refcounts are exact, and the old structure's
//! clusters are unreferenced with refcount 0.
#![forbid(unsafe_code)]

use super::check::count::{add_bitmaps, read_and_count, refusal};
use super::error::Error;
use super::header::INCOMPAT_DIRTY;
use super::layout::ExtState;
use super::refcount::{set_entry, Refcounts, MAX_REFTABLE_BYTES};
use super::Image;

impl Image {
    /// Writes a refcount structure counting exactly the references of a complete walk, then
    /// switches the header to it and clears the dirty bit. Refused (nothing written) when the
    /// walk cannot be complete.
    pub(super) fn rebuild_refcounts(&mut self, changes: &mut Vec<String>) -> Result<(), Error> {
        let (layout, problems, base) = read_and_count(&*self.io)?;
        let structural: Vec<_> = problems.structural_errors().cloned().collect();
        if let Some(why) = refusal(&layout, &structural, &base) {
            return Err(Error::Unsupported(format!(
                "refusing to rebuild the refcounts of {}: {why}",
                self.path.display()
            )));
        }
        let mut refs = base.refs;
        // The old structure is replaced: nothing refers to it any more.
        let old = &layout.refcounts;
        let cluster_size = layout.cluster_size();
        refs.remove(
            old.table_offset,
            u64::from(old.table_clusters) * cluster_size,
        );
        for (_, offset) in old.blocks() {
            refs.remove(offset, cluster_size);
        }
        // Bitmaps whose clusters are known; a damaged one's are not (its removal frees nothing).
        let directory = layout.ext == ExtState::Valid && !layout.directory_damaged;
        add_bitmaps(&mut refs, &layout, directory, |i| layout.bitmaps[i].trusted);

        let order = layout.header.refcount_order;
        let per_block = (cluster_size * 8) >> order;
        let max_refcount = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        // The new structure starts past the file and every reference; it covers itself.
        let first = refs.limit().max(layout.file_len.div_ceil(cluster_size));
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let end = first + table_clusters + blocks;
            let need_blocks = end.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster_size);
            if (need_blocks, need_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        if table_clusters * cluster_size > MAX_REFTABLE_BYTES {
            return Err(Error::Limit(format!(
                "{}: a refcount table for {} clusters would exceed QEMU's limit",
                self.path.display(),
                first + table_clusters + blocks
            )));
        }
        let table_offset = first * cluster_size;
        let block_at = |index: u64| (first + table_clusters + index) * cluster_size;
        let structure = first..first + table_clusters + blocks;
        let mut block = vec![0u8; cluster_size as usize];
        for index in 0..blocks {
            block.fill(0);
            let start = index * per_block;
            for cluster in start..start + per_block {
                let count = refs.get(cluster) + u64::from(structure.contains(&cluster));
                if count > max_refcount {
                    return Err(Error::Unsupported(format!(
                        "{}: the cluster at {:#x} has {count} references, more than a \
                         {}-bit refcount holds",
                        self.path.display(),
                        cluster * cluster_size,
                        1u32 << order
                    )));
                }
                if count != 0 {
                    set_entry(&mut block, (cluster - start) as usize, order, count);
                }
            }
            self.write(block_at(index), &block, "a rebuilt refcount block")?;
        }
        let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
        for index in 0..blocks {
            let at = 8 * index as usize;
            table[at..at + 8].copy_from_slice(&block_at(index).to_be_bytes());
        }
        self.write(table_offset, &table, "the rebuilt refcount table")?;
        self.flush("flushing the rebuilt refcounts")?;

        let file_len = self
            .io
            .len()
            .map_err(|e| Error::io("reading the file's length", e))?;
        self.layout = layout;
        self.layout.file_len = file_len;
        self.layout.refcounts = Refcounts::load(
            &*self.io,
            self.layout.header.cluster_bits,
            order,
            table_offset,
            table_clusters as u32,
            file_len,
        )?;
        self.layout.header.clear_incompatible(INCOMPAT_DIRTY);
        let ext = self.current_ext();
        let autoclear = self.layout.header.autoclear;
        self.write_header(ext, autoclear)?;
        changes.push(format!(
            "rebuilt the refcounts from a complete walk (the image had the dirty bit of lazy \
             refcounts): a new refcount table at {table_offset:#x} with {blocks} block{}, the \
             dirty bit cleared",
            if blocks == 1 { "" } else { "s" }
        ));
        Ok(())
    }
}
