// SPDX-License-Identifier: GPL-2.0-or-later

//! `hbitmap_qcow2_*`: persistent dirty bitmaps in qcow2 images (`hbitmap::qcow2`) for C.
//!
//! The conventions (negative errno values and what each means, error messages, NULL
//! arguments, poisoning after an internal error) are documented once, on [`HBitmapQcow2`],
//! whose documentation is the header's; `Error::errno` is the one mapping from errors to them.

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
///
/// After an internal error (a bug in the library, reported as -EIO "internal error") the handle
/// is poisoned: every later call returns -EIO without touching the image; close it and open
/// the image again (what is on disk is the state before or after the failed change).
///
/// Bitmaps loaded with `hbitmap_qcow2_load` from a writable handle are marked in use on disk.
/// Before closing, store each of them (`hbitmap_qcow2_store`, which clears the mark) or release
/// it (`hbitmap_qcow2_release`, when no write was tracked since loading). Closing cannot store
/// them itself: the content is in the caller's `HBitmap`, which the library does not own.
/// Closing does not drop the mark either: the bitmap on disk would then claim to be consistent
/// while missing every write tracked in memory, and an incremental backup based on it would
/// silently miss data. So `hbitmap_qcow2_close` leaves such bitmaps in use (QEMU then treats
/// them as inconsistent, as after a crash) and reports them with -EBUSY.
pub struct HBitmapQcow2 {
    image: Image,
    /// Set when a call panicked: the message, and every later call is refused.
    poisoned: Option<String>,
}

impl HBitmapQcow2 {
    fn new(image: Image) -> *mut HBitmapQcow2 {
        Box::into_raw(Box::new(HBitmapQcow2 {
            image,
            poisoned: None,
        }))
    }

    /// The error for any call on a poisoned handle.
    fn refusal(&self, function: &str) -> Option<Error> {
        self.poisoned.as_ref().map(|why| {
            Error::io(
                format!(
                    "{function}: {}: an earlier call on this handle failed with an internal \
                     error ({why}); close the handle and open the image again",
                    self.image.path().display()
                ),
                std::io::Error::other("handle poisoned"),
            )
        })
    }
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
    /// The name's bytes as stored, NUL-terminated (names have at most 1023 bytes); a name
    /// stored with a NUL byte reads up to it, as QEMU reads it.
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

/// Why a call failed.
enum Failure {
    Error(Error),
    /// A panic (a bug in the library), with its message.
    Panic(String),
}

/// Runs `body`, catching a panic.
fn catch(function: &str, body: impl FnOnce() -> Result<(), Error>) -> Result<(), Failure> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result.map_err(Failure::Error),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Failure::Panic(format!("{function}: internal error: {why}")))
        }
    }
}

/// The negative errno of a failure, its message stored in `*errmsg`.
///
/// # Safety
/// `errmsg` is NULL or valid for writing one pointer.
unsafe fn report(errmsg: *mut *mut c_char, failure: &Failure) -> c_int {
    let (code, message) = match failure {
        Failure::Error(error) => (error.errno(), error.to_string()),
        Failure::Panic(message) => (libc::EIO, message.clone()),
    };
    // SAFETY: the caller's contract.
    unsafe { set_errmsg(errmsg, &message) };
    -code
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
    match catch(function, body) {
        Ok(()) => 0,
        // SAFETY: the caller's contract.
        Err(failure) => unsafe { report(errmsg, &failure) },
    }
}

/// As `guarded`, for a call that may change the image behind `handle`: refused on a poisoned
/// handle, and a panic poisons it (the layout in memory may be half updated).
///
/// # Safety
/// `errmsg` is NULL or valid for writing one pointer.
unsafe fn guarded_mut(
    function: &str,
    errmsg: *mut *mut c_char,
    handle: &mut HBitmapQcow2,
    body: impl FnOnce(&mut Image) -> Result<(), Error>,
) -> c_int {
    let result = match handle.refusal(function) {
        Some(refused) => Err(Failure::Error(refused)),
        None => catch(function, || body(&mut handle.image)),
    };
    match result {
        Ok(()) => 0,
        Err(failure) => {
            if let Failure::Panic(message) = &failure {
                handle.poisoned = Some(message.clone());
            }
            // SAFETY: the caller's contract.
            unsafe { report(errmsg, &failure) }
        }
    }
}

/// As `guarded`, for a call that only reads through `handle`: refused on a poisoned handle.
///
/// # Safety
/// `errmsg` is NULL or valid for writing one pointer.
unsafe fn guarded_ref(
    function: &str,
    errmsg: *mut *mut c_char,
    handle: &HBitmapQcow2,
    body: impl FnOnce(&Image) -> Result<(), Error>,
) -> c_int {
    let result = match handle.refusal(function) {
        Some(refused) => Err(Failure::Error(refused)),
        None => catch(function, || body(&handle.image)),
    };
    match result {
        Ok(()) => 0,
        // SAFETY: the caller's contract.
        Err(failure) => unsafe { report(errmsg, &failure) },
    }
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

/// Reads a bitmap name: the bytes of a NUL-terminated string, any bytes but NUL (so a name
/// stored with a NUL byte cannot be named through this ABI; QEMU cannot name it either), aborting
/// on NULL.
///
/// # Safety
/// A non-NULL `ptr` points to a NUL-terminated string that outlives `'a`.
unsafe fn name_bytes<'a>(function: &str, what: &str, ptr: *const c_char) -> &'a [u8] {
    if ptr.is_null() {
        null_pointer(function, what);
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    unsafe { CStr::from_ptr(ptr) }.to_bytes()
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
            put(F, "image", image, HBitmapQcow2::new(opened));
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
            put(F, "image", image, HBitmapQcow2::new(created));
            Ok(())
        })
    }
}

/// Flushes and closes an image, releasing its locks; the handle is freed in every case, also
/// when it fails. NULL does nothing.
///
/// Bitmaps loaded through this handle (`hbitmap_qcow2_load`, writable handle) and neither
/// stored, released nor removed since stay marked in use on disk, since their stored content
/// may miss writes tracked in memory: the image is closed anyway and -EBUSY returned, the
/// message naming them. (A poisoned handle is closed without that check.)
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
    let HBitmapQcow2 { image, poisoned } = *handle;
    // SAFETY: the caller's contract.
    unsafe {
        guarded("hbitmap_qcow2_close", errmsg, || {
            let left = if poisoned.is_none() {
                image.tracked_bitmaps()
            } else {
                Vec::new()
            };
            let path = image.path().to_path_buf();
            image.close()?;
            if left.is_empty() {
                return Ok(());
            }
            let names: Vec<String> = left.iter().map(|name| format!("'{name}'")).collect();
            let one = left.len() == 1;
            Err(Error::InUse(format!(
                "{}: closed, but bitmap{} {} loaded through this handle {} neither stored nor \
                 released and stay{} marked in use (inconsistent): store a loaded bitmap with \
                 hbitmap_qcow2_store, or release it with hbitmap_qcow2_release if no write was \
                 tracked, before closing",
                path.display(),
                if one { "" } else { "s" },
                names.join(", "),
                if one { "was" } else { "were" },
                if one { "s" } else { "" },
            )))
        })
    }
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

/// Number of bitmaps in the image (0 for a poisoned handle).
///
/// # Safety
/// `image` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_bitmap_count(image: *const HBitmapQcow2) -> usize {
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow("hbitmap_qcow2_bitmap_count", "image", image) };
    if handle.poisoned.is_some() {
        return 0;
    }
    handle.image.bitmaps().len()
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
        guarded_ref(F, errmsg, handle, |image| {
            let bitmaps = image.bitmaps();
            let Some(bitmap) = bitmaps.get(index) else {
                return Err(Error::NotFound(format!(
                    "#{index} (the image has {})",
                    bitmaps.len()
                )));
            };
            let mut name = [0 as c_char; 1024];
            let raw = image.raw_name(index);
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            let loaded = image.load_bitmap(name)?;
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
        guarded_ref(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            let loaded = image.inspect_bitmap(name)?;
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            if flags & !(HBITMAP_QCOW2_BITMAP_IN_USE | HBITMAP_QCOW2_BITMAP_AUTO) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unknown bitmap flags {flags:#x}"
                )));
            }
            image.store_bitmap(
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.add_bitmap(name, granularity, enabled)
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.remove_bitmap(name)
        })
    }
}

/// Drops the in-use mark that `hbitmap_qcow2_load` set on bitmap `name` through this handle,
/// for a caller that tracked no write since loading it (the stored content is still exact);
/// the caller's `HBitmap` is not needed and stays the caller's. -EINVAL for a bitmap this
/// handle did not load: an in-use mark found on disk says the content is stale.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_release(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_release";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.release_bitmap(name)
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.clear_bitmap(name)
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
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.set_enabled(name, enabled)
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
        guarded_mut(F, errmsg, handle, |image| {
            let source = name_bytes(F, "source", source);
            let target = name_bytes(F, "target", target);
            image.merge_bitmap(source, target)
        })
    }
}

/// `hbitmap_qcow2_add_ex` flag: add the bitmap disabled (without the auto flag).
pub const HBITMAP_QCOW2_ADD_DISABLED: u32 = 1;
/// `hbitmap_qcow2_add_ex` flag: success, changing nothing, when a bitmap of that name exists
/// with the same granularity and enabled state and is not in use (a retry after a crash).
pub const HBITMAP_QCOW2_ADD_EXIST_OK: u32 = 2;

/// One dirty byte range of a bitmap: `hbitmap_qcow2_dirty_extents` fills them,
/// `hbitmap_qcow2_import` reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HBitmapQcow2Extent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// Cluster size of the image in bytes.
///
/// # Safety
/// `image` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_cluster_size(image: *const HBitmapQcow2) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_qcow2_cluster_size", "image", image) }
        .image
        .cluster_size()
}

/// Adds an empty bitmap `name` of `granularity` bytes (0: QEMU's default for the image, the
/// cluster size clamped to 4 KiB..64 KiB; else a power of two, 512 B to 2 GiB). `flags`:
/// `HBITMAP_QCOW2_ADD_DISABLED`, `HBITMAP_QCOW2_ADD_EXIST_OK`. -EEXIST if the name exists
/// (with `EXIST_OK`: only if the existing bitmap differs in granularity or state, or is in use).
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_add_ex(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    granularity: u64,
    flags: u32,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_add_ex";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            if flags & !(HBITMAP_QCOW2_ADD_DISABLED | HBITMAP_QCOW2_ADD_EXIST_OK) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unknown add flags {flags:#x}"
                )));
            }
            let granularity = match granularity {
                0 => image.default_granularity(),
                g => g,
            };
            let enabled = flags & HBITMAP_QCOW2_ADD_DISABLED == 0;
            if flags & HBITMAP_QCOW2_ADD_EXIST_OK != 0 {
                image.ensure_bitmap(name, granularity, enabled).map(|_| ())
            } else {
                image.add_bitmap(name, granularity, enabled)
            }
        })
    }
}

/// Merges bitmap `source` of the image behind `source_image` (of the same virtual size, open
/// read-only or not; it may be `image` itself) into bitmap `target` of `image`.
///
/// # Safety
/// `image` and `source_image` are live handles; `source` and `target` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_merge_from(
    image: *mut HBitmapQcow2,
    source_image: *const HBitmapQcow2,
    source: *const c_char,
    target: *const c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_merge_from";
    if source_image.is_null() {
        null_pointer(F, "source_image");
    }
    if std::ptr::eq(image.cast_const(), source_image) {
        // SAFETY: the caller's contract; one handle, so the plain merge.
        return unsafe { hbitmap_qcow2_merge(image, source, target, errmsg) };
    }
    // SAFETY: the caller's contract; two distinct live handles.
    let (handle, other) = unsafe {
        (
            borrow_mut(F, "image", image),
            borrow(F, "source_image", source_image),
        )
    };
    if let Some(refused) = other.refusal(F) {
        // SAFETY: the caller's contract.
        return unsafe { report(errmsg, &Failure::Error(refused)) };
    }
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let source = name_bytes(F, "source", source);
            let target = name_bytes(F, "target", target);
            image.merge_bitmap_from(&other.image, source, target)
        })
    }
}

/// Marks the bytes `offset..offset + length` of bitmap `name` dirty (`dirty` true) or clean,
/// in one crash-safe store, without marking the bitmap in use on the way. -EINVAL (nothing
/// written) for a range ending past the virtual size, and for a clean range that does not start
/// and end on granule boundaries (or the virtual size); -EBUSY for a bitmap in use.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_set_range(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    offset: u64,
    length: u64,
    dirty: bool,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_set_range";
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            image.set_range(name, offset, length, dirty)
        })
    }
}

/// Creates or replaces bitmap `name` with exactly the `count` byte ranges at `extents` dirty
/// (any order, overlaps allowed), at `granularity` bytes per bit (0: the existing bitmap's,
/// else QEMU's default for the image), with `flags` (`HBITMAP_QCOW2_BITMAP_AUTO`). -EINVAL,
/// nothing written, for a range ending past the virtual size. `extents` may be NULL when
/// `count` is 0.
///
/// # Safety
/// `image` is a live handle; `name` a NUL-terminated string; `extents` points to `count`
/// extents.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_import(
    image: *mut HBitmapQcow2,
    name: *const c_char,
    granularity: u64,
    extents: *const HBitmapQcow2Extent,
    count: usize,
    flags: u32,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_import";
    if extents.is_null() && count > 0 {
        null_pointer(F, "extents");
    }
    let extents: &[HBitmapQcow2Extent] = if count == 0 {
        &[]
    } else {
        // SAFETY: non-NULL, `count` extents (the caller's contract).
        unsafe { std::slice::from_raw_parts(extents, count) }
    };
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let name = name_bytes(F, "name", name);
            if flags & !HBITMAP_QCOW2_BITMAP_AUTO != 0 {
                return Err(Error::InvalidArgument(format!(
                    "unknown import flags {flags:#x}"
                )));
            }
            image.import_bitmap(
                name,
                (granularity != 0).then_some(granularity),
                extents.iter().map(|e| (e.offset, e.length)),
                BitmapFlags {
                    in_use: false,
                    auto: flags & HBITMAP_QCOW2_BITMAP_AUTO != 0,
                },
            )
        })
    }
}

/// Dirty bytes of bitmap number `index` (directory order) into `*bytes`: its extents' total
/// length, clipped to the virtual size. -EBUSY for a bitmap in use (its content is not to be
/// trusted), -ENOENT past the last.
///
/// # Safety
/// `image` is a live handle; `bytes` is valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_bitmap_dirty_bytes(
    image: *const HBitmapQcow2,
    index: usize,
    bytes: *mut u64,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_bitmap_dirty_bytes";
    if bytes.is_null() {
        null_pointer(F, "bytes");
    }
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_ref(F, errmsg, handle, |image| {
            let dirty = image.dirty_bytes_at(index)?;
            put(F, "bytes", bytes, dirty);
            Ok(())
        })
    }
}

/// Fills `extents` with up to `max` maximal dirty ranges of `bitmap` (items, clipped to its
/// size) at or after item `start`, in order (a range running across `start` begins at
/// `start`), and returns how many it wrote; fewer than `max` means there are no more. To
/// continue, call again from the end of the last range returned. A `start` at or past the size
/// returns 0. For a byte-addressed bitmap (`hbitmap_qcow2_load`/`_inspect`) the ranges are byte
/// ranges of the disk. `extents` may be NULL when `max` is 0.
///
/// # Safety
/// `bitmap` is a live `HBitmap`; `extents` is valid for writing `max` extents.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_dirty_extents(
    bitmap: *const HBitmap,
    start: u64,
    extents: *mut HBitmapQcow2Extent,
    max: usize,
) -> usize {
    const F: &str = "hbitmap_qcow2_dirty_extents";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow(F, "bitmap", bitmap) };
    if max == 0 {
        return 0;
    }
    if extents.is_null() {
        null_pointer(F, "extents");
    }
    let size = bitmap.size();
    let mut next = start;
    let mut written = 0;
    while written < max && next < size {
        let Some((offset, length)) = bitmap.next_dirty_area(next, size - next) else {
            break;
        };
        // SAFETY: `written < max` and `extents` holds `max` extents (the caller's contract).
        unsafe {
            extents
                .add(written)
                .write(HBitmapQcow2Extent { offset, length })
        };
        written += 1;
        next = offset + length;
    }
    written
}

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, CString};
    use std::io;

    use super::*;
    use crate::qcow2::io::{FileIo, ImageIo};

    /// I/O whose writes panic once armed: a stand-in for a bug in the middle of a change.
    struct PanickingIo<I> {
        inner: I,
        armed: bool,
    }

    impl<I: ImageIo> ImageIo for PanickingIo<I> {
        fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.pread(offset, buf)
        }
        fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            assert!(!self.armed, "write at {offset:#x} during a test of panics");
            self.inner.pwrite(offset, buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    fn take_message(message: *mut c_char) -> String {
        assert!(!message.is_null());
        // SAFETY: set by set_errmsg to a malloc'd NUL-terminated string, freed once here.
        unsafe {
            let text = CStr::from_ptr(message).to_string_lossy().into_owned();
            libc::free(message.cast());
            text
        }
    }

    /// A handle on a fresh image in memory (no file, no lock: Miri runs it), with small
    /// clusters so that Miri has few bytes to go through.
    fn memory_handle(virtual_size: u64) -> *mut HBitmapQcow2 {
        let bytes = crate::qcow2::create::build(virtual_size, 512).unwrap();
        let io = crate::qcow2::io::MemIo::new(bytes);
        HBitmapQcow2::new(Image::open_io(Box::new(io), "memory.qcow2", true).unwrap())
    }

    /// Every `hbitmap_qcow2_*` function on handles, names, out-pointers and extent arrays
    /// passed as C passes them.
    #[test]
    fn the_qcow2_api_through_pointers() {
        let size = 8 << 20;
        let (a, b, c, d) = (
            CString::new("a").unwrap(),
            CString::new("b").unwrap(),
            CString::new("c").unwrap(),
            CString::new("d").unwrap(),
        );
        let mut message: *mut c_char = ptr::null_mut();
        // SAFETY: live handles, NUL-terminated names, writable outputs, each handle closed and
        // each loaded bitmap freed once.
        unsafe {
            let image = memory_handle(size);
            assert_eq!(hbitmap_qcow2_virtual_size(image), size);
            assert_eq!(hbitmap_qcow2_cluster_size(image), 512);
            assert_eq!(
                hbitmap_qcow2_add(image, a.as_ptr(), 65536, true, &mut message),
                0
            );
            assert!(message.is_null());
            assert_eq!(
                hbitmap_qcow2_add(image, a.as_ptr(), 65536, true, &mut message),
                -libc::EEXIST
            );
            assert!(take_message(message).contains('a'));
            message = ptr::null_mut();
            let flags = HBITMAP_QCOW2_ADD_DISABLED | HBITMAP_QCOW2_ADD_EXIST_OK;
            assert_eq!(
                hbitmap_qcow2_add_ex(image, b.as_ptr(), 65536, flags, &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_add_ex(image, b.as_ptr(), 65536, flags, &mut message),
                0
            );
            assert_eq!(hbitmap_qcow2_bitmap_count(image), 2);

            let mut info: HBitmapQcow2BitmapInfo = std::mem::zeroed();
            assert_eq!(
                hbitmap_qcow2_bitmap_info(image, 1, &mut info, &mut message),
                0
            );
            assert_eq!(CStr::from_ptr(info.name.as_ptr()), b.as_c_str());
            assert_eq!(info.granularity, 65536);
            assert!(!info.auto_ && !info.in_use);
            assert_eq!(
                hbitmap_qcow2_bitmap_info(image, 2, &mut info, ptr::null_mut()),
                -libc::ENOENT
            );

            assert_eq!(
                hbitmap_qcow2_set_range(image, a.as_ptr(), 1 << 20, 3 << 16, true, &mut message),
                0
            );
            let mut bytes = 0u64;
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 0, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, 3 << 16);

            // Inspect reads; load marks in use until stored back or released.
            let mut bitmap: *mut HBitmap = ptr::null_mut();
            assert_eq!(
                hbitmap_qcow2_inspect(image, a.as_ptr(), &mut bitmap, &mut message),
                0
            );
            let mut extents = [HBitmapQcow2Extent::default(); 3];
            assert_eq!(
                hbitmap_qcow2_dirty_extents(bitmap, 0, extents.as_mut_ptr(), 3),
                1
            );
            assert_eq!(
                extents[0],
                HBitmapQcow2Extent {
                    offset: 1 << 20,
                    length: 3 << 16
                }
            );
            assert_eq!(
                hbitmap_qcow2_dirty_extents(bitmap, 0, ptr::null_mut(), 0),
                0
            );
            super::super::hbitmap_free(bitmap);

            assert_eq!(
                hbitmap_qcow2_load(image, a.as_ptr(), &mut bitmap, &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_info(image, 0, &mut info, &mut message),
                0
            );
            assert!(info.in_use);
            super::super::hbitmap_set(bitmap, 0, 1);
            assert_eq!(
                hbitmap_qcow2_store(
                    image,
                    a.as_ptr(),
                    bitmap,
                    HBITMAP_QCOW2_BITMAP_AUTO,
                    &mut message
                ),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 0, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, 4 << 16);
            super::super::hbitmap_free(bitmap);
            assert_eq!(
                hbitmap_qcow2_load(image, b.as_ptr(), &mut bitmap, &mut message),
                0
            );
            super::super::hbitmap_free(bitmap);
            assert_eq!(hbitmap_qcow2_release(image, b.as_ptr(), &mut message), 0);

            assert_eq!(
                hbitmap_qcow2_set_enabled(image, b.as_ptr(), true, &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_merge(image, a.as_ptr(), b.as_ptr(), &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 1, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, 4 << 16);
            assert_eq!(hbitmap_qcow2_clear(image, a.as_ptr(), &mut message), 0);
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 0, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, 0);

            let ranges = [
                HBitmapQcow2Extent {
                    offset: 0,
                    length: 100,
                },
                HBitmapQcow2Extent {
                    offset: 5 << 20,
                    length: 1 << 20,
                },
            ];
            let auto = HBITMAP_QCOW2_BITMAP_AUTO;
            assert_eq!(
                hbitmap_qcow2_import(
                    image,
                    c.as_ptr(),
                    65536,
                    ranges.as_ptr(),
                    2,
                    auto,
                    &mut message
                ),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 2, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, (1 << 16) + (1 << 20));
            assert_eq!(
                hbitmap_qcow2_import(image, d.as_ptr(), 0, ptr::null(), 0, 0, &mut message),
                0
            );

            // Merging from another handle, and from the same one through merge_from.
            let other = memory_handle(size);
            let flags = 0;
            assert_eq!(
                hbitmap_qcow2_import(
                    other,
                    a.as_ptr(),
                    0,
                    ranges.as_ptr(),
                    1,
                    flags,
                    &mut message
                ),
                0
            );
            assert_eq!(
                hbitmap_qcow2_merge_from(image, other, a.as_ptr(), d.as_ptr(), &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 3, &mut bytes, &mut message),
                0
            );
            // The first 100 bytes, at the default granularity of an image of 512-byte clusters.
            assert_eq!(bytes, 4096);
            assert_eq!(
                hbitmap_qcow2_merge_from(image, image, c.as_ptr(), d.as_ptr(), &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_bitmap_dirty_bytes(image, 3, &mut bytes, &mut message),
                0
            );
            assert_eq!(bytes, (1 << 16) + (1 << 20));
            assert_eq!(hbitmap_qcow2_close(other, &mut message), 0);

            assert_eq!(hbitmap_qcow2_remove(image, d.as_ptr(), &mut message), 0);
            assert_eq!(hbitmap_qcow2_bitmap_count(image), 3);
            let mut result: HBitmapQcow2CheckResult = std::mem::zeroed();
            let mut findings: *mut c_char = ptr::null_mut();
            assert_eq!(
                hbitmap_qcow2_check(image, &mut result, &mut findings, &mut message),
                0
            );
            assert_eq!((result.corruptions, result.leaks), (0, 0));
            let text = take_message(findings);
            assert!(!text.contains("ERROR"), "{text}");
            findings = ptr::null_mut();
            assert_eq!(
                hbitmap_qcow2_repair(
                    image,
                    HBITMAP_QCOW2_REPAIR_ALL,
                    &mut result,
                    &mut findings,
                    &mut message
                ),
                0
            );
            assert_eq!(result.corruptions_fixed, 0);
            let _ = take_message(findings);
            assert_eq!(
                hbitmap_qcow2_repair(image, 7, &mut result, ptr::null_mut(), &mut message),
                -libc::EINVAL
            );
            let _ = take_message(message);
            message = ptr::null_mut();
            assert_eq!(hbitmap_qcow2_close(image, &mut message), 0);
            assert!(message.is_null());
            assert_eq!(hbitmap_qcow2_close(ptr::null_mut(), ptr::null_mut()), 0);
        }
    }

    /// A panic poisons a handle on an image in memory too (Miri runs this one): the handle
    /// refuses every call, and so does a merge from it into a healthy handle.
    #[test]
    fn a_panic_poisons_a_handle_in_memory() {
        let bytes = crate::qcow2::create::build(1 << 20, 512).unwrap();
        let io = PanickingIo {
            inner: crate::qcow2::io::MemIo::new(bytes),
            armed: true,
        };
        let poisoned = HBitmapQcow2::new(Image::open_io(Box::new(io), "memory", true).unwrap());
        let healthy = memory_handle(1 << 20);
        let a = CString::new("a").unwrap();
        let mut message: *mut c_char = ptr::null_mut();
        // SAFETY: live handles and valid pointers, as a C caller would pass them.
        unsafe {
            assert_eq!(
                hbitmap_qcow2_add(poisoned, a.as_ptr(), 65536, true, &mut message),
                -libc::EIO
            );
            assert!(take_message(message).contains("internal error"));
            message = ptr::null_mut();
            assert_eq!(
                hbitmap_qcow2_add(healthy, a.as_ptr(), 65536, true, &mut message),
                0
            );
            assert_eq!(
                hbitmap_qcow2_merge_from(healthy, poisoned, a.as_ptr(), a.as_ptr(), &mut message),
                -libc::EIO
            );
            assert!(take_message(message).contains("earlier call"));
            assert_eq!(hbitmap_qcow2_close(poisoned, ptr::null_mut()), 0);
            assert_eq!(hbitmap_qcow2_close(healthy, ptr::null_mut()), 0);
        }
    }

    /// Opening and creating by path: the path is read from C's string and a failure reported
    /// through `errmsg`, with the output left unwritten.
    // Miri cannot open files the way the library does (O_NONBLOCK, for FIFOs).
    #[cfg_attr(miri, ignore)]
    #[test]
    fn open_and_create_report_failures() {
        let path = CString::new("/nonexistent-directory/hbitmap/a.qcow2").unwrap();
        let mut message: *mut c_char = ptr::null_mut();
        let mut image: *mut HBitmapQcow2 = ptr::null_mut();
        // SAFETY: a NUL-terminated path and writable outputs.
        unsafe {
            for flags in [0, HBITMAP_QCOW2_OPEN_FORCE_SHARE, HBITMAP_QCOW2_OPEN_WRITE] {
                let ret = hbitmap_qcow2_open(path.as_ptr(), flags, &mut image, &mut message);
                assert_eq!(ret, -libc::ENOENT);
                assert!(image.is_null());
                assert!(take_message(message).contains("a.qcow2"));
                message = ptr::null_mut();
            }
            let ret = hbitmap_qcow2_create(path.as_ptr(), 1 << 20, 65536, &mut image, &mut message);
            assert_eq!(ret, -libc::ENOENT);
            assert!(image.is_null());
            assert!(take_message(message).contains("a.qcow2"));
        }
    }

    /// A panic in the middle of a change poisons the handle: every later call is refused with
    /// -EIO instead of working from a half-updated layout; closing still frees it.
    // Files and QEMU's fcntl locks: Miri runs neither (the in-memory test above covers the
    // same pointers but for the poisoned handle's).
    #[cfg_attr(miri, ignore)]
    #[test]
    fn a_panic_poisons_the_handle() {
        let dir = std::env::temp_dir().join(format!("hbq-ffi-poison-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.qcow2");
        let size = 16 << 20;
        let mut image = Image::create(&path, size, 65536).unwrap();
        image.add_bitmap("a", 65536, true).unwrap();
        image.close().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let io = PanickingIo {
            inner: FileIo::new(file),
            armed: true,
        };
        let image = Image::open_io(Box::new(io), &path, true).unwrap();
        let handle = HBitmapQcow2::new(image);
        let a = CString::new("a").unwrap();
        let b = CString::new("b").unwrap();
        let mut message: *mut c_char = ptr::null_mut();
        // SAFETY: a live handle and valid pointers, as a C caller would pass them.
        unsafe {
            assert_eq!(
                hbitmap_qcow2_add(handle, b.as_ptr(), 65536, true, &mut message),
                -libc::EIO
            );
            assert!(take_message(message).contains("internal error"));
            message = ptr::null_mut();
            assert_eq!(hbitmap_qcow2_bitmap_count(handle), 0);
            let mut info: HBitmapQcow2BitmapInfo = std::mem::zeroed();
            assert_eq!(
                hbitmap_qcow2_bitmap_info(handle, 0, &mut info, &mut message),
                -libc::EIO
            );
            let text = take_message(message);
            assert!(text.contains("earlier call"), "{text}");
            message = ptr::null_mut();
            let mut out: *mut HBitmap = ptr::null_mut();
            assert_eq!(
                hbitmap_qcow2_inspect(handle, a.as_ptr(), &mut out, ptr::null_mut()),
                -libc::EIO
            );
            assert_eq!(
                hbitmap_qcow2_remove(handle, a.as_ptr(), &mut message),
                -libc::EIO
            );
            assert!(take_message(message).contains("earlier call"));
            assert!(out.is_null());
            assert_eq!(hbitmap_qcow2_close(handle, ptr::null_mut()), 0);
        }
        // The image itself is untouched: the panic came before any write.
        let image = Image::open(&path, crate::qcow2::OpenOptions::default()).unwrap();
        assert_eq!(image.bitmaps().len(), 1);
        drop(image);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `hbitmap_qcow2_repair` mode: free leaked clusters (`qemu-img check -r leaks`).
pub const HBITMAP_QCOW2_REPAIR_LEAKS: u32 = 1;
/// `hbitmap_qcow2_repair` mode: also remove every bitmap that cannot be trusted (in use after a
/// crash, damaged, cross-linked) and a stale bitmaps extension (`-r all`).
pub const HBITMAP_QCOW2_REPAIR_ALL: u32 = 2;

/// What `hbitmap_qcow2_check` and `hbitmap_qcow2_repair` found, with `qemu-img check`'s
/// meanings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HBitmapQcow2CheckResult {
    /// Clusters whose refcount is below their references, plus every other error found.
    pub corruptions: u64,
    /// Clusters whose refcount is above their references.
    pub leaks: u64,
    /// Errors that stopped the check (I/O).
    pub check_errors: u64,
    /// End of the last cluster in use or counted (0 when the references could not be counted).
    pub image_end_offset: u64,
    /// After a repair: leaked clusters freed (0 for a check).
    pub leaks_fixed: u64,
    /// After a repair: bitmaps removed and extension problems dropped (0 for a check).
    pub corruptions_fixed: u64,
    /// Bitmaps marked in use.
    pub in_use_bitmaps: u32,
    /// Bitmaps with a broken entry, table or a cross-link.
    pub damaged_bitmaps: u32,
    /// The bitmaps extension is stale (the image has no usable bitmaps).
    pub stale_extension: bool,
    /// The bitmaps extension or its directory is unreadable or cross-linked.
    pub broken_extension: bool,
}

fn check_result(report: &crate::qcow2::CheckReport) -> HBitmapQcow2CheckResult {
    HBitmapQcow2CheckResult {
        corruptions: report.corruptions,
        leaks: report.leaks,
        check_errors: report.check_errors,
        image_end_offset: report.image_end_offset.unwrap_or(0),
        leaks_fixed: 0,
        corruptions_fixed: 0,
        in_use_bitmaps: report.in_use_bitmaps.len() as u32,
        damaged_bitmaps: report.damaged_bitmaps.len() as u32,
        stale_extension: report.stale_extension,
        broken_extension: report.broken_extension,
    }
}

/// The findings as text, one per line (ERROR, WARNING, LEAK, NOTE), then the changes of a
/// repair (REPAIRED).
fn findings_text(report: &crate::qcow2::CheckReport, changes: &[String]) -> String {
    let mut text = String::new();
    for change in changes {
        text.push_str(&format!("REPAIRED: {change}\n"));
    }
    text.push_str(&report.to_string());
    text
}

/// Stores a malloc'd copy of `text` in `*out` when `out` is not NULL.
///
/// # Safety
/// `out` is NULL or valid for writing one pointer.
unsafe fn put_text(out: *mut *mut c_char, text: &str) {
    // SAFETY: the caller's contract; set_errmsg copies any string with malloc.
    unsafe { set_errmsg(out, text) };
}

/// Checks the image behind an open handle from the file, as `qemu-img check` does: the
/// refcount of every cluster against its references (leaks, corruptions) and every bitmap.
/// Never writes. `*result` receives the counts; when `findings` is not NULL, `*findings`
/// receives every finding as text, one per line (free it with `free`). A consistent image with
/// bitmaps in use or a stale extension returns 0 with `corruptions` and `leaks` 0: those are
/// states, not damage.
///
/// # Safety
/// `image` is a live handle; `result` is valid for writing; `findings` and `errmsg` are NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_check(
    image: *const HBitmapQcow2,
    result: *mut HBitmapQcow2CheckResult,
    findings: *mut *mut c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_check";
    if result.is_null() {
        null_pointer(F, "result");
    }
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_ref(F, errmsg, handle, |image| {
            let report = image.check();
            put(F, "result", result, check_result(&report));
            put_text(findings, &findings_text(&report, &[]));
            Ok(())
        })
    }
}

/// Repairs the image behind a handle open for writing, as `qemu-img check -r` does: `mode` is
/// `HBITMAP_QCOW2_REPAIR_LEAKS` or `HBITMAP_QCOW2_REPAIR_ALL`. Bitmaps this handle loaded and
/// marks in use stay (they are in use for a reason). Refused with -ENOTSUP, nothing written,
/// when the clusters in use cannot be known completely (damaged metadata other than the
/// bitmaps', a dirty or corrupt image, and for `LEAKS` damaged bitmaps); -EROFS on a read-only
/// handle. Crash-consistent. `*result` receives the check made after the repair with the
/// counts fixed; `*findings` (when not NULL) every change made and what that check found.
///
/// # Safety
/// `image` is a live handle; `result` is valid for writing; `findings` and `errmsg` are NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_qcow2_repair(
    image: *mut HBitmapQcow2,
    mode: u32,
    result: *mut HBitmapQcow2CheckResult,
    findings: *mut *mut c_char,
    errmsg: *mut *mut c_char,
) -> c_int {
    const F: &str = "hbitmap_qcow2_repair";
    if result.is_null() {
        null_pointer(F, "result");
    }
    // SAFETY: the caller's contract.
    let handle = unsafe { borrow_mut(F, "image", image) };
    // SAFETY: the caller's contract.
    unsafe {
        guarded_mut(F, errmsg, handle, |image| {
            let mode = match mode {
                HBITMAP_QCOW2_REPAIR_LEAKS => crate::qcow2::RepairMode::Leaks,
                HBITMAP_QCOW2_REPAIR_ALL => crate::qcow2::RepairMode::All,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown repair mode {other}"
                    )))
                }
            };
            let repaired = image.repair(mode)?;
            let mut counts = check_result(&repaired.after);
            counts.leaks_fixed = repaired.leaks_fixed;
            counts.corruptions_fixed = repaired.corruptions_fixed;
            put(F, "result", result, counts);
            put_text(findings, &findings_text(&repaired.after, &repaired.changes));
            Ok(())
        })
    }
}
