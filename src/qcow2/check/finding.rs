// SPDX-License-Identifier: GPL-2.0-or-later

//! What a check finds, typed: how grave it is ([`Severity`]), what it concerns ([`Subject`])
//! and what is wrong ([`FindingKind`], with the data that says where). One `Display` renders a
//! finding as text: the CLI, the C ABI and the bindings print that text, and code decides on
//! the kinds, never on the text.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;

use crate::qcow2::name::BitmapName;

/// How a finding of a [`CheckReport`](super::CheckReport) is tagged when rendered: `ERROR`,
/// `WARNING`, `LEAK` (a run of leaked clusters), `NOTE`. Ordered as they are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Severity {
    Error,
    Warning,
    Leak,
    Note,
}

impl Severity {
    /// The lower-case name (`error`, `warning`, `leak`, `note`), as machine-readable outputs
    /// give it.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Leak => "leak",
            Severity::Note => "note",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Leak => "LEAK",
            Severity::Note => "NOTE",
        })
    }
}

/// What a finding concerns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Subject {
    /// One bitmap (its directory entry, name, table or clusters).
    Bitmap(BitmapName),
    /// The bitmap directory as a whole.
    Directory,
    /// The bitmaps extension (its header fields, its state), or bitmaps' cross-links summed up.
    Extension,
    /// A run of host clusters (indexes, not byte offsets): `count` clusters from `first`.
    Clusters { first: u64, count: u64 },
    /// Metadata other than the bitmaps': the header, L1 and L2 tables, refcount structures,
    /// snapshots, the encryption header, files the image needs.
    Structure,
}

impl Subject {
    /// Whether the finding concerns the bitmaps extension (its fields, directory or bitmaps).
    pub fn is_bitmaps(&self) -> bool {
        matches!(
            self,
            Subject::Bitmap(_) | Subject::Directory | Subject::Extension
        )
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Bitmap(name) => write!(f, "bitmap '{name}'"),
            Subject::Directory => f.write_str("the bitmap directory"),
            Subject::Extension => f.write_str("the bitmaps extension"),
            Subject::Clusters { first, count } => write!(f, "clusters {first}+{count}"),
            Subject::Structure => f.write_str("the image's metadata"),
        }
    }
}

/// A structure of the file, where a finding locates something (offsets are bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Place {
    Header,
    L1Table {
        at: u64,
    },
    L2Table {
        at: u64,
        l1_index: u64,
    },
    RefcountTable {
        at: u64,
    },
    RefcountBlock {
        index: u64,
        at: u64,
    },
    SnapshotTable {
        at: u64,
    },
    SnapshotL1 {
        snapshot: u64,
        at: u64,
    },
    SnapshotL2 {
        snapshot: u64,
        l1_index: u64,
        at: u64,
    },
    EncryptionHeader {
        at: u64,
    },
    Directory {
        at: u64,
    },
    BitmapTable {
        bitmap: BitmapName,
        at: u64,
    },
    /// A data cluster of a bitmap, listed by entry `entry` of its table (at `entry_at`).
    BitmapData {
        bitmap: BitmapName,
        at: u64,
        entry: u64,
        entry_at: u64,
    },
}

impl Place {
    /// Whether this is the bitmap directory, a bitmap table or a bitmap data cluster.
    pub fn is_bitmaps(&self) -> bool {
        matches!(
            self,
            Place::Directory { .. } | Place::BitmapTable { .. } | Place::BitmapData { .. }
        )
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Header => f.write_str("the header cluster at 0x0"),
            Place::L1Table { at } => write!(f, "the active L1 table at {at:#x}"),
            Place::L2Table { at, l1_index } => {
                write!(f, "the L2 table at {at:#x} (L1 entry {l1_index})")
            }
            Place::RefcountTable { at } => write!(f, "the refcount table at {at:#x}"),
            Place::RefcountBlock { index, at } => write!(f, "refcount block {index} at {at:#x}"),
            Place::SnapshotTable { at } => write!(f, "the snapshot table at {at:#x}"),
            Place::SnapshotL1 { snapshot, at } => {
                write!(f, "the L1 table of snapshot {snapshot} at {at:#x}")
            }
            Place::SnapshotL2 {
                snapshot,
                l1_index,
                at,
            } => write!(
                f,
                "the L2 table at {at:#x} (L1 entry {l1_index} of snapshot {snapshot})"
            ),
            Place::EncryptionHeader { at } => write!(f, "the encryption header at {at:#x}"),
            Place::Directory { at } => write!(f, "the bitmap directory at {at:#x}"),
            Place::BitmapTable { bitmap, at } => {
                write!(f, "the bitmap table of bitmap '{bitmap}' at {at:#x}")
            }
            Place::BitmapData {
                bitmap,
                at,
                entry,
                entry_at,
            } => write!(
                f,
                "a data cluster of bitmap '{bitmap}' at {at:#x} (bitmap table entry {entry} at \
                 {entry_at:#x})"
            ),
        }
    }
}

/// What is summed up by a [`FindingKind::More`] finding (the findings past the first 20 of a
/// kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MoreOf {
    /// Invalid entries of the active L1 table.
    InvalidL1Entries,
    /// Overlaps among metadata other than the bitmaps'.
    Overlaps,
    /// Overlaps of bitmap clusters with other metadata or each other (cross-links).
    BitmapOverlaps,
    /// Bitmap clusters that are also guest data clusters (cross-links).
    GuestCrossLinks,
    /// L1 or L2 entries the reference count cannot follow.
    UnfollowableEntries,
    /// L1 or L2 entries that break the format.
    MalformedEntries,
    /// Clusters whose refcount is below their references.
    RefcountsBelowReferences,
    /// Entries whose COPIED flag disagrees with the refcount.
    CopiedFlags,
    /// Runs of leaked clusters.
    LeakRuns,
}

impl MoreOf {
    fn text(self) -> &'static str {
        match self {
            MoreOf::InvalidL1Entries => "invalid L1 table entries",
            MoreOf::Overlaps | MoreOf::BitmapOverlaps => "overlaps",
            MoreOf::GuestCrossLinks => "guest data cross-links",
            MoreOf::UnfollowableEntries => "entries that cannot be followed",
            MoreOf::MalformedEntries => "malformed L1 or L2 entries",
            MoreOf::RefcountsBelowReferences => "clusters whose refcount is below their references",
            MoreOf::CopiedFlags => "entries whose COPIED flag disagrees with the refcount",
            MoreOf::LeakRuns => "runs of leaked clusters",
        }
    }
}

/// What is wrong with a field of the bitmaps extension (QEMU's rules).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtensionProblem {
    /// The reserved field (bytes 4-7) is not zero.
    Reserved(u32),
    /// `nb_bitmaps` is 0.
    NoBitmaps,
    /// `nb_bitmaps` exceeds 65535.
    TooManyBitmaps(u32),
    /// `bitmap_directory_offset` is 0 or not cluster-aligned.
    DirectoryOffset(u64),
    /// `bitmap_directory_size` is 0.
    DirectorySizeZero,
    /// `bitmap_directory_size` exceeds QEMU's limit.
    DirectoryTooLarge { size: u64, limit: u64 },
    /// The directory extends past the end of the file.
    DirectoryPastEnd {
        offset: u64,
        size: u64,
        file_len: u64,
    },
}

/// What is wrong with a bitmap's directory entry (QEMU's `check_dir_entry` and load path).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EntryProblem {
    NameTooLong {
        len: usize,
        limit: usize,
    },
    UnsupportedType(u8),
    Granularity(u32),
    ReservedFlags(u32),
    TableSizeZero,
    TableTooLarge {
        size: u32,
        limit: u64,
    },
    /// The table describes more bitmap data (`bytes`) than QEMU's 512 MiB limit.
    TooMuchData {
        size: u32,
        bytes: u64,
    },
    /// `bitmap_table_offset` is 0 or not cluster-aligned.
    TableOffset(u64),
    /// The table's size does not match the virtual disk's (`expected` entries).
    TableSizeMismatch {
        size: u32,
        disk_len: u64,
        granularity: u64,
        cluster_size: u64,
        expected: u64,
    },
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryProblem::NameTooLong { len, limit } => {
                write!(f, "name_size {len} exceeds QEMU's limit of {limit}")
            }
            EntryProblem::UnsupportedType(t) => {
                write!(f, "type {t} is not supported (only 1, dirty tracking)")
            }
            EntryProblem::Granularity(gran) => write!(
                f,
                "granularity_bits {gran} is out of range (QEMU supports 9 to 31)"
            ),
            EntryProblem::ReservedFlags(flags) => write!(
                f,
                "flags {flags:#x} has reserved bits set (only bit 0 in_use and bit 1 auto are \
                 supported)"
            ),
            EntryProblem::TableSizeZero => f.write_str("bitmap_table_size is 0"),
            EntryProblem::TableTooLarge { size, limit } => {
                write!(
                    f,
                    "bitmap_table_size {size} exceeds QEMU's limit of {limit}"
                )
            }
            EntryProblem::TooMuchData { size, bytes } => write!(
                f,
                "bitmap_table_size {size} describes {bytes} bytes of bitmap data, more than \
                 QEMU's 512 MiB limit"
            ),
            EntryProblem::TableOffset(offset) => write!(
                f,
                "bitmap_table_offset {offset:#x} is not a nonzero multiple of the cluster size"
            ),
            EntryProblem::TableSizeMismatch {
                size,
                disk_len,
                granularity,
                cluster_size,
                expected,
            } => write!(
                f,
                "bitmap_table_size {size} does not match the virtual size: a {disk_len}-byte \
                 disk at granularity {granularity} with {cluster_size}-byte clusters needs \
                 {expected} entries"
            ),
        }
    }
}

/// What is wrong (or worth knowing), with the data that locates it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FindingKind {
    // The header and the metadata map.
    /// The dirty bit is set (lazy refcounts).
    DirtyBit,
    /// The corrupt bit is set.
    CorruptBit,
    /// Autoclear feature bits this library does not know are set.
    UnknownAutoclearBits { bits: u64 },
    /// An active L1 entry's L2 table offset is not cluster-aligned (entry at `at`).
    L2TableMisaligned { l1_index: u64, at: u64, offset: u64 },
    /// An active L1 entry's L2 table lies past the end of the file.
    L2TablePastEnd {
        l1_index: u64,
        at: u64,
        offset: u64,
        file_len: u64,
    },
    /// A snapshot's L1 entry points to an L2 table misaligned or past the end of the file.
    SnapshotL2Invalid {
        snapshot: u64,
        l1_index: u64,
        at: u64,
        offset: u64,
    },
    /// A snapshot's L1 table is misaligned, too large or past the end of the file.
    SnapshotL1Invalid {
        snapshot: u64,
        entry_at: u64,
        l1_offset: u64,
        l1_size: u64,
    },
    /// The encryption header's area is misaligned or past the end of the file.
    EncryptionAreaInvalid { offset: u64, len: u64 },
    /// Two metadata structures (neither the bitmaps') share clusters.
    Overlap { first: Place, second: Place },
    /// The findings of one kind past the first 20, summed up.
    More { count: u64, of: MoreOf },
    /// A metadata cluster has refcount 0 (found while reading; a complete count reports it
    /// as [`RefcountBelowReferences`](Self::RefcountBelowReferences)).
    RefcountZero { at: u64, place: Place },
    /// A bitmap cluster has a refcount above 1 (found while reading; a complete count reports
    /// it as a leak).
    BitmapRefcountAboveOne {
        at: u64,
        place: Place,
        refcount: u64,
    },
    /// A file the image needs (backing or external data file) cannot be opened.
    MissingFile {
        /// "backing file" or "external data file".
        what: &'static str,
        /// The name in the header, escaped.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// Why it cannot be opened (the system's message).
        error: String,
    },
    /// The image cannot be read (an I/O error or a structure too damaged to go on).
    Unreadable { detail: String },
    /// The references of every cluster could not be counted.
    CountFailed { detail: String },
    /// An earlier write through this handle failed (why): the handle refuses further writes.
    WriteFailed { why: String },

    // The reference count's walk of the L1 and L2 tables (`snapshot`: None for the active
    // disk; `l2_at`: the L2 table's offset; `index`: the entry's).
    /// An L1 entry has reserved bits set.
    L1ReservedBits {
        index: u64,
        snapshot: Option<u64>,
        entry: u64,
    },
    /// An L1 entry has flags but no L2 table offset.
    L1FlagsWithoutTable {
        index: u64,
        snapshot: Option<u64>,
        entry: u64,
    },
    /// An L1 entry points to an L2 table misaligned or past the end of the file.
    L1EntryUnfollowable {
        index: u64,
        snapshot: Option<u64>,
        offset: u64,
    },
    /// A compressed cluster's entry is marked COPIED.
    CompressedCopied { index: u64, l2_at: u64, entry: u64 },
    /// A compressed cluster's entry has a subcluster bitmap.
    CompressedSubclusters { index: u64, l2_at: u64, bitmap: u64 },
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile { index: u64, l2_at: u64 },
    /// Compressed data starting past the end of the file.
    CompressedPastEnd {
        index: u64,
        l2_at: u64,
        offset: u64,
        file_len: u64,
    },
    /// An L2 entry has reserved bits set.
    L2ReservedBits { index: u64, l2_at: u64, entry: u64 },
    /// An unallocated entry whose subcluster bitmap marks subclusters allocated.
    UnallocatedSubclusters { index: u64, l2_at: u64, bitmap: u64 },
    /// A subcluster bitmap marking subclusters both allocated and zero.
    SubclustersAllocatedAndZero { index: u64, l2_at: u64, bitmap: u64 },
    /// A guest data cluster offset not cluster-aligned.
    DataMisaligned { index: u64, l2_at: u64, offset: u64 },
    /// A guest data cluster past the end of the file.
    DataPastEnd {
        index: u64,
        l2_at: u64,
        offset: u64,
        file_len: u64,
    },

    // The reference count against the stored refcounts.
    /// A cluster's refcount is below its references (at `at`, part of `place` if metadata).
    RefcountBelowReferences {
        at: u64,
        place: Option<Place>,
        stored: u64,
        referenced: u64,
    },
    /// Active L1/L2 entries whose COPIED flag disagrees with their cluster's refcount.
    CopiedFlag {
        at: u64,
        entries: u64,
        refcount: u64,
    },
    /// A run of leaked clusters (refcount above the references), bytes `at..end`.
    Leak { at: u64, end: u64 },

    // The bitmaps extension.
    /// Autoclear bit 0 is set without a bitmaps extension.
    AutoclearWithoutExtension,
    /// Another bitmaps extension (at `at`) before the one used (at `used_at`).
    IgnoredExtension { at: u64, used_at: u64 },
    /// The extension's stated length is not 24 (its first 24 bytes are read).
    ExtensionLength { at: u64, stated: u64 },
    /// The extension's data is not 24 bytes long: unreadable.
    ExtensionTooShort { at: u64, len: u64 },
    /// The extension is stale (autoclear bit 0 clear).
    StaleExtension,
    /// A field of the extension breaks QEMU's rules.
    ExtensionField { at: u64, problem: ExtensionProblem },
    /// The directory cannot be parsed (the parser's message).
    BadDirectory { detail: String },
    /// A directory entry breaks QEMU's rules (entry at `at`).
    BadEntry { at: u64, problem: EntryProblem },
    /// Another bitmap has the same name.
    DuplicateName { at: u64 },
    /// The name is not UTF-8 (a note: QEMU reads it).
    NonUtf8Name { at: u64 },
    /// The name is empty (a note: QEMU reads it).
    EmptyName { at: u64 },
    /// The name holds a NUL byte; QEMU knows it as `qemu_name`.
    NameWithNul { at: u64, qemu_name: String },
    /// QEMU reads the name (up to a NUL) as `qemu_name`, another bitmap's name too.
    NameClash {
        at: u64,
        qemu_name: String,
        other: BitmapName,
    },
    /// The bitmap is marked in use.
    InUse,
    /// The bitmap table extends past the end of the file.
    TablePastEnd {
        entry_at: u64,
        offset: u64,
        entries: u32,
        file_len: u64,
    },
    /// Clusters of the bitmaps extension shared with other metadata or each other.
    CrossLink { first: Place, second: Place },
    /// A bitmap cluster that is also a guest data cluster (of the active disk, or of
    /// `snapshot`), mapping `virtual_offset` through entry `entry` of the L2 table at `l2_at`.
    GuestCrossLink {
        place: Place,
        cluster_at: u64,
        virtual_offset: u64,
        snapshot: Option<u64>,
        l2_at: u64,
        entry: u64,
    },
    /// A bitmap table entry is invalid.
    InvalidTableEntry {
        index: u64,
        at: u64,
        value: u64,
        why: &'static str,
    },
    /// A bitmap table entry points past the end of the file.
    TableEntryPastEnd {
        index: u64,
        at: u64,
        data: u64,
        file_len: u64,
    },
    /// A padding bit past the end of the bitmap is set in its last data cluster (a note).
    PaddingBit {
        data: u64,
        index: u64,
        entry_at: u64,
        bit: u64,
    },
}

impl FindingKind {
    /// The kind's name (the variant's), as machine-readable outputs give it.
    pub fn name(&self) -> &'static str {
        use FindingKind::*;
        match self {
            DirtyBit => "DirtyBit",
            CorruptBit => "CorruptBit",
            UnknownAutoclearBits { .. } => "UnknownAutoclearBits",
            L2TableMisaligned { .. } => "L2TableMisaligned",
            L2TablePastEnd { .. } => "L2TablePastEnd",
            SnapshotL2Invalid { .. } => "SnapshotL2Invalid",
            SnapshotL1Invalid { .. } => "SnapshotL1Invalid",
            EncryptionAreaInvalid { .. } => "EncryptionAreaInvalid",
            Overlap { .. } => "Overlap",
            More { .. } => "More",
            RefcountZero { .. } => "RefcountZero",
            BitmapRefcountAboveOne { .. } => "BitmapRefcountAboveOne",
            MissingFile { .. } => "MissingFile",
            Unreadable { .. } => "Unreadable",
            CountFailed { .. } => "CountFailed",
            WriteFailed { .. } => "WriteFailed",
            L1ReservedBits { .. } => "L1ReservedBits",
            L1FlagsWithoutTable { .. } => "L1FlagsWithoutTable",
            L1EntryUnfollowable { .. } => "L1EntryUnfollowable",
            CompressedCopied { .. } => "CompressedCopied",
            CompressedSubclusters { .. } => "CompressedSubclusters",
            CompressedWithDataFile { .. } => "CompressedWithDataFile",
            CompressedPastEnd { .. } => "CompressedPastEnd",
            L2ReservedBits { .. } => "L2ReservedBits",
            UnallocatedSubclusters { .. } => "UnallocatedSubclusters",
            SubclustersAllocatedAndZero { .. } => "SubclustersAllocatedAndZero",
            DataMisaligned { .. } => "DataMisaligned",
            DataPastEnd { .. } => "DataPastEnd",
            RefcountBelowReferences { .. } => "RefcountBelowReferences",
            CopiedFlag { .. } => "CopiedFlag",
            Leak { .. } => "Leak",
            AutoclearWithoutExtension => "AutoclearWithoutExtension",
            IgnoredExtension { .. } => "IgnoredExtension",
            ExtensionLength { .. } => "ExtensionLength",
            ExtensionTooShort { .. } => "ExtensionTooShort",
            StaleExtension => "StaleExtension",
            ExtensionField { .. } => "ExtensionField",
            BadDirectory { .. } => "BadDirectory",
            BadEntry { .. } => "BadEntry",
            DuplicateName { .. } => "DuplicateName",
            NonUtf8Name { .. } => "NonUtf8Name",
            EmptyName { .. } => "EmptyName",
            NameWithNul { .. } => "NameWithNul",
            NameClash { .. } => "NameClash",
            InUse => "InUse",
            TablePastEnd { .. } => "TablePastEnd",
            CrossLink { .. } => "CrossLink",
            GuestCrossLink { .. } => "GuestCrossLink",
            InvalidTableEntry { .. } => "InvalidTableEntry",
            TableEntryPastEnd { .. } => "TableEntryPastEnd",
            PaddingBit { .. } => "PaddingBit",
        }
    }

    /// Whether this reports clusters of the bitmaps extension shared with something else
    /// (or sums such reports up).
    pub fn is_cross_link(&self) -> bool {
        matches!(
            self,
            FindingKind::CrossLink { .. }
                | FindingKind::GuestCrossLink { .. }
                | FindingKind::More {
                    of: MoreOf::BitmapOverlaps | MoreOf::GuestCrossLinks,
                    ..
                }
        )
    }
}

/// One finding of a check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Finding {
    pub severity: Severity,
    pub subject: Subject,
    pub kind: FindingKind,
}

impl Finding {
    pub fn new(severity: Severity, subject: Subject, kind: FindingKind) -> Finding {
        Finding {
            severity,
            subject,
            kind,
        }
    }

    /// An error about metadata other than the bitmaps'.
    pub(crate) fn structure(kind: FindingKind) -> Finding {
        Finding::new(Severity::Error, Subject::Structure, kind)
    }

    /// The bitmap this finding concerns, if one.
    pub fn bitmap(&self) -> Option<&BitmapName> {
        match &self.subject {
            Subject::Bitmap(name) => Some(name),
            _ => None,
        }
    }
}

fn capitalized(place: &Place) -> String {
    let text = place.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn disk(snapshot: Option<u64>) -> String {
    match snapshot {
        None => "the active disk".to_string(),
        Some(index) => format!("snapshot {index}"),
    }
}

/// The finding's text (without its severity tag): what `check` prints after `ERROR: ` etc.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FindingKind::*;
        // The bitmap's name as the messages give it.
        let name = || match &self.subject {
            Subject::Bitmap(name) => name.to_string(),
            _ => String::new(),
        };
        match &self.kind {
            DirtyBit => f.write_str(
                "the image has the dirty bit set (its refcounts may be stale after an unclean \
                 shutdown with lazy refcounts); 'check -r all' rebuilds them, which writing \
                 needs first",
            ),
            CorruptBit => f.write_str(
                "the image is marked corrupt (incompatible feature bit 1); QEMU refuses to \
                 write it until 'qemu-img check -r all' repairs it",
            ),
            UnknownAutoclearBits { bits } => write!(
                f,
                "unknown autoclear feature bits {bits:#x} are set; the next write clears them"
            ),
            L2TableMisaligned {
                l1_index,
                at,
                offset,
            } => write!(
                f,
                "L1 table entry {l1_index} at {at:#x}: L2 table offset {offset:#x} is not \
                 cluster-aligned"
            ),
            L2TablePastEnd {
                l1_index,
                at,
                offset,
                file_len,
            } => write!(
                f,
                "L1 table entry {l1_index} at {at:#x}: the L2 table at {offset:#x} lies past \
                 the end of the file ({file_len} bytes)"
            ),
            SnapshotL2Invalid {
                snapshot,
                l1_index,
                at,
                offset,
            } => write!(
                f,
                "snapshot {snapshot}: L1 table entry {l1_index} at {at:#x}: the L2 table at \
                 {offset:#x} is misaligned or lies past the end of the file"
            ),
            SnapshotL1Invalid {
                snapshot,
                entry_at,
                l1_offset,
                l1_size,
            } => write!(
                f,
                "snapshot {snapshot} (table entry at {entry_at:#x}): its L1 table at \
                 {l1_offset:#x} ({l1_size} entries) is misaligned, too large or past the end \
                 of the file"
            ),
            EncryptionAreaInvalid { offset, len } => write!(
                f,
                "encryption header extension: the area at {offset:#x} ({len} bytes) is not \
                 cluster-aligned or lies past the end of the file"
            ),
            Overlap { first, second } | CrossLink { first, second } => {
                write!(f, "{} overlaps {second}", capitalized(first))
            }
            More { count, of } => write!(f, "... and {count} more {}", of.text()),
            RefcountZero { at, place } => write!(
                f,
                "the cluster at {at:#x} ({place}) has refcount 0: it is used but counted free; \
                 repair the image with 'qemu-img check -r all'"
            ),
            BitmapRefcountAboveOne {
                at,
                place,
                refcount,
            } => write!(
                f,
                "the cluster at {at:#x} ({place}) has refcount {refcount}, expected 1"
            ),
            MissingFile {
                what,
                name,
                path,
                error,
            } => write!(
                f,
                "the {what} '{name}' ({}) cannot be opened: {error}; QEMU cannot open the \
                 image without it",
                path.display()
            ),
            Unreadable { detail } => f.write_str(detail),
            CountFailed { detail } => {
                write!(f, "counting the references of every cluster: {detail}")
            }
            WriteFailed { why } => write!(
                f,
                "an earlier write through this handle failed ({why}); reopen the image"
            ),
            L1ReservedBits {
                index,
                snapshot,
                entry,
            } => write!(
                f,
                "L1 table entry {index} of {} ({entry:#x}) has reserved bits set",
                disk(*snapshot)
            ),
            L1FlagsWithoutTable {
                index,
                snapshot,
                entry,
            } => write!(
                f,
                "L1 table entry {index} of {} ({entry:#x}) has flags but no L2 table offset",
                disk(*snapshot)
            ),
            L1EntryUnfollowable {
                index,
                snapshot,
                offset,
            } => write!(
                f,
                "L1 table entry {index} of {} points to an L2 table at {offset:#x} that is \
                 misaligned or past the end of the file",
                disk(*snapshot)
            ),
            CompressedCopied {
                index,
                l2_at,
                entry,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} ({entry:#x}) is a compressed \
                 cluster marked COPIED, which compressed clusters never are"
            ),
            CompressedSubclusters {
                index,
                l2_at,
                bitmap,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} is a compressed cluster with a \
                 non-zero subcluster allocation bitmap ({bitmap:#x})"
            ),
            CompressedWithDataFile { index, l2_at } => write!(
                f,
                "the L2 table at {l2_at:#x} has a compressed cluster in entry {index}, which an \
                 image with an external data file cannot have"
            ),
            CompressedPastEnd {
                index,
                l2_at,
                offset,
                file_len,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} points to compressed data at \
                 {offset:#x}, past the end of the file ({file_len} bytes)"
            ),
            L2ReservedBits {
                index,
                l2_at,
                entry,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} ({entry:#x}) has reserved bits set"
            ),
            UnallocatedSubclusters {
                index,
                l2_at,
                bitmap,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} is unallocated but its subcluster \
                 bitmap ({bitmap:#x}) marks subclusters allocated"
            ),
            SubclustersAllocatedAndZero {
                index,
                l2_at,
                bitmap,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} has a subcluster bitmap \
                 ({bitmap:#x}) marking subclusters both allocated and zero"
            ),
            DataMisaligned {
                index,
                l2_at,
                offset,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} points to a data cluster at \
                 {offset:#x} that is not cluster-aligned"
            ),
            DataPastEnd {
                index,
                l2_at,
                offset,
                file_len,
            } => write!(
                f,
                "entry {index} of the L2 table at {l2_at:#x} points to a data cluster at \
                 {offset:#x}, past the end of the file ({file_len} bytes)"
            ),
            RefcountBelowReferences {
                at,
                place,
                stored,
                referenced,
            } => {
                write!(f, "the cluster at {at:#x}")?;
                if let Some(place) = place {
                    write!(f, " ({place})")?;
                }
                write!(
                    f,
                    " has refcount {stored} but {referenced} reference{}: it could be handed \
                     out while in use",
                    if *referenced == 1 { "" } else { "s" }
                )
            }
            CopiedFlag {
                at,
                entries,
                refcount,
            } => write!(
                f,
                "{entries} entr{} of the active disk for the cluster at {at:#x} {} the COPIED \
                 flag {}, but its refcount is {refcount}",
                if *entries == 1 { "y" } else { "ies" },
                if *entries == 1 { "has" } else { "have" },
                if *refcount == 1 { "clear" } else { "set" },
            ),
            Leak { at, end } => {
                let count = match self.subject {
                    Subject::Clusters { count, .. } => count,
                    _ => 0,
                };
                write!(
                    f,
                    "{count} leaked cluster{} at {at:#x}..{end:#x}: refcount above the \
                     references",
                    if count == 1 { "" } else { "s" }
                )
            }
            AutoclearWithoutExtension => f.write_str(
                "autoclear bit 0 (bitmaps) is set but there is no bitmaps extension; the next \
                 write clears it",
            ),
            IgnoredExtension { at, used_at } => write!(
                f,
                "the header has another bitmaps extension at {at:#x}, before the one at \
                 {used_at:#x}: QEMU reads only the last (the specification allows one), and so \
                 does this library; 'check -r' drops the other"
            ),
            ExtensionLength { at, stated } => write!(
                f,
                "bitmaps extension at {at:#x}: its length is {stated}, not 24 (QEMU refuses to \
                 open the image); its fields are read from its first 24 bytes"
            ),
            ExtensionTooShort { at, len } => {
                write!(f, "bitmaps extension at {at:#x}: length {len} is not 24")
            }
            StaleExtension => f.write_str(
                "the bitmaps extension is stale (autoclear bit 0 is clear: a program without \
                 bitmap support modified the image), so the image has no usable bitmaps; their \
                 clusters are leaked ('qemu-img check -r leaks' reclaims them) and the next \
                 write drops the extension",
            ),
            ExtensionField { at, problem } => {
                write!(f, "bitmaps extension at {at:#x}: ")?;
                match problem {
                    ExtensionProblem::Reserved(value) => {
                        write!(f, "the reserved field (bytes 4-7) is {value:#x}, not zero")
                    }
                    ExtensionProblem::NoBitmaps => f.write_str("nb_bitmaps is 0"),
                    ExtensionProblem::TooManyBitmaps(count) => {
                        write!(f, "nb_bitmaps {count} exceeds QEMU's limit of 65535")
                    }
                    ExtensionProblem::DirectoryOffset(offset) => write!(
                        f,
                        "bitmap_directory_offset {offset:#x} is not a nonzero multiple of the \
                         cluster size"
                    ),
                    ExtensionProblem::DirectorySizeZero => {
                        f.write_str("bitmap_directory_size is 0")
                    }
                    ExtensionProblem::DirectoryTooLarge { size, limit } => write!(
                        f,
                        "bitmap_directory_size {size} exceeds QEMU's limit of {limit}"
                    ),
                    ExtensionProblem::DirectoryPastEnd {
                        offset,
                        size,
                        file_len,
                    } => write!(
                        f,
                        "the bitmap directory at {offset:#x} ({size} bytes) extends past the \
                         end of the file ({file_len} bytes)"
                    ),
                }
            }
            BadDirectory { detail } => f.write_str(detail),
            BadEntry { at, problem } => write!(
                f,
                "bitmap '{}' (directory entry at {at:#x}): {problem}",
                name()
            ),
            DuplicateName { at } => write!(
                f,
                "bitmap '{}' (directory entry at {at:#x}): the name is used by another bitmap \
                 too (names must be unique)",
                name()
            ),
            NonUtf8Name { at } => write!(
                f,
                "bitmap '{}' (directory entry at {at:#x}): the name is not valid UTF-8 (shown \
                 with \\xHH escapes)",
                name()
            ),
            EmptyName { at } => write!(
                f,
                "bitmap '' (directory entry at {at:#x}): the name is empty (QEMU reads it, but \
                 creates no such bitmap)"
            ),
            NameWithNul { at, qemu_name } => write!(
                f,
                "bitmap '{}' (directory entry at {at:#x}): the name contains a NUL byte; QEMU \
                 knows the bitmap as '{qemu_name}', the name up to it",
                name()
            ),
            NameClash {
                at,
                qemu_name,
                other,
            } => write!(
                f,
                "bitmap '{}' (directory entry at {at:#x}): QEMU reads the name up to its NUL \
                 byte, as '{qemu_name}', the name of bitmap '{other}' too, and so refuses to \
                 open the image (\"Bitmap already exists\"); remove or replace one of them",
                name()
            ),
            InUse => write!(
                f,
                "bitmap '{}' is in use (flag in_use): it was not saved properly and its content \
                 may be inconsistent; it cannot be loaded, only inspected or removed",
                name()
            ),
            TablePastEnd {
                entry_at,
                offset,
                entries,
                file_len,
            } => write!(
                f,
                "bitmap '{}' (directory entry at {entry_at:#x}): the bitmap table at \
                 {offset:#x} ({entries} entries) extends past the end of the file ({file_len} \
                 bytes)",
                name()
            ),
            GuestCrossLink {
                place,
                cluster_at,
                virtual_offset,
                snapshot,
                l2_at,
                entry,
            } => write!(
                f,
                "{} is also a guest data cluster: the cluster at {cluster_at:#x} holds virtual \
                 offset {virtual_offset:#x} of {} (L2 table at {l2_at:#x}, entry {entry}); \
                 freeing or rewriting it would destroy guest data",
                capitalized(place),
                disk(*snapshot)
            ),
            InvalidTableEntry {
                index,
                at,
                value,
                why,
            } => write!(
                f,
                "bitmap '{}': bitmap table entry {index} at {at:#x} is {value:#x}: {why}",
                name()
            ),
            TableEntryPastEnd {
                index,
                at,
                data,
                file_len,
            } => write!(
                f,
                "bitmap '{}': bitmap table entry {index} at {at:#x} points to a data cluster at \
                 {data:#x}, past the end of the file ({file_len} bytes)",
                name()
            ),
            PaddingBit {
                data,
                index,
                entry_at,
                bit,
            } => write!(
                f,
                "bitmap '{}': the last data cluster at {data:#x} (bitmap table entry {index} at \
                 {entry_at:#x}) has padding bit {bit} set past the end of the bitmap; it is \
                 ignored (QEMU writes such bits) and the next store of the bitmap clears it",
                name()
            ),
        }
    }
}
