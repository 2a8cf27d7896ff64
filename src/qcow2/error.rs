// SPDX-License-Identifier: GPL-2.0-or-later

//! The error type of the qcow2 layer.
#![forbid(unsafe_code)]

use std::io;

/// Why an operation on a qcow2 image failed.
///
/// Every message names what is wrong: for a malformed image, the field, the bitmap and the file
/// offset concerned. [`Error::errno`] gives the negative-errno-style code the C ABI returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading, writing or flushing the image file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file is not a qcow2 image, or a structure in it is malformed or inconsistent.
    #[error("{0}")]
    Corrupt(String),
    /// The image is valid but uses something this library (or QEMU 10) does not support.
    #[error("{0}")]
    Unsupported(String),
    /// Another process holds the image (QEMU's OFD byte-range locks say so).
    #[error("{0}")]
    Locked(String),
    /// A change was asked of an image that cannot be written (opened read-only, or refused for
    /// writing for the reason given).
    #[error("{0}")]
    ReadOnly(String),
    /// No bitmap of that name (given escaped, as [`BitmapName`](super::BitmapName) shows it).
    #[error("no bitmap named '{0}' in the image")]
    NotFound(String),
    /// A bitmap of that name (escaped) exists already.
    #[error("a bitmap named '{0}' already exists in the image")]
    Exists(String),
    /// The bitmap is marked in use (inconsistent) and the operation needs its content.
    #[error("{0}")]
    InUse(String),
    /// An argument is out of range (name, granularity, size...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A QEMU limit would be exceeded (number of bitmaps, directory or table size...).
    #[error("{0}")]
    Limit(String),
}

impl Error {
    /// The errno this error maps to (positive), as the C ABI returns it negated: the match
    /// below is the table.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Locked(_) => libc::EAGAIN,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::InUse(_) => libc::EBUSY,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Limit(_) => libc::EFBIG,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for a `Corrupt` error.
pub(crate) fn corrupt(message: impl Into<String>) -> Error {
    Error::Corrupt(message.into())
}
