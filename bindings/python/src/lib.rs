// SPDX-License-Identifier: GPL-2.0-or-later

//! The Python extension module `hbitmap._hbitmap`: thin glue over the safe Rust API
//! ([`hbitmap::HBitmap`], [`hbitmap::qcow2::Image`], [`hbitmap::serialize`]); the package
//! `hbitmap` (`python/hbitmap/__init__.py`) re-exports it with the exception classes.
//!
//! Rules kept throughout:
//! - nothing reaches a panic of the core: where a precondition can fail (an item past the end,
//!   a range that wraps, a misaligned serialization chunk...), the core's `try_` method is
//!   called and its `hbitmap::Violation` raised as `ValueError` with the core's message; wrong
//!   types and negative or huge integers are refused by PyO3's conversions (`TypeError`,
//!   `OverflowError`);
//! - errors of the qcow2 layer become `hbitmap.Error` (an `OSError` with the library's errno
//!   and message, naming the image), of the `OSError` subclass its errno selects
//!   (`errors.rs`);
//! - image I/O and bulk bitmap work run with the GIL released; the objects lock themselves
//!   (a `Mutex` around the image, a `RwLock` around a bitmap), so threads sharing one wait
//!   for each other instead of corrupting it.

mod bitmap;
mod errors;
mod image;
mod names;

use pyo3::prelude::*;

/// Bindings of libhbitmap: qcow2 persistent dirty bitmaps and QEMU's HBitmap.
#[pymodule]
fn _hbitmap(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bitmap::PyHBitmap>()?;
    m.add_class::<bitmap::ExtentIterator>()?;
    m.add_class::<image::PyImage>()?;
    m.add_class::<image::PyBitmapInfo>()?;
    m.add_function(wrap_pyfunction!(image::create, m)?)?;
    m.add_function(wrap_pyfunction!(image::check_file, m)?)?;
    m.add("MAX_GROUPS", hbitmap::MAX_GROUPS)?;
    m.add(
        "MAX_SERIALIZABLE_GRANULARITY",
        hbitmap::serialize::MAX_SERIALIZABLE_GRANULARITY,
    )?;
    Ok(())
}
