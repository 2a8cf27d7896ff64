// SPDX-License-Identifier: GPL-2.0-or-later

//! `hbitmap.HBitmap` and the iterator over dirty extents.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hbitmap::{HBitmap, Violation};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PySlice};

/// Ranges spanning more groups than this, and whole-bitmap work, run with the GIL released.
const BULK_GROUPS: u64 = 1 << 15;

/// Extents an iterator computes at a time, with the GIL released.
const BATCH: usize = 4096;

/// The bitmap behind a Python object. A panic cannot happen under the lock (where a
/// precondition can fail, the core's `try_` method is called, which checks it before changing
/// anything), so a poisoned lock still guards a consistent bitmap.
pub type Shared = Arc<RwLock<HBitmap>>;

fn read(bitmap: &RwLock<HBitmap>) -> RwLockReadGuard<'_, HBitmap> {
    bitmap.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(bitmap: &RwLock<HBitmap>) -> RwLockWriteGuard<'_, HBitmap> {
    bitmap.write().unwrap_or_else(PoisonError::into_inner)
}

fn value_error(function: &str, why: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("HBitmap.{function}: {why}"))
}

/// A broken precondition of the core as the `ValueError` of `HBitmap.{function}`, carrying the
/// core's message.
fn violation(function: &'static str) -> impl FnOnce(Violation) -> PyErr {
    move |why| value_error(function, why)
}

/// The bitmap's geometry, fixed for its life (the binding exposes no resize), kept beside the
/// lock so that the getters and the choice of releasing the GIL take no lock.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// Size in items.
    size: u64,
    /// log2 of the items per group.
    granularity: u32,
    /// Groups (bits).
    groups: u64,
}

/// QEMU's hierarchical dirty bitmap: `size` items, one bit per group of `2**granularity`
/// items (for a disk: bytes, and the granularity is log2 of the bitmap's granularity in
/// bytes).
///
/// Setting or resetting any item of a group sets or resets the whole group. Iterating yields
/// the dirty extents as `(start, length)` tuples in items, clipped to the size. An argument
/// that breaks a precondition (an item past the end, a range that wraps, a misaligned
/// serialization chunk) raises `ValueError`; a negative or too large integer raises
/// `OverflowError`. Thread-safe: readers share the bitmap, a writer waits for them, and bulk
/// work runs with the GIL released.
#[pyclass(frozen, module = "hbitmap", name = "HBitmap")]
pub struct PyHBitmap {
    pub(crate) inner: Shared,
    geometry: Geometry,
}

impl PyHBitmap {
    /// Wraps a bitmap the library made (a loaded qcow2 bitmap).
    pub fn wrap(bitmap: HBitmap) -> PyHBitmap {
        PyHBitmap {
            geometry: Geometry {
                size: bitmap.size(),
                granularity: bitmap.granularity(),
                groups: bitmap.groups(),
            },
            inner: Arc::new(RwLock::new(bitmap)),
        }
    }

    /// Runs `f` on the bitmap for reading: under the GIL when the lock is free and the work
    /// small, else with the GIL released while waiting and working.
    fn with_read<T: Send>(
        &self,
        py: Python<'_>,
        bulk: bool,
        f: impl FnOnce(&HBitmap) -> T + Send,
    ) -> T {
        if !bulk {
            if let Ok(guard) = self.inner.try_read() {
                return f(&guard);
            }
        }
        py.detach(|| f(&read(&self.inner)))
    }

    /// As [`with_read`](Self::with_read), for writing.
    fn with_write<T: Send>(
        &self,
        py: Python<'_>,
        bulk: bool,
        f: impl FnOnce(&mut HBitmap) -> T + Send,
    ) -> T {
        if !bulk {
            if let Ok(mut guard) = self.inner.try_write() {
                return f(&mut guard);
            }
        }
        py.detach(|| f(&mut write(&self.inner)))
    }

    /// Whether a range is bulk work (spans many groups).
    fn is_bulk(&self, start: u64, count: u64) -> bool {
        let granularity = self.geometry.granularity;
        count > 0
            && ((start.saturating_add(count - 1) >> granularity) - (start >> granularity))
                > BULK_GROUPS
    }

    /// The chunk `start..start + count` (count defaults to the rest of the bitmap), checked by
    /// the core; returns its length in items and in serialized bytes.
    fn chunk(
        &self,
        py: Python<'_>,
        function: &'static str,
        start: u64,
        count: Option<u64>,
    ) -> PyResult<(u64, u64)> {
        let size = self.geometry.size;
        let count = match count {
            Some(count) => count,
            None => size.checked_sub(start).ok_or_else(|| {
                value_error(
                    function,
                    format!("start {start} is past the bitmap's size {size}"),
                )
            })?,
        };
        let bytes = self
            .with_read(py, false, |bitmap| {
                bitmap.try_serialization_size(start, count)
            })
            .map_err(violation(function))?;
        Ok((count, bytes))
    }
}

/// Bytes of a bytes-like object (`bytes`, `bytearray`, `memoryview`, any buffer).
fn bytes_of(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().to_vec());
    }
    if let Ok(array) = data.cast::<PyByteArray>() {
        return Ok(array.to_vec());
    }
    let py = data.py();
    let view = py
        .import("builtins")?
        .getattr("memoryview")?
        .call1((data,))
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "a bytes-like object is required, not {}",
                data.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
    let bytes = view.call_method0("tobytes")?;
    Ok(bytes.cast::<PyBytes>()?.as_bytes().to_vec())
}

/// Locks two bitmaps in address order (the same order in every thread, so that two threads
/// merging `a` into `b` and `b` into `a` cannot deadlock), the first for writing.
fn lock_pair<'a>(
    target: &'a RwLock<HBitmap>,
    source: &'a RwLock<HBitmap>,
) -> (RwLockWriteGuard<'a, HBitmap>, RwLockReadGuard<'a, HBitmap>) {
    if (target as *const RwLock<HBitmap>) < (source as *const RwLock<HBitmap>) {
        let w = write(target);
        (w, read(source))
    } else {
        let r = read(source);
        (write(target), r)
    }
}

#[pymethods]
impl PyHBitmap {
    /// HBitmap(size, granularity=0)
    ///
    /// An empty bitmap of `size` items, one bit per group of `2**granularity` items. Raises
    /// `ValueError` when the granularity is 64 or more or the size needs more than 2**41
    /// groups. Memory is taken only as bits are set.
    #[new]
    #[pyo3(signature = (size, granularity = 0))]
    fn new(size: u64, granularity: u32) -> PyResult<PyHBitmap> {
        HBitmap::new(size, granularity)
            .map(PyHBitmap::wrap)
            .map_err(|e| PyValueError::new_err(format!("HBitmap: {e}")))
    }

    /// The size in items.
    #[getter]
    fn size(&self) -> u64 {
        self.geometry.size
    }

    /// log2 of the number of items per bit.
    #[getter]
    fn granularity(&self) -> u32 {
        self.geometry.granularity
    }

    /// Bits (groups of `2**granularity` items) in the bitmap.
    #[getter]
    fn groups(&self) -> u64 {
        self.geometry.groups
    }

    /// Marks every group touched by `start .. start + count` dirty. A zero count does nothing;
    /// a range ending past the last group raises `ValueError`.
    fn set(&self, py: Python<'_>, start: u64, count: u64) -> PyResult<()> {
        let bulk = self.is_bulk(start, count);
        self.with_write(py, bulk, |bitmap| bitmap.try_set(start, count))
            .map_err(violation("set"))
    }

    /// Marks every group touched by `start .. start + count` clean: a group covered only in
    /// part is cleaned whole (the original's rule). A zero count does nothing; a range ending
    /// past the last group raises `ValueError`.
    fn reset(&self, py: Python<'_>, start: u64, count: u64) -> PyResult<()> {
        let bulk = self.is_bulk(start, count);
        self.with_write(py, bulk, |bitmap| bitmap.try_reset(start, count))
            .map_err(violation("reset"))
    }

    /// Marks the whole bitmap clean.
    fn clear(&self, py: Python<'_>) {
        self.with_write(py, true, HBitmap::reset_all);
    }

    /// Whether the group holding `item` is dirty; `ValueError` past the last group.
    fn get(&self, py: Python<'_>, item: u64) -> PyResult<bool> {
        self.with_read(py, false, |bitmap| bitmap.try_get(item))
            .map_err(violation("get"))
    }

    /// Dirty items: dirty groups times the group size (QEMU's `hbitmap_count`; the last group
    /// counts whole even where it passes the size).
    fn count(&self, py: Python<'_>) -> u64 {
        self.with_read(py, false, HBitmap::count)
    }

    /// Whether no bit is set.
    fn is_empty(&self, py: Python<'_>) -> bool {
        self.with_read(py, false, HBitmap::is_empty)
    }

    /// The number of dirty extents: what iterating yields (`len(list(bitmap)) ==
    /// len(bitmap)`), counted with the GIL released. The size in items is `size`: as `len` it
    /// would make `list(bitmap)` reserve room for every item.
    fn __len__(&self, py: Python<'_>) -> usize {
        self.with_read(py, true, |bitmap| bitmap.extents().count())
    }

    /// True when a bit is set (as `len(bitmap) != 0`, without counting).
    fn __bool__(&self, py: Python<'_>) -> bool {
        !self.with_read(py, false, HBitmap::is_empty)
    }

    /// The dirty extents, as `(start, length)` in items, in order (see `extents`).
    fn __iter__(&self) -> ExtentIterator {
        ExtentIterator::new(self.inner.clone())
    }

    /// An iterator over the dirty extents, as `(start, length)` tuples in items, maximal runs of
    /// dirty groups clipped to the size, computed a batch at a time with the GIL released.
    /// Changes made while iterating are seen from the position reached.
    fn extents(&self) -> ExtentIterator {
        ExtentIterator::new(self.inner.clone())
    }

    /// Items covered by one serialized 64-bit word: chunk starts and lengths are multiples of it
    /// (`64 << granularity`). `ValueError` when the granularity is 58 or more.
    #[getter]
    fn serialization_align(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_read(py, false, HBitmap::try_serialization_align)
            .map_err(violation("serialization_align"))
    }

    /// Bytes that serializing the chunk `start .. start + count` takes (`count`: to the end).
    #[pyo3(signature = (start = 0, count = None))]
    fn serialization_size(&self, py: Python<'_>, start: u64, count: Option<u64>) -> PyResult<u64> {
        Ok(self.chunk(py, "serialization_size", start, count)?.1)
    }

    /// The chunk `start .. start + count` (`count`: to the end) in QEMU's serialization format:
    /// the last level's bits as little-endian 64-bit words, as QEMU migrates and stores them.
    /// The start must be a multiple of `serialization_align`, and so must the count unless the
    /// chunk ends the bitmap (`ValueError` otherwise).
    #[pyo3(signature = (start = 0, count = None))]
    fn serialize<'py>(
        &self,
        py: Python<'py>,
        start: u64,
        count: Option<u64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (count, bytes) = self.chunk(py, "serialize", start, count)?;
        let len = usize::try_from(bytes)
            .map_err(|_| value_error("serialize", format!("{bytes} bytes do not fit memory")))?;
        let inner = &self.inner;
        PyBytes::new_with(py, len, |buf| {
            // The new bytes object is not visible to any other thread yet.
            py.detach(|| read(inner).try_serialize_part(buf, start, count))
                .map_err(violation("serialize"))
        })
    }

    /// Serializes the chunk `start .. start + count` (as `serialize`) into the start of
    /// `buffer`, any writable bytes-like object at least `serialization_size` bytes long, and
    /// returns the number of bytes written.
    #[pyo3(signature = (buffer, start = 0, count = None))]
    fn serialize_into(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        start: u64,
        count: Option<u64>,
    ) -> PyResult<u64> {
        let (_, bytes) = self.chunk(py, "serialize_into", start, count)?;
        let view = py
            .import("builtins")?
            .getattr("memoryview")?
            .call1((buffer,))?;
        if view.getattr("readonly")?.extract::<bool>()? {
            return Err(PyTypeError::new_err(
                "HBitmap.serialize_into: the buffer is read-only",
            ));
        }
        let view = view.call_method1("cast", ("B",))?;
        let available: u64 = view.len()? as u64;
        if available < bytes {
            return Err(value_error(
                "serialize_into",
                format!("buffer of {available} bytes, {bytes} needed"),
            ));
        }
        let data = self.serialize(py, start, count)?;
        let slice = PySlice::new(py, 0, bytes as isize, 1);
        view.set_item(slice, data)?;
        Ok(bytes)
    }

    /// Loads the chunk `start .. start + count` (`count`: to the end) from `data`, a bytes-like
    /// object of exactly `serialization_size(start, count)` bytes in QEMU's format. With
    /// `finish` false the summary is left stale for more chunks: call `deserialize_finish`
    /// after the last one.
    #[pyo3(signature = (data, start = 0, count = None, finish = true))]
    fn deserialize(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        start: u64,
        count: Option<u64>,
        finish: bool,
    ) -> PyResult<()> {
        let (count, bytes) = self.chunk(py, "deserialize", start, count)?;
        let data = bytes_of(data)?;
        if data.len() as u64 != bytes {
            return Err(value_error(
                "deserialize",
                format!(
                    "{} bytes given, the chunk start {start} count {count} takes {bytes}",
                    data.len()
                ),
            ));
        }
        self.with_write(py, true, |bitmap| {
            bitmap.try_deserialize_part(&data, start, count, finish)
        })
        .map_err(violation("deserialize"))
    }

    /// Rebuilds the summary after `deserialize(..., finish=False)` calls.
    fn deserialize_finish(&self, py: Python<'_>) {
        self.with_write(py, true, HBitmap::deserialize_finish);
    }

    /// `self |= other`: every dirty group of `other` dirties the groups of `self` it overlaps.
    /// The sizes in items must be equal (`ValueError`); the granularities may differ.
    fn merge(&self, py: Python<'_>, other: &Bound<'_, PyHBitmap>) -> PyResult<()> {
        let other = other.get();
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return Ok(());
        }
        let (target, source) = (&*self.inner, &*other.inner);
        py.detach(|| {
            let (mut target, source) = lock_pair(target, source);
            target.try_union_with(&source)
        })
        .map_err(violation("merge"))
    }

    /// An independent copy.
    fn copy(&self, py: Python<'_>) -> PyHBitmap {
        PyHBitmap::wrap(self.with_read(py, true, HBitmap::clone))
    }

    /// An independent copy (`copy.copy`).
    fn __copy__(&self, py: Python<'_>) -> PyHBitmap {
        self.copy(py)
    }

    /// An independent copy (`copy.deepcopy`).
    fn __deepcopy__(&self, py: Python<'_>, _memo: &Bound<'_, PyAny>) -> PyHBitmap {
        self.copy(py)
    }

    /// SHA-256 of the last level, in lowercase hexadecimal (QEMU's `hbitmap_sha256`).
    fn sha256(&self, py: Python<'_>) -> String {
        self.with_read(py, true, HBitmap::sha256)
    }

    /// Equal: same size, granularity and dirty groups.
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> Py<PyAny> {
        let Ok(other) = other.cast::<PyHBitmap>() else {
            return py.NotImplemented();
        };
        let other = other.get();
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return true
                .into_pyobject(py)
                .unwrap()
                .to_owned()
                .into_any()
                .unbind();
        }
        let (a, b) = (&*self.inner, &*other.inner);
        let equal = py.detach(|| {
            let (first, second) = if (a as *const RwLock<HBitmap>) < (b as *const RwLock<HBitmap>) {
                (a, b)
            } else {
                (b, a)
            };
            let first = read(first);
            let second = read(second);
            *first == *second
        });
        equal
            .into_pyobject(py)
            .unwrap()
            .to_owned()
            .into_any()
            .unbind()
    }

    /// Size, granularity, count and the first extents.
    fn __repr__(&self, py: Python<'_>) -> String {
        self.with_read(py, false, Self::describe)
    }
}

impl PyHBitmap {
    /// The `repr`: geometry, count and the first extents.
    fn describe(bitmap: &HBitmap) -> String {
        const SHOWN: usize = 4;
        let mut extents = bitmap.extents();
        let shown: Vec<String> = extents
            .by_ref()
            .take(SHOWN)
            .map(|r| format!("({}, {})", r.start, r.end - r.start))
            .collect();
        let more = if extents.next().is_some() {
            ", ..."
        } else {
            ""
        };
        format!(
            "<hbitmap.HBitmap size={} granularity={} count={} extents=[{}{more}]>",
            bitmap.size(),
            bitmap.granularity(),
            bitmap.count(),
            shown.join(", ")
        )
    }
}

/// Iterator over the dirty extents of a bitmap, as `(start, length)` tuples (items; bytes for a
/// qcow2 bitmap), computed in batches with the GIL released. One thread at a time: a second
/// thread calling `next` while the first computes a batch gets `ValueError`, as with a
/// generator.
#[pyclass(frozen, module = "hbitmap")]
pub struct ExtentIterator {
    bitmap: Shared,
    state: Mutex<IterState>,
}

struct IterState {
    next: u64,
    buffer: VecDeque<(u64, u64)>,
    done: bool,
}

impl ExtentIterator {
    pub fn new(bitmap: Shared) -> ExtentIterator {
        ExtentIterator {
            bitmap,
            state: Mutex::new(IterState {
                next: 0,
                buffer: VecDeque::new(),
                done: false,
            }),
        }
    }
}

#[pymethods]
impl ExtentIterator {
    /// The iterator itself.
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// The next extent, `(start, length)`.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(u64, u64)>> {
        let Ok(mut state) = self.state.try_lock() else {
            return Err(PyValueError::new_err(
                "extent iterator already executing in another thread",
            ));
        };
        if let Some(extent) = state.buffer.pop_front() {
            return Ok(Some(extent));
        }
        if state.done {
            return Ok(None);
        }
        let bitmap = &self.bitmap;
        let state = &mut *state;
        py.detach(|| {
            let bitmap = read(bitmap);
            let size = bitmap.size();
            while state.buffer.len() < BATCH {
                let found = size
                    .checked_sub(state.next)
                    .and_then(|rest| bitmap.next_dirty_area(state.next, rest));
                match found {
                    Some((start, count)) => {
                        state.buffer.push_back((start, count));
                        state.next = start + count;
                    }
                    None => {
                        state.done = true;
                        break;
                    }
                }
            }
        });
        Ok(state.buffer.pop_front())
    }
}
