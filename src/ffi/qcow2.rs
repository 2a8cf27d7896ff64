//! `hbitmap_qcow2_*`: persistent dirty bitmaps in qcow2 images (`hbitmap::qcow2`) for C.
//!
//! Conventions: every function returns 0 on success or a negative errno (`-EINVAL` for a
//! malformed image or a bad argument, `-ENOENT` for an unknown bitmap, `-EEXIST`, `-EBUSY` for a
//! bitmap marked in use, `-EAGAIN` when another process holds the image, `-EROFS` for a write
//! refused, `-ENOTSUP`, `-EFBIG` for a QEMU limit, `-EIO` or the OS error for I/O). When `errmsg`
//! is not NULL and the call fails, `*errmsg` receives a message allocated with `malloc` (free it
//! with `free`); it is left untouched on success. Output parameters are written only on
//! success. Image handles and strings must not be NULL (the process aborts, as for the
//! `hbitmap_*` preconditions); `errmsg` may be. A panic inside the library is turned into
//! `-EIO` with a message, never unwound into C.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use libc::{c_char, c_int};

use super::{borrow, borrow_mut, null_pointer};
use crate::qcow2::{BitmapFlags, Error, Image, OpenOptions};
use crate::HBitmap;

/// An open qcow2 image (opaque). Close it with `hbitmap_qcow2_close`.
///
/// The `hbitmap_qcow2_*` functions return 0 on success or a negative errno (-EINVAL malformed
/// image or bad argument, -ENOENT unknown bitmap, -EEXIST, -EBUSY bitmap in use, -EAGAIN image
/// locked by another process, -EROFS write refused, -ENOTSUP, -EFBIG QEMU limit, -EIO or the OS
/// error for I/O). On failure, when `errmsg` is not NULL, `*errmsg` receives a message to
/// `free()`; outputs are written only on success. NULL handles and strings abort.
pub struct HBitmapQcow2 {
    image: Image,
}

/// `hbitmap_qcow2_open` flag: open for writing (takes QEMU's write locks).
pub const HBITMAP_QCOW2_OPEN_WRITE: u32 = 1;
/// `hbitmap_qcow2_open` flag: read-only without locking, like `qemu-img -U`.
pub const HBITMAP_QCOW2_OPEN_FORCE_SHARE: u32 = 2;
/// Bitmap flag: in use (inconsistent).
pub const HBITMAP_QCOW2_BITMAP_IN_USE: u32 = 1;
/// Bitmap flag: auto (enabled).
pub const HBITMAP_QCOW2_BITMAP_AUTO: u32 = 2;

/// One bitmap of an image's directory, filled by `hbitmap_qcow2_bitmap_info`.
#[repr(C)]
pub struct HBitmapQcow2BitmapInfo {
    /// The name's bytes as stored, NUL-terminated (names have at most 1023 bytes).
    pub name: [c_char; 1024],
    /// Bytes of the virtual disk per bit.
    pub granularity: u64,
    /// File offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// Flag in_use: the bitmap may be inconsistent and cannot be loaded.
    pub in_use: bool,
    /// Flag auto: the bitmap is enabled.
    pub auto_: bool,
    /// Bitmap type (1: dirty tracking).
    pub bitmap_type: u8,
}

/// Stores a malloc'd copy of `message` in `*errmsg` (if `errmsg` is not NULL).
///
/// # Safety
/// `errmsg` is NULL or valid for writing one pointer.
unsafe fn set_errmsg(errmsg: *mut *mut c_char, message: &str) {
    if errmsg.is_null() {
        return;
    }
    let bytes: Vec<u8> = message
        .bytes()
        .map(|b| if b == 0 { b'?' } else { b })
        .collect();
    // SAFETY: malloc of a positive size; the result is checked for NULL below.
    let copy = unsafe { libc::malloc(bytes.len() + 1) } as *mut u8;
    if copy.is_null() {
        return;
    }
    // SAFETY: `copy` has room for the bytes and the terminating NUL; `errmsg` is writable (the
    // caller's contract).
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
        *copy.add(bytes.len()) = 0;
        *errmsg = copy as *mut c_char;
    }
}

/// Runs `body`, converting its error or a panic into a negative errno and a message.
///
/// # Safety
/// `errmsg` is NULL or valid for writing one pointer.
unsafe fn guarded(
    function: &str,
    errmsg: *mut *mut c_char,
    body: impl FnOnce() -> Result<(), Error>,
) -> c_int {
    let (code, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return 0,
        Ok(Err(error)) => (error.errno(), error.to_string()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            (libc::EIO, format!("{function}: internal error: {why}"))
        }
    };
    // SAFETY: the caller's contract.
    unsafe { set_errmsg(errmsg, &message) };
    -code
}

/// Reads a NUL-terminated string argument, aborting on NULL.
///
/// # Safety
/// A non-NULL `ptr` points to a NUL-terminated string that outlives `'a`.
unsafe fn string<'a>(function: &str, what: &str, ptr: *const c_char) -> Result<&'a str, Error> {
    if ptr.is_null() {
        null_pointer(function, what);
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
}

/// Writes `value` to `*out`, aborting on NULL.
///
/// # Safety
/// A non-NULL `out` is valid for writing one `T`.
unsafe fn put<T>(function: &str, what: &str, out: *mut T, value: T) {
    if out.is_null() {
        null_pointer(function, what);
    }
    // SAFETY: non-NULL and writable (the caller's contract).
    unsafe { out.write(value) };
}

/// Opens the qcow2 image at `path`: `flags` is 0 (read-only), `HBITMAP_QCOW2_OPEN_WRITE` or
/// `HBITMAP_QCOW2_OPEN_FORCE_SHARE`. The image is validated whole (a malformed bitmaps extension
/// gives -EINVAL) and locked as QEMU locks it (-EAGAIN if QEMU holds it). On success `*image`
/// receives the handle.
///
/// # Safety
/// `path` is a NUL-terminated string; `image` is valid for writing; `errmsg` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_open(
    path: *const c_char,
    flags: u32,
    image: *mut *mut HBitmapQcow2,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_open";
    if image.is_null() {
        null_pointer(F, "image");
    }
    // SAFETY: the caller's contract, for every pointer used below.
    unsafe {
        guarded(F, errmsg, || {
            let path = string(F, "path", path)?;
            if flags & !(HBITMAP_QCOW2_OPEN_WRITE | HBITMAP_QCOW2_OPEN_FORCE_SHARE) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unknown open flags {flags:#x}"
                )));
            }
            let opened = Image::open(
                path,
                OpenOptions {
                    write: flags & HBITMAP_QCOW2_OPEN_WRITE != 0,
                    force_share: flags & HBITMAP_QCOW2_OPEN_FORCE_SHARE != 0,
                },
            )?;
            put(
                F,
                "image",
                image,
                Box::into_raw(Box::new(HBitmapQcow2 { image: opened })),
            );
            Ok(())
        })
    }
}

/// Creates (or overwrites) `path` as an empty qcow2 v3 image of `virtual_size` bytes (a multiple
/// of 512) with `cluster_size`-byte clusters (a power of two, 512 to 2 MiB) and opens it for
/// writing into `*image`.
///
/// # Safety
/// As `hbitmap_qcow2_open`.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_create(
    path: *const c_char,
    virtual_size: u64,
    cluster_size: u64,
    image: *mut *mut HBitmapQcow2,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_create";
    if image.is_null() {
        null_pointer(F, "image");
    }
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let path = string(F, "path", path)?;
            let created = Image::create(path, virtual_size, cluster_size)?;
            put(
                F,
                "image",
                image,
                Box::into_raw(Box::new(HBitmapQcow2 { image: created })),
            );
            Ok(())
        })
    }
}

/// Flushes and closes an image, releasing its locks; the handle is freed even when flushing
/// fails. NULL does nothing.
///
/// # Safety
/// `image` is NULL or a handle from `hbitmap_qcow2_open`/`_create` not closed since.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_close(
    image: *mut HBitmapQcow2,
    errmsg: *mut *mut c_char,
) -> c_int {
    if image.is_null() {
        return 0;
    }
    // SAFETY: the handle came from Box::into_raw (the caller's contract).
    let handle = unsafe { Box::from_raw(image) };
    // SAFETY: the caller's contract.
    unsafe { guarded("hbitmap_qcow2_close", errmsg, || handle.image.close()) }
}

/// Virtual size of the image in bytes: the size of every bitmap.
///
/// # Safety
/// `image` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_virtual_size(image: *const HBitmapQcow2) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_qcow2_virtual_size", "image", image) }
        .image
        .virtual_size()
}

/// Number of bitmaps in the image.
///
/// # Safety
/// `image` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_bitmap_count(image: *const HBitmapQcow2) -> usize {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_qcow2_bitmap_count", "image", image) }
        .image
        .bitmaps()
        .len()
}

/// Describes bitmap number `index` (directory order) into `*info`; -ENOENT past the last.
///
/// # Safety
/// `image` is a live handle; `info` is valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_bitmap_info(
    image: *const HBitmapQcow2,
    index: usize,
    info: *mut HBitmapQcow2BitmapInfo,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_bitmap_info";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let bitmaps = handle.image.bitmaps();
            let Some(bitmap) = bitmaps.get(index) else {
                return Err(Error::NotFound(format!(
                    "#{index} (the image has {})",
                    bitmaps.len()
                )));
            };
            let mut name = [0 as c_char; 1024];
            let raw = handle.image.raw_name(index);
            for (out, &byte) in name.iter_mut().zip(raw.iter().take(1023)) {
                *out = byte as c_char;
            }
            put(
                F,
                "info",
                info,
                HBitmapQcow2BitmapInfo {
                    name,
                    granularity: bitmap.granularity,
                    table_offset: bitmap.table_offset,
                    table_size: bitmap.table_size,
                    in_use: bitmap.in_use,
                    auto_: bitmap.auto,
                    bitmap_type: bitmap.bitmap_type,
                },
            );
            Ok(())
        })
    }
}

/// Loads bitmap `name` into a new `HBitmap` (byte-addressed over the virtual size; free it with
/// `hbitmap_free`) stored in `*bitmap`. Refused (-EBUSY) for a bitmap marked in use. On an image
/// opened for writing the bitmap is marked in use on disk until stored back.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string; `bitmap` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_load(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    bitmap: *mut *mut HBitmap,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_load";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            let loaded = handle.image.load_bitmap(name)?;
            put(F, "bitmap", bitmap, Box::into_raw(Box::new(loaded)));
            Ok(())
        })
    }
}

/// Reads bitmap `name` without changing the image, even when it is marked in use (its content
/// may then be inconsistent), into a new `HBitmap` in `*bitmap`.
///
/// # Safety
/// As `hbitmap_qcow2_load`.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_inspect(
    image: *const HBitmapQcow2,
    name: *const c_char,
    bitmap: *mut *mut HBitmap,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_inspect";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            let loaded = handle.image.inspect_bitmap(name)?;
            put(F, "bitmap", bitmap, Box::into_raw(Box::new(loaded)));
            Ok(())
        })
    }
}

/// Stores `bitmap` as `name` (created or replaced) with `flags` (`HBITMAP_QCOW2_BITMAP_IN_USE`,
/// `HBITMAP_QCOW2_BITMAP_AUTO`). The bitmap must be byte-addressed over the virtual size with a
/// granularity of 9 to 31.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string; `bitmap` a live `HBitmap`.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_store(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    bitmap: *const HBitmap,
    flags: u32,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_store";
    // SAFETY: the caller's contract.
    let (handle, bitmap) = unsafe { (borrow_mut(F, "image", image), borrow(F, "bitmap", bitmap)) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            if flags & !(HBITMAP_QCOW2_BITMAP_IN_USE | HBITMAP_QCOW2_BITMAP_AUTO) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unknown bitmap flags {flags:#x}"
                )));
            }
            handle.image.store_bitmap(
                name,
                bitmap,
                BitmapFlags {
                    in_use: flags & HBITMAP_QCOW2_BITMAP_IN_USE != 0,
                    auto: flags & HBITMAP_QCOW2_BITMAP_AUTO != 0,
                },
            )
        })
    }
}

/// Adds an empty bitmap `name` of `granularity` bytes (a power of two, 512 B to 2 GiB), enabled
/// or not; -EEXIST if the name exists.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_add(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    granularity: u64,
    enabled: bool,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_add";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            handle.image.add_bitmap(name, granularity, enabled)
        })
    }
}

/// Removes bitmap `name` (also one marked in use).
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_remove(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_remove";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            handle.image.remove_bitmap(name)
        })
    }
}

/// Clears bitmap `name`; -EBUSY for a bitmap in use.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_clear(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_clear";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            handle.image.clear_bitmap(name)
        })
    }
}

/// Enables or disables bitmap `name` (its auto flag); -EBUSY for a bitmap in use.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_set_enabled(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    enabled: bool,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_set_enabled";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let name = string(F, "name", name)?;
            handle.image.set_enabled(name, enabled)
        })
    }
}

/// Merges bitmap `source` into bitmap `target` of the same image (`target |= source`).
///
/// # Safety
/// `image` is a live handle; `source` and `target` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_merge(
    image: *mut HBitmapQcow2,
    source: *const c_char,
    target: *const c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_merge";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded(F, errmsg, || {
            let source = string(F, "source", source)?;
            let target = string(F, "target", target)?;
            handle.image.merge_bitmap(source, target)
        })
    }
}
