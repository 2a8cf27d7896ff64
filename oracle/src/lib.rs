// SPDX-License-Identifier: GPL-2.0-or-later

//! The original C `util/hbitmap.c`, prefixed `qemu_`, as an oracle for differential tests;
//! QEMU 10.0.2's, prefixed `qemu10_`, in [`qemu10`].
//!
//! [`AVAILABLE`] says whether the original was built; when it was not (no
//! `../shared/reference`), the functions below are stubs that panic and tests must skip.

#![allow(clippy::missing_safety_doc)]

/// Whether the reference implementation is linked in.
pub const AVAILABLE: bool = cfg!(oracle);

/// Opaque `QemuHBitmap`.
#[repr(C)]
pub struct QemuHBitmap {
    _private: [u8; 0],
}

/// `QemuHBitmapIter`: the same layout as `HBitmapIter`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct QemuHBitmapIter {
    pub hb: *const QemuHBitmap,
    pub granularity: libc::c_int,
    pub pos: usize,
    pub cur: [libc::c_ulong; 7],
}

impl Default for QemuHBitmapIter {
    fn default() -> Self {
        QemuHBitmapIter {
            hb: std::ptr::null(),
            granularity: 0,
            pos: 0,
            cur: [0; 7],
        }
    }
}

/// Declares each function of the original: linked when the reference was built, and otherwise
/// a stub that panics, so that tests compile either way and call them only when [`AVAILABLE`].
macro_rules! reference_api {
    ($(fn $name:ident = $symbol:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        #[cfg(oracle)]
        extern "C" {
            $(pub fn $symbol($($arg: $ty),*) $(-> $ret)?;)*
        }

        $(
            #[cfg(not(oracle))]
            #[allow(clippy::missing_safety_doc)]
            pub unsafe extern "C" fn $symbol($($arg: $ty),*) $(-> $ret)? {
                $(let _ = $arg;)*
                unreachable!("the reference implementation was not built")
            }
        )*
    };
}

use libc::{c_char, c_int, c_ulong, c_void};

reference_api! {
    fn alloc = qemu_hbitmap_alloc(size: u64, granularity: c_int) -> *mut QemuHBitmap;
    fn free = qemu_hbitmap_free(hb: *mut QemuHBitmap);
    fn truncate = qemu_hbitmap_truncate(hb: *mut QemuHBitmap, size: u64);
    fn merge = qemu_hbitmap_merge(
        a: *const QemuHBitmap,
        b: *const QemuHBitmap,
        result: *mut QemuHBitmap,
    ) -> bool;
    fn can_merge = qemu_hbitmap_can_merge(a: *const QemuHBitmap, b: *const QemuHBitmap) -> bool;
    fn empty = qemu_hbitmap_empty(hb: *const QemuHBitmap) -> bool;
    fn granularity = qemu_hbitmap_granularity(hb: *const QemuHBitmap) -> c_int;
    fn count = qemu_hbitmap_count(hb: *const QemuHBitmap) -> u64;
    fn set = qemu_hbitmap_set(hb: *mut QemuHBitmap, start: u64, count: u64);
    fn reset = qemu_hbitmap_reset(hb: *mut QemuHBitmap, start: u64, count: u64);
    fn reset_all = qemu_hbitmap_reset_all(hb: *mut QemuHBitmap);
    fn get = qemu_hbitmap_get(hb: *const QemuHBitmap, item: u64) -> bool;
    fn is_serializable = qemu_hbitmap_is_serializable(hb: *const QemuHBitmap) -> bool;
    fn serialization_align = qemu_hbitmap_serialization_align(hb: *const QemuHBitmap) -> u64;
    fn serialization_size = qemu_hbitmap_serialization_size(
        hb: *const QemuHBitmap,
        start: u64,
        count: u64,
    ) -> u64;
    fn serialize_part = qemu_hbitmap_serialize_part(
        hb: *const QemuHBitmap,
        buf: *mut u8,
        start: u64,
        count: u64,
    );
    fn deserialize_part = qemu_hbitmap_deserialize_part(
        hb: *mut QemuHBitmap,
        buf: *mut u8,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn deserialize_zeroes = qemu_hbitmap_deserialize_zeroes(
        hb: *mut QemuHBitmap,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn deserialize_ones = qemu_hbitmap_deserialize_ones(
        hb: *mut QemuHBitmap,
        start: u64,
        count: u64,
        finish: bool,
    );
    fn deserialize_finish = qemu_hbitmap_deserialize_finish(hb: *mut QemuHBitmap);
    fn sha256 = qemu_hbitmap_sha256(hb: *const QemuHBitmap, errp: *mut *mut c_void) -> *mut c_char;
    fn iter_init = qemu_hbitmap_iter_init(
        hbi: *mut QemuHBitmapIter,
        hb: *const QemuHBitmap,
        first: u64,
    );
    fn iter_skip_words = qemu_hbitmap_iter_skip_words(hbi: *mut QemuHBitmapIter) -> c_ulong;
    fn iter_next = qemu_hbitmap_iter_next(hbi: *mut QemuHBitmapIter, advance: bool) -> i64;
    fn next_zero = qemu_hbitmap_next_zero(hb: *const QemuHBitmap, start: u64, count: u64) -> i64;
    fn next_dirty_area = qemu_hbitmap_next_dirty_area(
        hb: *const QemuHBitmap,
        start: *mut u64,
        count: *mut u64,
    ) -> bool;
    fn create_meta = qemu_hbitmap_create_meta(hb: *mut QemuHBitmap, chunk_size: c_int)
        -> *mut QemuHBitmap;
    fn free_meta = qemu_hbitmap_free_meta(hb: *mut QemuHBitmap);
}

pub mod qemu10;

/// The header's `static inline hbitmap_iter_next_word`, over the reference's `skip_words`.
///
/// # Safety
/// `hbi` must have been initialized by `qemu_hbitmap_iter_init` on a live bitmap.
pub unsafe fn qemu_hbitmap_iter_next_word(
    hbi: &mut QemuHBitmapIter,
    p_cur: &mut libc::c_ulong,
) -> usize {
    let mut cur = hbi.cur[6];
    if cur == 0 {
        // SAFETY: the caller guarantees `hbi` is initialized on a live bitmap.
        cur = unsafe { qemu_hbitmap_iter_skip_words(hbi) };
        if cur == 0 {
            *p_cur = 0;
            return usize::MAX;
        }
    }
    hbi.cur[6] = 0;
    *p_cur = cur;
    hbi.pos
}
