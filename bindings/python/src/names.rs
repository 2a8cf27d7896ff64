// SPDX-License-Identifier: GPL-2.0-or-later

//! Bitmap names across the boundary: taken as `str` (its UTF-8 bytes) or any bytes-like
//! object, given back as `str` when they are UTF-8 and as `bytes` otherwise.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

/// A bitmap name: its exact bytes.
pub struct Name(pub Vec<u8>);

impl<'a, 'py> FromPyObject<'a, 'py> for Name {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(text) = obj.cast::<PyString>() {
            return Ok(Name(text.to_cow()?.as_bytes().to_vec()));
        }
        if let Ok(bytes) = obj.cast::<PyBytes>() {
            return Ok(Name(bytes.as_bytes().to_vec()));
        }
        if let Ok(array) = obj.cast::<PyByteArray>() {
            return Ok(Name(array.to_vec()));
        }
        Err(PyTypeError::new_err(format!(
            "a bitmap name is a str or bytes, not {}",
            obj.get_type().name()?
        )))
    }
}

/// A name for Python: `str` when it is UTF-8, else `bytes`.
pub fn to_python<'py>(py: Python<'py>, name: &[u8]) -> Bound<'py, PyAny> {
    match std::str::from_utf8(name) {
        Ok(text) => PyString::new(py, text).into_any(),
        Err(_) => PyBytes::new(py, name).into_any(),
    }
}
