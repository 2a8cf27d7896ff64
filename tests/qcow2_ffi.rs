// SPDX-License-Identifier: GPL-2.0-or-later

//! The C ABI of the qcow2 layer, called as C would call it.
mod qcow2_util;

use std::ffi::{CStr, CString};
use std::ptr;

use hbitmap::ffi::*;
use hbitmap::HBitmap;
use hbitmap_testkit::Rng;
use libc::c_char;
use qcow2_util::*;

fn take_message(message: *mut c_char) -> String {
    assert!(!message.is_null());
    // SAFETY: set by the library to a malloc'd NUL-terminated string.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: malloc'd by the library, freed once.
    unsafe { libc::free(message.cast()) };
    text
}

#[test]
fn c_abi_roundtrip() {
    let s = Scratch::new("ffi");
    let path = CString::new(s.path("a.qcow2").to_str().unwrap()).unwrap();
    let size: u64 = 64 << 20;
    let mut image: *mut HBitmapQcow2 = ptr::null_mut();
    let mut message: *mut c_char = ptr::null_mut();
    // SAFETY: valid pointers throughout, as a C caller would pass them.
    unsafe {
        assert_eq!(
            hbitmap_qcow2_create(path.as_ptr(), size, 65536, &mut image, &mut message),
            0
        );
        assert!(message.is_null());
        assert_eq!(hbitmap_qcow2_virtual_size(image), size);
        let name = CString::new("b0").unwrap();
        assert_eq!(
            hbitmap_qcow2_add(image, name.as_ptr(), 65536, true, ptr::null_mut()),
            0
        );
        let bitmap = hbitmap_alloc(size, 12);
        hbitmap_set(bitmap, 4096 * 10, 4096 * 3);
        let other = CString::new("b1").unwrap();
        assert_eq!(
            hbitmap_qcow2_store(
                image,
                other.as_ptr(),
                bitmap,
                HBITMAP_QCOW2_BITMAP_AUTO,
                &mut message
            ),
            0
        );
        hbitmap_free(bitmap);
        assert_eq!(hbitmap_qcow2_bitmap_count(image), 2);
        let mut info: HBitmapQcow2BitmapInfo = std::mem::zeroed();
        assert_eq!(
            hbitmap_qcow2_bitmap_info(image, 1, &mut info, ptr::null_mut()),
            0
        );
        assert_eq!(CStr::from_ptr(info.name.as_ptr()).to_str().unwrap(), "b1");
        assert_eq!(
            (info.granularity, info.auto_, info.in_use, info.bitmap_type),
            (4096, true, false, 1)
        );
        assert_eq!(
            hbitmap_qcow2_bitmap_info(image, 2, &mut info, &mut message),
            -libc::ENOENT
        );
        take_message(message);
        message = ptr::null_mut();

        // Errors: a duplicate name, an unknown bitmap, a bad granularity.
        assert_eq!(
            hbitmap_qcow2_add(image, name.as_ptr(), 65536, true, &mut message),
            -libc::EEXIST
        );
        assert!(take_message(message).contains("b0"));
        message = ptr::null_mut();
        let missing = CString::new("nope").unwrap();
        let mut out: *mut HBitmap = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_load(image, missing.as_ptr(), &mut out, &mut message),
            -libc::ENOENT
        );
        assert!(out.is_null(), "outputs are written only on success");
        take_message(message);
        message = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_add(image, missing.as_ptr(), 100, true, &mut message),
            -libc::EINVAL
        );
        take_message(message);
        message = ptr::null_mut();

        assert_eq!(
            hbitmap_qcow2_merge(image, other.as_ptr(), name.as_ptr(), ptr::null_mut()),
            0
        );
        assert_eq!(
            hbitmap_qcow2_set_enabled(image, name.as_ptr(), false, ptr::null_mut()),
            0
        );
        assert_eq!(
            hbitmap_qcow2_inspect(image, name.as_ptr(), &mut out, ptr::null_mut()),
            0
        );
        assert_eq!(hbitmap_count(out), 65536);
        hbitmap_free(out);
        out = ptr::null_mut();
        // Load marks the bitmap in use; a second load is refused.
        assert_eq!(
            hbitmap_qcow2_load(image, other.as_ptr(), &mut out, ptr::null_mut()),
            0
        );
        assert_eq!(hbitmap_count(out), 3 * 4096);
        assert_eq!(
            hbitmap_qcow2_load(image, other.as_ptr(), &mut ptr::null_mut(), &mut message),
            -libc::EBUSY
        );
        assert!(take_message(message).contains("in use"));
        message = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_store(image, other.as_ptr(), out, 0, ptr::null_mut()),
            0
        );
        hbitmap_free(out);
        assert_eq!(
            hbitmap_qcow2_clear(image, other.as_ptr(), ptr::null_mut()),
            0
        );
        assert_eq!(
            hbitmap_qcow2_remove(image, name.as_ptr(), ptr::null_mut()),
            0
        );
        assert_eq!(hbitmap_qcow2_bitmap_count(image), 1);
        assert_eq!(hbitmap_qcow2_close(image, ptr::null_mut()), 0);

        // Locked out while another handle writes.
        let mut writer: *mut HBitmapQcow2 = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_open(
                path.as_ptr(),
                HBITMAP_QCOW2_OPEN_WRITE,
                &mut writer,
                ptr::null_mut()
            ),
            0
        );
        let mut reader: *mut HBitmapQcow2 = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_open(path.as_ptr(), 0, &mut reader, &mut message),
            -libc::EAGAIN
        );
        assert!(reader.is_null());
        take_message(message);
        message = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_open(
                path.as_ptr(),
                HBITMAP_QCOW2_OPEN_FORCE_SHARE,
                &mut reader,
                ptr::null_mut()
            ),
            0
        );
        let empty = hbitmap_alloc(size, 16);
        assert_eq!(
            hbitmap_qcow2_store(reader, name.as_ptr(), empty, 0, &mut message),
            -libc::EROFS
        );
        assert!(take_message(message).contains("read-only"));
        message = ptr::null_mut();
        hbitmap_free(empty);
        hbitmap_qcow2_close(reader, ptr::null_mut());
        hbitmap_qcow2_close(writer, ptr::null_mut());

        // A file that is not qcow2.
        let junk = s.path("junk");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let junk = CString::new(junk.to_str().unwrap()).unwrap();
        assert_eq!(
            hbitmap_qcow2_open(junk.as_ptr(), 0, &mut reader, &mut message),
            -libc::EINVAL
        );
        assert!(take_message(message).contains("not a qcow2 image"));
    }
    if have("qemu-img") {
        qemu_check(&s.path("a.qcow2"), false);
    }
}

/// Opens `path` through the C ABI, writable.
///
/// # Safety
/// None beyond the C ABI's own contract; `unsafe` for the calls.
unsafe fn open_writable(path: &CString) -> *mut HBitmapQcow2 {
    let mut image: *mut HBitmapQcow2 = ptr::null_mut();
    // SAFETY: valid pointers.
    let code = unsafe {
        hbitmap_qcow2_open(
            path.as_ptr(),
            HBITMAP_QCOW2_OPEN_WRITE,
            &mut image,
            ptr::null_mut(),
        )
    };
    assert_eq!(code, 0);
    image
}

/// (in use, dirty bytes) of bitmap `name` as the Rust API reads the file.
fn on_disk(path: &std::path::Path, name: &str) -> (bool, u64) {
    let image = hbitmap::qcow2::Image::open(path, hbitmap::qcow2::OpenOptions::default()).unwrap();
    let in_use = image.bitmap(name).unwrap().in_use;
    (in_use, image.inspect_bitmap(name).unwrap().count())
}

/// A bitmap loaded for tracking from a writable handle and not stored: closing cannot know
/// whether the caller tracked writes in it, so the bitmap stays in use and close says so
/// (-EBUSY, naming it); released (no write tracked) it is consistent again with its content;
/// stored, it is consistent with the new content.
#[test]
fn c_abi_close_reports_loaded_bitmaps_left_in_use() {
    let s = Scratch::new("ffi-close");
    let file = s.path("a.qcow2");
    let path = CString::new(file.to_str().unwrap()).unwrap();
    let size: u64 = 16 << 20;
    let mut image = hbitmap::qcow2::Image::create(&file, size, 65536).unwrap();
    let mut content = HBitmap::new(size, 16).unwrap();
    content.set(1 << 20, 3 << 16);
    for name in ["left", "released", "stored"] {
        image
            .store_bitmap(name, &content, hbitmap::qcow2::BitmapFlags::default())
            .unwrap();
    }
    image.close().unwrap();
    let names: Vec<CString> = ["left", "released", "stored", "never-loaded"]
        .iter()
        .map(|n| CString::new(*n).unwrap())
        .collect();
    let mut message: *mut c_char = ptr::null_mut();
    // SAFETY: valid pointers throughout, as a C caller would pass them.
    unsafe {
        let image = open_writable(&path);
        let mut loaded = [ptr::null_mut(); 3];
        for (name, out) in names.iter().zip(loaded.iter_mut()) {
            assert_eq!(
                hbitmap_qcow2_load(image, name.as_ptr(), out, ptr::null_mut()),
                0
            );
        }
        // Only a mark this handle set can be released.
        assert_eq!(
            hbitmap_qcow2_release(image, names[1].as_ptr(), ptr::null_mut()),
            0
        );
        hbitmap_set(loaded[2], 0, 4096);
        assert_eq!(
            hbitmap_qcow2_store(image, names[2].as_ptr(), loaded[2], 0, ptr::null_mut()),
            0
        );
        for bitmap in loaded {
            hbitmap_free(bitmap);
        }
        assert_eq!(hbitmap_qcow2_close(image, &mut message), -libc::EBUSY);
        let text = take_message(message);
        assert!(
            text.contains("'left'") && !text.contains("'released'") && !text.contains("'stored'"),
            "{text}"
        );
        message = ptr::null_mut();

        // A mark found on disk (not set through this handle) is not released.
        let image = open_writable(&path);
        assert_eq!(
            hbitmap_qcow2_release(image, names[0].as_ptr(), &mut message),
            -libc::EINVAL
        );
        assert!(take_message(message).contains("not loaded through this handle"));
        // Nothing loaded: close succeeds.
        assert_eq!(hbitmap_qcow2_close(image, ptr::null_mut()), 0);
    }
    assert_eq!(on_disk(&file, "left"), (true, 3 << 16));
    assert_eq!(on_disk(&file, "released"), (false, 3 << 16));
    assert_eq!(on_disk(&file, "stored"), (false, (3 << 16) + 65536));
    if have("qemu-img") {
        let info = run(
            "qemu-img",
            &["info", "--output=json", file.to_str().unwrap()],
        );
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(text.contains("\"in-use\""), "{text}");
        qemu_check(&file, false);
    }
}

/// Names through the C ABI are the bytes of a C string, UTF-8 or not, as QEMU's own are.
#[test]
fn c_abi_names_are_bytes() {
    let s = Scratch::new("ffi-names");
    let path = CString::new(s.path("a.qcow2").to_str().unwrap()).unwrap();
    let size: u64 = 16 << 20;
    let mut image: *mut HBitmapQcow2 = ptr::null_mut();
    let mut message: *mut c_char = ptr::null_mut();
    let odd = CString::new(&b"tab\t\xff\xfe"[..]).unwrap();
    let missing = CString::new(&b"\xff"[..]).unwrap();
    // SAFETY: valid pointers throughout, as a C caller would pass them.
    unsafe {
        assert_eq!(
            hbitmap_qcow2_create(path.as_ptr(), size, 65536, &mut image, ptr::null_mut()),
            0
        );
        assert_eq!(
            hbitmap_qcow2_add(image, odd.as_ptr(), 65536, true, &mut message),
            0,
            "{}",
            if message.is_null() {
                String::new()
            } else {
                take_message(message)
            }
        );
        let mut info: HBitmapQcow2BitmapInfo = std::mem::zeroed();
        assert_eq!(
            hbitmap_qcow2_bitmap_info(image, 0, &mut info, ptr::null_mut()),
            0
        );
        assert_eq!(
            CStr::from_ptr(info.name.as_ptr()).to_bytes(),
            b"tab\t\xff\xfe"
        );
        let mut bitmap: *mut HBitmap = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_inspect(image, odd.as_ptr(), &mut bitmap, ptr::null_mut()),
            0
        );
        hbitmap_free(bitmap);
        assert_eq!(
            hbitmap_qcow2_remove(image, missing.as_ptr(), &mut message),
            -libc::ENOENT
        );
        assert_eq!(
            take_message(message),
            "no bitmap named '\\xff' in the image"
        );
        assert_eq!(
            hbitmap_qcow2_remove(image, odd.as_ptr(), ptr::null_mut()),
            0
        );
        assert_eq!(hbitmap_qcow2_bitmap_count(image), 0);
        assert_eq!(hbitmap_qcow2_close(image, ptr::null_mut()), 0);
    }
}

/// Check and repair through the C ABI, on a handle a hypervisor holds: the bitmap it loaded
/// (in use for a reason) stays, the one a crash left in use goes, leaked clusters are freed;
/// a read-only handle and an unknown mode are refused.
#[test]
fn c_abi_check_and_repair() {
    use hbitmap::qcow2::io::{CrashIo, FileIo};
    use hbitmap::qcow2::{Image, OpenOptions};
    use std::sync::atomic::Ordering;

    let s = Scratch::new("ffi-repair");
    let path = s.path("a.qcow2");
    let size: u64 = 64 << 20;
    let mut rng = Rng::new(61);
    let content = random_bitmap(&mut rng, size, 12, 30);
    let mut image = Image::create(&path, size, 65536).unwrap();
    image.store_bitmap("mine", &content, AUTO).unwrap();
    image.store_bitmap("crashed", &content, AUTO).unwrap();
    image.close().unwrap();
    let rw = OpenOptions {
        write: true,
        force_share: false,
    };
    // 'crashed' loaded and never stored; then a store interrupted before its header: leaks.
    let _ = Image::open(&path, rw)
        .unwrap()
        .load_bitmap("crashed")
        .unwrap();
    let io = CrashIo::new(FileIo::new(rw_file(&path)), u64::MAX);
    let writes = io.writes();
    let mut image = Image::open_io(Box::new(io), &path, true).unwrap();
    image.store_bitmap("lost", &content, AUTO).unwrap();
    drop(image);
    let writes = writes.load(Ordering::SeqCst);
    Image::open(&path, rw)
        .unwrap()
        .remove_bitmap("lost")
        .unwrap();
    let io = CrashIo::new(FileIo::new(rw_file(&path)), writes - 2);
    let mut image = Image::open_io(Box::new(io), &path, true).unwrap();
    assert!(image.store_bitmap("lost", &content, AUTO).is_err());
    drop(image);

    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    let mine = CString::new("mine").unwrap();
    let mut handle: *mut HBitmapQcow2 = ptr::null_mut();
    let mut message: *mut c_char = ptr::null_mut();
    let mut findings: *mut c_char = ptr::null_mut();
    let mut result = HBitmapQcow2CheckResult::default();
    // SAFETY: valid pointers throughout, as a C caller would pass them.
    unsafe {
        // Read-only: check works, repair is refused.
        assert_eq!(
            hbitmap_qcow2_open(c_path.as_ptr(), 0, &mut handle, &mut message),
            0
        );
        assert_eq!(
            hbitmap_qcow2_check(handle, &mut result, &mut findings, &mut message),
            0
        );
        let text = take_message(findings);
        assert!(result.leaks > 0, "{result:?}");
        assert_eq!(
            (result.corruptions, result.in_use_bitmaps),
            (0, 1),
            "{text}"
        );
        assert!(
            text.contains("LEAK: ") && text.contains("'crashed' is in use"),
            "{text}"
        );
        assert_eq!(
            hbitmap_qcow2_repair(
                handle,
                HBITMAP_QCOW2_REPAIR_ALL,
                &mut result,
                ptr::null_mut(),
                &mut message
            ),
            -libc::EROFS
        );
        assert!(take_message(message).contains("read-only"));
        message = ptr::null_mut();
        assert_eq!(hbitmap_qcow2_close(handle, ptr::null_mut()), 0);

        // Writable, with 'mine' loaded (so in use through this handle).
        assert_eq!(
            hbitmap_qcow2_open(
                c_path.as_ptr(),
                HBITMAP_QCOW2_OPEN_WRITE,
                &mut handle,
                &mut message
            ),
            0
        );
        let mut loaded: *mut HBitmap = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_load(handle, mine.as_ptr(), &mut loaded, &mut message),
            0
        );
        assert_eq!(
            hbitmap_qcow2_repair(handle, 3, &mut result, ptr::null_mut(), &mut message),
            -libc::EINVAL
        );
        assert!(take_message(message).contains("unknown repair mode 3"));
        message = ptr::null_mut();
        assert_eq!(
            hbitmap_qcow2_repair(
                handle,
                HBITMAP_QCOW2_REPAIR_ALL,
                &mut result,
                &mut findings,
                &mut message
            ),
            0,
            "{}",
            if message.is_null() {
                String::new()
            } else {
                take_message(message)
            }
        );
        let text = take_message(findings);
        assert!(
            text.contains("REPAIRED: removed bitmap 'crashed'") && !text.contains("'mine':"),
            "{text}"
        );
        assert!(result.leaks_fixed > 0, "{result:?}");
        // In use is a state, not damage: removed, but not counted as a corruption fixed.
        assert_eq!(result.corruptions_fixed, 0);
        assert_eq!((result.leaks, result.corruptions), (0, 0), "{text}");
        // 'mine' is still the handle's: storing it clears the mark.
        assert_eq!(result.in_use_bitmaps, 1);
        assert_eq!(
            hbitmap_qcow2_store(
                handle,
                mine.as_ptr(),
                loaded,
                HBITMAP_QCOW2_BITMAP_AUTO,
                &mut message
            ),
            0
        );
        hbitmap_free(loaded);
        assert_eq!(
            hbitmap_qcow2_check(handle, &mut result, ptr::null_mut(), &mut message),
            0
        );
        assert_eq!(
            (result.leaks, result.corruptions, result.in_use_bitmaps),
            (0, 0, 0),
            "{result:?}"
        );
        assert_eq!(hbitmap_qcow2_close(handle, &mut message), 0);
    }
    let image = Image::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(image.bitmaps().len(), 1);
    assert_eq!(image.inspect_bitmap("mine").unwrap(), content);
    if have("qemu-img") {
        qemu_check(&path, false);
    }
}
