// SPDX-License-Identifier: GPL-2.0-or-later

//! Persistent dirty bitmaps in qcow2 images: the qcow2 "bitmaps" header extension, read and
//! written offline, interoperating with QEMU 10.
//!
//! An [`Image`] is an open qcow2 file. Its bitmaps are listed by [`Image::bitmaps`], read into
//! an [`HBitmap`] by [`Image::load_bitmap`] (or [`Image::inspect_bitmap`]) and written back by
//! [`Image::store_bitmap`]. An in-memory bitmap is byte-addressed over the virtual disk:
//! `HBitmap::new(virtual_size, log2(granularity))`.
//!
//! ```no_run
//! use hbitmap::qcow2::{BitmapFlags, Image, OpenOptions};
//!
//! let mut image = Image::open("disk.qcow2", OpenOptions { write: true, force_share: false })?;
//! let mut bitmap = image.load_bitmap("backup-0")?; // marked in use on disk until stored
//! bitmap.set(0, 65536);
//! image.store_bitmap("backup-0", &bitmap, BitmapFlags { in_use: false, auto: true })?;
//! image.close()?;
//! # Ok::<(), hbitmap::qcow2::Error>(())
//! ```
//!
//! # Rules enforced (QEMU 10's, and stricter where QEMU would silently misread)
//!
//! - The extension counts only with autoclear bit 0 set; present with the bit clear it is
//!   stale: the image reads as having no bitmaps and the next write drops it (as QEMU does).
//!   Unknown autoclear bits are cleared, in a header write of their own, before anything else
//!   is written.
//! - At most 65535 bitmaps, a directory of at most 64 MiB; names of at most 1023 bytes, unique;
//!   granularity 512 B to 2 GiB; type 1 only; no extra data; reserved flags, fields
//!   and padding zero; the table size must match the virtual size, granularity and cluster size
//!   (unless the bitmap is in use); at most 512 MiB of bitmap data.
//! - Tables, data clusters and the directory must lie within the file, be cluster-aligned and
//!   overlap nothing else (header, L1/L2 tables, refcount table and blocks, snapshot table,
//!   snapshot L1 and L2 tables, LUKS header, guest data clusters of the active disk and of every
//!   snapshot, another bitmap's clusters). Such images are refused with a message naming both
//!   owners and the file offset. Every size is checked against the file size and QEMU's limits
//!   before memory is allocated for it.
//! - Padding bits set past a bitmap's end are ignored (QEMU writes them when it loads an
//!   all-ones table entry); `check` notes them and our writes clear them.
//! - A bitmap marked in use is listed, can be inspected and removed, but not loaded. Listing and
//!   removing it never depend on its table (QEMU never reads an in-use bitmap's table): a table
//!   past the end of the file or with invalid entries is a warning, and removing such a bitmap
//!   leaks what its table pointed to rather than freeing clusters on its word.
//! - Images with unknown incompatible feature bits are refused, for reading too (QEMU refuses
//!   to open them: they may not be interpretable).
//! - Writing is refused for version 2 images, images with the dirty or corrupt bit, or metadata
//!   clusters whose refcount is 0.
//!
//! # Names
//!
//! A name is bytes ([`BitmapName`]): the API takes any `impl AsRef<[u8]>` (`&str`, `&[u8]`, a
//! [`BitmapName`]...). Images may hold any bytes QEMU reads: control characters, bytes that are
//! not UTF-8, a NUL (QEMU uses the name up to it) or no byte at all; such bitmaps are listed,
//! read and edited like any other. A bitmap is created only with a name QEMU would create: 1 to
//! 1023 bytes without NUL (any other byte is accepted, as `qemu-img bitmap --add` accepts it).
//! Messages show names escaped ([`BitmapName::escaped`]).
//!
//! # Crash consistency
//!
//! A change never overwrites live metadata: new data clusters, tables and the directory go to
//! newly allocated clusters (their refcounts written first), everything is flushed, the header
//! cluster is rewritten in one write and flushed, and only then are the old clusters freed. An
//! interruption at any point leaves the old or the new bitmaps, with at worst leaked clusters.
//!
//! # Check and repair
//!
//! [`Image::check`] and [`Image::check_file`] count every cluster's references as `qemu-img
//! check` does and compare them with the refcounts (leaks above, corruption below), besides
//! validating the bitmaps; they never write. [`Image::repair_file`] and [`Image::repair`] do
//! what `qemu-img check -r leaks|all` does for what this library maps completely (see
//! [`RepairMode`]); where it does not, they refuse with the reason and write nothing.
//!
//! # Locking
//!
//! Images are locked as QEMU locks them (OFD byte-range locks, see `lock.rs`): a writer keeps QEMU
//! from opening the image, and a QEMU process using the image makes opening fail with
//! [`Error::Locked`]. [`OpenOptions::force_share`] skips locking for read-only access.
// `forbid` cannot be lifted by a submodule: every file but lock.rs forbids unsafe code itself,
// and lock.rs (QEMU's OFD locks need fcntl) allows it under this `deny`.
#![deny(unsafe_code)]

mod bitmap_dir;
mod bitmap_table;
mod check;
pub(crate) mod create;
mod error;
mod header;
pub mod io;
mod l2_entry;
mod layout;
mod lock;
mod name;
mod rebuild;
mod refcount;
mod repair;
mod writer;

use std::path::{Path, PathBuf};

use crate::HBitmap;

use self::bitmap_dir::{DirEntry, FLAG_AUTO, FLAG_IN_USE};
use self::header::{BitmapsExt, AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN};
use self::io::{FileIo, ImageIo};
use self::layout::{Bitmap, ExtState, Layout};
use self::lock::ImageLock;
use self::name::escape;

pub use self::check::finding::{
    EntryProblem, ExtensionProblem, Finding, FindingKind, MoreOf, Place, Severity, Subject,
};
pub use self::check::CheckReport;
pub use self::error::Error;
pub use self::name::BitmapName;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing (takes QEMU's write locks).
    pub write: bool,
    /// Read-only access without taking or checking locks, like `qemu-img -U`: works while QEMU
    /// has the image open, but what is read may be stale. Invalid with `write`.
    pub force_share: bool,
}

/// One bitmap of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name's bytes as stored; `Display` shows them escaped.
    pub name: BitmapName,
    /// Bytes of the virtual disk per bit.
    pub granularity: u64,
    /// Flag `in_use`: the bitmap was not saved properly and may be inconsistent.
    pub in_use: bool,
    /// Flag `auto`: the bitmap is enabled (tracks writes).
    pub auto: bool,
    /// The bitmap type (1: dirty tracking).
    pub bitmap_type: u8,
    /// File offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
}

/// Flags of a stored bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapFlags {
    /// Mark the bitmap in use (inconsistent).
    pub in_use: bool,
    /// Mark the bitmap enabled.
    pub auto: bool,
}

/// What `check -r` repairs (`qemu-img check -r`'s modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Free leaked clusters (refcount above the references). Refused when the image holds
    /// damaged bitmaps, whose clusters are then not known.
    Leaks,
    /// Also remove every bitmap that cannot be trusted (in use, damaged, cross-linked) and a
    /// stale or unreadable bitmaps extension, keeping every intact bitmap as it is, then free
    /// what only they used.
    All,
}

/// What a repair did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Each change made, in order.
    pub changes: Vec<String>,
    /// `leaks-fixed`: leaked clusters whose refcount was lowered to their references.
    pub leaks_fixed: u64,
    /// `corruptions-fixed`: damaged bitmaps removed and bitmaps extension problems dropped
    /// (bitmaps removed because they were in use are a state, not damage: only in `changes`).
    pub corruptions_fixed: u64,
    /// The check before the repair.
    pub before: CheckReport,
    /// The check after it.
    pub after: CheckReport,
}

/// Dirty bytes of a byte-addressed bitmap, clipped to its size: the sum of its extents'
/// lengths ([`HBitmap::count`] counts the last granule whole even where it passes the end).
pub fn dirty_bytes(bitmap: &HBitmap) -> u64 {
    let size = bitmap.size();
    let covered = u128::from(bitmap.groups()) << bitmap.granularity();
    let overshoot = covered.saturating_sub(u128::from(size)) as u64;
    if overshoot > 0 && bitmap.get(size - 1) {
        bitmap.count() - overshoot
    } else {
        bitmap.count()
    }
}

/// An open qcow2 image.
pub struct Image {
    path: PathBuf,
    io: Box<dyn ImageIo>,
    _lock: Option<ImageLock>,
    writable: bool,
    layout: Layout,
    infos: Vec<BitmapInfo>,
    warnings: Vec<String>,
    /// Set after a failed write whose effect could not be undone: further writes are refused.
    poisoned: Option<String>,
    /// Clusters allocated by the write in progress, freed again if it fails before the header.
    pending: Vec<(u64, u64)>,
    header_attempted: bool,
    /// Names of the bitmaps that `load_bitmap` marked in use through this handle and that were
    /// neither stored, released nor removed since.
    tracked: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("writable", &self.writable)
            .field("virtual_size", &self.virtual_size())
            .field("cluster_size", &self.cluster_size())
            .field("bitmaps", &self.infos)
            .finish()
    }
}

fn summarize(errors: &[String]) -> String {
    match errors.len() {
        0 => String::new(),
        1 => errors[0].clone(),
        n => format!(
            "{} (and {} more problem{})",
            errors[0],
            n - 1,
            if n == 2 { "" } else { "s" }
        ),
    }
}

fn info_of(bitmap: &Bitmap) -> BitmapInfo {
    let entry = &bitmap.entry;
    BitmapInfo {
        name: BitmapName::from(entry.name.clone()),
        granularity: 1u64 << entry.granularity_bits.min(63),
        in_use: entry.flags & FLAG_IN_USE != 0,
        auto: entry.flags & FLAG_AUTO != 0,
        bitmap_type: entry.bitmap_type,
        table_offset: entry.table_offset,
        table_size: entry.table_size,
    }
}

/// The clusters a bitmap occupies: its table and its data clusters.
/// Nothing for a bitmap whose table could not be trusted (an in-use bitmap's, see `layout`):
/// its clusters are leaked rather than freed on the word of a damaged table.
fn clusters_of(bitmap: &Bitmap, cluster_size: u64) -> Vec<(u64, u64)> {
    if bitmap.table.is_empty() {
        return Vec::new();
    }
    let mut out = vec![(
        bitmap.entry.table_offset,
        u64::from(bitmap.entry.table_size) * 8,
    )];
    for &entry in &bitmap.table {
        let offset = entry & bitmap_table::ENTRY_OFFSET_MASK;
        if offset != 0 {
            out.push((offset, cluster_size));
        }
    }
    out
}

impl Image {
    /// Opens an image.
    ///
    /// Takes QEMU's locks unless `force_share` is set, then reads and validates the header,
    /// the refcount table, the metadata map and the whole bitmaps extension (directory, every
    /// table, the padding of every last data cluster). A malformed image is refused with
    /// [`Error::Corrupt`] naming the first problem, one with unknown incompatible features with
    /// [`Error::Unsupported`]; opening for writing is also refused (with [`Error::ReadOnly`]
    /// giving the reason) for version 2 images, images marked dirty or corrupt, or with
    /// uncounted metadata clusters.
    /// Opening never writes.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Image, Error> {
        let path = path.as_ref();
        if options.write && options.force_share {
            return Err(Error::InvalidArgument(
                "force_share is only for read-only access".into(),
            ));
        }
        let lock = if options.force_share {
            None
        } else {
            Some(ImageLock::acquire(path, options.write)?)
        };
        let access = if options.write {
            io::Access::Write
        } else {
            io::Access::Read
        };
        let file = io::open_file(path, access)?;
        Image::from_parts(
            path.to_path_buf(),
            Box::new(FileIo::new(file)),
            lock,
            options.write,
        )
    }

    /// Opens an image through any [`ImageIo`] (no locking): for fault injection in tests.
    /// `path` is only reported back by [`path`](Self::path).
    pub fn open_io(
        io: Box<dyn ImageIo>,
        path: impl Into<PathBuf>,
        write: bool,
    ) -> Result<Image, Error> {
        Image::from_parts(path.into(), io, None, write)
    }

    pub(crate) fn from_parts(
        path: PathBuf,
        io: Box<dyn ImageIo>,
        lock: Option<ImageLock>,
        writable: bool,
    ) -> Result<Image, Error> {
        let (layout, problems) = layout::read(&*io)?;
        let mut warnings: Vec<String> = problems
            .of(Severity::Warning)
            .map(ToString::to_string)
            .collect();
        if problems.has_errors() {
            let errors: Vec<String> = problems.errors().map(ToString::to_string).collect();
            // Damage confined to some bitmaps leaves the others readable, as QEMU lists and
            // serves them; reading a damaged one is refused. Writing waits for a repair.
            if problems.refuse_opening(&layout) || writable {
                return Err(Error::Corrupt(summarize(&errors)));
            }
            warnings.extend(errors);
        }
        if writable && !problems.write_blockers.is_empty() {
            return Err(Error::ReadOnly(format!(
                "cannot open {} for writing: {}",
                path.display(),
                summarize(&problems.write_blockers)
            )));
        }
        let mut image = Image {
            path,
            io,
            _lock: lock,
            writable,
            layout,
            infos: Vec::new(),
            warnings,
            poisoned: None,
            pending: Vec::new(),
            header_attempted: false,
            tracked: Vec::new(),
        };
        image.refresh_infos();
        Ok(image)
    }

    /// Creates a new, empty version 3 image (refcount_order 4, as `qemu-img create -f qcow2`
    /// makes it) of `virtual_size` bytes (a multiple of 512) with clusters of `cluster_size`
    /// bytes (a power of two, 512 B to 2 MiB), overwriting any file at `path` (unless QEMU holds
    /// it), and opens it for writing.
    pub fn create(
        path: impl AsRef<Path>,
        virtual_size: u64,
        cluster_size: u64,
    ) -> Result<Image, Error> {
        create::create(path.as_ref(), virtual_size, cluster_size)
    }

    /// Reads and checks an image without opening it as an [`Image`]: a malformed image gives a
    /// report listing every problem found rather than an error. Fails only when the file cannot
    /// be opened, locked or read.
    pub fn check_file(path: impl AsRef<Path>, options: OpenOptions) -> Result<CheckReport, Error> {
        let path = path.as_ref();
        let _lock = if options.force_share {
            None
        } else {
            Some(ImageLock::acquire(path, false)?)
        };
        let file = io::open_file(path, io::Access::Read)?;
        let io = FileIo::new(file);
        let mut report = check::check_io(&io);
        if let Ok(len) = io.len() {
            if let Ok(header) = header::Header::read(&io, len) {
                report.add_missing_files(path, &header);
            }
        }
        Ok(report)
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtual disk size in bytes, as QEMU sees it (the header's size in whole 512-byte
    /// sectors): the size of every bitmap.
    pub fn virtual_size(&self) -> u64 {
        self.layout.virtual_len()
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.layout.cluster_size()
    }

    /// QEMU's default bitmap granularity for this image: the cluster size clamped to 4 KiB to
    /// 64 KiB (`bdrv_get_default_bitmap_granularity`).
    pub fn default_granularity(&self) -> u64 {
        self.cluster_size().clamp(4096, 65536)
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The bitmaps, in directory order.
    pub fn bitmaps(&self) -> &[BitmapInfo] {
        &self.infos
    }

    /// The bitmap called `name` (its exact bytes).
    pub fn bitmap(&self, name: impl AsRef<[u8]>) -> Option<&BitmapInfo> {
        self.find(name.as_ref()).map(|index| &self.infos[index])
    }

    /// Warnings found when the image was opened (bitmaps in use, a stale extension...).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The stored bytes of the name of bitmap number `index` (directory order).
    pub(crate) fn raw_name(&self, index: usize) -> &[u8] {
        self.layout
            .bitmaps
            .get(index)
            .map_or(&[][..], |b| b.entry.name.as_slice())
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.layout
            .bitmaps
            .iter()
            .position(|b| b.entry.name == name)
    }

    fn refresh_infos(&mut self) {
        self.infos = self.layout.bitmaps.iter().map(info_of).collect();
    }

    fn index_of(&self, name: &[u8]) -> Result<usize, Error> {
        self.find(name).ok_or_else(|| Error::NotFound(escape(name)))
    }

    fn consistent(&self, name: &[u8], doing: &str) -> Result<usize, Error> {
        let index = self.index_of(name)?;
        if self.layout.bitmaps[index].entry.in_use() {
            let name = escape(name);
            return Err(Error::InUse(format!(
                "cannot {doing} bitmap '{name}': it is marked in use (it was not saved properly, \
                 e.g. QEMU did not shut down cleanly, so its content may be inconsistent); \
                 inspect it or remove it instead"
            )));
        }
        Ok(index)
    }

    fn read_bitmap(&self, index: usize) -> Result<HBitmap, Error> {
        let bitmap = &self.layout.bitmaps[index];
        let name = bitmap.name();
        if let (false, Some(damage)) = (bitmap.trusted, &bitmap.damage) {
            let why = format!(
                "bitmap '{name}' is damaged and cannot be read: {damage} ('qbitmap check -r all' \
                 removes it and keeps the intact bitmaps)"
            );
            return Err(if bitmap.entry.in_use() {
                Error::InUse(why)
            } else {
                Error::Corrupt(why)
            });
        }
        let len = self.virtual_size();
        let gran = u32::from(bitmap.entry.granularity_bits);
        let cluster_size = self.cluster_size();
        let expected = bitmap_table::table_size_for(len, gran, cluster_size);
        if expected != u64::from(bitmap.entry.table_size) || bitmap.table.is_empty() {
            return Err(Error::InUse(format!(
                "bitmap '{name}' is in use and its bitmap_table_size {} does not match the \
                 virtual size ({expected} entries needed): its content cannot be read",
                bitmap.entry.table_size
            )));
        }
        bitmap_table::load(&*self.io, &bitmap.table, len, gran, cluster_size, &name)
    }

    /// Loads a bitmap for tracking: refused for a bitmap marked in use (its content may be
    /// inconsistent: [`Error::InUse`]). On an image opened for writing the bitmap is then marked
    /// in use on disk, as QEMU marks the bitmaps it loads, until it is stored back with
    /// [`store_bitmap`](Self::store_bitmap), or released with
    /// [`release_bitmap`](Self::release_bitmap) when no write was tracked. Closing does neither:
    /// a bitmap loaded and then dropped stays in use, as after a crash
    /// ([`tracked_bitmaps`](Self::tracked_bitmaps) lists them).
    pub fn load_bitmap(&mut self, name: impl AsRef<[u8]>) -> Result<HBitmap, Error> {
        let name = name.as_ref();
        let index = self.consistent(name, "load")?;
        let bitmap = self.read_bitmap(index)?;
        if self.writable {
            self.write_op(|image| {
                let mut bitmaps = image.layout.bitmaps.clone();
                bitmaps[index].entry.flags |= FLAG_IN_USE;
                image.commit(bitmaps, Vec::new())
            })?;
            self.tracked.push(name.to_vec());
        }
        Ok(bitmap)
    }

    /// Drops the in-use mark that [`load_bitmap`](Self::load_bitmap) set through this handle,
    /// for a caller that tracked no write to the virtual disk since then: the stored content is
    /// still exact. Only for bitmaps this handle loaded: an in-use mark found on disk (a crash)
    /// says the content is stale, and is refused here.
    pub fn release_bitmap(&mut self, name: impl AsRef<[u8]>) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.index_of(name)?;
        if !self.tracked.iter().any(|t| t == name) {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{}' was not loaded through this handle: only the in-use mark set by \
                 loading it here can be released",
                escape(name)
            )));
        }
        if self.layout.bitmaps[index].entry.in_use() {
            self.write_op(|image| {
                let mut bitmaps = image.layout.bitmaps.clone();
                bitmaps[index].entry.flags &= !FLAG_IN_USE;
                image.commit(bitmaps, Vec::new())
            })?;
        }
        self.untrack(name);
        Ok(())
    }

    /// The bitmaps this handle loaded for tracking (so marked in use on disk) and that were
    /// neither stored, released nor removed since: closing leaves them in use.
    pub fn tracked_bitmaps(&self) -> Vec<BitmapName> {
        self.layout
            .bitmaps
            .iter()
            .filter(|b| b.entry.in_use() && self.tracked.contains(&b.entry.name))
            .map(|b| BitmapName::from(b.entry.name.clone()))
            .collect()
    }

    fn untrack(&mut self, name: &[u8]) {
        self.tracked.retain(|t| t != name);
    }

    /// Changes a bitmap offline: reads it (refused for a bitmap in use), lets `change` modify it
    /// and stores the result with the same flags, in the one crash-safe switch of
    /// [`store_bitmap`](Self::store_bitmap): an interruption leaves the old or the new content.
    ///
    /// Unlike [`load_bitmap`](Self::load_bitmap) this does not mark the bitmap in use on disk
    /// first: nothing writes to the virtual disk between the read and the store, so there is no
    /// window in which the stored content is stale, and a crash cannot leave the bitmap in use
    /// (QEMU would then consider it inconsistent, and an incremental backup would lose it).
    pub fn edit_bitmap(
        &mut self,
        name: impl AsRef<[u8]>,
        change: impl FnOnce(&mut HBitmap),
    ) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.consistent(name, "change")?;
        let mut bitmap = self.read_bitmap(index)?;
        change(&mut bitmap);
        let auto = self.layout.bitmaps[index].entry.flags & FLAG_AUTO != 0;
        self.store_bitmap(
            name,
            &bitmap,
            BitmapFlags {
                in_use: false,
                auto,
            },
        )
    }

    /// Reads a bitmap without changing anything, even one marked in use (explicit inspection:
    /// its content may be inconsistent). An in-use bitmap whose table does not match the virtual
    /// size cannot be read.
    pub fn inspect_bitmap(&self, name: impl AsRef<[u8]>) -> Result<HBitmap, Error> {
        let index = self.index_of(name.as_ref())?;
        self.read_bitmap(index)
    }

    fn check_bitmap_arg(&self, name: &[u8], bitmap: &HBitmap) -> Result<(), Error> {
        // Only a new name must be one QEMU would create: an existing bitmap keeps whatever name
        // the image gave it (an empty one, one with a NUL).
        if self.find(name).is_none() {
            self.check_new_name(name)?;
        }
        let len = self.virtual_size();
        if bitmap.size() != len {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{}' covers {} bytes but the virtual disk has {len}",
                escape(name),
                bitmap.size()
            )));
        }
        self.check_constraints(name, bitmap.granularity())
    }

    /// The granularity of bitmap `name` in bytes as the log2 its entry stores, within QEMU's
    /// constraints for this image.
    fn granularity_bits(&self, name: &[u8], granularity: u64) -> Result<u32, Error> {
        if !granularity.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{}': granularity {granularity} is not a power of two",
                escape(name)
            )));
        }
        let bits = granularity.trailing_zeros();
        self.check_constraints(name, bits)?;
        Ok(bits)
    }

    /// A new bitmap's name: one QEMU would create, and not one QEMU already sees in the image
    /// (QEMU reads a stored name up to a NUL byte, and would refuse to open the image).
    fn check_new_name(&self, name: &[u8]) -> Result<(), Error> {
        bitmap_dir::check_name(name).map_err(Error::InvalidArgument)?;
        let seen_as = |stored: &[u8]| stored.split(|&b| b == 0).next() == Some(name);
        if let Some(other) = self.layout.bitmaps.iter().find(|b| seen_as(&b.entry.name)) {
            return Err(Error::InvalidArgument(format!(
                "a bitmap named '{}' cannot be added: QEMU reads the name of bitmap '{}' up to \
                 its NUL byte, as '{}', and would refuse to open the image with both",
                escape(name),
                other.name(),
                escape(name)
            )));
        }
        Ok(())
    }

    fn check_constraints(&self, name: &[u8], granularity_bits: u32) -> Result<(), Error> {
        let name = escape(name);
        let len = self.virtual_size();
        if !(bitmap_dir::MIN_GRANULARITY_BITS..=bitmap_dir::MAX_GRANULARITY_BITS)
            .contains(&granularity_bits)
        {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{name}': granularity 2^{granularity_bits} is out of range (512 B to \
                 2 GiB)"
            )));
        }
        if len == 0 {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{name}': a virtual disk of 0 bytes cannot hold a persistent bitmap"
            )));
        }
        let bytes = bitmap_table::groups(len, granularity_bits).div_ceil(8);
        if bytes > bitmap_dir::MAX_PHYS_SIZE
            || bytes > bitmap_dir::MAX_TABLE_SIZE * self.cluster_size()
        {
            return Err(Error::Limit(format!(
                "bitmap '{name}': too much space ({bytes} bytes) would be occupied by the \
                 bitmap; use a larger granularity"
            )));
        }
        Ok(())
    }

    fn check_directory_limits(&self, bitmaps: &[&[u8]]) -> Result<(), Error> {
        if bitmaps.len() as u64 > bitmap_dir::MAX_BITMAPS {
            return Err(Error::Limit(format!(
                "too many persistent bitmaps ({}; QEMU's limit is 65535)",
                bitmaps.len()
            )));
        }
        let size: u64 = bitmaps
            .iter()
            .map(|name| bitmap_dir::entry_size(name.len()))
            .sum();
        if size > bitmap_dir::MAX_DIRECTORY_SIZE {
            return Err(Error::Limit(format!(
                "the bitmap directory would be too large ({size} bytes; QEMU's limit is {})",
                bitmap_dir::MAX_DIRECTORY_SIZE
            )));
        }
        Ok(())
    }

    /// Stores `bitmap` as `name`, creating it or replacing the bitmap of that name (even one in
    /// use), with the given flags. The bitmap must cover the virtual size in bytes with a
    /// granularity of 512 B to 2 GiB (`HBitmap::new(virtual_size, 9..=31)`). Clusters without a
    /// dirty bit are stored as zero table entries. A new name must be one QEMU would create (1 to
    /// 1023 bytes, no NUL); an existing bitmap is replaced whatever its name.
    pub fn store_bitmap(
        &mut self,
        name: impl AsRef<[u8]>,
        bitmap: &HBitmap,
        flags: BitmapFlags,
    ) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        self.check_bitmap_arg(name, bitmap)?;
        let existing = self.find(name);
        if existing.is_none() {
            let mut names: Vec<&[u8]> = self
                .layout
                .bitmaps
                .iter()
                .map(|b| b.entry.name.as_slice())
                .collect();
            names.push(name);
            self.check_directory_limits(&names)?;
        }
        self.write_op(|image| image.store(name, bitmap, flags, existing))?;
        self.untrack(name);
        Ok(())
    }

    fn store(
        &mut self,
        name: &[u8],
        bitmap: &HBitmap,
        flags: BitmapFlags,
        existing: Option<usize>,
    ) -> Result<(), Error> {
        let cluster_size = self.cluster_size();
        let len = self.virtual_size();
        let gran = bitmap.granularity();
        let table_size = bitmap_table::table_size_for(len, gran, cluster_size);
        // Data clusters with a dirty bit, allocated in runs of contiguous free clusters.
        let used = bitmap_table::used_clusters(bitmap, cluster_size);
        let mut placed = Vec::with_capacity(used.len());
        while placed.len() < used.len() {
            let (offset, clusters) = self.alloc_run((used.len() - placed.len()) as u64)?;
            for k in 0..clusters {
                placed.push(offset + k * cluster_size);
            }
        }
        let table_clusters = (table_size * 8).div_ceil(cluster_size);
        let table_offset = self.alloc(table_clusters)?;
        self.layout.refcounts.write_dirty(&mut *self.io)?;

        let mut table = vec![0u64; table_size as usize];
        for (&index, &offset) in used.iter().zip(&placed) {
            table[index as usize] = offset;
        }
        let shown = escape(name);
        let what = format!("bitmap '{shown}' data");
        bitmap_table::write_data(bitmap, &used, &placed, cluster_size, |offset, data| {
            self.write(offset, data, &what)
        })?;
        self.write(
            table_offset,
            &bitmap_table::encode(&table, cluster_size),
            &format!("the bitmap table of '{shown}'"),
        )?;

        let mut entry_flags = 0;
        if flags.in_use {
            entry_flags |= FLAG_IN_USE;
        }
        if flags.auto {
            entry_flags |= FLAG_AUTO;
        }
        let new = Bitmap {
            entry: DirEntry {
                table_offset,
                table_size: table_size as u32,
                flags: entry_flags,
                bitmap_type: bitmap_dir::TYPE_DIRTY_TRACKING,
                granularity_bits: gran as u8,
                name: name.to_vec(),
                dir_pos: 0,
            },
            table,
            trusted: true,
            damage: None,
            entry_valid: true,
        };
        let mut bitmaps = self.layout.bitmaps.clone();
        let mut to_free = Vec::new();
        match existing {
            Some(index) => {
                to_free.extend(clusters_of(&bitmaps[index], cluster_size));
                bitmaps[index] = new;
            }
            None => bitmaps.push(new),
        }
        self.commit(bitmaps, to_free)
    }

    /// Adds an empty bitmap of `granularity` bytes (a power of two, 512 B to 2 GiB), enabled
    /// (`auto`) or not. Fails if the name exists.
    pub fn add_bitmap(
        &mut self,
        name: impl AsRef<[u8]>,
        granularity: u64,
        enabled: bool,
    ) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        if self.find(name).is_some() {
            return Err(Error::Exists(escape(name)));
        }
        self.check_new_name(name)?;
        let bits = self.granularity_bits(name, granularity)?;
        self.store_empty(name, bits, enabled)
    }

    /// Removes a bitmap (also one marked in use) and frees its clusters.
    pub fn remove_bitmap(&mut self, name: impl AsRef<[u8]>) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.index_of(name)?;
        self.write_op(|image| {
            let mut bitmaps = image.layout.bitmaps.clone();
            let removed = bitmaps.remove(index);
            let to_free = clusters_of(&removed, image.cluster_size());
            image.commit(bitmaps, to_free)
        })?;
        self.untrack(name);
        Ok(())
    }

    /// Clears a bitmap (keeps its granularity and flags). Refused for a bitmap in use.
    pub fn clear_bitmap(&mut self, name: impl AsRef<[u8]>) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.consistent(name, "clear")?;
        let entry = &self.layout.bitmaps[index].entry;
        let (bits, auto) = (
            u32::from(entry.granularity_bits),
            entry.flags & FLAG_AUTO != 0,
        );
        self.store_empty(name, bits, auto)
    }

    /// Stores a clean bitmap of granularity `2^bits` bytes as `name`, consistent, `auto` or not.
    fn store_empty(&mut self, name: &[u8], bits: u32, auto: bool) -> Result<(), Error> {
        let bitmap = HBitmap::new(self.virtual_size(), bits)
            .map_err(|e| Error::Limit(format!("bitmap '{}': {e}", escape(name))))?;
        let flags = BitmapFlags {
            in_use: false,
            auto,
        };
        self.store_bitmap(name, &bitmap, flags)
    }

    /// Enables or disables a bitmap (its `auto` flag). Refused for a bitmap in use.
    pub fn set_enabled(&mut self, name: impl AsRef<[u8]>, enabled: bool) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.consistent(name, if enabled { "enable" } else { "disable" })?;
        let flags = self.layout.bitmaps[index].entry.flags;
        let new_flags = if enabled {
            flags | FLAG_AUTO
        } else {
            flags & !FLAG_AUTO
        };
        if new_flags == flags {
            return Ok(());
        }
        self.write_op(|image| {
            let mut bitmaps = image.layout.bitmaps.clone();
            bitmaps[index].entry.flags = new_flags;
            image.commit(bitmaps, Vec::new())
        })
    }

    /// Merges bitmap `source` into bitmap `target` (`target |= source`), both of this image and
    /// not in use. Granularities may differ: every dirty range of the source dirties the target.
    pub fn merge_bitmap(
        &mut self,
        source: impl AsRef<[u8]>,
        target: impl AsRef<[u8]>,
    ) -> Result<(), Error> {
        self.ensure_writable()?;
        let source_index = self.consistent(source.as_ref(), "merge from")?;
        let source_bitmap = self.read_bitmap(source_index)?;
        self.merge_into(&source_bitmap, target.as_ref())
    }

    /// Merges bitmap `source` of another image (of the same virtual size) into bitmap `target`
    /// of this one.
    pub fn merge_bitmap_from(
        &mut self,
        source_image: &Image,
        source: impl AsRef<[u8]>,
        target: impl AsRef<[u8]>,
    ) -> Result<(), Error> {
        let (source, target) = (source.as_ref(), target.as_ref());
        self.ensure_writable()?;
        if source_image.virtual_size() != self.virtual_size() {
            return Err(Error::InvalidArgument(format!(
                "cannot merge bitmap '{}' of {} ({} bytes) into {} ({} bytes): the \
                 virtual sizes differ",
                escape(source),
                source_image.path().display(),
                source_image.virtual_size(),
                self.path.display(),
                self.virtual_size()
            )));
        }
        let source_index = source_image.consistent(source, "merge from")?;
        let source_bitmap = source_image.read_bitmap(source_index)?;
        self.merge_into(&source_bitmap, target)
    }

    /// Adds bitmap `name` as [`add_bitmap`](Self::add_bitmap) does, or, when a bitmap of that
    /// name exists already with the same granularity and enabled state and not in use, leaves
    /// it as it is: a retry after a crash reaches the same state. Returns whether it added the
    /// bitmap. [`Error::Exists`] when the existing bitmap differs from the one asked for.
    pub fn ensure_bitmap(
        &mut self,
        name: impl AsRef<[u8]>,
        granularity: u64,
        enabled: bool,
    ) -> Result<bool, Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let Some(index) = self.find(name) else {
            self.add_bitmap(name, granularity, enabled)?;
            return Ok(true);
        };
        let existing = &self.infos[index];
        if existing.granularity != granularity || existing.auto != enabled || existing.in_use {
            return Err(Error::Exists(escape(name)));
        }
        Ok(false)
    }

    /// Marks the bytes `offset..offset + length` of bitmap `name` dirty (`dirty`) or clean, in
    /// one crash-safe store ([`edit_bitmap`](Self::edit_bitmap)). The range must end within
    /// the virtual size; a clean range must start and end on granule boundaries (or end at the
    /// virtual size), as clearing part of a granule would clear bytes outside it. Refused for a
    /// bitmap in use. An empty range changes nothing.
    pub fn set_range(
        &mut self,
        name: impl AsRef<[u8]>,
        offset: u64,
        length: u64,
        dirty: bool,
    ) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let index = self.consistent(name, if dirty { "set" } else { "reset" })?;
        let virtual_size = self.virtual_size();
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= virtual_size)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "bitmap '{}': range {offset}+{length} ends past the virtual size of \
                     {virtual_size} bytes",
                    escape(name)
                ))
            })?;
        let granule = self.infos[index].granularity;
        let aligned = |x: u64| x % granule == 0 || x == virtual_size;
        let whole_granules = aligned(offset) && aligned(end);
        if !dirty && !whole_granules {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{}': range {offset}+{length} is not aligned to the granularity of \
                 {granule} bytes: resetting it would also mark clean bytes outside it",
                escape(name)
            )));
        }
        if length == 0 {
            return Ok(());
        }
        self.edit_bitmap(name, |bitmap| {
            if dirty {
                bitmap.set(offset, length);
            } else {
                bitmap.reset(offset, length);
            }
        })
    }

    /// Creates or replaces bitmap `name` with exactly the byte ranges `extents` (`(offset,
    /// length)` pairs, in any order, overlapping or not) dirty, at `granularity` bytes per bit
    /// (`None`: the existing bitmap's, else [`default_granularity`](Self::default_granularity)),
    /// with `flags`. Every range must end within the virtual size; nothing is written
    /// otherwise. A range that does not cover whole granules dirties the granules it touches.
    pub fn import_bitmap(
        &mut self,
        name: impl AsRef<[u8]>,
        granularity: Option<u64>,
        extents: impl IntoIterator<Item = (u64, u64)>,
        flags: BitmapFlags,
    ) -> Result<(), Error> {
        let name = name.as_ref();
        self.ensure_writable()?;
        let granularity = granularity
            .or_else(|| self.bitmap(name).map(|info| info.granularity))
            .unwrap_or_else(|| self.default_granularity());
        let bits = self.granularity_bits(name, granularity)?;
        let virtual_size = self.virtual_size();
        let mut bitmap = HBitmap::new(virtual_size, bits)
            .map_err(|e| Error::Limit(format!("bitmap '{}': {e}", escape(name))))?;
        for (offset, length) in extents {
            if offset
                .checked_add(length)
                .is_none_or(|end| end > virtual_size)
            {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{}': extent at offset {offset} of length {length} ends past the \
                     virtual size of {virtual_size} bytes",
                    escape(name)
                )));
            }
            bitmap.set(offset, length);
        }
        self.store_bitmap(name, &bitmap, flags)
    }

    /// Dirty bytes of bitmap number `index` (directory order), clipped to the virtual size
    /// ([`dirty_bytes`]). [`Error::InUse`] for a bitmap marked in use: its content is not to be
    /// trusted.
    pub fn dirty_bytes_at(&self, index: usize) -> Result<u64, Error> {
        let Some(entry) = self.layout.bitmaps.get(index) else {
            return Err(Error::NotFound(format!("#{index}")));
        };
        if entry.entry.in_use() {
            return Err(Error::InUse(format!(
                "bitmap '{}' is in use (inconsistent): its dirty bytes are not known",
                escape(&entry.entry.name)
            )));
        }
        Ok(dirty_bytes(&self.read_bitmap(index)?))
    }

    fn merge_into(&mut self, source: &HBitmap, target: &[u8]) -> Result<(), Error> {
        let target_index = self.consistent(target, "merge into")?;
        let mut merged = self.read_bitmap(target_index)?;
        if !merged.merge(source) {
            for extent in source.extents() {
                merged.set(extent.start, extent.end - extent.start);
            }
        }
        let flags = self.layout.bitmaps[target_index].entry.flags;
        self.store_bitmap(
            target,
            &merged,
            BitmapFlags {
                in_use: false,
                auto: flags & FLAG_AUTO != 0,
            },
        )
    }

    /// Validates the image again from the file: the extension, every bitmap (directory entry,
    /// table, overlaps, padding), refcounts of the metadata. Never writes.
    pub fn check(&self) -> CheckReport {
        let mut report = check::check_io(&*self.io);
        report.add_missing_files(&self.path, &self.layout.header);
        if let Some(why) = &self.poisoned {
            report.findings.push(Finding::new(
                Severity::Warning,
                Subject::Structure,
                FindingKind::WriteFailed { why: why.clone() },
            ));
            report.findings.sort_by_key(|finding| finding.severity);
        }
        report
    }

    /// Flushes and closes the image, releasing its locks. (Dropping releases them too.)
    pub fn close(mut self) -> Result<(), Error> {
        if self.writable {
            self.flush("flushing the image on close")?;
        }
        Ok(())
    }
}
