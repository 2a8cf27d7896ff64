// SPDX-License-Identifier: GPL-2.0-or-later

//! The `hbitmap_*` functions called as C calls them: through raw pointers, with the aliasing C
//! allows (a merge's result being one of its operands, the meta bitmap's pointer used between
//! calls on its parent, an iterator on the caller's stack). Small enough for Miri, which checks
//! every one of these accesses against Rust's aliasing rules.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::ptr;

use super::*;
use crate::HBitmap;

fn items(hb: *const HBitmap) -> Vec<u64> {
    // SAFETY: the tests pass live bitmaps.
    unsafe { &*hb }.iter().collect()
}

#[test]
fn the_original_api_through_pointers() {
    // SAFETY: every pointer is a live bitmap from hbitmap_alloc or a live local, as a C caller
    // passes them; each bitmap is freed once, after its meta bitmap.
    unsafe {
        let hb = hbitmap_alloc(1000, 2);
        assert_eq!(hbitmap_granularity(hb), 2);
        assert!(hbitmap_empty(hb));
        assert!(hbitmap_is_serializable(hb));
        hbitmap_set(hb, 9, 1);
        hbitmap_set(hb, 100, 30);
        assert_eq!(hbitmap_count(hb), 4 + 32);
        assert!(hbitmap_get(hb, 8) && hbitmap_get(hb, 131) && !hbitmap_get(hb, 132));
        hbitmap_reset(hb, 100, 4);
        assert_eq!(items(hb), [8, 104, 108, 112, 116, 120, 124, 128]);
        assert_eq!(hbitmap_next_zero(hb, 104, 900), 132);
        assert_eq!(hbitmap_next_zero(hb, 104, 10), -1);
        let (mut start, mut count) = (10u64, 990u64);
        assert!(hbitmap_next_dirty_area(hb, &mut start, &mut count));
        // Group 2 (items 8..=11) is dirty: the area starts at `start` within it.
        assert_eq!((start, count), (10, 2));
        let (mut start, mut count) = (12u64, 988u64);
        assert!(hbitmap_next_dirty_area(hb, &mut start, &mut count));
        assert_eq!((start, count), (104, 28));
        let (mut start, mut count) = (132u64, 500u64);
        assert!(!hbitmap_next_dirty_area(hb, &mut start, &mut count));

        // The iterator lives in C's storage: uninitialized until hbitmap_iter_init.
        let mut hbi = MaybeUninit::<HBitmapIter>::uninit();
        hbitmap_iter_init(hbi.as_mut_ptr(), hb, 0);
        let hbi = hbi.as_mut_ptr();
        assert_eq!(hbitmap_iter_next(hbi, false), 8);
        assert_eq!(hbitmap_iter_next(hbi, true), 8);
        let mut seen = Vec::new();
        loop {
            match hbitmap_iter_next(hbi, true) {
                -1 => break,
                item => seen.push(item as u64),
            }
        }
        assert_eq!(seen, items(hb)[1..]);
        // The header's inline hbitmap_iter_next_word: take the current word of the last level,
        // then hbitmap_iter_skip_words for the next nonzero one.
        hbitmap_set(hb, 600, 1);
        hbitmap_iter_init(hbi, hb, 0);
        let last = HBITMAP_LEVELS - 1;
        assert_eq!((*hbi).cur[last], 1 << 2 | 0x7f << 26);
        (*hbi).cur[last] = 0;
        assert_eq!(hbitmap_iter_skip_words(hbi), 1 << (150 - 128));
        assert_eq!((*hbi).pos, 2);
        hbitmap_reset(hb, 600, 1);

        // Truncate, then merges with every aliasing C allows.
        hbitmap_truncate(hb, 120);
        assert_eq!(items(hb), [8, 104, 108, 112, 116]);
        let other = hbitmap_alloc(120, 2);
        hbitmap_set(other, 0, 1);
        assert!(hbitmap_can_merge(hb, other));
        let result = hbitmap_alloc(120, 2);
        assert!(hbitmap_merge(hb, other, result));
        assert_eq!(items(result), [0, 8, 104, 108, 112, 116]);
        assert!(hbitmap_merge(other, hb, other));
        assert_eq!(items(other), items(result));
        assert!(hbitmap_merge(hb, hb, hb));
        assert!(hbitmap_merge(hb, hb, result));
        assert_eq!(items(result), items(hb));
        let coarser = hbitmap_alloc(120, 3);
        assert!(!hbitmap_can_merge(hb, coarser));
        assert!(!hbitmap_merge(hb, coarser, result));

        hbitmap_reset_all(hb);
        assert!(hbitmap_empty(hb));
        for bitmap in [hb, other, result, coarser] {
            hbitmap_free(bitmap);
        }
        hbitmap_free(ptr::null_mut());
    }
}

#[test]
fn the_meta_pointer_stays_valid_between_calls_on_its_parent() {
    // SAFETY: as in the test above; `meta` is used only while its parent owns it.
    unsafe {
        let hb = hbitmap_alloc(1 << 16, 0);
        let meta = hbitmap_create_meta(hb, 512);
        assert_eq!(hbitmap_granularity(meta), 9);
        // Migration's pattern: writes to the parent mark the meta bitmap, which C reads and
        // resets through its own pointer in between.
        hbitmap_set(hb, 1000, 10);
        assert_eq!(items(meta), [512]);
        assert!(hbitmap_get(meta, 512));
        hbitmap_reset(meta, 512, 512);
        assert!(hbitmap_empty(meta));
        hbitmap_set(hb, 5000, 1);
        hbitmap_reset(hb, 1000, 10);
        assert_eq!(items(meta), [512, 4608]);
        let mut hbi = MaybeUninit::<HBitmapIter>::uninit();
        hbitmap_iter_init(hbi.as_mut_ptr(), meta, 0);
        assert_eq!(hbitmap_iter_next_qemu10(hbi.as_mut_ptr()), 512);
        hbitmap_reset_all(meta);
        hbitmap_set(hb, 0, 1);
        assert_eq!(hbitmap_count(meta), 512);
        // The parent's clone has a meta bitmap of its own.
        let copy = (*hb).clone();
        assert_eq!(copy.meta().unwrap().count(), 512);
        drop(copy);
        hbitmap_free_meta(hb);
        hbitmap_free(hb);
    }
}

#[test]
fn serialization_through_caller_buffers() {
    // SAFETY: live bitmaps, and buffers of hbitmap_serialization_size bytes.
    unsafe {
        let hb = hbitmap_alloc(64 * 64 * 3, 0);
        hbitmap_set(hb, 70, 3);
        hbitmap_set(hb, 64 * 64 * 2 + 5, 1);
        let align = hbitmap_serialization_align(hb);
        assert_eq!(align, 64);
        let size = hbitmap_serialization_size(hb, 0, 64 * 64 * 3);
        assert_eq!(size, 64 * 3 * 8);
        assert_eq!(hbitmap_serialization_size(hb, 0, 0), 0);
        // An uninitialized buffer, as C may pass: serializing only writes it.
        let mut buf = vec![MaybeUninit::<u8>::uninit(); size as usize];
        hbitmap_serialize_part(hb, buf.as_mut_ptr().cast(), 0, 64 * 64 * 3);
        let mut bytes: Vec<u8> = buf.iter().map(|b| b.assume_init()).collect();
        assert_eq!(
            u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
            0b111 << 6
        );
        assert_eq!(
            u64::from_le_bytes(bytes[128 * 8..][..8].try_into().unwrap()),
            1 << 5
        );
        hbitmap_serialize_part(hb, ptr::null_mut(), 0, 0);

        let copy = hbitmap_alloc(64 * 64 * 3, 0);
        hbitmap_deserialize_ones(copy, 64 * 64, 64 * 64, false);
        hbitmap_deserialize_part(copy, bytes.as_mut_ptr(), 0, 64 * 64, false);
        hbitmap_deserialize_zeroes(copy, 64 * 64, 64 * 64, false);
        hbitmap_deserialize_part(
            copy,
            bytes[64 * 64 * 2 / 8..].as_mut_ptr(),
            64 * 64 * 2,
            64 * 64,
            false,
        );
        hbitmap_deserialize_finish(copy);
        assert_eq!(items(copy), items(hb));
        assert_eq!(hbitmap_count(copy), 4);

        // The digest is a malloc'd C string, freed with free().
        let digest = hbitmap_sha256(copy, ptr::null_mut());
        let text = CStr::from_ptr(digest).to_str().unwrap().to_owned();
        libc::free(digest.cast());
        assert_eq!(text, (*hb).sha256());
        assert_eq!(text.len(), 64);
        hbitmap_free(hb);
        hbitmap_free(copy);
    }
}

#[test]
fn the_qemu10_api_through_pointers() {
    // SAFETY: as in the tests above.
    unsafe {
        let hb = hbitmap_alloc_qemu10(1000, 2);
        hbitmap_set(hb, 100, 28);
        hbitmap_set(hb, 400, 4);
        hbitmap_reset_qemu10(hb, 108, 4);
        assert_eq!(items(hb), [100, 104, 112, 116, 120, 124, 400]);
        assert_eq!(hbitmap_next_dirty(hb, 0, 1000), 100);
        assert_eq!(hbitmap_next_dirty(hb, 128, 100), -1);
        assert_eq!(hbitmap_next_zero_qemu10(hb, 100, 900), 108);
        let (mut start, mut count) = (0i64, 0i64);
        assert!(hbitmap_next_dirty_area_qemu10(
            hb, 0, 1000, 6, &mut start, &mut count
        ));
        assert_eq!((start, count), (100, 6));
        assert!(!hbitmap_next_dirty_area_qemu10(
            hb, 404, 1000, 6, &mut start, &mut count
        ));
        let mut pnum = 0i64;
        assert!(hbitmap_status(hb, 112, 100, &mut pnum));
        assert_eq!(pnum, 16);
        assert!(!hbitmap_status(hb, 128, 100, &mut pnum));
        assert_eq!(pnum, 100);

        let mut hbi = MaybeUninit::<HBitmapIter>::uninit();
        hbitmap_iter_init(hbi.as_mut_ptr(), hb, 110);
        let mut seen = Vec::new();
        loop {
            match hbitmap_iter_next_qemu10(hbi.as_mut_ptr()) {
                -1 => break,
                item => seen.push(item as u64),
            }
        }
        assert_eq!(seen, [112, 116, 120, 124, 400]);

        // Merges of different granularities into a third bitmap and into an operand.
        let fine = hbitmap_alloc_qemu10(1000, 0);
        hbitmap_set(fine, 999, 1);
        let result = hbitmap_alloc_qemu10(1000, 2);
        hbitmap_merge_qemu10(hb, fine, result);
        assert_eq!(items(result), [100, 104, 112, 116, 120, 124, 400, 996]);
        hbitmap_merge_qemu10(fine, hb, fine);
        assert_eq!(hbitmap_count(fine), 24 + 4 + 1);
        hbitmap_merge_qemu10(result, result, result);
        hbitmap_truncate_qemu10(result, 200);
        assert_eq!(items(result), [100, 104, 112, 116, 120, 124]);
        for bitmap in [hb, fine, result] {
            hbitmap_free(bitmap);
        }
    }
}
