// SPDX-License-Identifier: GPL-2.0-or-later

//! One function per subcommand: open the image, call the library, print.

use std::io::{self, Read, Write};
use std::path::Path;

use crate::qcow2::{BitmapFlags, BitmapInfo, BitmapName, Finding, Image, OpenOptions, RepairMode};
use anyhow::{anyhow, bail, Context, Result};
use hbitmap::HBitmap;
use serde::Deserialize;

use crate::cli::{DumpFormat, DumpOutputArgs, OutputArgs, Repair};
use crate::extents::{self, dirty_bytes, Extent};
use crate::output::{
    self, BitmapReport, CheckOutput, DumpReport, FindingOutput, ImageReport, JsonName,
};
use crate::size::format_size;

/// Opens an image for reading; `force_share` skips QEMU's locks.
pub fn open_read(path: &Path, force_share: bool) -> Result<Image> {
    Image::open(
        path,
        OpenOptions {
            write: false,
            force_share,
        },
    )
    .with_context(|| path.display().to_string())
}

/// Opens an image for writing.
pub fn open_write(path: &Path) -> Result<Image> {
    Image::open(
        path,
        OpenOptions {
            write: true,
            force_share: false,
        },
    )
    .with_context(|| path.display().to_string())
}

/// Runs `f` on an image opened for writing and closes it, naming the image in any error.
fn edit(path: &Path, f: impl FnOnce(&mut Image) -> Result<()>) -> Result<()> {
    let mut image = open_write(path)?;
    let done = f(&mut image);
    // Close even after an error, so that nothing stays half-written; the first error wins.
    let closed = image.close();
    done.and(closed.map_err(anyhow::Error::from))
        .with_context(|| path.display().to_string())
}

fn find<'a>(image: &'a Image, name: &BitmapName) -> Result<&'a BitmapInfo> {
    image
        .bitmap(name)
        .ok_or_else(|| anyhow!("no bitmap named '{name}'"))
}

/// The `list` report of an open image.
pub fn image_report(image: &Image, shown_path: &Path) -> Result<ImageReport> {
    let mut bitmaps = Vec::with_capacity(image.bitmaps().len());
    for info in image.bitmaps() {
        let dirty = if info.in_use {
            None
        } else {
            let bitmap = image
                .inspect_bitmap(&info.name)
                .with_context(|| format!("bitmap '{}'", info.name))?;
            Some(dirty_bytes(&bitmap))
        };
        bitmaps.push(BitmapReport {
            name: JsonName(info.name.clone()),
            granularity: info.granularity,
            flags: output::flag_names(info.in_use, info.auto),
            dirty_bytes: dirty,
        });
    }
    Ok(ImageReport {
        image: shown_path.display().to_string(),
        virtual_size: image.virtual_size(),
        cluster_size: image.cluster_size(),
        bitmaps,
    })
}

pub fn list(
    out: &mut impl Write,
    path: &Path,
    force_share: bool,
    format: OutputArgs,
) -> Result<()> {
    let image = open_read(path, force_share)?;
    let report = image_report(&image, path).with_context(|| path.display().to_string())?;
    if format.json() {
        output::write_json(out, &report)?;
    } else {
        output::write_list(out, &report)?;
    }
    Ok(())
}

/// The `dump` report of a loaded bitmap.
pub fn dump_report(name: &BitmapName, granularity: u64, bitmap: &HBitmap) -> DumpReport {
    DumpReport {
        name: Some(JsonName(name.clone())),
        granularity: Some(granularity),
        virtual_size: Some(bitmap.size()),
        dirty_bytes: Some(dirty_bytes(bitmap)),
        extents: bitmap.extents().map(Extent::from).collect(),
    }
}

pub fn dump(
    out: &mut impl Write,
    path: &Path,
    name: &BitmapName,
    force: bool,
    force_share: bool,
    format: DumpOutputArgs,
) -> Result<()> {
    let image = open_read(path, force_share)?;
    let report = (|| {
        let info = find(&image, name)?;
        if info.in_use && !force {
            bail!(
                "bitmap '{name}' is in use: a program that had the image open did not store \
                 it, so its content is inconsistent (use --force to dump it anyway)"
            );
        }
        if info.in_use {
            eprintln!(
                "qbitmap: warning: {}: bitmap '{name}' is in use; its content may be inconsistent",
                path.display()
            );
        }
        let bitmap = image.inspect_bitmap(name)?;
        Ok(dump_report(name, info.granularity, &bitmap))
    })()
    .with_context(|| path.display().to_string())?;
    match format.format() {
        DumpFormat::Json => output::write_dump_json(out, &report)?,
        DumpFormat::Nbdinfo => output::write_nbdinfo_map(out, &report)?,
        DumpFormat::Human => output::write_dump(out, &path.display().to_string(), &report)?,
    }
    Ok(())
}

/// `add`; with `exist_ok` an existing bitmap that `add` would have made (same granularity and
/// enabled state, not in use) is success, so that a retry reaches the same end state.
pub fn add(
    path: &Path,
    name: &BitmapName,
    granularity: Option<u64>,
    disabled: bool,
    exist_ok: bool,
) -> Result<()> {
    edit(path, |image| {
        let granularity = granularity.unwrap_or_else(|| image.default_granularity());
        if let Some(existing) = image.bitmap(name) {
            if !exist_ok {
                bail!("a bitmap named '{name}' already exists");
            }
            let mut differences = Vec::new();
            if existing.granularity != granularity {
                differences.push(format!(
                    "its granularity is {}, not {}",
                    format_size(existing.granularity),
                    format_size(granularity)
                ));
            }
            if existing.auto == disabled {
                differences.push(format!(
                    "it is {}",
                    if existing.auto { "enabled" } else { "disabled" }
                ));
            }
            if existing.in_use {
                differences.push("it is in use (inconsistent)".to_string());
            }
            if !differences.is_empty() {
                bail!(
                    "a bitmap named '{name}' already exists and differs from the one requested: \
                     {}",
                    differences.join(", ")
                );
            }
            return Ok(());
        }
        Ok(image.add_bitmap(name, granularity, !disabled)?)
    })
}

/// `remove`; with `missing_ok` a missing bitmap is success (a retry after it was removed).
pub fn remove(path: &Path, name: &BitmapName, missing_ok: bool) -> Result<()> {
    edit(path, |image| {
        if missing_ok && image.bitmap(name).is_none() {
            return Ok(());
        }
        find(image, name)?;
        Ok(image.remove_bitmap(name)?)
    })
}

pub fn clear(path: &Path, name: &BitmapName) -> Result<()> {
    edit(path, |image| {
        find(image, name)?;
        Ok(image.clear_bitmap(name)?)
    })
}

pub fn set_enabled(path: &Path, name: &BitmapName, enabled: bool) -> Result<()> {
    edit(path, |image| {
        find(image, name)?;
        Ok(image.set_enabled(name, enabled)?)
    })
}

pub fn merge(
    path: &Path,
    source: &BitmapName,
    target: &BitmapName,
    source_image: Option<&Path>,
    force_share: bool,
) -> Result<()> {
    let same_image = match source_image {
        Some(other) => same_file(path, other),
        None => true,
    };
    if same_image {
        return edit(path, |image| {
            find(image, source)?;
            find(image, target)?;
            Ok(image.merge_bitmap(source, target)?)
        });
    }
    let other_path = source_image.expect("a source image");
    let other = open_read(other_path, force_share)?;
    if other.bitmap(source).is_none() {
        bail!("{}: no bitmap named '{source}'", other_path.display());
    }
    edit(path, |image| {
        find(image, target)?;
        image
            .merge_bitmap_from(&other, source, target)
            .with_context(|| format!("merging '{source}' of {}", other_path.display()))
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `set` (dirty = true) and `reset` (dirty = false) of a byte range.
pub fn set_range(
    path: &Path,
    name: &BitmapName,
    offset: u64,
    length: u64,
    dirty: bool,
) -> Result<()> {
    edit(path, |image| {
        let info = find(image, name)?.clone();
        let virtual_size = image.virtual_size();
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= virtual_size)
            .ok_or_else(|| {
                anyhow!(
                    "range {offset}+{length} ends past the virtual size of {virtual_size} \
                     bytes ({})",
                    format_size(virtual_size)
                )
            })?;
        if info.in_use {
            bail!("bitmap '{name}' is in use and its content inconsistent; clear or remove it");
        }
        let granule = info.granularity;
        if !dirty
            && (!offset.is_multiple_of(granule)
                || !(end.is_multiple_of(granule) || end == virtual_size))
        {
            bail!(
                "range {offset}+{length} is not aligned to the bitmap's granularity ({}): \
                 resetting it would also mark clean bytes outside it",
                format_size(granule)
            );
        }
        if length == 0 {
            return Ok(());
        }
        Ok(image.edit_bitmap(name, |bitmap| {
            if dirty {
                bitmap.set(offset, length);
            } else {
                bitmap.reset(offset, length);
            }
        })?)
    })
}

/// One extent of `import`'s input. Besides `dump`'s `{offset, length}` it takes the entries of
/// `nbdinfo --map=qemu:dirty-bitmap:NAME --json`, whose `type` bit 0 says "dirty".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportExtent {
    offset: u64,
    length: u64,
    #[serde(default, rename = "type")]
    kind: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

/// What `import` reads: a `dump` document, or a bare array of extents.
struct ImportDoc {
    granularity: Option<u64>,
    extents: Vec<Extent>,
}

fn parse_import(text: &str) -> Result<ImportDoc> {
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Document {
        granularity: Option<u64>,
        extents: Vec<ImportExtent>,
    }
    let value: serde_json::Value = serde_json::from_str(text).context("invalid JSON")?;
    let (granularity, extents) = if value.is_array() {
        (None, serde_json::from_value::<Vec<ImportExtent>>(value)?)
    } else {
        let doc: Document = serde_json::from_value(value).context(
            "expected a dump document {\"extents\": [{\"offset\": N, \"length\": N}, ...]}",
        )?;
        (doc.granularity, doc.extents)
    };
    if let Some(g) = granularity {
        if !g.is_power_of_two() {
            bail!("granularity {g} is not a power of two");
        }
    }
    let extents = extents
        .into_iter()
        .filter(|e| e.kind.is_none_or(|kind| kind & 1 != 0))
        .map(|e| Extent {
            offset: e.offset,
            length: e.length,
        })
        .collect();
    Ok(ImportDoc {
        granularity,
        extents,
    })
}

/// Reads FILE, or standard input for None or "-".
fn read_input(file: Option<&Path>) -> Result<(String, String)> {
    let mut text = String::new();
    match file {
        Some(path) if path != Path::new("-") => {
            let shown = path.display().to_string();
            std::fs::File::open(path)
                .and_then(|mut f| f.read_to_string(&mut text))
                .with_context(|| shown.clone())?;
            Ok((shown, text))
        }
        _ => {
            io::stdin()
                .read_to_string(&mut text)
                .context("standard input")?;
            Ok(("standard input".into(), text))
        }
    }
}

pub fn import(
    path: &Path,
    name: &BitmapName,
    granularity: Option<u64>,
    disabled: bool,
    file: Option<&Path>,
) -> Result<()> {
    let (source, text) = read_input(file)?;
    let doc = parse_import(&text).with_context(|| source.clone())?;
    edit(path, |image| {
        let existing = image.bitmap(name).cloned();
        let granularity = granularity
            .or(doc.granularity)
            .or(existing.as_ref().map(|e| e.granularity))
            .unwrap_or_else(|| image.default_granularity());
        let virtual_size = image.virtual_size();
        let ranges =
            extents::normalize(&doc.extents, virtual_size).with_context(|| source.clone())?;
        let unaligned = extents::unaligned(&ranges, granularity, virtual_size);
        if unaligned > 0 {
            eprintln!(
                "qbitmap: warning: {source}: {unaligned} extent(s) do not start and end on \
                 {} boundaries; whole granules were marked dirty",
                format_size(granularity)
            );
        }
        let mut bitmap = HBitmap::new(virtual_size, granularity.trailing_zeros())?;
        for range in ranges {
            bitmap.set(range.start, range.end - range.start);
        }
        let auto = !disabled && existing.as_ref().is_none_or(|e| e.auto);
        let flags = BitmapFlags {
            in_use: false,
            auto,
        };
        Ok(image.store_bitmap(name, &bitmap, flags)?)
    })
}

/// `check [-r leaks|all]`: returns qemu-img check's exit status (0 consistent, 1 check error
/// or refused repair, 2 corruptions, 3 leaks only).
pub fn check(
    out: &mut impl Write,
    path: &Path,
    force_share: bool,
    repair: Option<Repair>,
    format: OutputArgs,
) -> Result<u8> {
    let options = OpenOptions {
        write: false,
        force_share,
    };
    let (report, repaired) = match repair {
        None => {
            // check_file reports every problem of an image too damaged to open.
            let report =
                Image::check_file(path, options).with_context(|| path.display().to_string())?;
            (report, None)
        }
        Some(mode) => {
            let mode = match mode {
                Repair::Leaks => RepairMode::Leaks,
                Repair::All => RepairMode::All,
            };
            let repaired =
                Image::repair_file(path, mode).with_context(|| path.display().to_string())?;
            (repaired.after.clone(), Some(repaired))
        }
    };
    // The check knows whether the image opens and how many bitmaps it lists: no third open.
    let bitmaps = report.bitmaps;
    let status = report.qemu_img_status();
    let result = CheckOutput {
        image: path.display().to_string(),
        filename: path.display().to_string(),
        format: "qcow2",
        check_errors: report.check_errors,
        corruptions: report.corruptions,
        leaks: report.leaks,
        corruptions_fixed: repaired.as_ref().map(|r| r.corruptions_fixed),
        leaks_fixed: repaired.as_ref().map(|r| r.leaks_fixed),
        image_end_offset: report.image_end_offset,
        total_clusters: report.total_clusters,
        allocated_clusters: report.allocated_clusters,
        fragmented_clusters: report.fragmented_clusters,
        compressed_clusters: report.compressed_clusters,
        bitmaps,
        clean: report.is_clean(),
        errors: texts(report.errors()),
        warnings: texts(report.warnings()),
        notes: texts(report.notes()),
        leaked: texts(report.leaked()),
        findings: report.findings.iter().map(FindingOutput::new).collect(),
        in_use_bitmaps: names(&report.in_use_bitmaps),
        damaged_bitmaps: names(&report.damaged_bitmaps),
        stale_extension: report.stale_extension,
        broken_extension: report.broken_extension,
        changes: repaired.as_ref().map(|r| r.changes.clone()),
        unrepairable: report.unrepairable.clone(),
        qemu_cannot_open: report.qemu_cannot_open.clone(),
    };
    if format.json() {
        output::write_json(out, &result)?;
        return Ok(status);
    }
    if let Some(repaired) = &repaired {
        for change in &repaired.changes {
            writeln!(out, "Repaired: {change}")?;
        }
        if repaired.changes.is_empty() {
            writeln!(out, "Nothing to repair.")?;
        } else {
            writeln!(
                out,
                "{} leaked cluster{} freed, {} corruption{} repaired; checked again:",
                repaired.leaks_fixed,
                if repaired.leaks_fixed == 1 { "" } else { "s" },
                repaired.corruptions_fixed,
                if repaired.corruptions_fixed == 1 {
                    ""
                } else {
                    "s"
                }
            )?;
        }
    }
    // The findings as the library renders them (the C ABI prints the same lines).
    write!(out, "{report}")?;
    if let Some(why) = &result.qemu_cannot_open {
        writeln!(out, "qemu-img check cannot check this image: {why}")?;
    }
    let checked = match result.bitmaps {
        Some(1) => " (1 bitmap checked)".to_string(),
        Some(n) => format!(" ({n} bitmaps checked)"),
        None => String::new(),
    };
    if result.clean {
        writeln!(out, "{}: no errors were found{checked}.", result.image)?;
    } else {
        let mut found = vec![
            count(result.errors.len(), "error"),
            count(result.warnings.len(), "warning"),
        ];
        if result.leaks > 0 {
            found.push(count(result.leaks as usize, "leaked cluster"));
        }
        writeln!(
            out,
            "{}: {} found{checked}.",
            result.image,
            found.join(", ")
        )?;
    }
    if result.leaks > 0 && result.corruptions == 0 {
        // '-r leaks' refuses while a bitmap's clusters are not known.
        let mode = if result.damaged_bitmaps.is_empty() && !result.broken_extension {
            "leaks"
        } else {
            "all"
        };
        writeln!(
            out,
            "Leaked clusters waste disk space but do no harm to data; 'qbitmap check -r {mode}' \
             frees them."
        )?;
    }
    if let Some(end) = result.image_end_offset {
        writeln!(out, "Image end offset: {end}")?;
    }
    Ok(status)
}

/// The findings' texts.
fn texts<'a>(findings: impl Iterator<Item = &'a Finding>) -> Vec<String> {
    findings.map(ToString::to_string).collect()
}

/// Bitmap names in their escaped form, as `list` prints them.
fn names(names: &[BitmapName]) -> Vec<String> {
    names.iter().map(ToString::to_string).collect()
}

/// "no errors", "1 error", "2 errors".
fn count(n: usize, what: &str) -> String {
    match n {
        0 => format!("no {what}s"),
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

pub fn create(path: &Path, size: u64, cluster_size: u64) -> Result<()> {
    let image =
        Image::create(path, size, cluster_size).with_context(|| path.display().to_string())?;
    image.close().with_context(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_dump_documents() {
        let doc = parse_import(
            r#"{"name": "b", "granularity": 65536, "virtual-size": 1048576, "dirty-bytes": 65536,
                "extents": [{"offset": 0, "length": 65536}]}"#,
        )
        .unwrap();
        assert_eq!(doc.granularity, Some(65536));
        assert_eq!(
            doc.extents,
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
    }

    #[test]
    fn imports_bare_arrays_and_nbdinfo_maps() {
        let doc = parse_import(r#"[{"offset": 5, "length": 6}]"#).unwrap();
        assert_eq!(doc.granularity, None);
        assert_eq!(
            doc.extents,
            vec![Extent {
                offset: 5,
                length: 6
            }]
        );
        let doc = parse_import(
            r#"[{"offset": 0, "length": 65536, "type": 1, "description": "dirty"},
                {"offset": 65536, "length": 131072, "type": 0, "description": "clean"}]"#,
        )
        .unwrap();
        assert_eq!(
            doc.extents,
            vec![Extent {
                offset: 0,
                length: 65536
            }]
        );
    }

    #[test]
    fn refuses_malformed_documents() {
        assert!(parse_import("").is_err());
        assert!(parse_import("{").is_err());
        assert!(parse_import(r#"{"extents": [{"offset": -1, "length": 1}]}"#).is_err());
        assert!(parse_import(r#"{"extents": [{"offset": 1}]}"#).is_err());
        assert!(parse_import(r#"{"extents": [{"offset": 1, "length": 1, "x": 1}]}"#).is_err());
        assert!(parse_import(r#"{"granularity": 3000, "extents": []}"#).is_err());
        assert!(parse_import(r#"{"granularity": 65536}"#).is_err());
    }
}
