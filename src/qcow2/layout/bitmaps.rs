// SPDX-License-Identifier: GPL-2.0-or-later

//! The bitmaps extension over the metadata map: its directory and each entry against QEMU's
//! rules, then every bitmap's table and data clusters against each other, the rest of the
//! metadata and guest data. What is wrong with a bitmap marked in use is only a warning.
#![forbid(unsafe_code)]

use super::*;
use crate::qcow2::check::finding::{EntryProblem, ExtensionProblem};

/// Checks one directory entry against QEMU's rules (`check_dir_entry` and the load path).
fn entry_problems(entry: &DirEntry, len: u64, cluster_size: u64) -> Vec<EntryProblem> {
    let mut out = Vec::new();
    let gran = u32::from(entry.granularity_bits);
    if entry.name.len() > bitmap_dir::MAX_NAME_SIZE {
        out.push(EntryProblem::NameTooLong {
            len: entry.name.len(),
            limit: bitmap_dir::MAX_NAME_SIZE,
        });
    }
    if entry.bitmap_type != bitmap_dir::TYPE_DIRTY_TRACKING {
        out.push(EntryProblem::UnsupportedType(entry.bitmap_type));
    }
    if !(bitmap_dir::MIN_GRANULARITY_BITS..=bitmap_dir::MAX_GRANULARITY_BITS).contains(&gran) {
        out.push(EntryProblem::Granularity(gran));
    }
    if entry.flags & bitmap_dir::RESERVED_FLAGS != 0 {
        out.push(EntryProblem::ReservedFlags(entry.flags));
    }
    if entry.table_size == 0 {
        out.push(EntryProblem::TableSizeZero);
    }
    if u64::from(entry.table_size) > bitmap_dir::MAX_TABLE_SIZE {
        out.push(EntryProblem::TableTooLarge {
            size: entry.table_size,
            limit: bitmap_dir::MAX_TABLE_SIZE,
        });
    }
    let phys = u64::from(entry.table_size) * cluster_size;
    if phys > bitmap_dir::MAX_PHYS_SIZE {
        out.push(EntryProblem::TooMuchData {
            size: entry.table_size,
            bytes: phys,
        });
    }
    if entry.table_offset == 0 || entry.table_offset % cluster_size != 0 {
        out.push(EntryProblem::TableOffset(entry.table_offset));
    }
    if out.is_empty() && !entry.in_use() {
        let expected = bitmap_table::table_size_for(len, gran, cluster_size);
        if expected != u64::from(entry.table_size) {
            out.push(EntryProblem::TableSizeMismatch {
                size: entry.table_size,
                disk_len: len,
                granularity: 1u64 << gran,
                cluster_size,
                expected,
            });
        }
    }
    out
}

pub(super) fn read_bitmaps(
    io: &dyn ImageIo,
    layout: &mut Layout,
    problems: &mut Problems,
    l2_tables: &[L2Ref],
    counter: Option<&mut Started>,
) -> Result<(), Error> {
    let Some(ext) = layout.header.bitmaps_ext().cloned() else {
        if layout.header.autoclear & AUTOCLEAR_BITMAPS != 0 {
            problems.push(
                Severity::Warning,
                Subject::Extension,
                FindingKind::AutoclearWithoutExtension,
            );
        }
        return Ok(());
    };
    let at = ext.offset;
    for &ignored in &layout.header.ignored_bitmaps_exts {
        problems.push(
            Severity::Warning,
            Subject::Extension,
            FindingKind::IgnoredExtension {
                at: ignored,
                used_at: at - 8,
            },
        );
    }
    if let Some(stated) = layout.header.bitmaps_ext_stated_len {
        let finding = Finding::new(
            Severity::Error,
            Subject::Extension,
            FindingKind::ExtensionLength { at: at - 8, stated },
        );
        let message = finding.to_string();
        problems.findings.push(finding);
        problems.qemu_refuses(&message);
        layout.ext_damage = Some(message);
    }
    if ext.data.len() != 24 {
        let finding = Finding::new(
            Severity::Error,
            Subject::Extension,
            FindingKind::ExtensionTooShort {
                at: at - 8,
                len: ext.data.len() as u64,
            },
        );
        problems.qemu_refuses(&finding.to_string());
        problems.findings.push(finding);
        layout.ext = ExtState::Broken;
        return Ok(());
    }
    if layout.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
        layout.ext = ExtState::Stale;
        problems.push(
            Severity::Warning,
            Subject::Extension,
            FindingKind::StaleExtension,
        );
        return Ok(());
    }
    let fields = BitmapsExt::parse(&ext.data);
    let cluster_size = layout.cluster_size();
    let file_len = layout.file_len;
    let mut errors = Vec::new();
    if fields.reserved != 0 {
        errors.push(ExtensionProblem::Reserved(fields.reserved));
    }
    if fields.nb_bitmaps == 0 {
        errors.push(ExtensionProblem::NoBitmaps);
    }
    if u64::from(fields.nb_bitmaps) > bitmap_dir::MAX_BITMAPS {
        errors.push(ExtensionProblem::TooManyBitmaps(fields.nb_bitmaps));
    }
    if fields.directory_offset % cluster_size != 0 || fields.directory_offset == 0 {
        errors.push(ExtensionProblem::DirectoryOffset(fields.directory_offset));
    }
    if fields.directory_size == 0 {
        errors.push(ExtensionProblem::DirectorySizeZero);
    }
    if fields.directory_size > bitmap_dir::MAX_DIRECTORY_SIZE {
        errors.push(ExtensionProblem::DirectoryTooLarge {
            size: fields.directory_size,
            limit: bitmap_dir::MAX_DIRECTORY_SIZE,
        });
    }
    if past_end(fields.directory_offset, fields.directory_size, file_len) {
        errors.push(ExtensionProblem::DirectoryPastEnd {
            offset: fields.directory_offset,
            size: fields.directory_size,
            file_len,
        });
    }
    if !errors.is_empty() {
        for problem in errors {
            let finding = Finding::new(
                Severity::Error,
                Subject::Extension,
                FindingKind::ExtensionField {
                    at: at - 8,
                    problem,
                },
            );
            problems.qemu_refuses(&finding.to_string());
            problems.findings.push(finding);
        }
        layout.ext = ExtState::Broken;
        return Ok(());
    }
    let raw = read_exact(
        io,
        fields.directory_offset,
        fields.directory_size,
        "the bitmap directory",
    )?;
    let mut directory_size = fields.directory_size;
    let entries = match bitmap_dir::parse(&raw, fields.nb_bitmaps, fields.directory_offset) {
        Ok(entries) => entries,
        Err(message) => {
            problems.push(
                Severity::Error,
                Subject::Directory,
                FindingKind::BadDirectory {
                    detail: message.clone(),
                },
            );
            problems.qemu_refuses(&message);
            // A count or size off by a few while the entries themselves are intact: read the
            // entries the directory's clusters hold, so that a repair can keep their bitmaps.
            let clusters = round_up(fields.directory_size, cluster_size)
                .min(bitmap_dir::MAX_DIRECTORY_SIZE)
                .min(file_len - fields.directory_offset);
            let whole = read_exact(
                io,
                fields.directory_offset,
                clusters,
                "the bitmap directory's clusters",
            )?;
            match bitmap_dir::salvage(&whole, fields.nb_bitmaps) {
                Some(entries) => {
                    directory_size = entries
                        .iter()
                        .map(|e| bitmap_dir::entry_size(e.name.len()))
                        .sum();
                    layout.ext_damage = Some(format!(
                        "{message}; the directory's clusters hold {} intact entr{} \
                         ({directory_size} bytes) where the extension says {} ({} bytes)",
                        entries.len(),
                        if entries.len() == 1 { "y" } else { "ies" },
                        fields.nb_bitmaps,
                        fields.directory_size
                    ));
                    entries
                }
                None => {
                    layout.ext = ExtState::Broken;
                    return Ok(());
                }
            }
        }
    };
    let len = layout.virtual_len();
    let mut names = HashSet::new();
    // Names as QEMU uses them (up to a NUL byte), with the first bitmap that has each.
    let mut qemu_names: HashMap<Vec<u8>, BitmapName> = HashMap::new();
    let mut duplicates = HashSet::new();
    let mut bitmaps: Vec<Bitmap> = Vec::with_capacity(entries.len());
    // Whether the bitmap's table is read and trusted. An in-use bitmap's table is only read to
    // free its clusters on removal (QEMU never reads it otherwise): whatever is wrong with it is
    // a warning, and the table is then left alone.
    let mut entry_ok = Vec::with_capacity(entries.len());
    // The first problem found with each bitmap.
    let mut damage: Vec<Option<Damage>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = BitmapName::from(entry.name.as_slice());
        let subject = Subject::Bitmap(name.clone());
        let pos = fields.directory_offset + entry.dir_pos;
        let found = entry_problems(&entry, len, cluster_size);
        let mut first_problem = None;
        let mut refused = |problems: &mut Problems, kind: FindingKind| {
            let finding = Finding::new(Severity::Error, subject.clone(), kind);
            first_problem.get_or_insert_with(|| Damage::Found(finding.clone()));
            problems.qemu_refuses(&finding.to_string());
            problems.findings.push(finding);
        };
        for problem in &found {
            refused(
                problems,
                FindingKind::BadEntry {
                    at: pos,
                    problem: problem.clone(),
                },
            );
        }
        if !names.insert(entry.name.clone()) {
            duplicates.insert(entry.name.clone());
            refused(problems, FindingKind::DuplicateName { at: pos });
        }
        // QEMU reads such names (and qemu-img writes the first kind): they are not problems.
        if std::str::from_utf8(&entry.name).is_err() {
            problems.push(
                Severity::Note,
                subject.clone(),
                FindingKind::NonUtf8Name { at: pos },
            );
        }
        if entry.name.is_empty() {
            problems.push(
                Severity::Note,
                subject.clone(),
                FindingKind::EmptyName { at: pos },
            );
        }
        let qemu_name = entry.name.split(|&b| b == 0).next().unwrap_or_default();
        match qemu_names.get(qemu_name) {
            Some(other) if *other != name => {
                let finding = Finding::new(
                    Severity::Warning,
                    subject.clone(),
                    FindingKind::NameClash {
                        at: pos,
                        qemu_name: crate::qcow2::name::escape(qemu_name),
                        other: other.clone(),
                    },
                );
                problems.qemu_refuses(&finding.to_string());
                problems.findings.push(finding);
            }
            Some(_) => {}
            None => {
                qemu_names.insert(qemu_name.to_vec(), name.clone());
            }
        }
        if let Some(nul) = entry.name.iter().position(|&b| b == 0) {
            problems.push(
                Severity::Note,
                subject.clone(),
                FindingKind::NameWithNul {
                    at: pos,
                    qemu_name: crate::qcow2::name::escape(&entry.name[..nul]),
                },
            );
        }
        if entry.in_use() {
            problems.push(Severity::Warning, subject.clone(), FindingKind::InUse);
        }
        let mut ok = found.is_empty();
        if ok
            && past_end(
                entry.table_offset,
                u64::from(entry.table_size) * 8,
                file_len,
            )
        {
            let finding = complaint(
                entry.in_use(),
                subject.clone(),
                FindingKind::TablePastEnd {
                    entry_at: pos,
                    offset: entry.table_offset,
                    entries: entry.table_size,
                    file_len,
                },
            );
            first_problem.get_or_insert_with(|| Damage::Found(finding.clone()));
            if !entry.in_use() {
                // QEMU reads the table of every bitmap not in use when it opens the image.
                problems.qemu_refuses(&finding.to_string());
            }
            problems.findings.push(finding);
            ok = false;
        }
        entry_ok.push(ok);
        damage.push(first_problem);
        bitmaps.push(Bitmap {
            entry,
            table: Vec::new(),
            trusted: false,
            damage: None,
            entry_valid: found.is_empty(),
        });
    }
    let in_use: Vec<bool> = bitmaps.iter().map(|b| b.entry.in_use()).collect();
    let names_of: Vec<BitmapName> = bitmaps
        .iter()
        .map(|b| BitmapName::from(b.entry.name.as_slice()))
        .collect();
    // Reports overlaps; the bitmaps involved are no longer trusted.
    let mut directory_damaged = false;
    let mut settle = |found: Vec<Overlap>,
                      problems: &mut Problems,
                      entry_ok: &mut Vec<bool>,
                      damage: &mut Vec<Option<Damage>>| {
        for mut overlap in found {
            directory_damaged |= overlap.directory;
            // Two bitmaps sharing a cluster, one in use and one consistent: the in-use one was
            // not saved properly (QEMU never reads its table), so it is the one to blame.
            if let [a, b] = overlap.bitmaps[..] {
                if in_use[a] != in_use[b] {
                    overlap.bitmaps = vec![if in_use[a] { a } else { b }];
                }
            }
            let soft = !overlap.bitmaps.is_empty() && overlap.bitmaps.iter().all(|&b| in_use[b]);
            // The first bitmap involved, else the directory, else the bitmaps as a whole.
            let subject = match overlap.bitmaps.first() {
                Some(&b) => Subject::Bitmap(names_of[b].clone()),
                None if overlap.directory => Subject::Directory,
                None => Subject::Extension,
            };
            let finding = overlap
                .kind
                .clone()
                .map(|kind| complaint(soft, subject, kind));
            for &b in &overlap.bitmaps {
                entry_ok[b] = false;
                damage[b].get_or_insert_with(|| match &finding {
                    Some(finding) => Damage::Found(finding.clone()),
                    // Past the overlaps reported one by one.
                    None => Damage::UnreportedOverlap,
                });
            }
            if !soft {
                problems.cross_link_clusters.extend(&overlap.clusters);
            }
            if let Some(finding) = finding {
                problems.findings.push(finding);
            }
        }
    };

    // Before reading any table: tables must not overlap each other or other metadata.
    let dir_region = Region {
        start: fields.directory_offset,
        end: round_up(fields.directory_offset + directory_size, cluster_size),
        owner: Owner::Directory,
    };
    let mut regions = layout.metadata.clone();
    regions.push(dir_region);
    for (index, bitmap) in bitmaps.iter().enumerate() {
        if entry_ok[index] {
            regions.push(table_region(bitmap, index, cluster_size));
        }
    }
    let cluster_bits = layout.header.cluster_bits;
    let found = overlaps(&mut regions, &bitmaps, true, cluster_bits, |a, b| {
        is_bitmap_owner(a.owner) || is_bitmap_owner(b.owner)
    });
    settle(found, problems, &mut entry_ok, &mut damage);

    // The tables, then the data clusters they point to.
    let mut data_regions = Vec::new();
    for (index, bitmap) in bitmaps.iter_mut().enumerate() {
        if !entry_ok[index] {
            continue;
        }
        let offset = bitmap.entry.table_offset;
        let raw = read_exact(
            io,
            offset,
            u64::from(bitmap.entry.table_size) * 8,
            &format!("the bitmap table of '{}'", names_of[index]),
        )?;
        let table = bitmap_table::decode(&raw);
        let mut ok = true;
        let mut regions = Vec::new();
        for (i, &entry) in table.iter().enumerate() {
            let entry_at = offset + 8 * i as u64;
            let subject = || Subject::Bitmap(names_of[index].clone());
            if let Some(why) = bitmap_table::entry_problem(entry, cluster_size) {
                let finding = complaint(
                    in_use[index],
                    subject(),
                    FindingKind::InvalidTableEntry {
                        index: i as u64,
                        at: entry_at,
                        value: entry,
                        why,
                    },
                );
                damage[index].get_or_insert_with(|| Damage::Found(finding.clone()));
                if !in_use[index] {
                    problems.qemu_refuses(&finding.to_string());
                }
                problems.findings.push(finding);
                ok = false;
                continue;
            }
            let data = entry & bitmap_table::ENTRY_OFFSET_MASK;
            if data == 0 {
                continue;
            }
            if data.saturating_add(cluster_size) > file_len {
                let finding = complaint(
                    in_use[index],
                    subject(),
                    FindingKind::TableEntryPastEnd {
                        index: i as u64,
                        at: entry_at,
                        data,
                        file_len,
                    },
                );
                damage[index].get_or_insert_with(|| Damage::Found(finding.clone()));
                if !in_use[index] {
                    problems.qemu_refuses(&finding.to_string());
                }
                problems.findings.push(finding);
                ok = false;
                continue;
            }
            regions.push(Region {
                start: data,
                end: data + cluster_size,
                owner: Owner::BitmapData(index, i as u64),
            });
        }
        if ok {
            bitmap.table = table;
            data_regions.extend(regions);
        } else {
            entry_ok[index] = false;
        }
    }
    // QEMU reads the table of every bitmap not in use while opening the image, overlaps or
    // not: one whose entries it rejects (a table laid over an L1 table reads COPIED flags as
    // reserved bits) makes it refuse the image.
    for (index, bitmap) in bitmaps.iter().enumerate() {
        let entry = &bitmap.entry;
        let bytes = u64::from(entry.table_size) * 8;
        if entry_ok[index]
            || in_use[index]
            || problems.qemu_refuses.is_some()
            || entry.table_offset % cluster_size != 0
            || past_end(entry.table_offset, bytes, file_len)
        {
            continue;
        }
        let raw = read_exact(io, entry.table_offset, bytes, "a bitmap table")?;
        let table = bitmap_table::decode(&raw);
        if let Some((i, why)) = table
            .iter()
            .enumerate()
            .find_map(|(i, &e)| bitmap_table::entry_problem(e, cluster_size).map(|why| (i, why)))
        {
            let finding = Finding::new(
                Severity::Error,
                Subject::Bitmap(names_of[index].clone()),
                FindingKind::InvalidTableEntry {
                    index: i as u64,
                    at: entry.table_offset + 8 * i as u64,
                    value: table[i],
                    why,
                },
            );
            problems.qemu_refuses(&finding.to_string());
        }
    }
    let guest = guest_cross_links(
        io,
        layout,
        &bitmaps,
        &entry_ok,
        &dir_region,
        &data_regions,
        l2_tables,
        counter,
    )?;
    settle(guest, problems, &mut entry_ok, &mut damage);
    let mut all = regions;
    all.extend(data_regions);
    let found = overlaps(&mut all, &bitmaps, true, cluster_bits, |a, b| {
        matches!(a.owner, Owner::BitmapData(..)) || matches!(b.owner, Owner::BitmapData(..))
    });
    settle(found, problems, &mut entry_ok, &mut damage);
    // An untrusted table is never used: removing its bitmap leaks what it points to.
    for (index, bitmap) in bitmaps.iter_mut().enumerate() {
        if !entry_ok[index] {
            bitmap.table = Vec::new();
        }
        bitmap.trusted = entry_ok[index] && !duplicates.contains(&bitmap.entry.name);
        if !bitmap.trusted {
            bitmap.damage = Some(damage[index].take().unwrap_or(Damage::Invalid));
        }
    }
    layout.directory_damaged = directory_damaged;

    // Padding bits of the last data cluster of every consistent bitmap.
    for (index, bitmap) in bitmaps.iter().enumerate() {
        if !entry_ok[index] || bitmap.entry.in_use() {
            continue;
        }
        let Some(&last) = bitmap.table.last() else {
            continue;
        };
        let data = last & bitmap_table::ENTRY_OFFSET_MASK;
        if data == 0 {
            continue;
        }
        let gran = u32::from(bitmap.entry.granularity_bits);
        let buf = read_exact(io, data, cluster_size, "a bitmap data cluster")?;
        let last_index = bitmap.table.len() as u64 - 1;
        if let Some(bit) = bitmap_table::padding_bit(&buf, len, gran, cluster_size, last_index) {
            // QEMU loads an all-ones table entry with whole words of ones and writes them back:
            // padding bits are ignored on reading, and our writes clear them.
            problems.push(
                Severity::Note,
                Subject::Bitmap(names_of[index].clone()),
                FindingKind::PaddingBit {
                    data,
                    index: last_index,
                    entry_at: bitmap.entry.table_offset + 8 * last_index,
                    bit,
                },
            );
        }
    }
    layout.ext = ExtState::Valid;
    layout.directory = Some((fields.directory_offset, directory_size));
    layout.bitmaps = bitmaps;
    Ok(())
}

/// An error, or a warning when it concerns only bitmaps in use (whose content QEMU never
/// trusts: they can still be listed and removed).
fn complaint(in_use_only: bool, subject: Subject, kind: FindingKind) -> Finding {
    let severity = if in_use_only {
        Severity::Warning
    } else {
        Severity::Error
    };
    Finding::new(severity, subject, kind)
}
