// SPDX-License-Identifier: GPL-2.0-or-later

//! QEMU's hierarchical dirty bitmap (`util/hbitmap.c`) in Rust, with a drop-in C ABI.
//!
//! Layers, each in its own module:
//! - [`bitmap`](crate::HBitmap): the bitmap (levels, set/reset, iteration, search, resize, merge,
//!   meta bitmaps), with a safe API;
//! - [`serialize`]: QEMU's little-endian, word-size-independent serialization;
//! - [`qcow2`]: persistent dirty bitmaps in qcow2 images (header, refcounts, bitmap directory
//!   and tables, image locks), over the bitmap and its serialization;
//! - `ffi`: the C ABI of `include/hbitmap.h`, the only place with `extern "C"` and raw pointers;
//! - [`AtomicHBitmap`]: the lock-free dirty-page bitmap a VMM marks from any thread (the
//!   `atomic-hbitmap` crate, re-exported; feature `vm-memory` for `GuestMemoryMmap<AtomicHBitmap>`),
//!   with its conversion into an [`HBitmap`] for a qcow2 image (`atomic.rs`).
//!
//! `unsafe` is denied crate-wide and allowed only where it is needed: the C ABI (`ffi`), the
//! bitmap's memory (`bitmap/storage.rs`: mappings; `bitmap/meta.rs`: the pointer C holds), its
//! hot loops (`bitmap/words.rs`: `popcnt`; `bitmap/bulk_write.rs`: streaming stores, and one
//! unchecked read in `bitmap/mod.rs`) and the image lock's `fcntl` (`qcow2/lock.rs`).

#![deny(unsafe_code)]

mod atomic;
mod bitmap;
#[doc(hidden)]
pub mod ffi;
pub mod qcow2;
pub mod serialize;

pub use crate::atomic::FromAtomicError;
pub use crate::bitmap::{
    BitmapError, Extents, HBitmap, Iter, Violation, BITS_PER_LEVEL, BITS_PER_WORD, LEVELS,
    LOG_MAX_SIZE, MAX_GROUPS,
};
pub use atomic_hbitmap::AtomicHBitmap;
