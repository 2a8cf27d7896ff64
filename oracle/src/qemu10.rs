// SPDX-License-Identifier: GPL-2.0-or-later

//! QEMU 10.0.2's `util/hbitmap.c` (current QEMU's API, unchanged since QEMU 7.2), built by
//! `../shared/reference/build-qemu10.sh` or, without it, by `tests/qemu10/build-oracle.sh`
//! (from Debian's qemu source tarball), with every name prefixed `qemu10_`.
//!
//! [`AVAILABLE_QEMU10`] says whether it was built; when it was not, [`MISSING_QEMU10`] says
//! why, the functions below are stubs that panic, and tests must skip.

use libc::{c_char, c_int, c_void};

/// Whether QEMU 10's implementation is linked in.
pub const AVAILABLE_QEMU10: bool = cfg!(oracle_qemu10);

/// Why QEMU 10's implementation was not built (empty when it was).
pub const MISSING_QEMU10: &str = match option_env!("HBITMAP_ORACLE_QEMU10_MISSING") {
    Some(why) => why,
    None => "",
};

/// Opaque `Qemu10HBitmap`.
#[repr(C)]
pub struct Qemu10HBitmap {
    _private: [u8; 0],
}

/// `Qemu10HBitmapIter`: QEMU 10's `HBitmapIter`, the same layout as ours.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Qemu10HBitmapIter {
    pub hb: *const Qemu10HBitmap,
    pub granularity: c_int,
    pub pos: usize,
    pub cur: [libc::c_ulong; 7],
}

impl Default for Qemu10HBitmapIter {
    fn default() -> Self {
        Qemu10HBitmapIter {
            hb: std::ptr::null(),
            granularity: 0,
            pos: 0,
            cur: [0; 7],
        }
    }
}

/// Declares each function of QEMU 10's API: linked when it was built, and otherwise a stub that
/// panics, so that tests compile either way and call them only when [`AVAILABLE_QEMU10`].
macro_rules! qemu10_api {
    ($(fn $symbol:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        #[cfg(oracle_qemu10)]
        extern "C" {
            $(pub fn $symbol($($arg: $ty),*) $(-> $ret)?;)*
        }

        $(
            #[cfg(not(oracle_qemu10))]
            #[allow(clippy::missing_safety_doc)]
            pub unsafe extern "C" fn $symbol($($arg: $ty),*) $(-> $ret)? {
                $(let _ = $arg;)*
                unreachable!("QEMU 10's implementation was not built")
            }
        )*
    };
}

qemu10_api! {
    fn qemu10_hbitmap_alloc(size: u64, granularity: c_int) -> *mut Qemu10HBitmap;
    fn qemu10_hbitmap_free(hb: *mut Qemu10HBitmap);
    fn qemu10_hbitmap_truncate(hb: *mut Qemu10HBitmap, size: u64);
    fn qemu10_hbitmap_merge(
        a: *const Qemu10HBitmap,
        b: *const Qemu10HBitmap,
        result: *mut Qemu10HBitmap,
    );
    fn qemu10_hbitmap_empty(hb: *const Qemu10HBitmap) -> bool;
    fn qemu10_hbitmap_granularity(hb: *const Qemu10HBitmap) -> c_int;
    fn qemu10_hbitmap_count(hb: *const Qemu10HBitmap) -> u64;
    fn qemu10_hbitmap_set(hb: *mut Qemu10HBitmap, start: u64, count: u64);
    fn qemu10_hbitmap_reset(hb: *mut Qemu10HBitmap, start: u64, count: u64);
    fn qemu10_hbitmap_reset_all(hb: *mut Qemu10HBitmap);
    fn qemu10_hbitmap_get(hb: *const Qemu10HBitmap, item: u64) -> bool;
    fn qemu10_hbitmap_is_serializable(hb: *const Qemu10HBitmap) -> bool;
    fn qemu10_hbitmap_serialization_align(hb: *const Qemu10HBitmap) -> u64;
    fn qemu10_hbitmap_serialization_size(
        hb: *const Qemu10HBitmap,
        start: u64,
        count: u64,
    ) -> u64;
    fn qemu10_hbitmap_serialize_part(
        hb: *const Qemu10HBitmap,
        buf: *mut u8,
        start: u64,
        count: u64,
    );
    fn qemu10_hbitmap_deserialize_part(
        hb: *mut Qemu10HBitmap,
        buf: *mut u8,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn qemu10_hbitmap_deserialize_zeroes(
        hb: *mut Qemu10HBitmap,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn qemu10_hbitmap_deserialize_ones(
        hb: *mut Qemu10HBitmap,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn qemu10_hbitmap_deserialize_finish(hb: *mut Qemu10HBitmap);
    fn qemu10_hbitmap_sha256(hb: *const Qemu10HBitmap, errp: *mut *mut c_void) -> *mut c_char;
    fn qemu10_hbitmap_iter_init(
        hbi: *mut Qemu10HBitmapIter,
        hb: *const Qemu10HBitmap,
        first: u64,
    );
    fn qemu10_hbitmap_iter_next(hbi: *mut Qemu10HBitmapIter) -> i64;
    fn qemu10_hbitmap_next_dirty(hb: *const Qemu10HBitmap, start: i64, count: i64) -> i64;
    fn qemu10_hbitmap_next_zero(hb: *const Qemu10HBitmap, start: i64, count: i64) -> i64;
    fn qemu10_hbitmap_next_dirty_area(
        hb: *const Qemu10HBitmap,
        start: i64,
        end: i64,
        max_dirty_count: i64,
        dirty_start: *mut i64,
        dirty_count: *mut i64,
    ) -> bool;
    fn qemu10_hbitmap_status(
        hb: *const Qemu10HBitmap,
        start: i64,
        count: i64,
        pnum: *mut i64,
    ) -> bool;
}
