// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The atomics the bitmap is built on: the standard library's, or loom's when the crate is built
//! with `--cfg loom` for the model tests (`tests/loom.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Between a mark's OR and its read of the summary, under loom only: loom models `SeqCst` loads
/// and read-modify-writes as `AcqRel` (tokio-rs/loom#180), which would let the mark and a
/// harvest each miss the other's write; a `SeqCst` fence, which loom does model, excludes that
/// outcome as the `SeqCst` accesses do outside loom. Elsewhere it is nothing: a fence there would
/// cost a mark as much as its OR.
#[inline(always)]
pub(crate) fn fence_for_loom() {
    #[cfg(loom)]
    fence(Ordering::SeqCst);
}

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
