// SPDX-License-Identifier: GPL-2.0-or-later

//! The functions of the original API (QEMU 4.0's `util/hbitmap.c`) whose signature or meaning
//! current QEMU changed or dropped. The header declares them unless `HBITMAP_QEMU_API` is
//! defined; their current counterparts are in `qemu10.rs`.

use libc::{c_int, c_ulong};

use super::hbitmap::{iter_next, iter_parts, merge_operands, HBitmapIter, MergeOperands};
use super::{borrow, borrow_mut, require, violated};
use crate::bitmap::{iter as iter_state, BitmapError, HBitmap, Violation};

/// Allocate a new bitmap of `size` items, one bit per `2^granularity` items.
///
/// Aborts unless `0 <= granularity < 64` and the size needs at most 2^41 groups.
/// Free it with `hbitmap_free`.
#[no_mangle]
pub extern "C" fn hbitmap_alloc(size: u64, granularity: c_int) -> *mut HBitmap {
    if !(0..64).contains(&granularity) {
        violated(
            "hbitmap_alloc",
            &Violation::Geometry(BitmapError::Granularity(granularity.into())),
        );
    }
    let bitmap = HBitmap::new(size, granularity as u32)
        .unwrap_or_else(|why| violated("hbitmap_alloc", &Violation::Geometry(why)));
    Box::into_raw(Box::new(bitmap))
}

/// Resize to `size` items: shrinking cleans the groups that disappear (marking the meta
/// bitmap), growing adds clean groups; the meta bitmap is resized too. Aborts if the new size
/// needs more than 2^41 groups.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_truncate(hb: *mut HBitmap, size: u64) {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_truncate", "hb", hb) };
    require!("hbitmap_truncate", bitmap.try_truncate(size));
}

/// Whether `a` and `b` have the same number of groups and the same granularity.
///
/// # Safety
/// `a` and `b` point to live bitmaps.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_can_merge(a: *const HBitmap, b: *const HBitmap) -> bool {
    // SAFETY: the caller's contract.
    let (a, b) = unsafe {
        (
            borrow("hbitmap_can_merge", "a", a),
            borrow("hbitmap_can_merge", "b", b),
        )
    };
    a.can_merge(b)
}

/// `result = a | b`; `result` may be `a` or `b`. Returns false, changing nothing, unless all
/// three have the same size and granularity. `a` and `b` are not modified unless aliased by
/// `result`.
///
/// # Safety
/// The three point to live bitmaps.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_merge(
    a: *const HBitmap,
    b: *const HBitmap,
    result: *mut HBitmap,
) -> bool {
    // SAFETY: the caller's contract.
    match unsafe { merge_operands("hbitmap_merge", a, b, result) } {
        MergeOperands::Itself(bitmap) => bitmap.merge_with_itself(),
        MergeOperands::InPlace { result, source } => result.merge(source),
        MergeOperands::Into { a, b, result } => HBitmap::merge_into(a, b, result),
    }
}

/// Mark every group touched by `start .. start + count - 1` clean, including groups the range
/// covers only partly; `count == 0` does nothing. Aborts if the range ends past the last group.
/// Marks the meta bitmap if a word became clean.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_reset(hb: *mut HBitmap, start: u64, count: u64) {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_reset", "hb", hb) };
    if let Some((first, last)) = require!("hbitmap_reset", bitmap.check_range(start, count)) {
        bitmap.reset_groups(start, count, first, last);
    }
}

/// Advance `hbi` to the next nonzero word of the last level and return it (its index is
/// `hbi->pos`); 0 at the end. Used by the inline `hbitmap_iter_next_word`.
///
/// # Safety
/// `hbi` was initialized by `hbitmap_iter_init` and its bitmap is live.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_iter_skip_words(hbi: *mut HBitmapIter) -> c_ulong {
    // SAFETY: the caller's contract.
    let (iter, bitmap) = unsafe { iter_parts("hbitmap_iter_skip_words", hbi) };
    iter_state::skip_words(bitmap, &mut iter.pos, &mut iter.cur)
}

/// The first item of the next dirty group, or -1 at the end. With `advance` false the same item
/// is returned again by the next call.
///
/// # Safety
/// `hbi` was initialized by `hbitmap_iter_init` and its bitmap is live.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_iter_next(hbi: *mut HBitmapIter, advance: bool) -> i64 {
    // SAFETY: the caller's contract.
    unsafe { iter_next(hbi, advance) }
}

/// The first clean item in `start .. start + count - 1` (or `start` itself if its group is
/// clean), or -1 if there is none, `count` is 0 or `start` is at or past the bitmap's size.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_next_zero(hb: *const HBitmap, start: u64, count: u64) -> i64 {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow("hbitmap_next_zero", "hb", hb) };
    // Items at or past 2^63 read as negative, as in the original's int64_t.
    bitmap
        .next_zero(start, count)
        .map_or(-1, |item| item as i64)
}

/// Find the first dirty extent intersecting `*start .. *start + *count - 1` (clipped to the
/// bitmap's size). If there is one, store its start (never before `*start`) and length in
/// `*start` and `*count` and return true; otherwise leave them alone and return false.
///
/// # Safety
/// `hb` points to a live bitmap; `start` and `count` point to readable, writable `uint64_t`s.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_next_dirty_area(
    hb: *const HBitmap,
    start: *mut u64,
    count: *mut u64,
) -> bool {
    const F: &str = "hbitmap_next_dirty_area";
    // SAFETY: the caller's contract.
    let (bitmap, start, count) = unsafe {
        (
            borrow(F, "hb", hb),
            borrow_mut(F, "start", start),
            borrow_mut(F, "count", count),
        )
    };
    match dirty_area_as_int64(bitmap, *start, *count) {
        Some((area_start, area_count)) => {
            *start = area_start;
            *count = area_count;
            true
        }
        None => false,
    }
}

/// `HBitmap::next_dirty_area` as the original computes it in `int64_t`: an item at or past 2^63
/// reads as negative there, so as none (no dirty area, or a clean group that does not end one).
fn dirty_area_as_int64(bitmap: &HBitmap, start: u64, count: u64) -> Option<(u64, u64)> {
    let below_2_63 = |item: &u64| i64::try_from(*item).is_ok();
    let size = bitmap.size();
    if start >= size || count == 0 || start >> bitmap.granularity() >= bitmap.groups() {
        return None;
    }
    let end = start + count.min(size - start);
    let first_dirty = bitmap
        .iter_from(start)
        .peek()
        .filter(below_2_63)
        .filter(|&first| first < end)?;
    let group_size = 1u64 << bitmap.granularity();
    let area_end = if group_size >= end - first_dirty {
        end
    } else {
        let from = first_dirty + group_size;
        bitmap
            .next_zero(from, end - from)
            .filter(below_2_63)
            .unwrap_or(end)
    };
    let area_start = first_dirty.max(start);
    Some((area_start, area_end - area_start))
}

/// Create the meta bitmap of `hb`, with one bit per `chunk_size` groups' worth of items, marked
/// over the range of an `hbitmap_set` that changes the first or last word of its range or fills
/// a clean word, and of an `hbitmap_reset` that makes a word clean (the original's rules). `hb`
/// owns it; free it with `hbitmap_free_meta`. Aborts if `hb` has one already, if `chunk_size` is
/// not a power of two, or if the meta granularity would reach 64.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_create_meta(hb: *mut HBitmap, chunk_size: c_int) -> *mut HBitmap {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_create_meta", "hb", hb) };
    require!("hbitmap_create_meta", bitmap.check_create_meta(chunk_size));
    bitmap.create_meta_unchecked(chunk_size);
    bitmap.meta_ptr().expect("the meta bitmap was just created")
}

/// Free the meta bitmap of `hb`. Aborts if it has none.
///
/// # Safety
/// `hb` points to a live bitmap; its meta bitmap's pointer is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_free_meta(hb: *mut HBitmap) {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_free_meta", "hb", hb) };
    if !bitmap.free_meta() {
        violated("hbitmap_free_meta", &"the bitmap has no meta bitmap");
    }
}
