// SPDX-License-Identifier: GPL-2.0-or-later

//! Broken preconditions: what the original guards with `assert()`.
//!
//! Checks return a `Violation` holding the offending values; it is formatted only when reported,
//! so the checks cost a compare on the hot paths. The safe API panics with it, its `try_`
//! methods return it (the Go and Python bindings turn it into an error), the C ABI aborts with
//! it, each naming the function.

use std::fmt;

use super::BitmapError;

/// A broken precondition and its values: what the `try_` methods of [`HBitmap`](super::HBitmap)
/// return where their panicking counterparts panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// An item past the last group.
    ItemOutOfRange { item: u64, group: u64, groups: u64 },
    /// `start + count - 1` overflows.
    RangeWraps { start: u64, count: u64 },
    /// A range ending past the last group.
    RangeOutOfRange {
        start: u64,
        count: u64,
        last: u64,
        groups: u64,
    },
    /// A granularity outside 0..64, or a size needing more than 2^41 groups: what
    /// [`HBitmap::new`](super::HBitmap::new) refuses.
    Geometry(BitmapError),
    /// A meta bitmap chunk size that is not a power of two.
    ChunkNotPowerOfTwo(i32),
    /// A second meta bitmap.
    MetaExists,
    /// A meta bitmap whose granularity would reach 64.
    MetaGranularity { chunk_size: i32, granularity: u32 },
    /// Serialization of a bitmap whose granularity is 58 or more.
    NotSerializable(u32),
    /// A serialization buffer shorter than the chunk's serialized size.
    BufferTooShort { len: u64, needed: u64 },
    /// A serialization chunk starting off alignment.
    ChunkStart { start: u64, align: u64 },
    /// A serialization chunk, not the last, whose length is off alignment.
    ChunkCount { count: u64, align: u64 },
    /// An iterator positioned past the last word: its bitmap shrank after `iter_init`.
    IterPastEnd { pos: u64, words: u64 },
    /// A size above `INT64_MAX`, which current QEMU's API cannot address.
    SizeOverInt64(u64),
    /// A negative position or length given to current QEMU's signed API.
    Negative { what: &'static str, value: i64 },
    /// A `max_dirty_count` that is not positive.
    MaxCountNotPositive(i64),
    /// A status query over an empty range or one ending past the size.
    StatusRange { start: u64, count: u64, size: u64 },
    /// A reset whose start, or whose length short of the end, is not a multiple of the group
    /// size (current QEMU's API resets whole groups only).
    ResetMisaligned {
        start: u64,
        count: u64,
        group_size: u64,
        size: u64,
    },
    /// Merge operands of different sizes in items.
    MergeSizes { a: u64, b: u64, result: u64 },
    /// A merge whose operands share a granularity that the result has not.
    MergeGranularity { operands: u32, result: u32 },
}

impl std::error::Error for Violation {}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Violation::ItemOutOfRange { item, group, groups } => {
                write!(f, "item {item} is in group {group}, beyond the bitmap's {groups} groups")
            }
            Violation::RangeWraps { start, count } => {
                write!(f, "range start {start} count {count} wraps past 2^64")
            }
            Violation::RangeOutOfRange { start, count, last, groups } => write!(
                f,
                "range start {start} count {count} ends in group {last}, beyond the bitmap's {groups} groups"
            ),
            Violation::Geometry(why) => why.fmt(f),
            Violation::ChunkNotPowerOfTwo(chunk_size) => {
                write!(f, "chunk size {chunk_size} is not a power of two")
            }
            Violation::MetaExists => write!(f, "the bitmap already has a meta bitmap"),
            Violation::MetaGranularity { chunk_size, granularity } => write!(
                f,
                "chunk size {chunk_size} gives the meta bitmap granularity {granularity}, not below 64"
            ),
            Violation::NotSerializable(granularity) => {
                write!(f, "granularity {granularity} is not below 58: not serializable")
            }
            Violation::BufferTooShort { len, needed } => {
                write!(f, "buffer of {len} bytes, {needed} needed")
            }
            Violation::ChunkStart { start, align } => {
                write!(f, "chunk start {start} is not a multiple of {align}")
            }
            Violation::ChunkCount { count, align } => write!(
                f,
                "chunk count {count} is not a multiple of {align} and the chunk is not the last one"
            ),
            Violation::IterPastEnd { pos, words } => write!(
                f,
                "iterator at word {pos} is past the bitmap's {words} words (truncated while iterating?)"
            ),
            Violation::SizeOverInt64(size) => {
                write!(f, "size {size} is above INT64_MAX")
            }
            Violation::Negative { what, value } => write!(f, "{what} {value} is negative"),
            Violation::MaxCountNotPositive(count) => {
                write!(f, "max_dirty_count {count} is not positive")
            }
            Violation::StatusRange { start, count, size } => write!(
                f,
                "range start {start} count {count} is empty or ends past the bitmap's size {size}"
            ),
            Violation::ResetMisaligned { start, count, group_size, size } => write!(
                f,
                "range start {start} count {count} does not cover whole groups of {group_size} \
                 items (a partial last group is allowed only at the size {size})"
            ),
            Violation::MergeSizes { a, b, result } => write!(
                f,
                "sizes differ: a has {a} items, b {b}, result {result}"
            ),
            Violation::MergeGranularity { operands, result } => write!(
                f,
                "a and b have granularity {operands} but result has {result}"
            ),
        }
    }
}
