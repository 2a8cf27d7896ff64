// SPDX-License-Identifier: GPL-2.0-or-later

//! `hbitmap.Image`, `hbitmap.create`, `hbitmap.check` and the bitmap descriptions.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hbitmap::qcow2::{
    BitmapFlags, BitmapName, CheckReport, Error, Finding, Image, OpenOptions, RepairMode,
    RepairReport, Severity, Subject,
};
use hbitmap::HBitmap;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::bitmap::{ExtentIterator, PyHBitmap};
use crate::errors::{self, Failure};
use crate::names::{self, Name};

fn escaped(name: &[u8]) -> String {
    BitmapName::from(name).escaped()
}

fn repair_mode(repair: Option<&str>) -> PyResult<Option<RepairMode>> {
    match repair {
        None => Ok(None),
        Some("leaks") => Ok(Some(RepairMode::Leaks)),
        Some("all") => Ok(Some(RepairMode::All)),
        Some(other) => Err(PyValueError::new_err(format!(
            "repair must be None, 'leaks' or 'all', not {other:?}"
        ))),
    }
}

/// One finding as `check --output=json` gives it: `severity` ('error', 'warning', 'leak',
/// 'note'), `subject` (a dict with `type`: 'bitmap' with `name`, 'directory', 'extension',
/// 'clusters' with `first` and `count`, 'structure'), `kind` (what is wrong: 'CrossLink',
/// 'InUse', 'Leak'...) and `text`.
fn finding_dict<'py>(py: Python<'py>, finding: &Finding) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("severity", finding.severity.name())?;
    let subject = PyDict::new(py);
    match &finding.subject {
        Subject::Bitmap(name) => {
            subject.set_item("type", "bitmap")?;
            subject.set_item("name", name.to_string())?;
        }
        Subject::Directory => subject.set_item("type", "directory")?,
        Subject::Extension => subject.set_item("type", "extension")?,
        &Subject::Clusters { first, count } => {
            subject.set_item("type", "clusters")?;
            subject.set_item("first", first)?;
            subject.set_item("count", count)?;
        }
        _ => subject.set_item("type", "structure")?,
    }
    d.set_item("subject", subject)?;
    d.set_item("kind", finding.kind.name())?;
    d.set_item("text", finding.to_string())?;
    Ok(d)
}

/// `check --output=json`'s document (`qemu-img check --output=json`'s names, then the findings),
/// as `qbitmap check` prints it.
fn report_dict<'py>(
    py: Python<'py>,
    path: &Path,
    report: &CheckReport,
    repaired: Option<&RepairReport>,
    bitmaps: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let shown = path.display().to_string();
    d.set_item("image", &shown)?;
    d.set_item("filename", &shown)?;
    d.set_item("format", "qcow2")?;
    d.set_item("check-errors", report.check_errors)?;
    d.set_item("corruptions", report.corruptions)?;
    d.set_item("leaks", report.leaks)?;
    if let Some(repaired) = repaired {
        d.set_item("corruptions-fixed", repaired.corruptions_fixed)?;
        d.set_item("leaks-fixed", repaired.leaks_fixed)?;
    }
    let optional = [
        ("image-end-offset", report.image_end_offset),
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            d.set_item(key, value)?;
        }
    }
    d.set_item("bitmaps", bitmaps)?;
    d.set_item("clean", report.is_clean())?;
    let texts = |severity: Severity| -> Vec<String> {
        report.of(severity).map(ToString::to_string).collect()
    };
    d.set_item("errors", texts(Severity::Error))?;
    d.set_item("warnings", texts(Severity::Warning))?;
    d.set_item("notes", texts(Severity::Note))?;
    d.set_item("leaked", texts(Severity::Leak))?;
    let findings = report
        .findings
        .iter()
        .map(|finding| finding_dict(py, finding))
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("findings", findings)?;
    let escaped = |names: &[hbitmap::qcow2::BitmapName]| -> Vec<String> {
        names.iter().map(ToString::to_string).collect()
    };
    d.set_item("in-use-bitmaps", escaped(&report.in_use_bitmaps))?;
    d.set_item("damaged-bitmaps", escaped(&report.damaged_bitmaps))?;
    d.set_item("stale-extension", report.stale_extension)?;
    d.set_item("broken-extension", report.broken_extension)?;
    if let Some(repaired) = repaired {
        d.set_item("changes", &repaired.changes)?;
    }
    if let Some(why) = &report.unrepairable {
        d.set_item("unrepairable", why)?;
    }
    Ok(d)
}

/// One persistent bitmap of an image, as listed when `Image.bitmaps()` was called.
#[pyclass(frozen, module = "hbitmap", name = "BitmapInfo")]
pub struct PyBitmapInfo {
    name: Vec<u8>,
    granularity: u64,
    in_use: bool,
    auto: bool,
    dirty_bytes: Option<u64>,
}

#[pymethods]
impl PyBitmapInfo {
    /// The name: `str` when its bytes are UTF-8, else `bytes` (QEMU stores any bytes).
    #[getter]
    fn name<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        names::to_python(py, &self.name)
    }

    /// Bytes of the virtual disk per bit.
    #[getter]
    fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Flag `in_use`: the bitmap was not saved properly (QEMU has it open, or crashed) and its
    /// content cannot be trusted.
    #[getter]
    fn in_use(&self) -> bool {
        self.in_use
    }

    /// Flag `auto`: the bitmap is enabled (QEMU records guest writes in it).
    #[getter]
    fn auto(&self) -> bool {
        self.auto
    }

    /// Dirty bytes of the virtual disk, clipped to its size; None for a bitmap in use.
    #[getter]
    fn dirty_bytes(&self) -> Option<u64> {
        self.dirty_bytes
    }

    /// The fields, the name escaped.
    fn __repr__(&self) -> String {
        let dirty = match self.dirty_bytes {
            Some(bytes) => bytes.to_string(),
            None => "None".into(),
        };
        format!(
            "<hbitmap.BitmapInfo name='{}' granularity={} in_use={} auto={} dirty_bytes={dirty}>",
            escaped(&self.name),
            self.granularity,
            if self.in_use { "True" } else { "False" },
            if self.auto { "True" } else { "False" },
        )
    }
}

/// What `merge` reads the source bitmap from.
enum Source {
    ThisImage,
    Other(Py<PyImage>),
    Path(PathBuf),
}

/// An open qcow2 image and its persistent dirty bitmaps: `Image(path, writable=False,
/// force_share=False)`.
///
/// Opening takes QEMU's image locks (`hbitmap.LockedError`, a `BlockingIOError`, when a QEMU
/// process holds the image); `force_share=True` reads without them, like `qemu-img -U`
/// (read-only). Use it as a context manager, or call `close()`. Every change is crash-safe
/// and flushed before the call returns. Names are `str` or `bytes`. Errors of the library are
/// `hbitmap.Error` (an `OSError` with `errno`, the message and the image as `filename`).
/// Calls release the GIL; threads sharing an Image take turns (each call holds the image's
/// lock for its duration).
#[pyclass(frozen, module = "hbitmap", name = "Image")]
pub struct PyImage {
    path: PathBuf,
    writable: bool,
    virtual_size: u64,
    cluster_size: u64,
    default_granularity: u64,
    inner: Mutex<Option<Image>>,
}

fn lock(inner: &Mutex<Option<Image>>) -> Result<MutexGuard<'_, Option<Image>>, Failure> {
    inner.lock().map_err(|_| {
        Failure::Image(Error::Io {
            context: "an earlier call on this image failed unexpectedly; close and reopen it"
                .into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        })
    })
}

impl PyImage {
    fn wrap(image: Image) -> PyImage {
        PyImage {
            path: image.path().to_path_buf(),
            writable: image.is_writable(),
            virtual_size: image.virtual_size(),
            cluster_size: image.cluster_size(),
            default_granularity: image.default_granularity(),
            inner: Mutex::new(Some(image)),
        }
    }

    /// Runs `f` on the open image with the GIL released, holding the image's lock.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Image) -> Result<T, Failure> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = lock(&self.inner)?;
            match guard.as_mut() {
                Some(image) => f(image),
                None => Err(Failure::Closed),
            }
        })
        .map_err(|failure| errors::to_py(py, failure, Some(&self.path)))
    }

    fn not_found(name: &[u8]) -> Failure {
        Failure::Image(Error::NotFound(escaped(name)))
    }

    /// Reads a bitmap, refusing one in use unless `force`.
    fn read(image: &Image, name: &[u8], force: bool) -> Result<HBitmap, Failure> {
        let info = image.bitmap(name).ok_or_else(|| Self::not_found(name))?;
        if info.in_use && !force {
            return Err(Failure::Image(Error::InUse(format!(
                "bitmap '{}' is in use: a program that had the image open did not store it, \
                 so its content is inconsistent (force=True reads it anyway)",
                escaped(name)
            ))));
        }
        Ok(image.inspect_bitmap(name)?)
    }
}

#[pymethods]
impl PyImage {
    /// Image(path, writable=False, force_share=False)
    ///
    /// Opens the qcow2 image at `path` (str, bytes or os.PathLike), read-only unless
    /// `writable`. The whole bitmaps extension is validated on opening: a malformed image
    /// raises `hbitmap.Error` (errno EINVAL, kind 'corrupt') naming the problem. Opening never
    /// writes. `force_share` reads without QEMU's locks (read-only only: `ValueError` with
    /// `writable`).
    #[new]
    #[pyo3(signature = (path, writable = false, force_share = false))]
    fn new(py: Python<'_>, path: PathBuf, writable: bool, force_share: bool) -> PyResult<PyImage> {
        if writable && force_share {
            return Err(PyValueError::new_err(
                "force_share is only for read-only access (writable=False)",
            ));
        }
        let options = OpenOptions {
            write: writable,
            force_share,
        };
        py.detach(|| Image::open(&path, options))
            .map(PyImage::wrap)
            .map_err(|e| errors::to_py(py, Failure::Image(e), Some(&path)))
    }

    /// The image itself; leaving the `with` block closes it.
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Closes the image (see `close`); exceptions propagate.
    #[pyo3(signature = (_exc_type = None, _exc = None, _tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// Flushes and closes the image, releasing its locks. Closing a closed image does nothing;
    /// any other call on it raises `ValueError`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let result = py.detach(|| -> Result<(), Failure> {
            let image = lock(&self.inner)?.take();
            match image {
                Some(image) => Ok(image.close()?),
                None => Ok(()),
            }
        });
        result.map_err(|failure| errors::to_py(py, failure, Some(&self.path)))
    }

    /// Whether the image was closed.
    #[getter]
    fn closed(&self) -> PyResult<bool> {
        match self.inner.try_lock() {
            Ok(guard) => Ok(guard.is_none()),
            // Another thread is using it: it was open when that call started.
            Err(std::sync::TryLockError::WouldBlock) => Ok(false),
            Err(std::sync::TryLockError::Poisoned(_)) => Ok(false),
        }
    }

    /// The image's path, as given.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Whether the image was opened for writing.
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }

    /// The virtual disk's size in bytes: the size of every bitmap.
    #[getter]
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The cluster size in bytes.
    #[getter]
    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// QEMU's default granularity for a new bitmap of this image: the cluster size clamped to
    /// 4 KiB .. 64 KiB.
    #[getter]
    fn default_granularity(&self) -> u64 {
        self.default_granularity
    }

    /// Warnings found when the image was opened (bitmaps in use, a stale extension...).
    #[getter]
    fn warnings(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.run(py, |image| Ok(image.warnings().to_vec()))
    }

    /// The bitmaps, in directory order, as `BitmapInfo` (name, granularity, in_use, auto,
    /// dirty_bytes). Counting the dirty bytes reads every bitmap that is not in use.
    fn bitmaps(&self, py: Python<'_>) -> PyResult<Vec<PyBitmapInfo>> {
        self.run(py, |image| {
            let mut out = Vec::with_capacity(image.bitmaps().len());
            for (index, info) in image.bitmaps().iter().enumerate() {
                let dirty_bytes = if info.in_use {
                    None
                } else {
                    Some(image.dirty_bytes_at(index)?)
                };
                out.push(PyBitmapInfo {
                    name: info.name.as_bytes().to_vec(),
                    granularity: info.granularity,
                    in_use: info.in_use,
                    auto: info.auto,
                    dirty_bytes,
                });
            }
            Ok(out)
        })
    }

    /// Whether the image has a bitmap of that name (its exact bytes).
    fn __contains__(&self, py: Python<'_>, name: Name) -> PyResult<bool> {
        self.run(py, move |image| Ok(image.bitmap(&name.0).is_some()))
    }

    /// The dirty extents of bitmap `name` as an iterator of `(offset, length)` in bytes of the
    /// virtual disk, maximal runs clipped to the virtual size: what `nbdinfo --map` shows for
    /// it through `qemu-nbd -B NAME`. The bitmap is read once (about 2 MiB for 1 TiB at
    /// 64 KiB granularity); the extents are produced as the iterator is consumed. A bitmap in
    /// use is refused (`hbitmap.Error`, EBUSY) unless `force`.
    #[pyo3(signature = (name, force = false))]
    fn extents(&self, py: Python<'_>, name: Name, force: bool) -> PyResult<ExtentIterator> {
        let bitmap = self.run(py, move |image| Self::read(image, &name.0, force))?;
        Ok(ExtentIterator::new(PyHBitmap::wrap(bitmap).inner))
    }

    /// Bitmap `name` as an `HBitmap` over the virtual disk's bytes (granularity: log2 of the
    /// bitmap's), changing nothing on disk. A bitmap in use is refused unless `force`.
    #[pyo3(signature = (name, force = false))]
    fn read_bitmap(&self, py: Python<'_>, name: Name, force: bool) -> PyResult<PyHBitmap> {
        let bitmap = self.run(py, move |image| Self::read(image, &name.0, force))?;
        Ok(PyHBitmap::wrap(bitmap))
    }

    /// Stores `bitmap` (an `HBitmap` of `virtual_size` items, granularity 9 to 31) as bitmap
    /// `name`, replacing one of that name (keeping its `auto` flag unless `enabled` is given)
    /// or creating it (enabled unless `enabled=False`).
    #[pyo3(signature = (name, bitmap, enabled = None))]
    fn write_bitmap(
        &self,
        py: Python<'_>,
        name: Name,
        bitmap: &Bound<'_, PyHBitmap>,
        enabled: Option<bool>,
    ) -> PyResult<()> {
        let shared = bitmap.get().inner.clone();
        self.run(py, move |image| {
            let bitmap = shared
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let auto = enabled
                .or_else(|| image.bitmap(&name.0).map(|info| info.auto))
                .unwrap_or(true);
            image.store_bitmap(
                &name.0,
                &bitmap,
                BitmapFlags {
                    in_use: false,
                    auto,
                },
            )?;
            Ok(())
        })
    }

    /// Adds an empty bitmap: granularity in bytes (a power of two, 512 B to 2 GiB; default
    /// `default_granularity`), enabled unless `disabled`. An existing name raises
    /// `hbitmap.ExistsError` (a `FileExistsError`), unless `exist_ok` and the existing bitmap
    /// is the one asked for (same granularity and state, not in use).
    #[pyo3(signature = (name, granularity = None, disabled = false, exist_ok = false))]
    fn add(
        &self,
        py: Python<'_>,
        name: Name,
        granularity: Option<u64>,
        disabled: bool,
        exist_ok: bool,
    ) -> PyResult<()> {
        self.run(py, move |image| {
            let granularity = granularity.unwrap_or_else(|| image.default_granularity());
            if exist_ok {
                image.ensure_bitmap(&name.0, granularity, !disabled)?;
            } else {
                image.add_bitmap(&name.0, granularity, !disabled)?;
            }
            Ok(())
        })
    }

    /// Removes a bitmap (also one in use) and frees its clusters. A missing bitmap raises
    /// `hbitmap.NotFoundError` (a `FileNotFoundError`) unless `missing_ok`.
    #[pyo3(signature = (name, missing_ok = false))]
    fn remove(&self, py: Python<'_>, name: Name, missing_ok: bool) -> PyResult<()> {
        self.run(py, move |image| {
            if missing_ok && image.bitmap(&name.0).is_none() {
                return Ok(());
            }
            image.remove_bitmap(&name.0)?;
            Ok(())
        })
    }

    /// Makes a bitmap empty (keeps its granularity and flags). Refused for a bitmap in use.
    fn clear(&self, py: Python<'_>, name: Name) -> PyResult<()> {
        self.run(py, move |image| Ok(image.clear_bitmap(&name.0)?))
    }

    /// Enables a bitmap (sets `auto`: QEMU records guest writes in it). Refused in use.
    fn enable(&self, py: Python<'_>, name: Name) -> PyResult<()> {
        self.run(py, move |image| Ok(image.set_enabled(&name.0, true)?))
    }

    /// Disables a bitmap (drops `auto`). Refused for a bitmap in use.
    fn disable(&self, py: Python<'_>, name: Name) -> PyResult<()> {
        self.run(py, move |image| Ok(image.set_enabled(&name.0, false)?))
    }

    /// `target |= source`: bitmap `source` of this image, or of `source_image` (an open `Image`
    /// or a path, opened read-only with QEMU's locks) of the same virtual size, into bitmap
    /// `target` of this image. Granularities may differ. Neither may be in use.
    #[pyo3(signature = (source, target, source_image = None))]
    fn merge(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        source: Name,
        target: Name,
        source_image: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let this = slf.get();
        let from = match source_image {
            None => Source::ThisImage,
            Some(other) => match other.cast::<PyImage>() {
                Ok(other) if other.is(slf) => Source::ThisImage,
                Ok(other) => Source::Other(other.clone().unbind()),
                Err(_) => {
                    let path: PathBuf = other.extract()?;
                    let same = match (path.canonicalize(), this.path.canonicalize()) {
                        (Ok(a), Ok(b)) => a == b,
                        _ => false,
                    };
                    if same {
                        Source::ThisImage
                    } else {
                        Source::Path(path)
                    }
                }
            },
        };
        let (source, target) = (source.0, target.0);
        match from {
            Source::ThisImage => this.run(py, move |image| {
                image.merge_bitmap(&source, &target)?;
                Ok(())
            }),
            Source::Path(path) => {
                let other = py
                    .detach(|| {
                        Image::open(
                            &path,
                            OpenOptions {
                                write: false,
                                force_share: false,
                            },
                        )
                    })
                    .map_err(|e| errors::to_py(py, Failure::Image(e), Some(&path)))?;
                this.run(py, move |image| {
                    image.merge_bitmap_from(&other, &source, &target)?;
                    Ok(())
                })
            }
            Source::Other(other) => {
                let other = other.get();
                let (mine, theirs) = (&this.inner, &other.inner);
                let result = py.detach(|| -> Result<(), Failure> {
                    // Both locks, always in address order: two threads merging in opposite
                    // directions cannot deadlock.
                    let mine_first = (mine as *const Mutex<Option<Image>>)
                        < (theirs as *const Mutex<Option<Image>>);
                    let (mut guard, other_guard) = if mine_first {
                        let g = lock(mine)?;
                        (g, lock(theirs)?)
                    } else {
                        let o = lock(theirs)?;
                        (lock(mine)?, o)
                    };
                    let image = guard.as_mut().ok_or(Failure::Closed)?;
                    let Some(other_image) = other_guard.as_ref() else {
                        return Err(Failure::Value(format!(
                            "I/O operation on closed image {}",
                            other.path.display()
                        )));
                    };
                    image.merge_bitmap_from(other_image, &source, &target)?;
                    Ok(())
                });
                result.map_err(|failure| errors::to_py(py, failure, Some(&this.path)))
            }
        }
    }

    /// Marks the bytes `offset .. offset + length` of the virtual disk dirty in bitmap `name`
    /// (whole granules). A range past the virtual size raises `hbitmap.InvalidArgumentError`
    /// (a `ValueError`); nothing is written then.
    fn set(&self, py: Python<'_>, name: Name, offset: u64, length: u64) -> PyResult<()> {
        self.run(py, move |image| {
            Ok(image.set_range(&name.0, offset, length, true)?)
        })
    }

    /// Marks the bytes `offset .. offset + length` clean in bitmap `name`. The range must cover
    /// whole granules (or end at the virtual size): `hbitmap.InvalidArgumentError` otherwise,
    /// as resetting it would also clean bytes outside it.
    fn reset(&self, py: Python<'_>, name: Name, offset: u64, length: u64) -> PyResult<()> {
        self.run(py, move |image| {
            Ok(image.set_range(&name.0, offset, length, false)?)
        })
    }

    /// Creates or replaces bitmap `name` from `extents`, an iterable of `(offset, length)` in
    /// bytes (e.g. what `extents()` or `nbdinfo --map` gave), at `granularity` bytes (default:
    /// the existing bitmap's, else `default_granularity`). A replaced bitmap keeps its `auto`
    /// flag; a new one is enabled. Extents are checked before anything is written.
    #[pyo3(signature = (name, extents, granularity = None))]
    fn import_extents(
        &self,
        py: Python<'_>,
        name: Name,
        extents: &Bound<'_, PyAny>,
        granularity: Option<u64>,
    ) -> PyResult<()> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for item in extents.try_iter()? {
            let (offset, length): (u64, u64) = item?.extract()?;
            ranges.push((offset, length));
        }
        self.run(py, move |image| {
            // A replaced bitmap keeps its `auto` flag; a new one is enabled.
            let auto = image.bitmap(&name.0).is_none_or(|existing| existing.auto);
            image.import_bitmap(
                &name.0,
                granularity,
                ranges,
                BitmapFlags {
                    in_use: false,
                    auto,
                },
            )?;
            Ok(())
        })
    }

    /// Checks the image as `qemu-img check` does, or with `repair` ('leaks' or 'all', on an
    /// image opened writable) repairs it as `qemu-img check -r` does (`'all'` also removes
    /// every bitmap that cannot be trusted: in use after a crash, damaged) and checks again.
    /// Returns `qbitmap check --output=json`'s document as a dict: `qemu-img check
    /// --output=json`'s figures under its names (`check-errors`, `corruptions`, `leaks`,
    /// `image-end-offset`, `total-clusters`, `allocated-clusters`, `fragmented-clusters`,
    /// `compressed-clusters`, and after a repair `leaks-fixed`, `corruptions-fixed`), then the
    /// findings (`errors`, `warnings`, `notes`, `leaked`, `findings` (each typed: `severity`,
    /// `subject`, `kind`, `text`), `in-use-bitmaps`, `damaged-bitmaps`, `stale-extension`,
    /// `broken-extension`, `bitmaps`, `clean`, `unrepairable`, `changes`).
    /// A refused repair raises `hbitmap.Error` (ENOTSUP) and writes nothing.
    #[pyo3(signature = (repair = None))]
    fn check<'py>(&self, py: Python<'py>, repair: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
        let mode = repair_mode(repair)?;
        let (report, repaired, bitmaps) = self.run(py, move |image| match mode {
            None => Ok((image.check(), None, image.bitmaps().len())),
            Some(mode) => {
                let repaired = image.repair(mode)?;
                Ok((
                    repaired.after.clone(),
                    Some(repaired),
                    image.bitmaps().len(),
                ))
            }
        })?;
        report_dict(py, &self.path, &report, repaired.as_ref(), Some(bitmaps))
    }

    /// Path, mode and geometry.
    fn __repr__(&self) -> PyResult<String> {
        let state = match self.closed()? {
            true => "closed",
            false if self.writable => "writable",
            false => "read-only",
        };
        Ok(format!(
            "<hbitmap.Image '{}' {state} virtual_size={} cluster_size={}>",
            self.path.display(),
            self.virtual_size,
            self.cluster_size
        ))
    }
}

/// create(path, size, cluster_size=65536) -> Image
///
/// Creates an empty qcow2 v3 image of `size` bytes (a multiple of 512) with clusters of
/// `cluster_size` bytes (a power of two, 512 B to 2 MiB), as `qemu-img create -f qcow2`
/// makes it, overwriting any file at `path` unless QEMU holds it, and returns it open for
/// writing.
#[pyfunction]
#[pyo3(signature = (path, size, cluster_size = 65536))]
pub fn create(py: Python<'_>, path: PathBuf, size: u64, cluster_size: u64) -> PyResult<PyImage> {
    py.detach(|| Image::create(&path, size, cluster_size))
        .map(PyImage::wrap)
        .map_err(|e| errors::to_py(py, Failure::Image(e), Some(&path)))
}

/// check(path, repair=None, force_share=False) -> dict
///
/// `Image.check` without opening the image as an `Image`: a malformed image gives a report
/// listing every problem instead of an error (errors are raised only when the file cannot be
/// opened, locked or read). `repair` ('leaks' or 'all') takes QEMU's write lock;
/// `force_share` (reading without locks) is for a plain check only.
#[pyfunction]
#[pyo3(name = "check", signature = (path, repair = None, force_share = false))]
pub fn check_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    repair: Option<&str>,
    force_share: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let mode = repair_mode(repair)?;
    if mode.is_some() && force_share {
        return Err(PyValueError::new_err(
            "force_share is only for a check without repair",
        ));
    }
    let options = OpenOptions {
        write: false,
        force_share,
    };
    let done = py.detach(|| -> Result<_, Error> {
        let (report, repaired) = match mode {
            None => (Image::check_file(&path, options)?, None),
            Some(mode) => {
                let repaired = Image::repair_file(&path, mode)?;
                (repaired.after.clone(), Some(repaired))
            }
        };
        let bitmaps = Image::open(&path, options)
            .ok()
            .map(|image| image.bitmaps().len());
        Ok((report, repaired, bitmaps))
    });
    let (report, repaired, bitmaps) =
        done.map_err(|e| errors::to_py(py, Failure::Image(e), Some(&path)))?;
    report_dict(py, &path, &report, repaired.as_ref(), bitmaps)
}
