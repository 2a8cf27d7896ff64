// SPDX-License-Identifier: GPL-2.0-or-later

//! `hbitmap_*`: the functions of QEMU's `util/hbitmap.c`, with the same names and signatures.

use std::ptr;

use libc::{c_char, c_int, c_ulong};
use static_assertions::{assert_eq_size, const_assert_eq};

use super::{borrow, borrow_mut, null_pointer, require, violated};
use crate::bitmap::{iter as iter_state, HBitmap, Violation, LAST, LEVELS};

#[cfg(not(all(target_pointer_width = "64", not(windows))))]
compile_error!("the C ABI follows QEMU's LP64 layout: 64-bit `unsigned long` and pointers");

/// Number of levels of an `HBitmap` (defined as a macro in the header, as QEMU does).
pub const HBITMAP_LEVELS: usize = LEVELS;

/// QEMU's `Error`: never set by this library, accepted for signature compatibility.
pub struct Error {
    _private: [u8; 0],
}

/// Iteration state over an `HBitmap`, laid out exactly as QEMU's `HBitmapIter` on 64-bit hosts
/// so that it lives on the caller's stack and the header's inline `hbitmap_iter_next_word` reads
/// it. Initialize it with `hbitmap_iter_init`; do not use it after its bitmap is freed.
#[repr(C)]
pub struct HBitmapIter {
    /// The bitmap being iterated.
    pub hb: *const HBitmap,
    /// Copy of the bitmap's granularity.
    pub granularity: c_int,
    /// Index of the current word in the last level.
    pub pos: usize,
    /// Per level, the bits of the current word still to visit.
    pub cur: [c_ulong; HBITMAP_LEVELS],
}

assert_eq_size!(HBitmapIter, [u8; 80]);
assert_eq_size!(c_ulong, u64);
const_assert_eq!(std::mem::offset_of!(HBitmapIter, hb), 0);
const_assert_eq!(std::mem::offset_of!(HBitmapIter, granularity), 8);
const_assert_eq!(std::mem::offset_of!(HBitmapIter, pos), 16);
const_assert_eq!(std::mem::offset_of!(HBitmapIter, cur), 24);
const_assert_eq!(std::mem::align_of::<HBitmapIter>(), 8);

/// Free a bitmap; NULL does nothing. Aborts if its meta bitmap was not freed first
/// (`hbitmap_free_meta`), or if it is a meta bitmap (its parent frees it).
///
/// # Safety
/// `hb` is NULL or was returned by `hbitmap_alloc` or `hbitmap_create_meta` and not freed
/// since.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_free(hb: *mut HBitmap) {
    if hb.is_null() {
        return;
    }
    // SAFETY: the caller's contract: a live bitmap.
    let bitmap = unsafe { &*hb };
    if bitmap.is_meta() {
        violated(
            "hbitmap_free",
            &"the bitmap is a meta bitmap (free it with hbitmap_free_meta on its parent)",
        );
    }
    if bitmap.meta().is_some() {
        violated(
            "hbitmap_free",
            &"the bitmap still has a meta bitmap (call hbitmap_free_meta first)",
        );
    }
    // SAFETY: not a meta bitmap, so it came from `Box::into_raw` in `hbitmap_alloc` (the
    // caller's contract).
    drop(unsafe { Box::from_raw(hb) });
}

/// The operands of a merge as Rust may borrow them: `result` may alias `a`, `b` or both.
pub(super) enum MergeOperands<'a> {
    /// `a`, `b` and `result` are one bitmap.
    Itself(&'a mut HBitmap),
    /// `result` is one operand; `source` is the other.
    InPlace {
        result: &'a mut HBitmap,
        source: &'a HBitmap,
    },
    /// `result` is neither operand (`a` and `b` may be one bitmap).
    Into {
        a: &'a HBitmap,
        b: &'a HBitmap,
        result: &'a mut HBitmap,
    },
}

/// Borrows the operands of `function`'s merge, aborting on NULL.
///
/// # Safety
/// The three point to live bitmaps that nothing else accesses during the merge.
pub(super) unsafe fn merge_operands<'a>(
    function: &str,
    a: *const HBitmap,
    b: *const HBitmap,
    result: *mut HBitmap,
) -> MergeOperands<'a> {
    for (name, ptr) in [("a", a), ("b", b), ("result", result.cast_const())] {
        if ptr.is_null() {
            null_pointer(function, name);
        }
    }
    let result_ptr = result.cast_const();
    if result_ptr == a && result_ptr == b {
        // SAFETY: non-NULL; the only reference made to the bitmap.
        return MergeOperands::Itself(unsafe { &mut *result });
    }
    if result_ptr == a || result_ptr == b {
        let source = if result_ptr == a { b } else { a };
        // SAFETY: non-NULL, distinct: a shared and an exclusive borrow of two different live
        // bitmaps.
        let (result, source) = unsafe { (&mut *result, &*source) };
        return MergeOperands::InPlace { result, source };
    }
    // SAFETY: non-NULL; `result` differs from `a` and `b`, which may be the same bitmap (two
    // shared borrows).
    let (a, b, result) = unsafe { (&*a, &*b, &mut *result) };
    MergeOperands::Into { a, b, result }
}

/// Whether no group is dirty.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_empty(hb: *const HBitmap) -> bool {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_empty", "hb", hb) }.is_empty()
}

/// The granularity given to `hbitmap_alloc`.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_granularity(hb: *const HBitmap) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_granularity", "hb", hb) }.granularity() as c_int
}

/// Number of dirty items: dirty groups times `2^granularity`.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_count(hb: *const HBitmap) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_count", "hb", hb) }.count()
}

/// Mark every group touched by `start .. start + count - 1` dirty; `count == 0` does nothing.
/// Aborts if the range ends past the last group. Marks the meta bitmap (see `hbitmap_create_meta`).
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_set(hb: *mut HBitmap, start: u64, count: u64) {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut("hbitmap_set", "hb", hb) };
    if let Some((first, last)) = require!("hbitmap_set", bitmap.check_range(start, count)) {
        bitmap.set_groups(start, count, first, last);
    }
}

/// Mark the whole bitmap clean (the meta bitmap is not marked).
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_reset_all(hb: *mut HBitmap) {
    // SAFETY: the caller's contract.
    unsafe { borrow_mut("hbitmap_reset_all", "hb", hb) }.reset_all();
}

/// Whether the group holding `item` is dirty. Aborts if `item` is past the last group.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_get(hb: *const HBitmap, item: u64) -> bool {
    // The point query is latency-bound: anything but the common case is one tail call, so the
    // common path needs no stack frame.
    // SAFETY: a non-NULL `hb` points to a live bitmap (the caller's contract).
    if let Some(dirty) = unsafe { hb.as_ref() }.and_then(|bitmap| bitmap.get_checked(item)) {
        return dirty;
    }
    // SAFETY: the caller's contract.
    unsafe { get_slow(hb, item) }
}

/// `hbitmap_get` when the fast path gave up: aborts for broken preconditions. It is a C ABI
/// function that can return (as far as the compiler knows), so calling it is a tail jump.
///
/// # Safety
/// `hb` is NULL or points to a live bitmap.
#[cold]
#[inline(never)]
unsafe extern "C" fn get_slow(hb: *const HBitmap, item: u64) -> bool {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow("hbitmap_get", "hb", hb) };
    match bitmap.check_item(item) {
        Err(why) => violated("hbitmap_get", &why),
        Ok(()) => bitmap.get(item),
    }
}

/// Whether the bitmap can be serialized: granularity below 58.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_is_serializable(hb: *const HBitmap) -> bool {
    // SAFETY: the caller's contract.
    unsafe { borrow("hbitmap_is_serializable", "hb", hb) }.is_serializable()
}

/// Items per serialized 64-bit word (`64 << granularity`): chunk starts, and the lengths of all
/// chunks but the last, must be multiples of it. Aborts if the bitmap is not serializable.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_serialization_align(hb: *const HBitmap) -> u64 {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow("hbitmap_serialization_align", "hb", hb) };
    if !bitmap.is_serializable() {
        violated(
            "hbitmap_serialization_align",
            &Violation::NotSerializable(bitmap.granularity()),
        );
    }
    bitmap.serialization_align()
}

/// Checks a serialization chunk for `function`, aborting on a bad one; the words it covers.
fn chunk_words(
    function: &str,
    bitmap: &HBitmap,
    start: u64,
    count: u64,
) -> Option<std::ops::Range<usize>> {
    bitmap
        .check_chunk(start, count)
        .unwrap_or_else(|why| violated(function, &why))
}

/// Bytes needed to serialize the chunk `start .. start + count - 1` (0 when `count == 0`).
/// Aborts on a misaligned or out-of-range chunk.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_serialization_size(
    hb: *const HBitmap,
    start: u64,
    count: u64,
) -> u64 {
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow("hbitmap_serialization_size", "hb", hb) };
    chunk_words("hbitmap_serialization_size", bitmap, start, count)
        .map_or(0, |words| words.len() as u64 * 8)
}

/// Write the chunk `start .. start + count - 1` to `buf` as little-endian 64-bit words
/// (`hbitmap_serialization_size` bytes; `buf` is only written, so it need not be initialized).
/// Aborts on a misaligned or out-of-range chunk.
///
/// # Safety
/// `hb` points to a live bitmap; `buf` has room for `hbitmap_serialization_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_serialize_part(
    hb: *const HBitmap,
    buf: *mut u8,
    start: u64,
    count: u64,
) {
    const F: &str = "hbitmap_serialize_part";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow(F, "hb", hb) };
    if let Some(words) = chunk_words(F, bitmap, start, count) {
        if buf.is_null() {
            null_pointer(F, "buf");
        }
        // SAFETY: the caller provides room for the chunk's bytes; non-NULL checked. They may be
        // uninitialized: `read_words_le` only writes them.
        let out = unsafe {
            std::slice::from_raw_parts_mut(buf.cast::<std::mem::MaybeUninit<u8>>(), words.len() * 8)
        };
        bitmap.read_words_le(words, out);
    }
}

/// Load the chunk `start .. start + count - 1` from `buf` (little-endian 64-bit words). With
/// `finish` false, call `hbitmap_deserialize_finish` after the last chunk and before any
/// other use. Aborts on a misaligned or out-of-range chunk.
///
/// # Safety
/// `hb` points to a live bitmap; `buf` holds `hbitmap_serialization_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_deserialize_part(
    hb: *mut HBitmap,
    buf: *mut u8,
    start: u64,
    count: u64,
    finish: bool,
) {
    const F: &str = "hbitmap_deserialize_part";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut(F, "hb", hb) };
    if let Some(words) = chunk_words(F, bitmap, start, count) {
        if buf.is_null() {
            null_pointer(F, "buf");
        }
        // SAFETY: the caller provides the chunk's bytes; non-NULL checked.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast_const(), words.len() * 8) };
        bitmap.deserialize_part(bytes, start, count, finish);
    }
}

/// Make the chunk `start .. start + count - 1` clean, whole words at a time, as a
/// deserialization step (see `hbitmap_deserialize_part` for `finish`).
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_deserialize_zeroes(
    hb: *mut HBitmap,
    start: u64,
    count: u64,
    finish: bool,
) {
    const F: &str = "hbitmap_deserialize_zeroes";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut(F, "hb", hb) };
    chunk_words(F, bitmap, start, count);
    bitmap.deserialize_zeroes(start, count, finish);
}

/// Make the chunk `start .. start + count - 1` dirty, whole words at a time, as a
/// deserialization step (see `hbitmap_deserialize_part` for `finish`).
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_deserialize_ones(
    hb: *mut HBitmap,
    start: u64,
    count: u64,
    finish: bool,
) {
    const F: &str = "hbitmap_deserialize_ones";
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow_mut(F, "hb", hb) };
    chunk_words(F, bitmap, start, count);
    bitmap.deserialize_ones(start, count, finish);
}

/// Rebuild the upper levels and the count after deserialization steps with `finish` false.
///
/// # Safety
/// `hb` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_deserialize_finish(hb: *mut HBitmap) {
    // SAFETY: the caller's contract.
    unsafe { borrow_mut("hbitmap_deserialize_finish", "hb", hb) }.deserialize_finish();
}

/// SHA-256 of the last level as it lies in memory, as 64 lowercase hex digits in a
/// NUL-terminated string that the caller releases with `free()` (or `g_free()`). `errp` is
/// never set and may be NULL.
///
/// # Safety
/// `bitmap` points to a live bitmap.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_sha256(
    bitmap: *const HBitmap,
    errp: *mut *mut Error,
) -> *mut c_char {
    let _ = errp;
    // SAFETY: the caller's contract.
    let bitmap = unsafe { borrow("hbitmap_sha256", "bitmap", bitmap) };
    let hex = bitmap.sha256();
    // SAFETY: plain allocation; checked for NULL below.
    let out = unsafe { libc::malloc(hex.len() + 1) }.cast::<u8>();
    if out.is_null() {
        violated("hbitmap_sha256", &"out of memory");
    }
    // SAFETY: `out` has room for the digits and the NUL.
    unsafe {
        ptr::copy_nonoverlapping(hex.as_ptr(), out, hex.len());
        *out.add(hex.len()) = 0;
    }
    out.cast()
}

/// Position `hbi` on the group holding `first`. Groups cleaned later are skipped; groups dirtied
/// later may or may not be seen. Aborts if `first` is past the last group (so never succeeds on
/// a bitmap of size 0).
///
/// # Safety
/// `hbi` points to writable `HBitmapIter` storage; `hb` points to a live bitmap that outlives
/// the iteration.
#[no_mangle]
pub unsafe extern "C" fn hbitmap_iter_init(hbi: *mut HBitmapIter, hb: *const HBitmap, first: u64) {
    const F: &str = "hbitmap_iter_init";
    // SAFETY: the caller's contract.
    let (iter, bitmap) = unsafe { (borrow_mut(F, "hbi", hbi), borrow(F, "hb", hb)) };
    require!("hbitmap_iter_init", bitmap.check_item(first));
    let (pos, cur) = iter_state::init(bitmap, first >> bitmap.granularity());
    *iter = HBitmapIter {
        hb,
        granularity: bitmap.granularity() as c_int,
        pos,
        cur,
    };
}

/// Borrow an initialized iterator and its bitmap.
///
/// # Safety
/// `hbi` was initialized by `hbitmap_iter_init` and its bitmap is live.
#[inline(always)]
pub(super) unsafe fn iter_parts<'a>(
    function: &str,
    hbi: *mut HBitmapIter,
) -> (&'a mut HBitmapIter, &'a HBitmap) {
    // SAFETY: the caller's contract.
    let iter = unsafe { borrow_mut(function, "hbi", hbi) };
    // SAFETY: `hbitmap_iter_init` stored a live bitmap (the caller's contract).
    let bitmap = unsafe { borrow(function, "hbi->hb", iter.hb) };
    (iter, bitmap)
}

/// The body of both generations' `hbitmap_iter_next`: the first item of the next dirty group,
/// or -1 at the end; with `advance` false the same item is returned again by the next call.
///
/// # Safety
/// `hbi` was initialized by `hbitmap_iter_init` and its bitmap is live.
#[inline(always)]
pub(super) unsafe fn iter_next(hbi: *mut HBitmapIter, advance: bool) -> i64 {
    // The common case, an item left in the current word, needs no stack frame: everything else
    // is one tail call, to the next word or to the report of a broken precondition.
    // SAFETY: a non-NULL `hbi` is an initialized iterator (the caller's contract).
    if let Some(iter) = unsafe { hbi.as_mut() } {
        // SAFETY: `hbitmap_iter_init` stored a live bitmap (the caller's contract).
        if let Some(bitmap) = unsafe { iter.hb.as_ref() } {
            if let Some(word) = iter_state::rest_of_word(bitmap, iter.pos, &iter.cur) {
                if word == 0 {
                    // SAFETY: `hbi` and its bitmap were just found non-NULL, and its position
                    // in range.
                    return unsafe { iter_next_word(hbi, advance) };
                }
                let granularity = iter.granularity as u32 & 63;
                let item =
                    iter_state::take_item(word, granularity, iter.pos, &mut iter.cur, advance);
                // Items at or past 2^63 read as negative, as in the original's int64_t.
                return item as i64;
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { iter_next_invalid(hbi) }
}

/// `hbitmap_iter_next` once the current word is exhausted. The C ABI makes it a function that
/// cannot unwind, so that calling it can be a tail call.
///
/// # Safety
/// Called by `hbitmap_iter_next` only, with an initialized `hbi` whose bitmap pointer is
/// non-NULL and whose position is within the bitmap's last level.
#[inline(never)]
unsafe extern "C" fn iter_next_word(hbi: *mut HBitmapIter, advance: bool) -> i64 {
    // SAFETY: checked non-NULL by the caller, and initialized (the caller's contract).
    let iter = unsafe { &mut *hbi };
    // SAFETY: checked non-NULL by the caller, and live (the caller's contract).
    let bitmap = unsafe { &*iter.hb };
    let granularity = iter.granularity as u32 & 63;
    iter_state::item_in_next_word(bitmap, granularity, &mut iter.pos, &mut iter.cur, advance)
        .map_or(-1, |item| item as i64)
}

/// `hbitmap_iter_next` with a NULL iterator or bitmap, or an iterator that outlived a shrink of
/// its bitmap: aborts, naming what is wrong.
///
/// # Safety
/// As for `hbitmap_iter_next`.
#[cold]
#[inline(never)]
unsafe extern "C" fn iter_next_invalid(hbi: *mut HBitmapIter) -> ! {
    // SAFETY: the caller's contract.
    let (iter, bitmap) = unsafe { iter_parts("hbitmap_iter_next", hbi) };
    violated(
        "hbitmap_iter_next",
        &Violation::IterPastEnd {
            pos: iter.pos as u64,
            words: bitmap.level_words(LAST).len() as u64,
        },
    );
}
