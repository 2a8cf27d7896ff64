// SPDX-License-Identifier: GPL-2.0-or-later

//! The bitmaps extension over the metadata map: its directory and each entry against QEMU's
//! rules, then every bitmap's table and data clusters against each other, the rest of the
//! metadata and guest data. What is wrong with a bitmap marked in use is only a warning.
#![forbid(unsafe_code)]

use super::*;

/// Checks one directory entry against QEMU's rules (`check_dir_entry` and the load path).
fn entry_problems(entry: &DirEntry, len: u64, cluster_size: u64) -> Vec<String> {
    let mut out = Vec::new();
    let gran = u32::from(entry.granularity_bits);
    if entry.name.len() > bitmap_dir::MAX_NAME_SIZE {
        out.push(format!(
            "name_size {} exceeds QEMU's limit of {}",
            entry.name.len(),
            bitmap_dir::MAX_NAME_SIZE
        ));
    }
    if entry.bitmap_type != bitmap_dir::TYPE_DIRTY_TRACKING {
        out.push(format!(
            "type {} is not supported (only 1, dirty tracking)",
            entry.bitmap_type
        ));
    }
    if !(bitmap_dir::MIN_GRANULARITY_BITS..=bitmap_dir::MAX_GRANULARITY_BITS).contains(&gran) {
        out.push(format!(
            "granularity_bits {gran} is out of range (QEMU supports 9 to 31)"
        ));
    }
    if entry.flags & bitmap_dir::RESERVED_FLAGS != 0 {
        out.push(format!(
            "flags {:#x} has reserved bits set (only bit 0 in_use and bit 1 auto are supported)",
            entry.flags
        ));
    }
    if entry.table_size == 0 {
        out.push("bitmap_table_size is 0".to_string());
    }
    if u64::from(entry.table_size) > bitmap_dir::MAX_TABLE_SIZE {
        out.push(format!(
            "bitmap_table_size {} exceeds QEMU's limit of {}",
            entry.table_size,
            bitmap_dir::MAX_TABLE_SIZE
        ));
    }
    let phys = u64::from(entry.table_size) * cluster_size;
    if phys > bitmap_dir::MAX_PHYS_SIZE {
        out.push(format!(
            "bitmap_table_size {} describes {phys} bytes of bitmap data, more than QEMU's \
             512 MiB limit",
            entry.table_size
        ));
    }
    if entry.table_offset == 0 || entry.table_offset % cluster_size != 0 {
        out.push(format!(
            "bitmap_table_offset {:#x} is not a nonzero multiple of the cluster size",
            entry.table_offset
        ));
    }
    if out.is_empty() && !entry.in_use() {
        let expected = bitmap_table::table_size_for(len, gran, cluster_size);
        if expected != u64::from(entry.table_size) {
            out.push(format!(
                "bitmap_table_size {} does not match the virtual size: a {len}-byte disk at \
                 granularity {} with {cluster_size}-byte clusters needs {expected} entries",
                entry.table_size,
                1u64 << gran
            ));
        }
    }
    out
}

pub(super) fn read_bitmaps(
    io: &dyn ImageIo,
    layout: &mut Layout,
    problems: &mut Problems,
    l2_tables: &[L2Ref],
) -> Result<(), Error> {
    let Some(ext) = layout.header.bitmaps_ext().cloned() else {
        if layout.header.autoclear & AUTOCLEAR_BITMAPS != 0 {
            problems.warnings.push(
                "autoclear bit 0 (bitmaps) is set but there is no bitmaps extension; the next \
                 write clears it"
                    .into(),
            );
        }
        return Ok(());
    };
    let at = ext.offset;
    for &ignored in &layout.header.ignored_bitmaps_exts {
        problems.warnings.push(format!(
            "the header has another bitmaps extension at {ignored:#x}, before the one at {:#x}: \
             QEMU reads only the last (the specification allows one), and so does this \
             library; 'check -r' drops the other",
            at - 8
        ));
    }
    if let Some(stated) = layout.header.bitmaps_ext_stated_len {
        let message = format!(
            "bitmaps extension at {:#x}: its length is {stated}, not 24 (QEMU refuses to open \
             the image); its fields are read from its first 24 bytes",
            at - 8
        );
        problems.errors.push(message.clone());
        problems.qemu_refuses(&message);
        layout.ext_damage = Some(message);
    }
    if ext.data.len() != 24 {
        let message = format!(
            "bitmaps extension at {:#x}: length {} is not 24",
            at - 8,
            ext.data.len()
        );
        problems.qemu_refuses(&message);
        problems.errors.push(message);
        layout.ext = ExtState::Broken;
        return Ok(());
    }
    if layout.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
        layout.ext = ExtState::Stale;
        problems.warnings.push(
            "the bitmaps extension is stale (autoclear bit 0 is clear: a program without bitmap \
             support modified the image), so the image has no usable bitmaps; their clusters are \
             leaked ('qemu-img check -r leaks' reclaims them) and the next write drops the \
             extension"
                .into(),
        );
        return Ok(());
    }
    let fields = BitmapsExt::parse(&ext.data);
    let cluster_size = layout.cluster_size();
    let file_len = layout.file_len;
    let mut errors = Vec::new();
    if fields.reserved != 0 {
        errors.push(format!(
            "bitmaps extension at {:#x}: the reserved field (bytes 4-7) is {:#x}, not zero",
            at - 8,
            fields.reserved
        ));
    }
    if fields.nb_bitmaps == 0 {
        errors.push(format!(
            "bitmaps extension at {:#x}: nb_bitmaps is 0",
            at - 8
        ));
    }
    if u64::from(fields.nb_bitmaps) > bitmap_dir::MAX_BITMAPS {
        errors.push(format!(
            "bitmaps extension at {:#x}: nb_bitmaps {} exceeds QEMU's limit of 65535",
            at - 8,
            fields.nb_bitmaps
        ));
    }
    if fields.directory_offset % cluster_size != 0 || fields.directory_offset == 0 {
        errors.push(format!(
            "bitmaps extension at {:#x}: bitmap_directory_offset {:#x} is not a nonzero \
             multiple of the cluster size",
            at - 8,
            fields.directory_offset
        ));
    }
    if fields.directory_size == 0 {
        errors.push(format!(
            "bitmaps extension at {:#x}: bitmap_directory_size is 0",
            at - 8
        ));
    }
    if fields.directory_size > bitmap_dir::MAX_DIRECTORY_SIZE {
        errors.push(format!(
            "bitmaps extension at {:#x}: bitmap_directory_size {} exceeds QEMU's limit of {}",
            at - 8,
            fields.directory_size,
            bitmap_dir::MAX_DIRECTORY_SIZE
        ));
    }
    if past_end(fields.directory_offset, fields.directory_size, file_len) {
        errors.push(format!(
            "bitmaps extension at {:#x}: the bitmap directory at {:#x} ({} bytes) extends past \
             the end of the file ({file_len} bytes)",
            at - 8,
            fields.directory_offset,
            fields.directory_size
        ));
    }
    if !errors.is_empty() {
        problems.qemu_refuses(&errors[0]);
        problems.errors.extend(errors);
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
            problems.errors.push(message.clone());
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
    let mut qemu_names: HashMap<Vec<u8>, String> = HashMap::new();
    let mut duplicates = HashSet::new();
    let mut bitmaps: Vec<Bitmap> = Vec::with_capacity(entries.len());
    // Whether the bitmap's table is read and trusted. An in-use bitmap's table is only read to
    // free its clusters on removal (QEMU never reads it otherwise): whatever is wrong with it is
    // a warning, and the table is then left alone.
    let mut entry_ok = Vec::with_capacity(entries.len());
    // The first problem found with each bitmap.
    let mut damage: Vec<Option<String>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = entry.display_name();
        let pos = fields.directory_offset + entry.dir_pos;
        let found = entry_problems(&entry, len, cluster_size);
        let mut first_problem = None;
        for message in &found {
            let message = format!("bitmap '{name}' (directory entry at {pos:#x}): {message}");
            first_problem.get_or_insert_with(|| message.clone());
            problems.qemu_refuses(&message);
            problems.errors.push(message);
        }
        if !names.insert(entry.name.clone()) {
            duplicates.insert(entry.name.clone());
            let message = format!(
                "bitmap '{name}' (directory entry at {pos:#x}): the name is used by another \
                 bitmap too (names must be unique)"
            );
            first_problem.get_or_insert_with(|| message.clone());
            problems.qemu_refuses(&message);
            problems.errors.push(message);
        }
        // QEMU reads such names (and qemu-img writes the first kind): they are not problems.
        if std::str::from_utf8(&entry.name).is_err() {
            problems.notes.push(format!(
                "bitmap '{name}' (directory entry at {pos:#x}): the name is not valid UTF-8 \
                 (shown with \\xHH escapes)"
            ));
        }
        if entry.name.is_empty() {
            problems.notes.push(format!(
                "bitmap '' (directory entry at {pos:#x}): the name is empty (QEMU reads it, \
                 but creates no such bitmap)"
            ));
        }
        let qemu_name = entry.name.split(|&b| b == 0).next().unwrap_or_default();
        match qemu_names.get(qemu_name) {
            Some(other) if *other != name => {
                problems.name_clashes += 1;
                let message = format!(
                    "bitmap '{name}' (directory entry at {pos:#x}): QEMU reads the name up to its \
                 NUL byte, as '{}', the name of bitmap '{other}' too, and so refuses to open \
                 the image (\"Bitmap already exists\"); remove or replace one of them",
                    crate::qcow2::name::escape(qemu_name)
                );
                problems.qemu_refuses(&message);
                problems.warnings.push(message);
            }
            Some(_) => {}
            None => {
                qemu_names.insert(qemu_name.to_vec(), name.clone());
            }
        }
        if let Some(nul) = entry.name.iter().position(|&b| b == 0) {
            problems.notes.push(format!(
                "bitmap '{name}' (directory entry at {pos:#x}): the name contains a NUL byte; \
                 QEMU knows the bitmap as '{}', the name up to it",
                crate::qcow2::name::escape(&entry.name[..nul])
            ));
        }
        if entry.in_use() {
            problems.warnings.push(format!(
                "bitmap '{name}' is in use (flag in_use): it was not saved properly and its \
                 content may be inconsistent; it cannot be loaded, only inspected or removed"
            ));
        }
        let mut ok = found.is_empty();
        if ok
            && past_end(
                entry.table_offset,
                u64::from(entry.table_size) * 8,
                file_len,
            )
        {
            let message = format!(
                "bitmap '{name}' (directory entry at {pos:#x}): the bitmap table at {:#x} ({} \
                 entries) extends past the end of the file ({file_len} bytes)",
                entry.table_offset, entry.table_size
            );
            first_problem.get_or_insert_with(|| message.clone());
            if !entry.in_use() {
                // QEMU reads the table of every bitmap not in use when it opens the image.
                problems.qemu_refuses(&message);
            }
            complain(problems, entry.in_use(), message);
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
    // Reports overlaps; the bitmaps involved are no longer trusted.
    let mut directory_damaged = false;
    let mut settle = |found: Vec<Overlap>,
                      problems: &mut Problems,
                      entry_ok: &mut Vec<bool>,
                      damage: &mut Vec<Option<String>>| {
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
            for &b in &overlap.bitmaps {
                entry_ok[b] = false;
                damage[b].get_or_insert_with(|| {
                    if overlap.message.is_empty() {
                        "its clusters overlap other data".to_string()
                    } else {
                        overlap.message.clone()
                    }
                });
            }
            if !soft {
                problems.cross_link_clusters.extend(&overlap.clusters);
            }
            if !overlap.message.is_empty() {
                problems.cross_link_errors += usize::from(!soft);
                complain(problems, soft, overlap.message);
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
    let found = overlaps(&mut regions, &bitmaps, cluster_bits, |a, b| {
        is_bitmap_owner(a.owner) || is_bitmap_owner(b.owner)
    });
    settle(found, problems, &mut entry_ok, &mut damage);

    // The tables, then the data clusters they point to.
    let mut data_regions = Vec::new();
    for (index, bitmap) in bitmaps.iter_mut().enumerate() {
        if !entry_ok[index] {
            continue;
        }
        let name = bitmap.name();
        let offset = bitmap.entry.table_offset;
        let raw = read_exact(
            io,
            offset,
            u64::from(bitmap.entry.table_size) * 8,
            &format!("the bitmap table of '{name}'"),
        )?;
        let table = bitmap_table::decode(&raw);
        let mut ok = true;
        let mut regions = Vec::new();
        for (i, &entry) in table.iter().enumerate() {
            let entry_at = offset + 8 * i as u64;
            if let Some(why) = bitmap_table::entry_problem(entry, cluster_size) {
                let message = format!(
                    "bitmap '{name}': bitmap table entry {i} at {entry_at:#x} is {entry:#x}: {why}"
                );
                damage[index].get_or_insert_with(|| message.clone());
                if !in_use[index] {
                    problems.qemu_refuses(&message);
                }
                complain(problems, in_use[index], message);
                ok = false;
                continue;
            }
            let data = entry & bitmap_table::ENTRY_OFFSET_MASK;
            if data == 0 {
                continue;
            }
            if data.saturating_add(cluster_size) > file_len {
                let message = format!(
                    "bitmap '{name}': bitmap table entry {i} at {entry_at:#x} points to a data \
                     cluster at {data:#x}, past the end of the file ({file_len} bytes)"
                );
                damage[index].get_or_insert_with(|| message.clone());
                if !in_use[index] {
                    problems.qemu_refuses(&message);
                }
                complain(problems, in_use[index], message);
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
            problems.qemu_refuses(&format!(
                "bitmap '{}': bitmap table entry {i} at {:#x} is {:#x}: {why}",
                bitmap.name(),
                entry.table_offset + 8 * i as u64,
                table[i]
            ));
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
    )?;
    settle(guest, problems, &mut entry_ok, &mut damage);
    let mut all = regions;
    all.extend(data_regions);
    let found = overlaps(&mut all, &bitmaps, cluster_bits, |a, b| {
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
            bitmap.damage = damage[index]
                .take()
                .or_else(|| Some("its entry or table is invalid".into()));
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
            problems.notes.push(format!(
                "bitmap '{}': the last data cluster at {data:#x} (bitmap table entry {last_index} \
                 at {:#x}) has padding bit {bit} set past the end of the bitmap; it is ignored \
                 (QEMU writes such bits) and the next store of the bitmap clears it",
                bitmap.name(),
                bitmap.entry.table_offset + 8 * last_index
            ));
        }
    }
    layout.ext = ExtState::Valid;
    layout.directory = Some((fields.directory_offset, directory_size));
    layout.bitmaps = bitmaps;
    Ok(())
}

/// An error, or a warning when it concerns only bitmaps in use (whose content QEMU never
/// trusts: they can still be listed and removed).
fn complain(problems: &mut Problems, in_use_only: bool, message: String) {
    if in_use_only {
        problems.warnings.push(message);
    } else {
        problems.errors.push(message);
    }
}
