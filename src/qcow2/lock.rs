// SPDX-License-Identifier: GPL-2.0-or-later

//! QEMU's image locking: open-file-description (OFD) byte-range locks on the image file.
//!
//! QEMU's `file-posix` driver (`raw_apply_lock_bytes` / `raw_check_lock_bytes`) takes a shared
//! read lock (`F_OFD_SETLK`, `F_RDLCK`) on byte `100 + bit` for each permission it holds and on
//! byte `200 + bit` for each permission it does *not* share with others, then tests
//! (`F_OFD_GETLK` with `F_WRLCK`) whether anyone else locks byte `200 + bit` of a permission it
//! wants or byte `100 + bit` of a permission it refuses to share. Permission bits:
//! `CONSISTENT_READ` = 0, `WRITE` = 1, `WRITE_UNCHANGED` = 2, `RESIZE` = 3.
//!
//! A writer here holds all four and shares only `CONSISTENT_READ` and `WRITE_UNCHANGED`, as a
//! QEMU process writing the image does; a reader holds `CONSISTENT_READ` and does not share
//! `WRITE` or `RESIZE`, as `qemu-img info` does. Locks belong to the open file description, so
//! they are released when the lock file is closed.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::error::Error;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// The locks held on an image; dropping it releases them.
#[derive(Debug)]
pub(crate) struct ImageLock {
    file: File,
}

impl Drop for ImageLock {
    /// Releases the locks explicitly rather than by closing the file: a child process that
    /// another thread spawns meanwhile shares the open file description until it execs, and
    /// the locks would live on with it.
    fn drop(&mut self) {
        let mut all = flock(libc::F_UNLCK, PERM_BASE);
        all.l_len = (SHARED_BASE + 4 - PERM_BASE) as libc::off_t;
        // SAFETY: `self.file` is open, and `all` is a valid, exclusively borrowed `flock`.
        // Failure leaves the locks to be released when the description closes, as before.
        let _ = unsafe {
            libc::fcntl(
                self.file.as_raw_fd(),
                libc::F_OFD_SETLK,
                &mut all as *mut libc::flock,
            )
        };
    }
}

impl ImageLock {
    /// Takes QEMU's locks for a writer (`write`) or a reader on `path`, then checks that no
    /// other process holds a conflicting one. Fails with [`Error::Locked`] naming the
    /// permission in conflict.
    pub(crate) fn acquire(path: &Path, write: bool) -> Result<ImageLock, Error> {
        let file = super::io::open_file(path, super::io::Access::Read)?;
        let (perm, shared) = if write {
            (ALL, CONSISTENT_READ | WRITE_UNCHANGED)
        } else {
            (CONSISTENT_READ, ALL & !(WRITE | RESIZE))
        };
        let fd = file.as_raw_fd();
        // From here on, an early return releases whatever was taken.
        let lock = ImageLock { file };
        for bit in 0..4u32 {
            if perm & (1 << bit) != 0 {
                lock_byte(fd, PERM_BASE + i64::from(bit)).map_err(|e| lock_error(path, e))?;
            }
            if shared & (1 << bit) == 0 {
                lock_byte(fd, SHARED_BASE + i64::from(bit)).map_err(|e| lock_error(path, e))?;
            }
        }
        for bit in 0..4u32 {
            let name = PERM_NAMES[bit as usize];
            if perm & (1 << bit) != 0 && is_locked(fd, SHARED_BASE + i64::from(bit))? {
                return Err(Error::Locked(format!(
                    "failed to get \"{name}\" lock: another process (QEMU?) is using the image \
                     {} and does not share the {name} permission",
                    path.display()
                )));
            }
            if shared & (1 << bit) == 0 && is_locked(fd, PERM_BASE + i64::from(bit))? {
                return Err(Error::Locked(format!(
                    "failed to get shared \"{name}\" lock: another process (QEMU?) has the \
                     image {} open for {name}{}",
                    path.display(),
                    if write {
                        ""
                    } else {
                        "; use force-share (-U) to read it anyway"
                    }
                )));
            }
        }
        Ok(lock)
    }
}

fn lock_error(path: &Path, error: std::io::Error) -> Error {
    match error.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Error::Locked(format!(
            "failed to lock {}: another process holds a conflicting lock",
            path.display()
        )),
        _ => Error::io(format!("locking {}", path.display()), error),
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero bytes are a valid value of it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte as libc::off_t;
    lock.l_len = 1;
    lock.l_pid = 0;
    lock
}

/// Takes a shared OFD lock on one byte.
fn lock_byte(fd: libc::c_int, byte: i64) -> std::io::Result<()> {
    let mut lock = flock(libc::F_RDLCK, byte);
    // SAFETY: `fd` is an open descriptor owned by the caller's `File`, and `lock` is a valid,
    // exclusively borrowed `flock` for the duration of the call, as F_OFD_SETLK requires.
    let ret = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut lock as *mut libc::flock) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds any lock on the byte.
fn is_locked(fd: libc::c_int, byte: i64) -> Result<bool, Error> {
    let mut lock = flock(libc::F_WRLCK, byte);
    // SAFETY: as in `lock_byte`; F_OFD_GETLK writes the conflicting lock (if any) into `lock`.
    let ret = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut lock as *mut libc::flock) };
    if ret == -1 {
        return Err(Error::io(
            "testing an image lock byte",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}
