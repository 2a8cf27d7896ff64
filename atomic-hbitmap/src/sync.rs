// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The atomics the bitmap is built on: the standard library's, or loom's when the crate is built
//! with `--cfg loom` for the model tests (`tests/loom.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

/// `len` words, all zero. Outside loom the memory comes zeroed from the allocator (`calloc`), so
/// a large bitmap costs no memory until pages are marked.
#[cfg(not(loom))]
pub(crate) fn zeroed(len: usize) -> Box<[AtomicU64]> {
    bytemuck::zeroed_slice_box(len)
}

#[cfg(loom)]
pub(crate) fn zeroed(len: usize) -> Box<[AtomicU64]> {
    (0..len).map(|_| AtomicU64::new(0)).collect()
}
