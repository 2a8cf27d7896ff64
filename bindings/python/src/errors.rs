// SPDX-License-Identifier: GPL-2.0-or-later

//! Errors across the boundary. A qcow2 error becomes an `hbitmap.Error`: an `OSError` whose
//! `errno` is [`hbitmap::qcow2::Error::errno`], `strerror` the library's message, `filename`
//! the image, and `kind` the library's variant; its class is chosen by the errno the way
//! `OSError` chooses its own subclasses (`FileNotFoundError` for `ENOENT`...), by the Python
//! side (`hbitmap/_errors.py`), so that `except FileNotFoundError` works on a missing image.

use std::path::Path;

use hbitmap::qcow2::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Why a call failed, before it is turned into a Python exception (that needs the GIL, which
/// the work runs without).
pub enum Failure {
    /// The library refused or failed.
    Image(Error),
    /// A misuse of the binding's objects (another image closed): a plain `ValueError`.
    Value(String),
    /// The image was closed.
    Closed,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::Image(error)
    }
}

/// The library's name for the variant, in `Error.kind`.
fn kind(error: &Error) -> &'static str {
    match error {
        Error::Io { .. } => "io",
        Error::Corrupt(_) => "corrupt",
        Error::Unsupported(_) => "unsupported",
        Error::Locked(_) => "locked",
        Error::ReadOnly(_) => "read-only",
        Error::NotFound(_) => "not-found",
        Error::Exists(_) => "exists",
        Error::InUse(_) => "in-use",
        Error::InvalidArgument(_) => "invalid-argument",
        Error::Limit(_) => "limit",
    }
}

/// An `hbitmap.Error` (or the subclass its errno selects) for `path`.
fn make(py: Python<'_>, errno: i32, kind: &str, message: &str, path: Option<&Path>) -> PyErr {
    let built = (|| -> PyResult<PyErr> {
        let factory = py.import("hbitmap._errors")?.getattr("_make")?;
        let filename = path.map(|p| p.to_string_lossy().into_owned());
        let error = factory.call1((errno, kind, message, filename))?;
        Ok(PyErr::from_value(error))
    })();
    built.unwrap_or_else(|e| e)
}

/// The Python exception for a failure concerning the image at `path` (None: no image).
pub fn to_py(py: Python<'_>, failure: Failure, path: Option<&Path>) -> PyErr {
    match failure {
        Failure::Image(error) => make(py, error.errno(), kind(&error), &error.to_string(), path),
        Failure::Value(message) => PyValueError::new_err(message),
        Failure::Closed => PyValueError::new_err(match path {
            Some(path) => format!("I/O operation on closed image {}", path.display()),
            None => "I/O operation on a closed image".to_string(),
        }),
    }
}
