// SPDX-License-Identifier: GPL-2.0-or-later

//! I/O on the image file, behind a trait so that tests can inject faults.
//!
//! [`FileIo`] is the real thing. [`FailingIo`] fails chosen operations (an OS error such as
//! `EIO` or `ENOSPC` at the N-th write, every write from then on, or a flush), and [`CrashIo`]
//! lets the first N writes reach the file and then behaves as if the process had died: nothing
//! more is written. [`MemIo`] keeps the image in memory, for fuzzing and tests that need no file.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Positioned I/O on an image file.
///
/// Reads are exact: reading past the end of the file is an error (the image layer checks every
/// offset against [`len`](ImageIo::len) first). Writes past the end extend the file.
#[allow(clippy::len_without_is_empty)]
pub trait ImageIo: Send {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// [`ImageIo`] on a real file.
#[derive(Debug)]
pub struct FileIo {
    file: File,
}

impl FileIo {
    /// Wraps an open file.
    pub fn new(file: File) -> FileIo {
        FileIo { file }
    }
}

impl ImageIo for FileIo {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let metadata = self.file.metadata()?;
        if metadata.file_type().is_block_device() {
            // A block device's inode says 0: its size is where its end is.
            return (&self.file).seek(SeekFrom::End(0));
        }
        Ok(metadata.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// How [`open_file`] opens an image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    /// Read and write, creating the file if it does not exist.
    Create,
}

/// Opens an image file, refusing anything but a regular file or a block device. The file is
/// opened non-blocking and checked before anything is read from it, so that a FIFO, a socket or a
/// terminal named by mistake is refused at once instead of hanging the caller (reads and writes
/// of regular files and block devices do not block either way).
pub(crate) fn open_file(path: &Path, access: Access) -> Result<File, super::Error> {
    let context = |what: &str| format!("{what} {}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(access != Access::Read)
        .create(access == Access::Create)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            let what = if access == Access::Create {
                "creating"
            } else {
                "opening"
            };
            super::Error::io(context(what), e)
        })?;
    let kind = file
        .metadata()
        .map_err(|e| super::Error::io(context("reading the metadata of"), e))?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else {
            "not a file"
        };
        return Err(super::Error::InvalidArgument(format!(
            "{} is {what}: an image must be a regular file or a block device",
            path.display()
        )));
    }
    Ok(file)
}

/// Which operations a [`FailingIo`] fails.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Fail the write with this index (0-based, counting `pwrite` and `set_len`).
    pub write: Option<u64>,
    /// Fail every write from this index on.
    pub writes_from: Option<u64>,
    /// Fail the flush with this index (0-based).
    pub flush: Option<u64>,
    /// Fail the read with this index (0-based).
    pub read: Option<u64>,
    /// The OS error (an errno value such as `libc::ENOSPC`) the failed operations return;
    /// `None` means `EIO`.
    pub errno: Option<i32>,
}

/// An [`ImageIo`] that fails the operations chosen in [`Faults`] and passes the others to the
/// wrapped one. A failed operation does nothing and returns a real OS error,
/// `io::Error::from_raw_os_error(errno)` ([`Faults::errno`], `EIO` by default), exactly what a
/// failing disk would give: [`Error::errno`](super::Error::errno) and the error's
/// [`source`](std::error::Error::source) report that errno.
pub struct FailingIo<I: ImageIo> {
    inner: I,
    faults: Faults,
    writes: u64,
    flushes: u64,
    reads: AtomicU64,
}

impl<I: ImageIo> FailingIo<I> {
    /// Wraps `inner`.
    pub fn new(inner: I, faults: Faults) -> FailingIo<I> {
        FailingIo {
            inner,
            faults,
            writes: 0,
            flushes: 0,
            reads: AtomicU64::new(0),
        }
    }

    fn injected(&self) -> io::Error {
        io::Error::from_raw_os_error(self.faults.errno.unwrap_or(libc::EIO))
    }

    fn write_fails(&mut self) -> bool {
        let index = self.writes;
        self.writes += 1;
        self.faults.write == Some(index) || self.faults.writes_from.is_some_and(|n| index >= n)
    }
}

impl<I: ImageIo> ImageIo for FailingIo<I> {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let index = self.reads.fetch_add(1, Ordering::Relaxed);
        if self.faults.read == Some(index) {
            return Err(self.injected());
        }
        self.inner.pread(offset, buf)
    }

    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.write_fails() {
            return Err(self.injected());
        }
        self.inner.pwrite(offset, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let index = self.flushes;
        self.flushes += 1;
        if self.faults.flush == Some(index) {
            return Err(self.injected());
        }
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if self.write_fails() {
            return Err(self.injected());
        }
        self.inner.set_len(len)
    }
}

/// An [`ImageIo`] that simulates a crash: the first `crash_at` writes (`pwrite` and `set_len`)
/// reach the wrapped file; that write and every later write or flush fail without touching it,
/// as if the process had died just before. Reads keep working.
///
/// [`writes`](CrashIo::writes) shares the count of attempted writes, so a test can first run an
/// operation with `crash_at = u64::MAX` to learn how many writes it makes, then crash it after
/// each of them in turn.
pub struct CrashIo<I: ImageIo> {
    inner: I,
    crash_at: u64,
    writes: Arc<AtomicU64>,
}

impl<I: ImageIo> CrashIo<I> {
    /// Wraps `inner`; write number `crash_at` (0-based) is the first one lost.
    pub fn new(inner: I, crash_at: u64) -> CrashIo<I> {
        CrashIo {
            inner,
            crash_at,
            writes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The shared count of writes attempted so far (including the lost ones).
    pub fn writes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.writes)
    }

    fn crashed(&self) -> bool {
        self.writes.load(Ordering::SeqCst) > self.crash_at
    }

    fn lost() -> io::Error {
        io::Error::other("simulated crash: write lost")
    }

    fn next_write_lost(&mut self) -> bool {
        let index = self.writes.fetch_add(1, Ordering::SeqCst);
        index >= self.crash_at
    }
}

impl<I: ImageIo> ImageIo for CrashIo<I> {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.pread(offset, buf)
    }

    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.next_write_lost() {
            return Err(Self::lost());
        }
        self.inner.pwrite(offset, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.crashed() {
            return Err(Self::lost());
        }
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if self.next_write_lost() {
            return Err(Self::lost());
        }
        self.inner.set_len(len)
    }
}

impl ImageIo for Box<dyn ImageIo> {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).pread(offset, buf)
    }
    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).pwrite(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}

/// An [`ImageIo`] over bytes in memory: no file, no disk I/O. Reads past the end fail, as
/// `read_exact_at` does; writes past the end extend the bytes, up to a limit past which they
/// fail with `EFBIG` (as a file would past its size limit), so that a hostile image cannot make
/// a fuzzer allocate without bound.
#[derive(Clone, Debug)]
pub struct MemIo {
    data: Vec<u8>,
    limit: usize,
}

impl MemIo {
    /// An image made of `data`, which writes may grow to any length.
    pub fn new(data: Vec<u8>) -> MemIo {
        MemIo::with_limit(data, usize::MAX)
    }

    /// An image made of `data`, which writes may grow up to `limit` bytes.
    pub fn with_limit(data: Vec<u8>, limit: usize) -> MemIo {
        MemIo { data, limit }
    }

    /// The image's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    fn grow_to(&mut self, len: usize) -> io::Result<()> {
        if len > self.limit {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        if len > self.data.len() {
            self.data.resize(len, 0);
        }
        Ok(())
    }
}

impl ImageIo for MemIo {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|range| range.end <= self.data.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self.data[range]);
        Ok(())
    }

    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        self.grow_to(end)?;
        self.data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.grow_to(len)?;
        self.data.truncate(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_io_reads_exactly_and_grows_up_to_its_limit() {
        let mut io = MemIo::with_limit(vec![1, 2, 3], 8);
        let mut two = [0u8; 2];
        io.pread(1, &mut two).unwrap();
        assert_eq!(two, [2, 3]);
        let past_end = io.pread(2, &mut two).unwrap_err();
        assert_eq!(past_end.kind(), io::ErrorKind::UnexpectedEof);

        io.pwrite(5, &[9]).unwrap();
        assert_eq!(io.data(), [1, 2, 3, 0, 0, 9]);
        let too_long = io.pwrite(7, &[0, 0]).unwrap_err();
        assert_eq!(too_long.raw_os_error(), Some(libc::EFBIG));
        assert_eq!(io.len().unwrap(), 6, "a refused write changes nothing");

        io.set_len(2).unwrap();
        assert_eq!(io.data(), [1, 2]);
        io.set_len(4).unwrap();
        assert_eq!(io.data(), [1, 2, 0, 0]);
        assert!(io.set_len(9).is_err());
    }
}
