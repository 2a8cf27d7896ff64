// SPDX-License-Identifier: GPL-2.0-or-later

//! Differential tests against QEMU 10.0.2's `util/hbitmap.c` (current QEMU's API, unchanged since
//! QEMU 7.2), built by the `hbitmap-oracle` crate with `qemu10_`-prefixed names: random sequences
//! of that API's operations run on this library's C ABI (`hbitmap::ffi::*`, the `_qemu10`
//! functions where the two generations differ) and on QEMU's, comparing every returned value,
//! every output parameter (including ones that must stay untouched), the iterator structs,
//! serialized bytes and SHA-256 digests, and the dirty count after every change.
//!
//! Only calls that QEMU 10 accepts are made (`Ctx::valid` holds its `assert()`s); besides, none
//! whose C behaviour is undefined:
//! - bits past the last group (`deserialize_ones` or `_part` over the last word) only where their
//!   items fit in `int64_t` (QEMU's iteration shifts a signed value left), and never a shrink to
//!   fewer words while they may be set (a summary bit would outlive its word);
//! - while deserialization without `finish` may have cleared bits, only the last level is read
//!   (QEMU's iteration asserts on a summary bit leading to a clean word);
//! - `truncate` and `merge` on consistent bitmaps only; `merge` of equal granularities only into
//!   a result of that granularity (QEMU writes past a coarser result's levels); never `merge` or
//!   `finish` on a bitmap of size 0 (QEMU counts from group 0 there).
//!
//! Environment, as for `tests/differential.rs`:
//! - `HBITMAP_DIFF_OPS`: random operations over all seeds (default 2 000 000 in release builds,
//!   100 000 in debug builds);
//! - `HBITMAP_DIFF_SEED`: comma-separated seeds (decimal or 0x hex) instead of the default list;
//! - `HBITMAP_DIFF_SCENARIO`: run only this scenario of each seed (to reproduce a failure);
//! - `HBITMAP_DIFF_TRACE`: print every operation before running it (for a crash, which cannot be
//!   caught and minimized).

use std::ffi::CStr;
use std::fmt::{Debug, Display};

use hbitmap::ffi::{self as ours, HBitmapIter, HBITMAP_LEVELS};
use hbitmap::HBitmap;
use hbitmap_oracle::qemu10::{self as oracle, Qemu10HBitmap, Qemu10HBitmapIter};
use libc::{c_char, c_int};

use hbitmap_testkit::differential::{self, Batch, Subject};
use hbitmap_testkit::Rng;

/// True (after saying why) when QEMU 10's implementation was not built and the tests must pass
/// vacuously.
fn skip() -> bool {
    if oracle::AVAILABLE_QEMU10 {
        return false;
    }
    hbitmap_testkit::tools::oracle_missing(
        "the differential tests against QEMU 10",
        &format!(
            "QEMU 10's hbitmap.c was not built ({}); set HBITMAP_QEMU10_REFERENCE to a folder \
             built by tests/qemu10/build-oracle.sh (or ../shared/reference/build-qemu10.sh)",
            oracle::MISSING_QEMU10
        ),
    );
    true
}

/// Bitmaps per scenario: slots 0 to 2 share a geometry; slot 3 has the same size and (mostly) a
/// different granularity, for QEMU 10's merge of different granularities.
const SLOTS: usize = 4;
/// Largest number of groups of a bitmap (64 KiB of last level).
const MAX_GROUPS: u64 = 1 << 19;
/// Items compared per full iteration.
const ITER_CAP: u32 = 1 << 14;

// ---------------------------------------------------------------------------------------------
// One bitmap in both implementations.
// ---------------------------------------------------------------------------------------------

/// The same bitmap in both implementations. Invariant: both pointers are live from `alloc` until
/// `free` (`Ctx::drop`), and every operation's arguments were checked by `Ctx::valid`.
#[derive(Clone, Copy)]
struct Handles {
    o: *mut HBitmap,
    r: *mut Qemu10HBitmap,
}

/// Calls one function in each implementation with the same arguments after the bitmap.
macro_rules! both {
    ($h:expr, $ours:path, $theirs:path $(, $arg:expr)* $(,)?) => {{
        let h: Handles = $h;
        // SAFETY: `h` holds live bitmaps and the arguments meet QEMU 10's preconditions (the
        // `Handles` invariant: `Ctx::valid` checked the operation).
        unsafe { ($ours(h.o $(, $arg)*), $theirs(h.r $(, $arg)*)) }
    }};
}

/// Converts a digest string from either implementation and frees it.
///
/// # Safety
/// `digest` is a NUL-terminated string allocated with `malloc`.
unsafe fn take_digest(digest: *mut c_char) -> String {
    assert!(!digest.is_null(), "sha256 returned NULL");
    // SAFETY: a NUL-terminated string (the caller's contract).
    let text = unsafe { CStr::from_ptr(digest) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated with malloc (ours) or g_malloc, which is malloc (GLib >= 2.46).
    unsafe { libc::free(digest.cast()) };
    text
}

impl Handles {
    fn alloc(size: u64, granularity: u32) -> Handles {
        // SAFETY: the geometry generator keeps `size <= INT64_MAX`, `granularity < 64` and the
        // groups within 2^41.
        unsafe {
            Handles {
                o: ours::hbitmap_alloc_qemu10(size, granularity as c_int),
                r: oracle::qemu10_hbitmap_alloc(size, granularity as c_int),
            }
        }
    }

    fn free(self) {
        // SAFETY: live, and not used again (Ctx::drop).
        unsafe {
            ours::hbitmap_free(self.o);
            oracle::qemu10_hbitmap_free(self.r);
        }
    }

    fn count(self) -> (u64, u64) {
        both!(self, ours::hbitmap_count, oracle::qemu10_hbitmap_count)
    }

    fn sha256(self) -> (String, String) {
        // SAFETY: live handles; both return a malloc'ed string.
        unsafe {
            (
                take_digest(ours::hbitmap_sha256(self.o, std::ptr::null_mut())),
                take_digest(oracle::qemu10_hbitmap_sha256(self.r, std::ptr::null_mut())),
            )
        }
    }

    /// Both serializations of a valid chunk of `len` bytes, each followed by 8 guard bytes.
    fn serialize(self, start: u64, count: u64, len: usize) -> (Vec<u8>, Vec<u8>) {
        let mut mine = vec![0xa5u8; len + 8];
        let mut theirs = mine.clone();
        // SAFETY: live handles, a valid chunk (checked by the caller); each buffer has room for
        // the chunk's `len` bytes.
        unsafe {
            ours::hbitmap_serialize_part(self.o, mine.as_mut_ptr(), start, count);
            oracle::qemu10_hbitmap_serialize_part(self.r, theirs.as_mut_ptr(), start, count);
        }
        (mine, theirs)
    }
}

/// What an iterator struct shows a C caller: granularity, position, per-level masks.
type IterView = (c_int, usize, [u64; HBITMAP_LEVELS]);

/// An iterator in each implementation over the same bitmap, initialized by `hbitmap_iter_init`.
struct IterPair {
    o: HBitmapIter,
    r: Qemu10HBitmapIter,
}

impl IterPair {
    /// Initialized at `first`, which `Ctx::valid` checked to lie in a group of `h`.
    fn init(h: Handles, first: u64) -> IterPair {
        let mut pair = IterPair {
            o: HBitmapIter {
                hb: std::ptr::null(),
                granularity: 0,
                pos: 0,
                cur: [0; HBITMAP_LEVELS],
            },
            r: Qemu10HBitmapIter::default(),
        };
        // SAFETY: live handles, `first` in the bitmap; the structs are writable.
        unsafe {
            ours::hbitmap_iter_init(&mut pair.o, h.o, first);
            oracle::qemu10_hbitmap_iter_init(&mut pair.r, h.r, first);
        }
        pair
    }

    fn views(&self) -> (IterView, IterView) {
        (
            (self.o.granularity, self.o.pos, self.o.cur),
            (self.r.granularity, self.r.pos, self.r.cur),
        )
    }

    fn next(&mut self) -> (i64, i64) {
        // SAFETY: both initialized on bitmaps that are live and consistent enough to iterate
        // (`Ctx::valid`), and not shrunk since (a truncate drops the iterator).
        unsafe {
            (
                ours::hbitmap_iter_next_qemu10(&mut self.o),
                oracle::qemu10_hbitmap_iter_next(&mut self.r),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runner's knowledge of each bitmap.
// ---------------------------------------------------------------------------------------------

/// How far the summary levels may disagree with the last level after deserialization without
/// `finish`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stale {
    /// Consistent.
    No,
    /// Only `deserialize_ones` since: some dirty words may lack their summary bit, but every
    /// summary bit still leads to a dirty word, so iteration is safe and deterministic.
    Ones,
    /// A zeroing step since: a summary bit may lead to a clean word (QEMU's iteration asserts).
    /// Only the last level is read until `finish` or `reset_all`.
    Unsafe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Part,
    Zeroes,
    Ones,
}

struct Pair {
    h: Handles,
    size: u64,
    granularity: u32,
    groups: u64,
    stale: Stale,
    /// Bits past the last group may be set (deserialization writes whole words).
    padding_dirty: bool,
    iter: Option<IterPair>,
}

/// Groups of `2^granularity` items covering `size` items.
fn groups_for(size: u64, granularity: u32) -> u64 {
    ((u128::from(size) + (1u128 << granularity) - 1) >> granularity) as u64
}

/// Whether `start + count`, unbounded, is at most `limit`.
fn within(start: u64, count: u64, limit: u128) -> bool {
    u128::from(start) + u128::from(count) <= limit
}

impl Pair {
    fn new(size: u64, granularity: u32) -> Pair {
        Pair {
            h: Handles::alloc(size, granularity),
            size,
            granularity,
            groups: groups_for(size, granularity),
            stale: Stale::No,
            padding_dirty: false,
            iter: None,
        }
    }

    /// Items addressable by set/reset/get: the whole last group, even past the size.
    fn limit(&self) -> u128 {
        u128::from(self.groups) << self.granularity
    }

    fn group(&self) -> u128 {
        1u128 << self.granularity
    }

    fn words(&self) -> u64 {
        self.groups.div_ceil(64).max(1)
    }

    fn serializable(&self) -> bool {
        self.granularity < 58
    }

    /// Items per serialization chunk (a word of groups).
    fn align(&self) -> u128 {
        64u128 << self.granularity
    }

    /// Whether the last word has bits past the last group.
    fn has_padding(&self) -> bool {
        self.groups % 64 != 0 || self.groups == 0
    }

    /// Whether bits past the last group may be set: their items, which QEMU's iteration computes
    /// as `int64_t << granularity`, fit in `int64_t`.
    fn padding_allowed(&self) -> bool {
        (u128::from(self.words() * 64 - 1) << self.granularity) <= i64::MAX as u128
    }

    fn searchable(&self) -> bool {
        self.stale != Stale::Unsafe
    }

    fn has_item(&self, item: u64) -> bool {
        u128::from(item) < self.limit()
    }

    /// `count` items from `start` lie in the bitmap's groups (an empty range anywhere).
    fn has_range(&self, start: u64, count: u64) -> bool {
        count == 0 || within(start, count, self.limit())
    }

    /// QEMU 10's `serialization_chunk` assertions.
    fn valid_chunk(&self, start: u64, count: u64) -> bool {
        if !self.serializable() || u128::from(start) % self.align() != 0 {
            return false;
        }
        if count == 0 {
            return true;
        }
        let last = (u128::from(start) + u128::from(count) - 1) >> self.granularity;
        last < u128::from(self.groups)
            && (last == u128::from(self.groups) - 1 || u128::from(count) % self.align() == 0)
    }

    /// Whether a chunk reaches the last word (and its padding bits).
    fn chunk_reaches_padding(&self, start: u64, count: u64) -> bool {
        count > 0
            && self.has_padding()
            && (u128::from(start) + u128::from(count) - 1) >> self.granularity >> 6
                == u128::from(self.words() - 1)
    }

    /// QEMU 10's `hbitmap_truncate` preconditions, and no shrink that QEMU would leave with a
    /// summary bit past the last level.
    fn valid_truncate(&self, size: u64) -> bool {
        let groups = groups_for(size, self.granularity);
        size <= i64::MAX as u64
            && groups <= MAX_GROUPS
            && self.stale == Stale::No
            && !(self.padding_dirty && groups.div_ceil(64).max(1) < self.words())
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.
// ---------------------------------------------------------------------------------------------

/// One operation with all its parameters, so that a failing sequence can be replayed.
#[derive(Clone, Debug)]
enum Op {
    Set {
        t: usize,
        start: u64,
        count: u64,
    },
    Reset {
        t: usize,
        start: u64,
        count: u64,
    },
    ResetAll {
        t: usize,
    },
    Get {
        t: usize,
        item: u64,
    },
    Count {
        t: usize,
    },
    NextDirty {
        t: usize,
        start: i64,
        count: i64,
    },
    NextZero {
        t: usize,
        start: i64,
        count: i64,
    },
    NextDirtyArea {
        t: usize,
        start: i64,
        end: i64,
        max: i64,
    },
    Status {
        t: usize,
        start: i64,
        count: i64,
    },
    /// Iterate from `first` to the end (at most `ITER_CAP` items).
    IterFull {
        t: usize,
        first: u64,
    },
    /// Start the slot's live iterator, which later steps see the bitmap change under.
    IterInit {
        t: usize,
        first: u64,
    },
    IterStep {
        t: usize,
        steps: u32,
    },
    Serialize {
        t: usize,
        start: u64,
        count: u64,
    },
    Deserialize {
        t: usize,
        fill: Fill,
        start: u64,
        count: u64,
        finish: bool,
        seed: u64,
    },
    Finish {
        t: usize,
    },
    Sha {
        t: usize,
    },
    Truncate {
        t: usize,
        size: u64,
    },
    /// Every slot to the same size, so that they can be merged again.
    TruncateAll {
        size: u64,
    },
    Merge {
        a: usize,
        b: usize,
        result: usize,
    },
    /// Compare the whole bitmap: every chunk's bytes (or every group), the digest, the count
    /// and an iteration from the start.
    Check {
        t: usize,
        seed: u64,
    },
}

type Geometry = [(u64, u32); SLOTS];

struct Ctx {
    slots: Vec<Pair>,
    /// Results compared.
    calls: u64,
    trace: bool,
}

type Outcome = Result<(), String>;

impl Drop for Ctx {
    fn drop(&mut self) {
        for pair in self.slots.drain(..) {
            pair.h.free();
        }
    }
}

impl Ctx {
    fn same<T: PartialEq + Debug>(&mut self, what: impl Display, results: (T, T)) -> Outcome {
        self.calls += 1;
        let (mine, theirs) = results;
        if mine == theirs {
            Ok(())
        } else {
            Err(format!("{what}: ours {mine:?}, QEMU 10 {theirs:?}"))
        }
    }

    fn same_count(&mut self, t: usize, after: &str) -> Outcome {
        let counts = self.slots[t].h.count();
        self.same(format_args!("count of slot {t} after {after}"), counts)
    }

    /// Serialization size and bytes of one chunk.
    fn compare_chunk(&mut self, t: usize, start: u64, count: u64) -> Outcome {
        let h = self.slots[t].h;
        let sizes = both!(
            h,
            ours::hbitmap_serialization_size,
            oracle::qemu10_hbitmap_serialization_size,
            start,
            count
        );
        self.same(format_args!("serialization_size({start}, {count})"), sizes)?;
        let bytes = h.serialize(start, count, sizes.1 as usize);
        self.same(format_args!("serialize_part({start}, {count})"), bytes)
    }

    fn deserialize(
        &mut self,
        t: usize,
        fill: Fill,
        start: u64,
        count: u64,
        finish: bool,
        seed: u64,
    ) -> Outcome {
        let p = &self.slots[t];
        let h = p.h;
        match fill {
            Fill::Part => {
                let len = both!(
                    h,
                    ours::hbitmap_serialization_size,
                    oracle::qemu10_hbitmap_serialization_size,
                    start,
                    count
                );
                let mut rng = Rng::new(seed);
                let mut words: Vec<u64> = (0..len.1 / 8).map(|_| rng.word()).collect();
                let keep_padding = p.padding_allowed() && rng.chance(1, 2);
                if p.chunk_reaches_padding(start, count) && !keep_padding {
                    let used = p.groups % 64;
                    if let Some(last) = words.last_mut() {
                        *last &= (1u64 << used) - 1;
                    }
                }
                let mut mine: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let mut theirs = mine.clone();
                // SAFETY: live handles, a valid chunk, buffers of its serialization size.
                unsafe {
                    ours::hbitmap_deserialize_part(h.o, mine.as_mut_ptr(), start, count, finish);
                    oracle::qemu10_hbitmap_deserialize_part(
                        h.r,
                        theirs.as_mut_ptr(),
                        start,
                        count,
                        finish,
                    );
                }
                self.same(
                    "deserialize_part's buffer",
                    ((len.0, mine), (len.1, theirs)),
                )?;
            }
            Fill::Zeroes => {
                both!(
                    h,
                    ours::hbitmap_deserialize_zeroes,
                    oracle::qemu10_hbitmap_deserialize_zeroes,
                    start,
                    count,
                    finish
                );
            }
            Fill::Ones => {
                both!(
                    h,
                    ours::hbitmap_deserialize_ones,
                    oracle::qemu10_hbitmap_deserialize_ones,
                    start,
                    count,
                    finish
                );
            }
        }
        let p = &mut self.slots[t];
        if count > 0 {
            if fill != Fill::Zeroes && p.chunk_reaches_padding(start, count) {
                p.padding_dirty = true;
            }
            p.stale = match (finish, fill) {
                (true, _) => Stale::No,
                (false, Fill::Ones) => p.stale.max(Stale::Ones),
                (false, _) => Stale::Unsafe,
            };
        }
        self.same_count(t, "deserialization")
    }

    fn truncate(&mut self, t: usize, size: u64) -> Outcome {
        both!(
            self.slots[t].h,
            ours::hbitmap_truncate_qemu10,
            oracle::qemu10_hbitmap_truncate,
            size
        );
        let p = &mut self.slots[t];
        p.size = size;
        p.groups = groups_for(size, p.granularity);
        // QEMU's iterators may point past a shrunk level.
        p.iter = None;
        self.same_count(t, "truncate")
    }

    /// The whole bitmap, compared.
    fn check(&mut self, t: usize, seed: u64) -> Outcome {
        let mut rng = Rng::new(seed);
        let h = self.slots[t].h;
        let granularity = both!(
            h,
            ours::hbitmap_granularity,
            oracle::qemu10_hbitmap_granularity
        );
        self.same("granularity", granularity)?;
        self.apply(&Op::Count { t })?;
        let digests = h.sha256();
        self.same("sha256", digests)?;
        let serializable = both!(
            h,
            ours::hbitmap_is_serializable,
            oracle::qemu10_hbitmap_is_serializable
        );
        self.same("is_serializable", serializable)?;
        let (limit, groups, group) = {
            let p = &self.slots[t];
            (p.limit(), p.groups, p.group())
        };
        if serializable.1 {
            let align = both!(
                h,
                ours::hbitmap_serialization_align,
                oracle::qemu10_hbitmap_serialization_align
            );
            self.same("serialization_align", align)?;
            // Every chunk, in aligned pieces of random lengths; the last reaches the end.
            let align = u128::from(align.1);
            let mut start = 0u128;
            while start < limit {
                let chunks = rng.range(1, 64);
                let count = (u128::from(chunks) * align).min(limit - start);
                self.compare_chunk(t, start as u64, count as u64)?;
                start += count;
            }
        } else {
            for group in 0..groups {
                let item = (u128::from(group) << self.slots[t].granularity) as u64;
                self.apply(&Op::Get { t, item })?;
            }
        }
        for _ in 0..8.min(groups) {
            let item = rng.below128(limit) as u64;
            self.apply(&Op::Get { t, item })?;
        }
        if groups > 0 && self.slots[t].searchable() {
            let first = rng.below128(group.min(limit)) as u64;
            self.apply(&Op::IterFull { t, first })?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Generation: arguments near every boundary, filtered by `Ctx::valid`.
// ---------------------------------------------------------------------------------------------

/// Group counts at level boundaries (64, 64^2, 64^3 groups) and either side.
const BOUNDARY_GROUPS: [u64; 14] = [
    1, 2, 63, 64, 65, 127, 128, 4095, 4096, 4097, 262143, 262144, 262145, 4160,
];

/// Largest number of groups of a bitmap at `granularity`: within `MAX_GROUPS` and a size of at
/// most `INT64_MAX`.
fn max_groups(granularity: u32) -> u64 {
    groups_for(i64::MAX as u64, granularity).min(MAX_GROUPS)
}

/// A size of exactly `groups` groups at `granularity` (the last one full or partial), at most
/// `INT64_MAX`.
fn size_for(rng: &mut Rng, groups: u64, granularity: u32) -> u64 {
    if groups == 0 {
        return 0;
    }
    let group = 1u128 << granularity;
    let top = u128::from(groups) << granularity;
    let short = if rng.chance(1, 2) {
        0
    } else {
        rng.below128(group)
    };
    let size = (top - short).min(i64::MAX as u128);
    let low = top - group + 1;
    let size = if size < low { low } else { size };
    let size = if size == i64::MAX as u128 && rng.chance(1, 2) {
        // Right at INT64_MAX or just below.
        size - rng.below128(size - low + 1).min(u128::from(rng.below(8)))
    } else {
        size
    };
    debug_assert_eq!(groups_for(size as u64, granularity), groups);
    size as u64
}

fn gen_granularity(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0..=2 => 0,
        3..=6 => rng.range(1, 20) as u32,
        7 => rng.pick(&[41u32, 42, 43, 44, 45, 46, 57, 58, 62, 63]),
        _ => rng.range(21, 63) as u32,
    }
}

fn gen_groups(rng: &mut Rng, granularity: u32) -> u64 {
    let cap = max_groups(granularity);
    let groups = match rng.below(12) {
        0 => 0,
        1 => cap,
        2..=5 => rng.pick(&BOUNDARY_GROUPS),
        6..=8 => rng.range(1, 300),
        9..=10 => rng.range(1, 5000),
        _ => rng.range(1, MAX_GROUPS / 2),
    };
    if groups > cap {
        rng.range(1, cap)
    } else {
        groups
    }
}

fn gen_geometry(rng: &mut Rng) -> Geometry {
    let granularity = gen_granularity(rng);
    let groups = gen_groups(rng, granularity);
    let size = size_for(rng, groups, granularity);
    let other = if rng.chance(3, 4) {
        // Another granularity that fits the size.
        (0..8)
            .map(|_| gen_granularity(rng))
            .find(|&g| g != granularity && groups_for(size, g) <= MAX_GROUPS)
            .unwrap_or(granularity)
    } else {
        granularity
    };
    [
        (size, granularity),
        (size, granularity),
        (size, granularity),
        (size, other),
    ]
}

/// A point in `0..limit` (`limit > 0`), mostly near group, word and summary boundaries, the size
/// or the ends.
fn gen_point(rng: &mut Rng, p: &Pair, limit: u128) -> u128 {
    let group = p.group();
    let near = |rng: &mut Rng, unit: u128| {
        let k = rng.below128(limit / unit + 1);
        (k * unit + u128::from(rng.below(3))).saturating_sub(1)
    };
    let point = match rng.below(9) {
        0 => 0,
        1 => limit - 1,
        2 | 3 => rng.below128(limit),
        4 => near(rng, group),
        5 => near(rng, group * 64),
        6 => near(rng, group * 4096),
        7 => (u128::from(p.size) + u128::from(rng.below(3))).saturating_sub(1),
        _ => rng.below128(limit.min(group * 200)),
    };
    point.min(limit - 1)
}

/// A length from `start` within `room` (`room > 0`): 1, short, to the end, or random.
fn gen_length(rng: &mut Rng, p: &Pair, room: u128) -> u128 {
    let length = match rng.below(6) {
        0 => 1,
        1 => rng.below128(p.group() * 3) + 1,
        2 => room,
        3 => rng.below128(p.group() * 64 * 3) + 1,
        _ => rng.below128(room) + 1,
    };
    length.clamp(1, room)
}

fn gen_range(rng: &mut Rng, p: &Pair) -> (u64, u64) {
    let limit = p.limit();
    if limit == 0 || rng.chance(1, 60) {
        return (
            if limit == 0 {
                0
            } else {
                gen_point(rng, p, limit) as u64
            },
            0,
        );
    }
    let start = gen_point(rng, p, limit);
    let count = if rng.chance(1, 8) && start < u128::from(p.size) {
        u128::from(p.size) - start
    } else {
        gen_length(rng, p, limit - start)
    };
    (start as u64, count as u64)
}

/// A reset range that QEMU 10 accepts: whole groups, or up to the size.
fn gen_reset_range(rng: &mut Rng, p: &Pair) -> (u64, u64) {
    let limit = p.limit();
    if limit == 0 || rng.chance(1, 60) {
        return (0, 0);
    }
    let group = p.group();
    let start = gen_point(rng, p, limit) / group * group;
    let count = match rng.below(6) {
        0 if start < u128::from(p.size) => u128::from(p.size) - start,
        1 => limit - start,
        _ => gen_length(rng, p, limit - start).div_ceil(group) * group,
    };
    (start as u64, count as u64)
}

/// A search start: inside the bitmap mostly, at or past the size sometimes, up to `INT64_MAX`.
fn gen_search_start(rng: &mut Rng, p: &Pair) -> i64 {
    let limit = p.limit();
    let start = match rng.below(10) {
        0 => u128::from(p.size),
        1 => i64::MAX as u128,
        2 => u128::from(p.size) + u128::from(rng.below(1000)),
        3 => rng.below128(i64::MAX as u128),
        _ if limit > 0 => gen_point(rng, p, limit),
        _ => 0,
    };
    start.min(i64::MAX as u128) as i64
}

/// A search length from `start`: 0, 1, short, to the size and either side, crossing the end,
/// up to `INT64_MAX - start`, or `INT64_MAX`.
fn gen_search_count(rng: &mut Rng, p: &Pair, start: i64) -> i64 {
    let start = start as u128;
    let to_size = u128::from(p.size).saturating_sub(start);
    let count = match rng.below(11) {
        0 => 0,
        1 => 1,
        2 => rng.below128(p.group() * 3) + 1,
        3 => to_size,
        4 => to_size + 1,
        5 => to_size.saturating_sub(1),
        6 => i64::MAX as u128 - start,
        7 => i64::MAX as u128,
        8 => rng.below128(to_size + 1),
        9 => rng.below128(i64::MAX as u128),
        _ => rng.below128(p.group() * 64 * 4) + 1,
    };
    count.min(i64::MAX as u128) as i64
}

/// A `max_dirty_count`: 1, small, a group, `INT64_MAX`, or random.
fn gen_max(rng: &mut Rng, p: &Pair) -> i64 {
    let max = match rng.below(6) {
        0 => 1,
        1 => u128::from(rng.range(1, 100)),
        2 => p.group(),
        3 | 4 => i64::MAX as u128,
        _ => rng.below128(u128::from(p.size) + 1) + 1,
    };
    max.min(i64::MAX as u128) as i64
}

/// A serialization chunk: aligned start; whole words, to the end, to the size, or empty.
fn gen_chunk(rng: &mut Rng, p: &Pair) -> (u64, u64) {
    let limit = p.limit();
    let align = p.align();
    if limit == 0 || rng.chance(1, 40) {
        return (0, 0);
    }
    let chunks = limit.div_ceil(align);
    let first = match rng.below(4) {
        0 => 0,
        1 => chunks - 1,
        _ => rng.below128(chunks),
    };
    let start = first * align;
    let count = match rng.below(5) {
        0 => limit - start,
        1 if start < u128::from(p.size) => u128::from(p.size) - start,
        _ => {
            let whole = (chunks - first).min(u128::from(rng.range(1, 70)));
            (rng.below128(whole) + 1) * align
        }
    };
    (start as u64, count.min(limit - start) as u64)
}

fn gen_truncate_size(rng: &mut Rng, p: &Pair, cap: u128) -> u64 {
    let size = u128::from(p.size);
    let group = p.group();
    let new = match rng.below(9) {
        0 => 0,
        1 => size + u128::from(rng.range(1, 200)),
        2 => size.saturating_sub(u128::from(rng.range(1, 200))),
        3 => size * 2,
        4 => size / 2,
        5 => size + group * u128::from(rng.range(1, 200)),
        6 => size.saturating_sub(group * u128::from(rng.range(1, 200))),
        7 => (u128::from(rng.pick(&BOUNDARY_GROUPS)) * group).saturating_sub(rng.below128(group)),
        _ => rng.below128(cap + 1),
    };
    new.min(cap) as u64
}

/// Largest size `truncate` may give slot `p` in the tests.
fn truncate_cap(p: &Pair) -> u128 {
    (u128::from(max_groups(p.granularity)) << p.granularity).min(i64::MAX as u128)
}

fn gen_slot(rng: &mut Rng) -> usize {
    [0, 0, 0, 1, 1, 2, 3][rng.below(7) as usize]
}

fn gen_candidate(rng: &mut Rng, ctx: &Ctx) -> Op {
    const WEIGHTS: [u64; 20] = [
        14, 12, 1, 6, 2, 8, 8, 10, 8, 2, 2, 5, 4, 6, 2, 2, 2, 1, 6, 1,
    ];
    let t = gen_slot(rng);
    let p = &ctx.slots[t];
    let item = |rng: &mut Rng| {
        if p.limit() == 0 {
            0
        } else {
            gen_point(rng, p, p.limit()) as u64
        }
    };
    match rng.weighted(&WEIGHTS) {
        0 => {
            let (start, count) = gen_range(rng, p);
            Op::Set { t, start, count }
        }
        1 => {
            let (start, count) = gen_reset_range(rng, p);
            Op::Reset { t, start, count }
        }
        2 => Op::ResetAll { t },
        3 => Op::Get { t, item: item(rng) },
        4 => Op::Count { t },
        5 => {
            let start = gen_search_start(rng, p);
            let count = gen_search_count(rng, p, start);
            Op::NextDirty { t, start, count }
        }
        6 => {
            let start = if rng.chance(1, 8) {
                // Past the size, in the last word.
                let words_end = (u128::from(p.words()) * 64) << p.granularity;
                let from = u128::from(p.size);
                (from + rng.below128(words_end.saturating_sub(from) + 1)).min(i64::MAX as u128)
                    as i64
            } else {
                gen_search_start(rng, p)
            };
            let count = gen_search_count(rng, p, start);
            Op::NextZero { t, start, count }
        }
        7 => {
            let start = gen_search_start(rng, p);
            let end = match rng.below(5) {
                0 => p.size as i64,
                1 => i64::MAX,
                2 => (p.size as i64).saturating_add(rng.range(1, 100) as i64),
                _ => start.saturating_add(gen_search_count(rng, p, start)),
            };
            Op::NextDirtyArea {
                t,
                start,
                end,
                max: gen_max(rng, p),
            }
        }
        8 => {
            if p.size == 0 {
                return Op::Count { t };
            }
            let start = gen_point(rng, p, u128::from(p.size));
            let room = u128::from(p.size) - start;
            let count = match rng.below(4) {
                0 => room,
                1 => 1,
                _ => gen_length(rng, p, room),
            };
            Op::Status {
                t,
                start: start as i64,
                count: count as i64,
            }
        }
        9 => Op::IterFull {
            t,
            first: item(rng),
        },
        10 => Op::IterInit {
            t,
            first: item(rng),
        },
        11 => Op::IterStep {
            t,
            steps: rng.range(1, 40) as u32,
        },
        12 => {
            let (start, count) = gen_chunk(rng, p);
            Op::Serialize { t, start, count }
        }
        13 => {
            let (start, count) = gen_chunk(rng, p);
            Op::Deserialize {
                t,
                fill: rng.pick(&[Fill::Part, Fill::Part, Fill::Zeroes, Fill::Ones]),
                start,
                count,
                finish: rng.chance(1, 2),
                seed: rng.next_u64(),
            }
        }
        14 => Op::Finish { t },
        15 => Op::Sha { t },
        16 => Op::Truncate {
            t,
            size: gen_truncate_size(rng, p, truncate_cap(p)),
        },
        17 => {
            let cap = ctx.slots.iter().map(truncate_cap).min().expect("slots");
            Op::TruncateAll {
                size: gen_truncate_size(rng, &ctx.slots[0], cap),
            }
        }
        18 => {
            let a = gen_slot(rng);
            let b = match rng.below(4) {
                0 => a,
                _ => gen_slot(rng),
            };
            let result = match rng.below(5) {
                0 => a,
                1 => b,
                _ => gen_slot(rng),
            };
            Op::Merge { a, b, result }
        }
        _ => Op::Check {
            t,
            seed: rng.next_u64(),
        },
    }
}

fn gen_op(rng: &mut Rng, ctx: &Ctx) -> Op {
    for _ in 0..64 {
        let op = gen_candidate(rng, ctx);
        if ctx.valid(&op) {
            return op;
        }
    }
    // Always valid; also the way out of a state where little is (stale bitmaps).
    Op::ResetAll { t: gen_slot(rng) }
}

// ---------------------------------------------------------------------------------------------
// The differential engine's view of a scenario (testkit::differential), and the tests.
// ---------------------------------------------------------------------------------------------

impl Subject for Ctx {
    type Geometry = Geometry;
    type Op = Op;

    fn new(geometry: &Geometry) -> Ctx {
        Ctx {
            slots: geometry
                .iter()
                .map(|&(size, granularity)| Pair::new(size, granularity))
                .collect(),
            calls: 0,
            trace: std::env::var_os("HBITMAP_DIFF_TRACE").is_some(),
        }
    }

    /// Whether QEMU 10 accepts `op` in the current state, with defined behaviour.
    fn valid(&self, op: &Op) -> bool {
        let non_negative = |values: &[i64]| values.iter().all(|&value| value >= 0);
        match *op {
            Op::Set { t, start, count } => {
                let p = &self.slots[t];
                p.searchable() && p.has_range(start, count)
            }
            Op::Reset { t, start, count } => {
                let p = &self.slots[t];
                let aligned = |value: u64| u128::from(value) % p.group() == 0;
                p.searchable()
                    && p.has_range(start, count)
                    && (count == 0
                        || aligned(start)
                            && (aligned(count)
                                || u128::from(start) + u128::from(count) == u128::from(p.size)))
            }
            Op::ResetAll { .. } | Op::Count { .. } | Op::Sha { .. } | Op::Check { .. } => true,
            Op::Get { t, item } => self.slots[t].has_item(item),
            Op::NextDirty { t, start, count } => {
                let p = &self.slots[t];
                non_negative(&[start, count]) && (p.searchable() || start as u64 >= p.size)
            }
            Op::NextZero { t, start, count } => {
                // QEMU reads the word holding `start` before its bounds check.
                let p = &self.slots[t];
                non_negative(&[start, count]) && (start as u64 >> p.granularity >> 6) < p.words()
            }
            Op::NextDirtyArea { t, start, end, max } => {
                let p = &self.slots[t];
                non_negative(&[start, end])
                    && max > 0
                    && (p.searchable() || start as u64 >= (end as u64).min(p.size))
            }
            Op::Status { t, start, count } => {
                let p = &self.slots[t];
                start >= 0
                    && count > 0
                    && within(start as u64, count as u64, u128::from(p.size))
                    && p.searchable()
            }
            Op::IterFull { t, first } | Op::IterInit { t, first } => {
                let p = &self.slots[t];
                p.has_item(first) && p.searchable()
            }
            Op::IterStep { t, .. } => {
                let p = &self.slots[t];
                p.iter.is_some() && p.searchable()
            }
            Op::Serialize { t, start, count } => self.slots[t].valid_chunk(start, count),
            Op::Deserialize {
                t,
                fill,
                start,
                count,
                ..
            } => {
                let p = &self.slots[t];
                // `Part` data gets clean padding bits where they are not allowed.
                p.valid_chunk(start, count)
                    && (fill != Fill::Ones
                        || p.padding_allowed()
                        || !p.chunk_reaches_padding(start, count))
            }
            Op::Finish { t } => self.slots[t].groups > 0,
            Op::Truncate { t, size } => self.slots[t].valid_truncate(size),
            Op::TruncateAll { size } => self.slots.iter().all(|p| p.valid_truncate(size)),
            Op::Merge { a, b, result } => {
                let (pa, pb, pr) = (&self.slots[a], &self.slots[b], &self.slots[result]);
                pa.size == pr.size
                    && pb.size == pr.size
                    && pr.size > 0
                    && [pa, pb, pr].iter().all(|p| p.stale == Stale::No)
                    && (pa.granularity != pb.granularity || pr.granularity == pa.granularity)
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        if self.trace {
            differential::say(format_args!("{op:?}"));
        }
        match *op {
            Op::Set { t, start, count } => {
                both!(
                    self.slots[t].h,
                    ours::hbitmap_set,
                    oracle::qemu10_hbitmap_set,
                    start,
                    count
                );
                self.same_count(t, "set")
            }
            Op::Reset { t, start, count } => {
                both!(
                    self.slots[t].h,
                    ours::hbitmap_reset_qemu10,
                    oracle::qemu10_hbitmap_reset,
                    start,
                    count
                );
                self.same_count(t, "reset")
            }
            Op::ResetAll { t } => {
                both!(
                    self.slots[t].h,
                    ours::hbitmap_reset_all,
                    oracle::qemu10_hbitmap_reset_all
                );
                let p = &mut self.slots[t];
                p.stale = Stale::No;
                p.padding_dirty = false;
                self.same_count(t, "reset_all")
            }
            Op::Get { t, item } => {
                let got = both!(
                    self.slots[t].h,
                    ours::hbitmap_get,
                    oracle::qemu10_hbitmap_get,
                    item
                );
                self.same(format_args!("get({item})"), got)
            }
            Op::Count { t } => {
                let h = self.slots[t].h;
                self.same_count(t, "anything")?;
                let empty = both!(h, ours::hbitmap_empty, oracle::qemu10_hbitmap_empty);
                self.same("empty", empty)
            }
            Op::NextDirty { t, start, count } => {
                let found = both!(
                    self.slots[t].h,
                    ours::hbitmap_next_dirty,
                    oracle::qemu10_hbitmap_next_dirty,
                    start,
                    count
                );
                self.same(format_args!("next_dirty({start}, {count})"), found)
            }
            Op::NextZero { t, start, count } => {
                let found = both!(
                    self.slots[t].h,
                    ours::hbitmap_next_zero_qemu10,
                    oracle::qemu10_hbitmap_next_zero,
                    start,
                    count
                );
                self.same(format_args!("next_zero({start}, {count})"), found)
            }
            Op::NextDirtyArea { t, start, end, max } => {
                let h = self.slots[t].h;
                // Sentinels: both must leave them alone when they find nothing.
                let (mut mine, mut theirs) = ((-7i64, -9i64), (-7i64, -9i64));
                // SAFETY: live handles, valid arguments, writable outputs.
                let found = unsafe {
                    (
                        ours::hbitmap_next_dirty_area_qemu10(
                            h.o,
                            start,
                            end,
                            max,
                            &mut mine.0,
                            &mut mine.1,
                        ),
                        oracle::qemu10_hbitmap_next_dirty_area(
                            h.r,
                            start,
                            end,
                            max,
                            &mut theirs.0,
                            &mut theirs.1,
                        ),
                    )
                };
                self.same(
                    format_args!("next_dirty_area({start}, {end}, {max}) -> (found, start, count)"),
                    ((found.0, mine), (found.1, theirs)),
                )
            }
            Op::Status { t, start, count } => {
                let h = self.slots[t].h;
                let (mut mine, mut theirs) = (-5i64, -5i64);
                // SAFETY: live handles, valid range, writable outputs.
                let dirty = unsafe {
                    (
                        ours::hbitmap_status(h.o, start, count, &mut mine),
                        oracle::qemu10_hbitmap_status(h.r, start, count, &mut theirs),
                    )
                };
                self.same(
                    format_args!("status({start}, {count}) -> (dirty, pnum)"),
                    ((dirty.0, mine), (dirty.1, theirs)),
                )
            }
            Op::IterFull { t, first } => {
                let mut iter = IterPair::init(self.slots[t].h, first);
                self.same(format_args!("iter_init({first})"), iter.views())?;
                for step in 0..ITER_CAP {
                    let item = iter.next();
                    self.same(format_args!("iter_next #{step} from {first}"), item)?;
                    self.same(
                        format_args!("iterator after iter_next #{step} from {first}"),
                        iter.views(),
                    )?;
                    if item.0 < 0 {
                        break;
                    }
                }
                Ok(())
            }
            Op::IterInit { t, first } => {
                let iter = IterPair::init(self.slots[t].h, first);
                let views = iter.views();
                self.slots[t].iter = Some(iter);
                self.same(
                    format_args!("iter_init({first}) of the live iterator"),
                    views,
                )
            }
            Op::IterStep { t, steps } => {
                let mut iter = self.slots[t].iter.take().expect("validated");
                let mut outcome = Ok(());
                for step in 0..steps {
                    let item = iter.next();
                    outcome = self
                        .same(format_args!("live iter_next #{step}"), item)
                        .and_then(|()| {
                            self.same(
                                format_args!("live iterator after iter_next #{step}"),
                                iter.views(),
                            )
                        });
                    if outcome.is_err() || item.0 < 0 {
                        break;
                    }
                }
                self.slots[t].iter = Some(iter);
                outcome
            }
            Op::Serialize { t, start, count } => self.compare_chunk(t, start, count),
            Op::Deserialize {
                t,
                fill,
                start,
                count,
                finish,
                seed,
            } => self.deserialize(t, fill, start, count, finish, seed),
            Op::Finish { t } => {
                both!(
                    self.slots[t].h,
                    ours::hbitmap_deserialize_finish,
                    oracle::qemu10_hbitmap_deserialize_finish
                );
                self.slots[t].stale = Stale::No;
                self.same_count(t, "deserialize_finish")
            }
            Op::Sha { t } => {
                let digests = self.slots[t].h.sha256();
                self.same("sha256", digests)
            }
            Op::Truncate { t, size } => self.truncate(t, size),
            Op::TruncateAll { size } => (0..SLOTS).try_for_each(|t| self.truncate(t, size)),
            Op::Merge { a, b, result } => {
                let (ha, hb, hr) = (self.slots[a].h, self.slots[b].h, self.slots[result].h);
                // SAFETY: live handles of equal sizes; granularities as QEMU requires.
                unsafe {
                    ours::hbitmap_merge_qemu10(ha.o, hb.o, hr.o);
                    oracle::qemu10_hbitmap_merge(ha.r, hb.r, hr.r);
                }
                // Equal granularities merge word by word, padding bits included.
                if self.slots[a].granularity == self.slots[b].granularity {
                    let padding = self.slots[a].padding_dirty || self.slots[b].padding_dirty;
                    self.slots[result].padding_dirty |= padding;
                }
                self.same_count(result, "merge")
            }
            Op::Check { t, seed } => self.check(t, seed),
        }
    }

    fn generate(&self, rng: &mut Rng) -> Op {
        gen_op(rng, self)
    }

    /// A full comparison of every bitmap.
    fn final_checks(&self, _: &mut Rng) -> Vec<Op> {
        (0..SLOTS)
            .map(|t| Op::Check { t, seed: t as u64 })
            .collect()
    }

    fn calls(&self) -> u64 {
        self.calls
    }
}

/// Scenario `scenario` of `seed`: its geometry and number of operations (fewer on large
/// bitmaps), and the generator that continues with the operations.
fn scenario(seed: u64, scenario: u64) -> (Geometry, u64, Rng) {
    let mut rng = Rng::derive(seed, scenario);
    let geometry = gen_geometry(&mut rng);
    let groups = geometry
        .iter()
        .map(|&(size, granularity)| groups_for(size, granularity))
        .max()
        .unwrap_or(0);
    let length = if groups > 100_000 {
        rng.range(50, 400)
    } else {
        rng.range(100, 3000)
    };
    (geometry, length, rng)
}

#[test]
fn random_operations() {
    if skip() {
        return;
    }
    // 2 * 10^6 operations take 5 to 10 s in a release build on 2 shared cores; debug builds run
    // 100 000.
    let default = if cfg!(debug_assertions) {
        100_000
    } else {
        2_000_000
    };
    differential::random_operations::<Ctx>(
        "differential QEMU 10",
        default,
        &[0x10_0001, 0x10_0002, 0x10_beef, 0xfeed_0010],
        scenario,
    );
}

/// Every granularity of interest against every boundary group count (and the largest sizes,
/// up to `INT64_MAX`), a short scenario each.
#[test]
fn boundary_geometries() {
    if skip() {
        return;
    }
    let granularities = [
        0u32, 1, 2, 3, 5, 6, 7, 12, 16, 20, 31, 32, 33, 40, 44, 57, 58, 62, 63,
    ];
    let mut batch = Batch::new("differential QEMU 10 boundaries");
    for (gi, &granularity) in granularities.iter().enumerate() {
        let cap = max_groups(granularity);
        let counts = [0u64, cap].into_iter().chain(BOUNDARY_GROUPS);
        for (ni, groups) in counts.enumerate() {
            if groups > cap {
                continue;
            }
            let mut rng = Rng::new(0x10_b000 + (gi as u64) * 100 + ni as u64);
            let size = size_for(&mut rng, groups, granularity);
            let other = granularities[rng.below(granularities.len() as u64) as usize];
            let other = if groups_for(size, other) <= MAX_GROUPS {
                other
            } else {
                granularity
            };
            let geometry = [
                (size, granularity),
                (size, granularity),
                (size, granularity),
                (size, other),
            ];
            let budget = if groups > 100_000 { 60 } else { 300 };
            let label = format!("boundary geometry {geometry:?}");
            batch.run::<Ctx>(&label, &geometry, &mut rng, budget);
        }
    }
    batch.finish();
}

/// The next summary-level boundary up: 64^4 groups (2 MiB per last level), a short scenario
/// each, slot 3 at a coarser granularity.
#[test]
fn large_geometries() {
    if skip() {
        return;
    }
    let mut batch = Batch::new("differential QEMU 10 large");
    let boundary = 1u64 << 24;
    for (index, (groups, granularity)) in [(boundary + 1, 0), (boundary - 1, 3), (boundary, 9)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(0x10_1a00 + index as u64);
        let size = size_for(&mut rng, groups, granularity);
        let coarser = granularity + 7;
        let geometry = [
            (size, granularity),
            (size, granularity),
            (size, granularity),
            (size, coarser),
        ];
        let label = format!("large geometry {geometry:?}");
        batch.run::<Ctx>(&label, &geometry, &mut rng, 150);
    }
    batch.finish();
}
