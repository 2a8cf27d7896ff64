// SPDX-License-Identifier: GPL-2.0-or-later

//! The repairs of `check -r leaks|all`, over the reference count of `check/`.
//!
//! A repair lowers refcounts only to the count of a complete walk, so it never frees a
//! referenced cluster; where the walk cannot be complete (damaged metadata other than the
//! bitmaps', a dirty or corrupt image) it refuses and says why. `All` first removes the bitmaps
//! that cannot be trusted in one header switch to a new directory (the crash-safe path of every
//! bitmap change), then walks the image again and frees what only they used.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use super::check::count::{
    add_bitmaps, compare, count_base, describe_leaks, describe_under, read_and_count, refusal,
    CopiedFlags, Mismatch,
};
use super::check::{check_io, check_walk};
use super::error::Error;
use super::header::{be64, read_exact, INCOMPAT_DIRTY};
use super::io::ImageIo;
use super::l2_entry::{L2Format, Mapping, RawEntry, OFLAG_COPIED};
use super::layout::{Damage, ExtState, L1_OFFSET_MASK, MAX_REPORTED};
use super::{clusters_of, layout, FileIo, Image, ImageLock, RepairMode, RepairReport};

/// Why a repair removes a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Removal {
    /// Its entry, table or clusters are damaged (the first problem found).
    Damaged(Damage),
    /// Marked in use: a state, not damage (`-r all` only).
    InUse,
    /// One of its clusters is counted below its references (why).
    CountedWrong(String),
}

impl Removal {
    /// Whether the removal repairs damage (counted in `corruptions_fixed`).
    fn is_damage(&self) -> bool {
        !matches!(self, Removal::InUse)
    }
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Removal::Damaged(why) => write!(f, "damaged: {why}"),
            Removal::InUse => f.write_str(
                "marked in use: it was not saved properly, so its content cannot be trusted",
            ),
            Removal::CountedWrong(why) => write!(f, "counted wrong: {why}"),
        }
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
        self.ensure_writable()?;
        // The check before the repair walks the image once; when nothing is written before the
        // leaks are freed (the common case), its count is the repair's too.
        let (before, mut walked) = check_walk(&*self.io);
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
            walked = None;
            self.write_op(|image| image.rebuild_refcounts(&mut rebuilt))?;
        }
        // What the rebuild fixed: every refcount it made right.
        let after_rebuild = (!rebuilt.is_empty()).then(|| check_io(&*self.io));
        let from_walk = walked.is_some();
        let (layout, problems, base, mut reused) = match walked {
            Some(walked) => (
                walked.layout,
                walked.problems,
                walked.base,
                Some(walked.comparison),
            ),
            None => {
                let (layout, problems, base) = read_and_count(&*self.io)?;
                (layout, problems, base, None)
            }
        };
        let structural: Vec<_> = problems.structural_errors().cloned().collect();
        if let Some(why) = refusal(&layout, &structural, &base) {
            return Err(refuse(self, why));
        }
        self.layout = layout;
        self.refresh_infos();
        let cluster_bits = self.layout.header.cluster_bits;
        let cluster_size = self.cluster_size();
        let ext = self.layout.ext;
        // Why each bitmap goes (None: it stays).
        let mut removal: Vec<Option<Removal>> = self
            .layout
            .bitmaps
            .iter()
            .map(|b| {
                if !b.trusted {
                    Some(Removal::Damaged(
                        b.damage.clone().unwrap_or(Damage::Invalid),
                    ))
                } else if mode == RepairMode::All
                    && b.entry.in_use()
                    && !self.tracked.contains(&b.entry.name)
                {
                    Some(Removal::InUse)
                } else {
                    None
                }
            })
            .collect();
        let mut directory_problem = match ext {
            ExtState::Broken => Some(format!(
                "the bitmaps extension is unreadable ({}); dropped it with every bitmap it listed",
                problems
                    .first_bitmaps_error()
                    .map(ToString::to_string)
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
        // The check's count holds every bitmap the directory lists: it is this repair's count
        // when every bitmap is trusted and kept and the directory counted. Otherwise the walk's
        // references (which include the bitmaps) give way to a count without them.
        let reusable = reused.is_some()
            && self.layout.bitmaps.iter().all(|b| b.trusted)
            && removal.iter().all(Option::is_none)
            && directory_problem.is_none();
        if !reusable {
            reused = None;
        }
        let mut base_refs = (!from_walk || reusable).then_some(base.refs);
        // Clusters of one intact bitmap that nothing counted (refcount 0): `All` counts them,
        // as qemu-img check -r all does, rather than dropping the bitmap.
        let mut uncounted: Vec<u64> = Vec::new();
        let last_comparison = loop {
            let count_directory = ext == ExtState::Valid && directory_problem.is_none();
            let mut comparison = match reused.take() {
                Some(comparison) => {
                    base_refs = None;
                    comparison
                }
                None => {
                    let mut refs = match base_refs.take() {
                        Some(refs) => refs,
                        None => count_base(&*self.io, &self.layout)?.refs,
                    };
                    add_bitmaps(&mut refs, &self.layout, count_directory, |i| {
                        removal[i].is_none()
                    });
                    compare(
                        &*self.io,
                        &self.layout.refcounts,
                        &refs,
                        &CopiedFlags::default(),
                    )?
                }
            };
            comparison
                .under
                .retain(|m| uncounted.binary_search(&m.cluster).is_err());
            let Some(first) = comparison.under.first() else {
                break comparison;
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
                        removal[index] = Some(Removal::CountedWrong(why.clone()));
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
        };
        // Whether anything is written before the leaks are freed: if not, the count above is
        // the image's as it stands, and its leaks are freed without walking the image again.
        let written_before_leaks = after_rebuild.is_some()
            || !uncounted.is_empty()
            || removal.iter().any(Option::is_some)
            || directory_problem.is_some()
            || !self.layout.header.ignored_bitmaps_exts.is_empty();

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
                .filter(|why| why.is_damage())
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
        let fixed = if written_before_leaks {
            drop(last_comparison);
            self.fix_leaks(&mut report.changes)
        } else {
            self.free_leaks(&last_comparison.leaks, &mut report.changes)
        };
        if let Err(error) = &fixed {
            self.reload(error.to_string());
        }
        report.leaks_fixed += fixed?;
        self.refresh_infos();
        report.after = if written_before_leaks || report.leaks_fixed > 0 {
            check_io(&*self.io)
        } else {
            // Nothing was written: the image is as the check before found it.
            report.before.clone()
        };
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
            report.after = check_io(&*self.io);
        }
        self.warnings = report.after.warnings().map(ToString::to_string).collect();
        Ok(report)
    }

    /// Sets the OFLAG_COPIED flag of every active L1 and L2 entry whose cluster has refcount 1
    /// and clears it elsewhere, as `qemu-img check -r` does; returns how many entries it
    /// changed. Each entry is one 8-byte write, valid whether or not it lands.
    fn fix_copied_flags(&mut self, changes: &mut Vec<String>) -> Result<u64, Error> {
        let header = self.layout.header.clone();
        let format = L2Format::of(&header);
        let cluster_bits = header.cluster_bits;
        let cluster_size = self.cluster_size();
        let file_len = self.layout.file_len;
        let data_file = format.data_file;
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
            for (i, RawEntry { entry, .. }) in format.entries(&table).enumerate() {
                let Mapping::Standard {
                    offset,
                    copied,
                    allocated: true,
                } = format.decode(entry)
                else {
                    continue;
                };
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
                    let at = l2_offset + (i * format.entry_bytes) as u64;
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
        let (layout, problems, mut base) = read_and_count(&*self.io)?;
        let structural: Vec<_> = problems.structural_errors().cloned().collect();
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
            &self.layout.refcounts,
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
        self.free_leaks(&comparison.leaks, changes)
    }

    /// Lowers the refcount of every leaked cluster to its references, as a complete walk of the
    /// image as it stands counted them; returns how many clusters it changed.
    fn free_leaks(&mut self, leaks: &[Mismatch], changes: &mut Vec<String>) -> Result<u64, Error> {
        if leaks.is_empty() {
            return Ok(0);
        }
        for leak in leaks {
            self.layout
                .refcounts
                .lower(&*self.io, leak.cluster, leak.referenced)?;
        }
        self.layout.refcounts.write_dirty(&mut *self.io)?;
        self.flush("flushing the repaired refcounts")?;
        let count = leaks.len() as u64;
        changes.push(format!(
            "freed {count} leaked cluster{} (refcount lowered to the references found):",
            if count == 1 { "" } else { "s" }
        ));
        changes.extend(
            describe_leaks(leaks, self.layout.header.cluster_bits)
                .into_iter()
                .map(|run| format!("  {run}")),
        );
        Ok(count)
    }
}
