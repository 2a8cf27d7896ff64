//! QEMU's hierarchical dirty bitmap (`util/hbitmap.c`) in Rust, with a drop-in C ABI.
//!
//! Layers, each in its own module:
//! - [`bitmap`](crate::HBitmap): the bitmap (levels, set/reset, iteration, search, resize, merge,
//!   meta bitmaps), safe Rust;
//! - [`serialize`]: QEMU's little-endian, word-size-independent serialization;
//! - `ffi`: the C ABI of `include/hbitmap.h`, the only place with `extern "C"` and raw pointers.

mod bitmap;
#[doc(hidden)]
pub mod ffi;
pub mod qcow2;
pub mod serialize;

pub use crate::bitmap::{
    BitmapError, Extents, HBitmap, Iter, BITS_PER_LEVEL, BITS_PER_WORD, LEVELS, LOG_MAX_SIZE,
    MAX_GROUPS,
};
