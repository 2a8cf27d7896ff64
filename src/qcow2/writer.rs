// SPDX-License-Identifier: GPL-2.0-or-later

//! How an [`Image`] writes: allocation of new clusters (refcounts first), the header switch
//! that commits a change, and recovery when a write fails before it (the new clusters freed
//! again, or the handle poisoned when that is not possible). The public operations in `mod.rs`
//! and `repair.rs` describe what changes; this file makes each change crash-consistent.
#![forbid(unsafe_code)]

use super::*;

impl Image {
    pub(super) fn ensure_writable(&self) -> Result<(), Error> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "the image {} is open read-only",
                self.path.display()
            )));
        }
        if let Some(why) = &self.poisoned {
            return Err(Error::ReadOnly(format!(
                "an earlier write to {} failed ({why}); reopen the image",
                self.path.display()
            )));
        }
        Ok(())
    }

    pub(super) fn write(&mut self, offset: u64, data: &[u8], what: &str) -> Result<(), Error> {
        self.io
            .pwrite(offset, data)
            .map_err(|e| Error::io(format!("writing {what} at {offset:#x}"), e))
    }

    pub(super) fn flush(&mut self, what: &str) -> Result<(), Error> {
        self.io.flush().map_err(|e| Error::io(what, e))
    }

    /// Allocates `clusters` contiguous clusters, remembering them in case the write fails.
    pub(super) fn alloc(&mut self, clusters: u64) -> Result<u64, Error> {
        let generation = self.layout.refcounts.generation;
        let offset = self.layout.refcounts.alloc(&mut *self.io, clusters)?;
        self.allocated(generation, offset, clusters)?;
        Ok(offset)
    }

    /// Allocates the first run of free clusters, of at most `max` clusters, remembering it in
    /// case the write fails; returns its offset and length in clusters.
    pub(super) fn alloc_run(&mut self, max: u64) -> Result<(u64, u64), Error> {
        let generation = self.layout.refcounts.generation;
        let (offset, clusters) = self.layout.refcounts.alloc_run(&mut *self.io, max)?;
        self.allocated(generation, offset, clusters)?;
        Ok((offset, clusters))
    }

    /// Bookkeeping after an allocation: header fields and metadata regions follow the refcount
    /// structures, the clusters are remembered, and they must not overlap known metadata.
    pub(super) fn allocated(
        &mut self,
        generation: u64,
        offset: u64,
        clusters: u64,
    ) -> Result<(), Error> {
        let refcounts = &self.layout.refcounts;
        self.layout
            .header
            .set_refcount_table(refcounts.table_offset, refcounts.table_clusters);
        if refcounts.generation != generation {
            self.layout.refresh_refcount_regions();
        }
        let len = clusters * self.cluster_size();
        self.pending.push((offset, len));
        let end = offset + len;
        let metadata = &self.layout.metadata;
        let before = metadata.partition_point(|r| r.start < end);
        for region in metadata[..before].iter().rev().take(2) {
            if offset < region.end && region.start < end {
                return Err(Error::Corrupt(format!(
                    "refusing to write: the free cluster at {offset:#x} handed out by the \
                     refcounts is used by {}; the refcounts are inconsistent (repair with \
                     'qemu-img check -r all')",
                    layout::place(region, &self.layout.bitmaps)
                )));
            }
        }
        Ok(())
    }

    /// Runs a write; if it fails, frees what it allocated (when the header was not touched) and
    /// reloads the state from the file, or refuses further writes when that is not possible.
    pub(super) fn write_op<T>(
        &mut self,
        op: impl FnOnce(&mut Image) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.ensure_writable()?;
        self.pending.clear();
        self.header_attempted = false;
        let result = self.prepare_write().and_then(|()| op(self));
        if let Err(error) = &result {
            self.recover(error.to_string());
        }
        self.pending.clear();
        result
    }

    pub(super) fn recover(&mut self, why: String) {
        if !self.header_attempted {
            // Best effort: a failure here only leaks the clusters.
            let pending = std::mem::take(&mut self.pending);
            let _ = self.free_clusters(&pending);
        }
        self.reload(why);
    }

    pub(super) fn free_clusters(&mut self, regions: &[(u64, u64)]) -> Result<(), Error> {
        self.release_clusters(regions)?;
        self.flush("flushing freed clusters")
    }

    /// Decrements the refcounts of `regions` and writes the refcount blocks, without a flush:
    /// losing these writes in a crash only leaks the clusters, and the next change's flush
    /// (or closing) makes them durable.
    pub(super) fn release_clusters(&mut self, regions: &[(u64, u64)]) -> Result<(), Error> {
        for &(offset, len) in regions {
            self.layout.refcounts.free(&*self.io, offset, len)?;
        }
        self.layout.refcounts.write_dirty(&mut *self.io)
    }

    /// Reads the state again from the file, or refuses further writes when that fails.
    pub(super) fn reload(&mut self, why: String) {
        match layout::read(&*self.io) {
            Ok((layout, problems)) if !problems.has_errors() => {
                self.layout = layout;
                self.refresh_infos();
            }
            _ => {
                self.poisoned = Some(why);
            }
        }
    }

    /// Before the first change: clears unknown autoclear bits in a header write of its own.
    pub(super) fn prepare_write(&mut self) -> Result<(), Error> {
        let autoclear = self.layout.header.autoclear;
        if autoclear & !AUTOCLEAR_KNOWN == 0 {
            return Ok(());
        }
        let ext = self.current_ext();
        let new_autoclear = autoclear & AUTOCLEAR_KNOWN;
        self.write_header(ext, new_autoclear)?;
        // That header kept the bitmaps as they were: a later failure may still free clusters.
        self.header_attempted = false;
        Ok(())
    }

    pub(super) fn current_ext(&self) -> Option<BitmapsExt> {
        match (self.layout.ext, self.layout.directory) {
            (ExtState::Valid, Some((offset, size))) => Some(BitmapsExt {
                nb_bitmaps: self.layout.bitmaps.len() as u32,
                reserved: 0,
                directory_size: size,
                directory_offset: offset,
            }),
            _ => None,
        }
    }

    pub(super) fn write_header(
        &mut self,
        ext: Option<BitmapsExt>,
        autoclear: u64,
    ) -> Result<(), Error> {
        let refcounts = &self.layout.refcounts;
        let rendered = self.layout.header.render(
            ext,
            autoclear,
            (refcounts.table_offset, refcounts.table_clusters),
        )?;
        self.header_attempted = true;
        self.write(0, &rendered, "the header")?;
        self.flush("flushing the header")?;
        self.layout.header.apply_rendered(&rendered, ext);
        self.layout.ext = if ext.is_some() {
            ExtState::Valid
        } else {
            ExtState::Absent
        };
        Ok(())
    }

    /// Writes a new directory for `bitmaps`, switches the header to it and frees the old
    /// directory and `to_free`.
    pub(super) fn commit(
        &mut self,
        bitmaps: Vec<Bitmap>,
        to_free: Vec<(u64, u64)>,
    ) -> Result<(), Error> {
        self.commit_with(bitmaps, to_free, true)
    }

    /// [`commit`](Self::commit), freeing the old directory or not (a repair leaves that to its
    /// reference count: the old directory may share clusters with what stays).
    pub(super) fn commit_with(
        &mut self,
        mut bitmaps: Vec<Bitmap>,
        to_free: Vec<(u64, u64)>,
        free_old_directory: bool,
    ) -> Result<(), Error> {
        let cluster_size = self.cluster_size();
        let names: Vec<&[u8]> = bitmaps.iter().map(|b| b.entry.name.as_slice()).collect();
        self.check_directory_limits(&names)?;
        let entries: Vec<DirEntry> = bitmaps.iter().map(|b| b.entry.clone()).collect();
        let ext = if entries.is_empty() {
            None
        } else {
            let mut dir = bitmap_dir::serialize(&entries);
            let size = dir.len() as u64;
            let clusters = size.div_ceil(cluster_size);
            let offset = self.alloc(clusters)?;
            dir.resize((clusters * cluster_size) as usize, 0);
            self.layout.refcounts.write_dirty(&mut *self.io)?;
            self.write(offset, &dir, "the bitmap directory")?;
            let mut pos = 0;
            for bitmap in &mut bitmaps {
                bitmap.entry.dir_pos = pos;
                pos += bitmap_dir::entry_size(bitmap.entry.name.len());
            }
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                reserved: 0,
                directory_size: size,
                directory_offset: offset,
            })
        };
        self.layout.refcounts.write_dirty(&mut *self.io)?;
        self.flush("flushing the new bitmaps")?;

        let autoclear = (self.layout.header.autoclear & AUTOCLEAR_KNOWN & !AUTOCLEAR_BITMAPS)
            | if ext.is_some() { AUTOCLEAR_BITMAPS } else { 0 };
        let old_directory = self.layout.directory;
        self.write_header(ext, autoclear)?;
        self.layout.directory = ext.map(|e| (e.directory_offset, e.directory_size));
        self.layout.bitmaps = bitmaps;
        self.refresh_infos();

        // Committed: now the old clusters can go. A failure from here on only leaks them (as
        // QEMU, which ignores errors when freeing): the change itself is durable.
        let mut to_free = to_free;
        if let Some((offset, size)) = old_directory.filter(|_| free_old_directory) {
            to_free.push((offset, size));
        }
        if let Err(error) = self.release_clusters(&to_free) {
            self.warnings.push(format!(
                "clusters of the replaced bitmap data could not be freed ({error}); they are \
                 leaked ('qemu-img check -r leaks' reclaims them)"
            ));
            self.reload(error.to_string());
        }
        Ok(())
    }
}
