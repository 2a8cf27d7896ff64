// SPDX-License-Identifier: GPL-2.0-or-later

//! The functions of current QEMU's API (`include/qemu/hbitmap.h` of QEMU 7.2 to 10) that the
//! original API lacks or has with another signature or meaning. Those that replace an original
//! function are exported as `<name>_qemu10`; the header declares them under `<name>` when
//! `HBITMAP_QEMU_API` is 10. Their behaviour is QEMU 10.0.2's `util/hbitmap.c`, asserts
//! included (as aborts naming the function and the values).

use libc::c_int;

use super::hbitmap::{iter_next, merge_operands, HBitmapIter, MergeOperands};
use super::{borrow, borrow_mut, require, violated};
use crate::bitmap::{BitmapError, HBitmap, Violation};

/// Current QEMU's sizes, positions and lengths are `int64_t`: a negative one is a broken
/// precondition.
fn non_negative(function: &str, what: &'static str, value: i64) -> u64 {
    u64::try_from(value)
        .unwrap_or_else(|_| violated(function, &Violation::Negative { what, value }))
}

/// Sizes must fit in `int64_t`.
fn check_size(function: &str, size: u64) {
    if size > i64::MAX as u64 {
        violated(function, &Violation::SizeOverInt64(size));
    }
}

/// Allocate a new bitmap of `size` items, one bit per `2^granularity` items.
///
/// Aborts unless `size <= INT64_MAX`, `0 <= granularity < 64` and the size needs at most 2^41
/// groups. Free it with `hbitmap_free`.
#[no_mangle]
pub extern "C" fn hbitmap_alloc_qemu10(size: u64, granularity: c_int) -> *mut HBitmap {
    const F: &str = "hbitmap_alloc";
    check_size(F, size);
    if !(0..64).contains(&granularity) {
        violated(
            F,
            &Violation::Geometry(BitmapError::Granularity(granularity.into())),
        );
    }
    let bitmap = HBitmap::new(size, granularity as u32)
        .unwrap_or_else(|why| violated(F, &Violation::Geometry(why)));
    Box::into_raw(Box::new(bitmap))
}

/// Resize to `size` items: shrinking cleans the groups that disappear, growing adds clean
/// groups. Aborts unless `size <= INT64_MAX` and the new size needs at most 2^41 groups.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_truncate_qemu10(hb: *mut HBitmap, size: u64) {
    const F: &str = "hbitmap_truncate";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut(F, "hb", hb) };
    check_size(F, size);
    require!("hbitmap_truncate", bitmap.try_truncate(size));
}

/// `result = a | b`. The three must have the same size in items; `a` and `b` may have different
/// granularities (every group of `result` touching a dirty extent becomes dirty). `result` may
/// be `a` or `b`; `a` and `b` are not modified unless aliased by `result`. Aborts if the sizes
/// differ, or if `a` and `b` share a granularity that `result` has not (QEMU would write past
/// `result`'s storage).
///
/// # Safety
/// The three point to live bitmaps.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_merge_qemu10(
    a: *const HBitmap,
    b: *const HBitmap,
    result: *mut HBitmap,
) {
    const F: &str = "hbitmap_merge";
    // SAFETY: the caller's contract.
    match unsafe { merge_operands(F, a, b, result) } {
        MergeOperands::Itself(bitmap) => {
            bitmap.merge_with_itself();
        }
        MergeOperands::InPlace { result, source } => {
            require!("hbitmap_merge", result.try_union_with(source));
        }
        MergeOperands::Into { a, b, result } => {
            require!("hbitmap_merge", HBitmap::try_union_into(a, b, result));
        }
    }
}

/// Mark the groups of `start .. start + count - 1` clean; `count == 0` does nothing. Aborts
/// unless the range covers whole groups (a partial last group only where the range ends at the
/// bitmap's size) and ends within the bitmap.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_reset_qemu10(hb: *mut HBitmap, start: u64, count: u64) {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_reset", "hb", hb) };
    require!("hbitmap_reset", bitmap.check_whole_groups(start, count));
    if let Some((first, last)) = require!("hbitmap_reset", bitmap.check_range(start, count)) {
        bitmap.reset_groups(start, count, first, last);
    }
}

/// The first item of the next dirty group, or -1 at the end.
///
/// # Safety
/// `hbi` was initialized by `hbitmap_iter_init` and its bitmap is live.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_iter_next_qemu10(hbi: *mut HBitmapIter) -> i64 {
    // SAFETY: the caller's contract.
    unsafe { iter_next(hbi, true) }
}

/// The first dirty item in `start .. start + count - 1` (`start` itself if its group is dirty),
/// or -1 if there is none, `count` is 0 or `start` is at or past the bitmap's size; a `count`
/// reaching past the end (`INT64_MAX`) searches to the end. Aborts if `start` or `count` is
/// negative.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_next_dirty(hb: *const HBitmap, start: i64, count: i64) -> i64 {
    const F: &str = "hbitmap_next_dirty";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow(F, "hb", hb) };
    let (start, count) = (
        non_negative(F, "start", start),
        non_negative(F, "count", count),
    );
    bitmap
        .next_dirty(start, count)
        .map_or(-1, |item| item as i64)
}

/// The first clean item in `start .. start + count - 1` (`start` itself if its group is clean),
/// or -1 if there is none, `count` is 0 or `start` is at or past the bitmap's size; a `count`
/// reaching past the end (`INT64_MAX`) searches to the end. Aborts if `start` or `count` is
/// negative.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_next_zero_qemu10(
    hb: *const HBitmap,
    start: i64,
    count: i64,
) -> i64 {
    const F: &str = "hbitmap_next_zero";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow(F, "hb", hb) };
    let (start, count) = (
        non_negative(F, "start", start),
        non_negative(F, "count", count),
    );
    bitmap
        .next_zero(start, count)
        .map_or(-1, |item| item as i64)
}

/// Find the first dirty extent within `start .. end - 1` (`end` clipped to the bitmap's size),
/// at most `max_dirty_count` items long. If there is one, store its start (never before
/// `start`) and length in `*dirty_start` and `*dirty_count` and return true; otherwise return
/// false and leave them alone. Aborts if `start` or `end` is negative or `max_dirty_count` is
/// not positive.
///
/// # Safety
/// `hb` points to a live bitmap; `dirty_start` and `dirty_count` point to writable `int64_t`s.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_next_dirty_area_qemu10(
    hb: *const HBitmap,
    start: i64,
    end: i64,
    max_dirty_count: i64,
    dirty_start: *mut i64,
    dirty_count: *mut i64,
) -> bool {
    const F: &str = "hbitmap_next_dirty_area";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow(F, "hb", hb) };
    let (start, end) = (non_negative(F, "start", start), non_negative(F, "end", end));
    if max_dirty_count <= 0 {
        violated(F, &Violation::MaxCountNotPositive(max_dirty_count));
    }
    let Some((area_start, area_count)) =
        bitmap.next_dirty_area_limited(start, end, max_dirty_count as u64)
    else {
        return false;
    };
    // SAFETY: the caller's contract.
    let (out_start, out_count) = unsafe {
        (
            borrow_mut(F, "dirty_start", dirty_start),
            borrow_mut(F, "dirty_count", dirty_count),
        )
    };
    // Both lie within the bitmap's size, which is at most INT64_MAX.
    *out_start = area_start as i64;
    *out_count = area_count as i64;
    true
}

/// Whether `start .. start + count - 1` begins dirty (true) or clean (false); `*pnum` receives
/// how many items from `start` on share that state (a run reaching the end of the range counts
/// as `count`). Aborts unless `start >= 0`, `count > 0` and the range ends within the bitmap's
/// size.
///
/// # Safety
/// `hb` points to a live bitmap; `pnum` points to a writable `int64_t`.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_status(
    hb: *const HBitmap,
    start: i64,
    count: i64,
    pnum: *mut i64,
) -> bool {
    const F: &str = "hbitmap_status";
    // SAFETY: the caller's contract.
    let (bitmap, pnum) = unsafe { (borrow(F, "hb", hb), borrow_mut(F, "pnum", pnum)) };
    let (start, count) = (
        non_negative(F, "start", start),
        non_negative(F, "count", count),
    );
    let (dirty, run) = require!("hbitmap_status", bitmap.try_status(start, count));
    *pnum = run as i64;
    dirty
}
