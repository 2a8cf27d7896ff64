//! Broken preconditions: what the original guards with `assert()`.
//!
//! Checks return a `Violation` holding the offending values; it is formatted only when reported,
//! so the checks cost a compare on the hot paths. The safe API panics with it, the C ABI aborts
//! with it, both naming the function.

use std::fmt;

/// A broken precondition and its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// A size needing more than 2^41 groups.
    TooLarge {
        size: u64,
        granularity: u32,
        groups: u64,
    },
    /// A granularity outside 0..64.
    Granularity(i64),
    /// A meta bitmap chunk size that is not a power of two.
    ChunkNotPowerOfTwo(i32),
    /// A second meta bitmap.
    MetaExists,
    /// A meta bitmap whose granularity would reach 64.
    MetaGranularity { chunk_size: i32, granularity: u32 },
    /// Serialization of a bitmap whose granularity is 58 or more.
    NotSerializable(u32),
    /// A serialization chunk starting off alignment.
    ChunkStart { start: u64, align: u64 },
    /// A serialization chunk, not the last, whose length is off alignment.
    ChunkCount { count: u64, align: u64 },
    /// An iterator positioned past the last word: its bitmap shrank after `iter_init`.
    IterPastEnd { pos: u64, words: u64 },
}

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
            Violation::TooLarge { size, granularity, groups } => write!(
                f,
                "size {size} at granularity {granularity} needs {groups} groups, more than 2^41"
            ),
            Violation::Granularity(granularity) => {
                write!(f, "granularity {granularity} is not in 0..64")
            }
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
        }
    }
}
