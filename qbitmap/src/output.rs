// SPDX-License-Identifier: GPL-2.0-or-later

//! What the commands print: the JSON documents (qemu-img's kebab-case style) and aligned text
//! tables for people.

use std::io::{self, Write};

use hbitmap::qcow2::{BitmapName, Finding, Subject};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::extents::Extent;
use crate::size::{format_size, group_digits};

/// `list --output=json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageReport {
    pub image: String,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub bitmaps: Vec<BitmapReport>,
}

/// A bitmap name in JSON, losslessly: `"name"` is the name when it is UTF-8 (control
/// characters and NULs in JSON's own escapes); otherwise `"name"` is its escaped form, for people,
/// and `"name-hex"` its bytes in hexadecimal, which then are the name.
#[derive(Debug, Clone)]
pub struct JsonName(pub BitmapName);

impl JsonName {
    /// The `(key, value)` pairs in document order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        match self.0.to_str() {
            Some(text) => vec![("name", text.to_string())],
            None => vec![
                ("name", self.0.escaped()),
                ("name-hex", hex(self.0.as_bytes())),
            ],
        }
    }
}

impl Serialize for JsonName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.fields();
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for (key, value) in &fields {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// Lower-case hexadecimal, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One bitmap of `list`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapReport {
    #[serde(flatten)]
    pub name: JsonName,
    pub granularity: u64,
    /// As `qemu-img info` prints them: "in-use" before "auto".
    pub flags: Vec<&'static str>,
    /// None for an in-use bitmap, whose content cannot be trusted.
    pub dirty_bytes: Option<u64>,
}

/// The flags of a bitmap as qemu-img names them.
pub fn flag_names(in_use: bool, auto: bool) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if in_use {
        flags.push("in-use");
    }
    if auto {
        flags.push("auto");
    }
    flags
}

/// `dump --output=json`; `import` reads it (every field but `extents` optional).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DumpReport {
    #[serde(flatten)]
    pub name: Option<JsonName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    pub extents: Vec<Extent>,
}

/// `check --output=json`: `qemu-img check --output=json`'s fields where they apply, then the
/// bitmap findings.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckOutput {
    pub image: String,
    pub filename: String,
    pub format: &'static str,
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corruptions_fixed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaks_fixed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_clusters: Option<u64>,
    /// None when the image is too damaged to open.
    pub bitmaps: Option<usize>,
    pub clean: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Harmless oddities (not counted by `clean`).
    pub notes: Vec<String>,
    /// Runs of leaked clusters.
    pub leaked: Vec<String>,
    /// Every finding above, typed: severity, subject, kind, and the text given above.
    pub findings: Vec<FindingOutput>,
    pub in_use_bitmaps: Vec<String>,
    pub damaged_bitmaps: Vec<String>,
    pub stale_extension: bool,
    pub broken_extension: bool,
    /// With -r: every change made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<String>>,
    /// Why -r would be refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrepairable: Option<String>,
    /// Why QEMU cannot open the image (then the exit status is 1, as qemu-img check's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_cannot_open: Option<String>,
}

/// One finding of `check --output=json`.
#[derive(Debug, Serialize)]
pub struct FindingOutput {
    /// `error`, `warning`, `leak` or `note`.
    pub severity: &'static str,
    pub subject: SubjectOutput,
    /// What is wrong (the library's `FindingKind` variant: `CrossLink`, `InUse`, `Leak`...).
    pub kind: &'static str,
    pub text: String,
}

/// What a finding concerns, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SubjectOutput {
    /// The name in its escaped form, as `list` prints it.
    Bitmap {
        name: String,
    },
    Directory,
    Extension,
    /// Host cluster indexes: `count` clusters from `first`.
    Clusters {
        first: u64,
        count: u64,
    },
    Structure,
}

impl FindingOutput {
    pub fn new(finding: &Finding) -> FindingOutput {
        let subject = match &finding.subject {
            Subject::Bitmap(name) => SubjectOutput::Bitmap {
                name: name.to_string(),
            },
            Subject::Directory => SubjectOutput::Directory,
            Subject::Extension => SubjectOutput::Extension,
            &Subject::Clusters { first, count } => SubjectOutput::Clusters { first, count },
            _ => SubjectOutput::Structure,
        };
        FindingOutput {
            severity: finding.severity.name(),
            subject,
            kind: finding.kind.name(),
            text: finding.to_string(),
        }
    }
}

/// Writes a value as pretty JSON followed by a newline.
pub fn write_json(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Column alignment of a [`Table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A text table: a header row and columns as wide as their widest cell, two spaces apart.
pub struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut impl Write, indent: &str) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (index, cell) in row.iter().enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let width = widths[index];
                match self.align[index] {
                    Align::Left if index + 1 == row.len() => line.push_str(cell),
                    Align::Left => line.push_str(&format!("{cell:<width$}")),
                    Align::Right => line.push_str(&format!("{cell:>width$}")),
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A share of the disk as a percentage; a share too small to show reads "<0.01%", never 0.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 || part == 0 {
        return "0%".into();
    }
    let value = part as f64 * 100.0 / whole as f64;
    if part == whole {
        "100%".into()
    } else if value >= 10.0 {
        format!("{value:.1}%")
    } else if value >= 0.01 {
        format!("{value:.2}%")
    } else {
        "<0.01%".into()
    }
}

/// The human form of `list`.
pub fn write_list(out: &mut impl Write, report: &ImageReport) -> io::Result<()> {
    writeln!(
        out,
        "{}: virtual size {} ({} bytes), cluster size {}",
        report.image,
        format_size(report.virtual_size),
        report.virtual_size,
        format_size(report.cluster_size)
    )?;
    if report.bitmaps.is_empty() {
        return writeln!(out, "No bitmaps.");
    }
    write_bitmap_table(out, &report.bitmaps, report.virtual_size, "")
}

/// The bitmap table of `list` (and of `demo`).
pub fn write_bitmap_table(
    out: &mut impl Write,
    bitmaps: &[BitmapReport],
    virtual_size: u64,
    indent: &str,
) -> io::Result<()> {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("GRANULARITY", Align::Right),
        ("FLAGS", Align::Left),
        ("DIRTY", Align::Right),
        ("OF DISK", Align::Right),
    ]);
    for bitmap in bitmaps {
        let flags = if bitmap.flags.is_empty() {
            "-".to_string()
        } else {
            bitmap.flags.join(",")
        };
        let (dirty, share) = match bitmap.dirty_bytes {
            Some(bytes) => (format_size(bytes), percent(bytes, virtual_size)),
            None => ("?".into(), "in use".into()),
        };
        table.row(vec![
            bitmap.name.0.escaped(),
            format_size(bitmap.granularity),
            flags,
            dirty,
            share,
        ]);
    }
    table.write(out, indent)
}

/// The extents table of `dump` (and of `demo`): exact offsets and lengths in bytes, and the
/// length for people.
pub fn write_extent_table(
    out: &mut impl Write,
    extents: &[Extent],
    indent: &str,
) -> io::Result<()> {
    let mut table = Table::new(&[
        ("OFFSET", Align::Right),
        ("LENGTH", Align::Right),
        ("", Align::Left),
    ]);
    for extent in extents {
        table.row(vec![
            extent.offset.to_string(),
            extent.length.to_string(),
            format_size(extent.length),
        ]);
    }
    table.write(out, indent)
}

/// `dump --output=json`: pretty like qemu-img's JSON, but one line per extent, so that a
/// bitmap with a million extents stays a million lines.
pub fn write_dump_json(out: &mut impl Write, dump: &DumpReport) -> io::Result<()> {
    writeln!(out, "{{")?;
    for (key, value) in dump.name.iter().flat_map(JsonName::fields) {
        writeln!(out, "  \"{key}\": {},", serde_json::to_string(&value)?)?;
    }
    for (key, value) in [
        ("granularity", dump.granularity),
        ("virtual-size", dump.virtual_size),
        ("dirty-bytes", dump.dirty_bytes),
    ] {
        if let Some(value) = value {
            writeln!(out, "  \"{key}\": {value},")?;
        }
    }
    if dump.extents.is_empty() {
        writeln!(out, "  \"extents\": []")?;
    } else {
        writeln!(out, "  \"extents\": [")?;
        for (index, extent) in dump.extents.iter().enumerate() {
            let comma = if index + 1 < dump.extents.len() {
                ","
            } else {
                ""
            };
            writeln!(
                out,
                "    {{\"offset\": {}, \"length\": {}}}{comma}",
                extent.offset, extent.length
            )?;
        }
        writeln!(out, "  ]")?;
    }
    writeln!(out, "}}")
}

/// The human form of `dump`.
/// The document `nbdinfo --json --map=qemu:dirty-bitmap:NAME` prints for the bitmap exported
/// by `qemu-nbd -B NAME`, byte for byte: maximal dirty (type 1) and clean (type 0) extents in
/// order, covering the whole virtual disk (nbdinfo merges adjacent extents of one type).
pub fn write_nbdinfo_map(out: &mut impl Write, dump: &DumpReport) -> io::Result<()> {
    let virtual_size = dump.virtual_size.unwrap_or(0);
    let mut entries = Vec::with_capacity(dump.extents.len() * 2 + 1);
    let mut pos = 0;
    for extent in &dump.extents {
        if extent.offset > pos {
            entries.push((pos, extent.offset - pos, 0));
        }
        entries.push((extent.offset, extent.length, 1));
        pos = extent.offset + extent.length;
    }
    if pos < virtual_size {
        entries.push((pos, virtual_size - pos, 0));
    }
    writeln!(out, "[")?;
    for (index, (offset, length, kind)) in entries.iter().enumerate() {
        let description = if *kind == 1 { "dirty" } else { "clean" };
        let separator = if index + 1 < entries.len() { "," } else { "" };
        writeln!(
            out,
            "{{ \"offset\": {offset}, \"length\": {length}, \"type\": {kind}, \
             \"description\": \"{description}\"}}{separator}"
        )?;
    }
    writeln!(out, "]")
}

pub fn write_dump(out: &mut impl Write, image: &str, dump: &DumpReport) -> io::Result<()> {
    let virtual_size = dump.virtual_size.unwrap_or(0);
    let dirty = dump.dirty_bytes.unwrap_or(0);
    writeln!(
        out,
        "Bitmap '{}' of {image}: granularity {}, virtual size {}",
        dump.name
            .as_ref()
            .map(|n| n.0.escaped())
            .unwrap_or_default(),
        format_size(dump.granularity.unwrap_or(0)),
        format_size(virtual_size)
    )?;
    if dump.extents.is_empty() {
        return writeln!(out, "No dirty extents.");
    }
    write_extent_table(out, &dump.extents, "")?;
    writeln!(
        out,
        "{} dirty in {} extent{} ({} of the disk)",
        format_size(dirty),
        group_digits(dump.extents.len() as u64),
        if dump.extents.len() == 1 { "" } else { "s" },
        percent(dirty, virtual_size)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut table = Table::new(&[("NAME", Align::Left), ("SIZE", Align::Right)]);
        table.row(vec!["a".into(), "1 KiB".into()]);
        table.row(vec!["longer".into(), "64 KiB".into()]);
        let mut out = Vec::new();
        table.write(&mut out, "").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME      SIZE\na        1 KiB\nlonger  64 KiB\n"
        );
    }

    #[test]
    fn dump_json_is_json_with_one_line_per_extent() {
        let mut dump = DumpReport {
            name: Some(JsonName(BitmapName::from(&b"a \"b\"\t\xff"[..]))),
            granularity: Some(65536),
            virtual_size: Some(1 << 30),
            dirty_bytes: Some(196608),
            extents: vec![
                Extent {
                    offset: 0,
                    length: 65536,
                },
                Extent {
                    offset: 1 << 20,
                    length: 131072,
                },
            ],
        };
        let mut out = Vec::new();
        write_dump_json(&mut out, &dump).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\n    {\"offset\": 1048576, \"length\": 131072}\n  ]"));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, serde_json::to_value(&dump).unwrap());
        dump.extents.clear();
        let mut out = Vec::new();
        write_dump_json(&mut out, &dump).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value, serde_json::to_value(&dump).unwrap());
    }

    #[test]
    fn percents() {
        assert_eq!(percent(0, 100), "0%");
        assert_eq!(percent(100, 100), "100%");
        assert_eq!(percent(50, 100), "50.0%");
        assert_eq!(percent(1, 100), "1.00%");
        assert_eq!(percent(1, 1 << 40), "<0.01%");
    }

    #[test]
    fn flags_in_qemu_order() {
        assert_eq!(flag_names(true, true), vec!["in-use", "auto"]);
        assert!(flag_names(false, false).is_empty());
    }
}
