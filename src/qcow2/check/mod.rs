// SPDX-License-Identifier: GPL-2.0-or-later

//! `check`: what is wrong with an image, as `qemu-img check` counts it, besides the bitmaps'
//! own validation. Reading the structures is `layout.rs`'s (which reports what it finds while
//! reading); the reference count over every structure is `count.rs`'s. Nothing here writes, and
//! nothing here calls the repair (`repair.rs` and `rebuild.rs` use this module, not the other
//! way round).
#![forbid(unsafe_code)]

pub(crate) mod count;
pub mod finding;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::Error;
use super::header;
use super::io::ImageIo;
use super::layout::{self, ExtState, Layout, Problems};
use super::name::{escape, BitmapName};
use finding::{Finding, FindingKind, Severity};

/// What [`Image::check`](crate::qcow2::Image::check) found. The counts use `qemu-img check`'s meanings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// What the check found, in the order rendered: errors (malformed or inconsistent
    /// structures, clusters whose refcount is below their references included), warnings
    /// (things worth knowing that do not make the image unreadable: bitmaps in use, a stale
    /// extension, flags that block writing...), runs of leaked clusters, notes (harmless
    /// oddities QEMU produces too, such as padding bits QEMU wrote: not problems).
    pub findings: Vec<Finding>,
    /// `corruptions`: clusters whose refcount is below their references, plus every other
    /// error found.
    pub corruptions: u64,
    /// `leaks`: clusters whose refcount is above their references.
    pub leaks: u64,
    /// Of `corruptions`: active L1 and L2 entries whose OFLAG_COPIED flag disagrees with the
    /// refcount of their cluster (set exactly where it is 1); `check -r` fixes them.
    pub copied_flag_errors: u64,
    /// `check-errors`: the check could not be completed (an I/O error).
    pub check_errors: u64,
    /// `image-end-offset`: the end of the last cluster counted or referenced (None when the
    /// references could not be counted).
    pub image_end_offset: Option<u64>,
    /// `total-clusters`: clusters of the virtual disk.
    pub total_clusters: Option<u64>,
    /// `allocated-clusters`, `fragmented-clusters`, `compressed-clusters`: the active disk's
    /// guest clusters, as `qemu-img check` counts them.
    pub allocated_clusters: Option<u64>,
    /// See `allocated_clusters`.
    pub fragmented_clusters: Option<u64>,
    /// See `allocated_clusters`.
    pub compressed_clusters: Option<u64>,
    /// How many bitmaps the image lists when it can be opened (read-only; damage confined to
    /// some bitmaps allows that); None when opening it is refused.
    pub bitmaps: Option<usize>,
    /// Bitmaps marked in use (not saved properly: their content cannot be trusted).
    pub in_use_bitmaps: Vec<BitmapName>,
    /// Bitmaps with a broken entry, name, flags, table or a cross-link.
    pub damaged_bitmaps: Vec<BitmapName>,
    /// The bitmaps extension is stale (autoclear bit 0 clear): the image has no usable bitmaps.
    pub stale_extension: bool,
    /// The bitmaps extension or its directory is unreadable or cross-linked.
    pub broken_extension: bool,
    /// Why [`Image::repair_file`](crate::qcow2::Image::repair_file) would refuse this image, if it would.
    pub unrepairable: Option<String>,
    /// Why QEMU refuses to open the image, if it does (a bitmap it rejects while loading the
    /// bitmaps, a missing backing or data file...): `qemu-img check` then cannot check it and
    /// exits 1, and so does `qbitmap check` (see [`qemu_img_status`](Self::qemu_img_status)),
    /// though the check here is complete and `check -r` repairs what it can. Also why
    /// `qemu-img check` fails on an image QEMU opens (a bitmap in use whose table holds an
    /// invalid entry).
    pub qemu_cannot_open: Option<String>,
}

impl CheckReport {
    /// Reports each file the image needs that cannot be opened: its backing file and its
    /// external data file, named in the header relative to the image's folder. QEMU cannot open
    /// such an image (`qemu-img check` exits 1); the bitmaps do not need them, so they can still
    /// be read and repaired here. Names QEMU would hand to a protocol
    /// (`json:{...}`, `nbd://...`) are not looked at.
    pub(crate) fn add_missing_files(&mut self, image: &Path, header: &header::Header) {
        let named = [
            ("backing file", header.backing_file.clone()),
            ("external data file", header.data_file_name()),
        ];
        for (what, name) in named {
            let Some(name) = name else { continue };
            let text = String::from_utf8_lossy(&name).into_owned();
            let protocol = text
                .split_once(':')
                .is_some_and(|(prefix, _)| !prefix.is_empty() && !prefix.contains('/'));
            if name.is_empty() || protocol {
                continue;
            }
            let relative = Path::new(std::ffi::OsStr::from_bytes(&name));
            let resolved = match image.parent() {
                Some(folder) if relative.is_relative() => folder.join(relative),
                _ => relative.to_path_buf(),
            };
            if let Err(error) = std::fs::File::open(&resolved) {
                let finding = Finding::structure(FindingKind::MissingFile {
                    what,
                    name: escape(&name),
                    path: resolved,
                    error: error.to_string(),
                });
                self.qemu_cannot_open
                    .get_or_insert_with(|| finding.to_string());
                self.findings.push(finding);
                self.sort_findings();
            }
        }
    }

    /// The exit status `qemu-img check` gives such an image: 1 when the check could not be
    /// completed (an I/O error) or QEMU cannot open the image, else 2 with corruptions, else 3
    /// with leaks, else 0.
    pub fn qemu_img_status(&self) -> u8 {
        if self.check_errors > 0 || self.qemu_cannot_open.is_some() {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// No errors, no warnings and no leaks.
    pub fn is_clean(&self) -> bool {
        self.errors().next().is_none()
            && self.warnings().next().is_none()
            && self.leaks == 0
            && self.check_errors == 0
    }

    /// No corruption, no leak and no check error: the image is consistent (bitmaps in use or a
    /// stale extension are states, not damage).
    pub fn is_consistent(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

impl CheckReport {
    /// The findings of one severity, in order.
    pub fn of(&self, severity: Severity) -> impl Iterator<Item = &Finding> + '_ {
        self.findings
            .iter()
            .filter(move |finding| finding.severity == severity)
    }

    /// Malformed or inconsistent structures, clusters whose refcount is below their
    /// references included.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> + '_ {
        self.of(Severity::Error)
    }

    /// Things worth knowing that do not make the image unreadable.
    pub fn warnings(&self) -> impl Iterator<Item = &Finding> + '_ {
        self.of(Severity::Warning)
    }

    /// The leaked clusters, in runs of consecutive ones.
    pub fn leaked(&self) -> impl Iterator<Item = &Finding> + '_ {
        self.of(Severity::Leak)
    }

    /// Harmless oddities: not problems.
    pub fn notes(&self) -> impl Iterator<Item = &Finding> + '_ {
        self.of(Severity::Note)
    }

    /// Puts the findings in the order they are rendered (by severity; in the order found
    /// within one).
    fn sort_findings(&mut self) {
        self.findings.sort_by_key(|finding| finding.severity);
    }
}

/// The findings, one line each: `TAG: text` (the one rendering the CLI and the C ABI print).
impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{}: {finding}", finding.severity)?;
        }
        Ok(())
    }
}

pub(crate) fn check_io(io: &dyn ImageIo) -> CheckReport {
    check_walk(io).0
}

/// What a check walked, for a repair made right after it (nothing written in between): the
/// structures read and the references counted, every bitmap the directory lists included as
/// qemu-img check counts them.
pub(crate) struct Walked {
    pub layout: Layout,
    pub problems: Problems,
    pub base: count::Base,
    pub comparison: count::Comparison,
}

/// [`check_io`], also handing back what it walked when the count was complete.
pub(crate) fn check_walk(io: &dyn ImageIo) -> (CheckReport, Option<Walked>) {
    let (layout, problems, started) = match layout::read_counted(io) {
        Ok(read) => read,
        Err(Error::Io { context, source }) => {
            let report = CheckReport {
                findings: vec![Finding::structure(FindingKind::Unreadable {
                    detail: format!("{context}: {source}"),
                })],
                check_errors: 1,
                unrepairable: Some(format!("{context}: {source}")),
                ..CheckReport::default()
            };
            return (report, None);
        }
        // What cannot be read at all makes qemu-img check fail to open the image too.
        Err(error) => {
            let report = CheckReport {
                findings: vec![Finding::structure(FindingKind::Unreadable {
                    detail: error.to_string(),
                })],
                check_errors: 1,
                unrepairable: Some(error.to_string()),
                ..CheckReport::default()
            };
            return (report, None);
        }
    };
    let mut report = CheckReport {
        findings: problems.findings.clone(),
        total_clusters: Some(layout.header.size.div_ceil(layout.cluster_size())),
        bitmaps: (!problems.refuse_opening(&layout)).then_some(layout.bitmaps.len()),
        in_use_bitmaps: layout
            .bitmaps
            .iter()
            .filter(|b| b.entry.in_use())
            .map(|b| BitmapName::from(b.entry.name.as_slice()))
            .collect(),
        damaged_bitmaps: layout
            .bitmaps
            .iter()
            .filter(|b| !b.trusted)
            .map(|b| BitmapName::from(b.entry.name.as_slice()))
            .collect(),
        stale_extension: layout.ext == ExtState::Stale,
        broken_extension: layout.ext == ExtState::Broken
            || layout.directory_damaged
            || layout.ext_damage.is_some(),
        ..CheckReport::default()
    };
    let cluster_bits = layout.header.cluster_bits;
    if let Some(first) = problems.structural_errors().next() {
        // Damaged metadata other than the bitmaps': a count would follow garbage (and a
        // hostile image's millions of pointers), and no repair would be made anyway.
        report.corruptions = report.errors().count() as u64;
        report.sort_findings();
        report.unrepairable = Some(format!(
            "metadata other than the bitmaps is damaged, so the clusters it uses are not \
             known completely: {first}"
        ));
        return (report, None);
    }
    // The walk of layout::read_counted counted what it read (each L2 table read once).
    let base = match started {
        Some(counter) => counter.and_then(|counter| counter.finish(io, &layout)),
        None => count::count_base(io, &layout),
    };
    let counted = base.and_then(|mut base| {
        let structural: Vec<Finding> = problems.structural_errors().cloned().collect();
        let unrepairable = count::refusal(&layout, &structural, &base);
        // Every bitmap the directory lists, trusted or not, as qemu-img check counts them.
        let bitmaps = count::add_bitmaps_as_qemu(io, &mut base.refs, &layout)?;
        let comparison = count::compare(io, &layout.refcounts, &base.refs, &base.copied)?;
        Ok((base, comparison, unrepairable, bitmaps))
    });
    let walked = match counted {
        Ok((base, comparison, unrepairable, (bitmap_corruptions, check_fails))) => {
            // The full count reports these precisely.
            report
                .findings
                .retain(|finding| !layout::is_refcount_warning(finding));
            for finding in &base.unmapped {
                if !report.findings.contains(finding) {
                    report.findings.push(finding.clone());
                }
            }
            // A cross-link is one corruption per cluster shared, as qemu-img check counts it:
            // a refcount below the references. Only where the stored refcount happens to
            // cover every reference does the shared cluster count on its own.
            let mut shared = problems.cross_link_clusters.clone();
            shared.sort_unstable();
            shared.dedup();
            let uncovered = shared
                .iter()
                .filter(|&&c| {
                    comparison
                        .under
                        .binary_search_by_key(&c, |m| m.cluster)
                        .is_err()
                })
                .count();
            // A name clash makes QEMU refuse the image, though it reads here.
            report.corruptions = (report.errors().count() - problems.cross_link_errors()
                + uncovered
                + comparison.under.len()) as u64
                + problems.name_clashes()
                + base.bad_entries
                + bitmap_corruptions
                + comparison.copied_wrong;
            report.copied_flag_errors = comparison.copied_wrong;
            report
                .findings
                .extend(base.bad_entry_findings.iter().cloned());
            report
                .findings
                .extend(count::describe_under(&comparison.under, &layout));
            report
                .findings
                .extend(comparison.describe_copied(cluster_bits));
            report.leaks = comparison.leaks.len() as u64;
            report
                .findings
                .extend(count::describe_leaks(&comparison.leaks, cluster_bits));
            report.image_end_offset = Some(comparison.end_cluster << cluster_bits);
            report.allocated_clusters = Some(base.stats.allocated);
            report.fragmented_clusters = Some(base.stats.fragmented);
            report.compressed_clusters = Some(base.stats.compressed);
            report.unrepairable = unrepairable;
            report.qemu_cannot_open = check_fails;
            Some((base, comparison))
        }
        Err(error) => {
            report.check_errors += 1;
            report.corruptions = report.errors().count() as u64;
            report
                .findings
                .push(Finding::structure(FindingKind::CountFailed {
                    detail: error.to_string(),
                }));
            report.unrepairable = Some(format!("the references could not be counted: {error}"));
            None
        }
    };
    report.sort_findings();
    if let Some(why) = &problems.qemu_refuses {
        report.qemu_cannot_open = Some(format!("QEMU refuses to open it: {why}"));
    }
    let walked = walked.map(|(base, comparison)| Walked {
        layout,
        problems,
        base,
        comparison,
    });
    (report, walked)
}

#[cfg(test)]
mod tests {
    use super::finding::{Finding, FindingKind, Severity, Subject};
    use super::CheckReport;

    #[test]
    fn findings_render_one_tagged_line_each_in_order() {
        let bitmap = Subject::Bitmap("b".into());
        let mut report = CheckReport {
            findings: vec![
                Finding::new(
                    Severity::Note,
                    bitmap.clone(),
                    FindingKind::EmptyName { at: 8 },
                ),
                Finding::new(Severity::Warning, bitmap.clone(), FindingKind::InUse),
                Finding::new(
                    Severity::Leak,
                    Subject::Clusters { first: 3, count: 2 },
                    FindingKind::Leak {
                        at: 0x30000,
                        end: 0x50000,
                    },
                ),
                Finding::structure(FindingKind::CountFailed { detail: "e".into() }),
                Finding::new(
                    Severity::Warning,
                    Subject::Extension,
                    FindingKind::StaleExtension,
                ),
            ],
            ..CheckReport::default()
        };
        report.sort_findings();
        let tags: Vec<Severity> = report.findings.iter().map(|f| f.severity).collect();
        assert_eq!(
            tags,
            [
                Severity::Error,
                Severity::Warning,
                Severity::Warning,
                Severity::Leak,
                Severity::Note
            ]
        );
        assert_eq!(report.warnings().count(), 2);
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ERROR: counting the references of every cluster: e"
        );
        assert!(lines[1].starts_with("WARNING: bitmap 'b' is in use (flag in_use)"));
        assert!(lines[2].starts_with("WARNING: the bitmaps extension is stale"));
        assert_eq!(
            lines[3],
            "LEAK: 2 leaked clusters at 0x30000..0x50000: refcount above the references"
        );
        assert!(lines[4].starts_with("NOTE: bitmap '' (directory entry at 0x8): the name is empty"));
        assert_eq!(lines.len(), 5);
        assert_eq!(CheckReport::default().to_string(), "");
    }
}
