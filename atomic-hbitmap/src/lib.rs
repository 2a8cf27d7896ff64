// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A lock-free hierarchical dirty-page bitmap for virtual machine monitors.
//!
//! [`AtomicHBitmap`] has the inherent API of vm-memory's `AtomicBitmap` (same methods, same
//! results, same edge cases), so a VMM switches by changing a type name; with the `vm-memory`
//! feature it implements vm-memory's `Bitmap`, `NewBitmap` and `WithBitmapSlice`, so that
//! `GuestMemoryMmap<AtomicHBitmap>` tracks every guest write. What it adds is a summary of the
//! page bits: [`harvest`](AtomicHBitmap::harvest) returns the dirty pages as runs while visiting
//! only the dirty parts of the bitmap, so a migration pass costs the number of dirty pages, not
//! the size of guest memory.
//!
//! ```
//! use std::num::NonZeroUsize;
//! use atomic_hbitmap::AtomicHBitmap;
//!
//! let page = NonZeroUsize::new(4096).unwrap();
//! let dirty = AtomicHBitmap::new(1 << 30, page); // 1 GiB of guest memory
//! dirty.set_addr_range(0x1000, 0x3000);           // pages 1, 2 and 3
//! dirty.set_bit(9);
//! assert_eq!(dirty.dirty_pages(), 4);
//! assert_eq!(dirty.harvest().collect::<Vec<_>>(), [1..4, 9..10]);
//! assert_eq!(dirty.dirty_pages(), 0);
//! ```
#![forbid(unsafe_code)]

mod sync;
#[cfg(feature = "vm-memory")]
mod vm_memory;

use std::fmt;
use std::num::NonZeroUsize;
use std::ops::Range;

use sync::{zeroed, AtomicU64, Ordering};

/// The orderings used throughout; the type's documentation says why they suffice.
const RMW: Ordering = Ordering::AcqRel;
const LOAD: Ordering = Ordering::Acquire;
const CHECK: Ordering = Ordering::Relaxed;

const WORD_BITS: usize = 64;

/// Bits `lo..=hi` of a word (`lo <= hi < 64`).
#[inline]
fn mask(lo: usize, hi: usize) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// A page-granular dirty bitmap that any number of threads mark through `&self`, with a
/// hierarchical summary that lets a harvest visit only the dirty pages.
///
/// # Structure
///
/// Level 0 holds one bit per page, in 64-bit words, exactly as vm-memory's `AtomicBitmap`;
/// `get_and_reset` returns these words. Each level above holds one bit per word of the level
/// below, set when that word may be non-zero; the top level is one word. With 64-ary levels the
/// summary adds 1/63 to the memory of the page bits (a 1 TiB guest of 4 KiB pages: 32 MiB of page
/// bits, 520 KiB of summary).
///
/// # Concurrency contract
///
/// Every method but [`enlarge`](Self::enlarge) takes `&self` and may run concurrently with any
/// other: marks ([`set_addr_range`](Self::set_addr_range), [`set_bit`](Self::set_bit), vm-memory's
/// `mark_dirty`) race freely with each other and with [`harvest`](Self::harvest),
/// [`get_and_reset`](Self::get_and_reset), [`reset_addr_range`](Self::reset_addr_range),
/// [`reset_bit`](Self::reset_bit) and [`reset`](Self::reset).
///
/// - A mark is one atomic OR per word of page bits (one for a page, one per 64 pages of a range).
///   It touches a summary word only to set a bit that is clear: it reads the ancestor words and
///   ORs only where a bit is missing, which after the first mark of a word is never.
/// - **No mark is lost.** A page whose mark *happens before* a harvest starts (the marking thread
///   returned and then told the harvester, through any synchronization) is returned by that
///   harvest or by an earlier one. A page marked while a harvest runs is returned by it, or stays
///   set and is returned by the next one. The same holds for `get_and_reset` (its words) and for
///   `reset` (which clears it, or leaves it for the next pass).
/// - **No page is returned that was not marked since it was last returned** (or cleared): each
///   page bit is taken by one atomic swap of its word, so concurrent harvests return disjoint
///   pages, and a page is returned once per mark (marks between two harvests collapse into one).
/// - The summary may over-approximate (a bit set over words that are clean, after a racing
///   harvest or a `reset_addr_range`); the next harvest clears it. It never misses a dirty word
///   once the mark that dirtied it has returned.
/// - A harvest iterator dropped before its end gives back what it took and has not returned: those
///   pages stay set.
///
/// # Memory orderings, and why they suffice
///
/// - A mark ORs the page word with `AcqRel`, then for each level above reads the ancestor word
///   (`Relaxed`) and, only when its bit is clear, ORs it with `AcqRel`.
/// - A harvest takes a summary word with an `AcqRel` swap to zero, descends into the words whose
///   bits it took, and takes each page word with an `AcqRel` swap to zero, always top-down: a
///   summary bit is cleared before the words under it are read.
///
/// Suppose a mark's OR of page word `w` comes after a harvest's swap of `w` in `w`'s modification
/// order (otherwise the swap returned the page). Every write to a page word is a read-modify-write,
/// so the mark's `Acquire` reads from the swap's release sequence: the swap synchronizes with the
/// mark, and the harvest's earlier clearing of every ancestor bit happens before the mark's reads
/// of those ancestors. By coherence those reads see the cleared bits (or bits set again since), so
/// the mark sets every ancestor bit the harvest took, after it took it, and the next harvest finds
/// the page. A mark that finds an ancestor bit already set relies on the marker who set it; the
/// same argument shows that no harvest can have cleared it in between without also taking the
/// page. Conversely, when a harvest's swap of a summary word reads a bit set by a mark (`Release`
/// part of its OR), the mark's OR of the page word happens before the harvest's swap of that
/// word, which therefore returns the page. The `Acquire` loads of `is_bit_set` and of the
/// non-destructive walks (`dirty_pages`, `Clone`) read the words as `AtomicBitmap`'s loads do.
/// `tests/loom.rs` checks these claims over every interleaving of small models.
///
/// The page data too: a mark's OR releases, and the swap that takes the page acquires, so a
/// harvester that takes a page sees every write to guest memory made before the page was marked
/// (vm-memory marks after writing). This is why a mark is an OR even when its bit is already set:
/// skipping it would let a harvest take the bit without seeing the new data.
pub struct AtomicHBitmap {
    /// `levels[0]`: one bit per page; `levels[k + 1]`: one bit per word of `levels[k]`. There are
    /// at least two levels and the last has exactly one word.
    levels: Vec<Box<[AtomicU64]>>,
    /// Pages tracked.
    size: usize,
    byte_size: usize,
    page_size: NonZeroUsize,
}

/// Words of each level for `pages` pages: the page words, then summaries up to a single word.
fn level_sizes(pages: usize) -> Vec<usize> {
    let mut sizes = vec![pages.div_ceil(WORD_BITS)];
    loop {
        let next = sizes[sizes.len() - 1].div_ceil(WORD_BITS).max(1);
        sizes.push(next);
        if next == 1 {
            return sizes;
        }
    }
}

#[allow(clippy::len_without_is_empty)] // as vm-memory's AtomicBitmap
impl AtomicHBitmap {
    /// Creates a bitmap tracking `byte_size` bytes, one bit per page of `page_size` bytes (the
    /// last page may be partial: the number of pages is rounded up). All pages are clean. The
    /// memory comes zeroed from the allocator: pages of the bitmap are touched only when marked.
    pub fn new(byte_size: usize, page_size: NonZeroUsize) -> Self {
        let size = byte_size.div_ceil(page_size.get());
        AtomicHBitmap {
            levels: level_sizes(size).into_iter().map(zeroed).collect(),
            size,
            byte_size,
            page_size,
        }
    }

    /// Grows the bitmap by `additional_size` bytes; the new pages are clean and the marks already
    /// made are kept. (Like `AtomicBitmap::enlarge`, it panics if the byte size overflows `usize`
    /// in a debug build.)
    pub fn enlarge(&mut self, additional_size: usize) {
        self.byte_size += additional_size;
        self.size = self.byte_size.div_ceil(self.page_size.get());
        let sizes = level_sizes(self.size);
        let old_levels = self.levels.len();
        for (level, &words) in self.levels.iter_mut().zip(&sizes) {
            if level.len() < words {
                let mut grown = std::mem::take(level).into_vec();
                grown.resize_with(words, || AtomicU64::new(0));
                *level = grown.into_boxed_slice();
            }
        }
        // New levels above the old top: summaries of the level below, computed exactly.
        for &words in &sizes[old_levels..] {
            let level = zeroed(words);
            let below = &self.levels[self.levels.len() - 1];
            for (index, word) in below.iter().enumerate() {
                if word.load(Ordering::Relaxed) != 0 {
                    level[index / WORD_BITS].fetch_or(1 << (index % WORD_BITS), Ordering::Relaxed);
                }
            }
            self.levels.push(level);
        }
    }

    /// Whether page `index` is marked; pages past the end are never marked.
    pub fn is_bit_set(&self, index: usize) -> bool {
        index < self.size
            && self.levels[0][index / WORD_BITS].load(LOAD) & (1 << (index % WORD_BITS)) != 0
    }

    /// Whether the page holding byte `addr` is marked.
    pub fn is_addr_set(&self, addr: usize) -> bool {
        self.is_bit_set(addr / self.page_size)
    }

    /// The pages holding bytes `start_addr..start_addr + len`, clamped to the bitmap; `None`
    /// when there are none. The end saturates at `usize::MAX`, as in `AtomicBitmap`.
    fn pages(&self, start_addr: usize, len: usize) -> Option<(usize, usize)> {
        if len == 0 {
            return None;
        }
        let first = start_addr / self.page_size;
        let last = start_addr.saturating_add(len - 1) / self.page_size;
        (first < self.size).then(|| (first, last.min(self.size - 1)))
    }

    /// Marks the pages holding bytes `start_addr..start_addr + len`: one atomic OR per word of
    /// page bits. A zero `len` does nothing, pages past the end are ignored, and the end
    /// saturates at `usize::MAX`.
    pub fn set_addr_range(&self, start_addr: usize, len: usize) {
        if let Some((first, last)) = self.pages(start_addr, len) {
            if first / WORD_BITS == last / WORD_BITS {
                self.raise(
                    0,
                    first / WORD_BITS,
                    mask(first % WORD_BITS, last % WORD_BITS),
                );
            } else {
                self.mark_pages(first, last);
            }
        }
    }

    /// Clears the pages holding bytes `start_addr..start_addr + len` (same range rules as
    /// [`set_addr_range`](Self::set_addr_range)). The summary is left as it is (it may then
    /// over-approximate until the next harvest): clearing it here could hide a racing mark.
    pub fn reset_addr_range(&self, start_addr: usize, len: usize) {
        if let Some((first, last)) = self.pages(start_addr, len) {
            let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
            for word in first_word..=last_word {
                let lo = if word == first_word {
                    first % WORD_BITS
                } else {
                    0
                };
                let hi = if word == last_word {
                    last % WORD_BITS
                } else {
                    63
                };
                self.levels[0][word].fetch_and(!mask(lo, hi), RMW);
            }
        }
    }

    /// Marks page `index`; an index past the end is ignored.
    pub fn set_bit(&self, index: usize) {
        if index < self.size {
            self.raise(0, index / WORD_BITS, 1 << (index % WORD_BITS));
        }
    }

    /// Clears page `index`; an index past the end is ignored.
    pub fn reset_bit(&self, index: usize) {
        if index < self.size {
            self.levels[0][index / WORD_BITS].fetch_and(!(1 << (index % WORD_BITS)), RMW);
        }
    }

    /// The number of pages tracked.
    pub fn len(&self) -> usize {
        self.size
    }

    /// The number of bytes tracked.
    pub fn byte_size(&self) -> usize {
        self.byte_size
    }

    /// The heap memory the bitmap holds, in bytes: the page bits (as much as `AtomicBitmap`'s)
    /// plus the summary levels (1/63 of that, and a few words). Allocated zeroed, it is touched
    /// only where pages are marked.
    pub fn heap_bytes(&self) -> usize {
        let words: usize = self.levels.iter().map(|level| level.len()).sum();
        words * size_of::<u64>() + self.levels.capacity() * size_of::<Box<[AtomicU64]>>()
    }

    /// The page size given to [`new`](Self::new).
    pub fn page_size(&self) -> NonZeroUsize {
        self.page_size
    }

    /// Takes every page bit: the words of page bits (page `i` is bit `i % 64` of word `i / 64`),
    /// as `AtomicBitmap::get_and_reset` returns them, and clears them. Only dirty words are
    /// visited; the clean ones are zeros of a freshly allocated vector.
    pub fn get_and_reset(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.levels[0].len()];
        self.take_words(|index, bits| words[index] = bits);
        words
    }

    /// Clears every page, visiting only the dirty ones.
    pub fn reset(&self) {
        self.take_words(|_, _| {});
    }

    /// Takes every page word the summary shows dirty, to the end, calling `f(index, bits)` for
    /// each (also for those found clean). 64 dirty words in a row are taken in one tight loop.
    fn take_words(&self, mut f: impl FnMut(usize, u64)) {
        let pages = &self.levels[0];
        let mut walk = Walk::new(self);
        while let Some((parent, bits)) = walk.next_summary() {
            let base = parent * WORD_BITS;
            if bits == u64::MAX {
                for (index, word) in pages[base..base + WORD_BITS].iter().enumerate() {
                    f(base + index, word.swap(0, RMW));
                }
            } else {
                let mut bits = bits;
                while bits != 0 {
                    let index = base + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    f(index, pages[index].swap(0, RMW));
                }
            }
        }
    }

    /// Returns the dirty pages as runs of page indexes, in increasing order, clearing each page
    /// as it is taken. Only the dirty parts of the bitmap are visited. Without concurrent marks
    /// the runs are maximal (separated by at least one clean page). See the type's documentation
    /// for what a harvest returns when marks race with it. Dropping the iterator early leaves the
    /// pages it has not returned marked.
    pub fn harvest(&self) -> Harvest<'_> {
        Harvest {
            walk: Walk::new(self),
            word: 0,
            bits: 0,
            run: None,
        }
    }

    /// The number of marked pages, counted without clearing them, visiting only dirty words.
    pub fn dirty_pages(&self) -> usize {
        let mut count = 0;
        self.for_each_dirty_word(|_, bits| count += bits.count_ones() as usize);
        count
    }

    /// Calls `f` with each run of marked pages, maximal and in increasing order, without
    /// clearing them (a copy of the marks, where [`harvest`](Self::harvest) takes them). Only
    /// dirty words are read.
    pub fn for_each_dirty_run(&self, mut f: impl FnMut(Range<usize>)) {
        let mut run: Option<Range<usize>> = None;
        self.for_each_dirty_word(|index, mut bits| {
            while bits != 0 {
                let offset = bits.trailing_zeros() as usize;
                let ones = (!(bits >> offset)).trailing_zeros() as usize;
                bits = if offset + ones == WORD_BITS {
                    0
                } else {
                    bits & (u64::MAX << (offset + ones))
                };
                let start = index * WORD_BITS + offset;
                match &mut run {
                    Some(r) if r.end == start => r.end = start + ones,
                    _ => {
                        if let Some(done) = run.replace(start..start + ones) {
                            f(done);
                        }
                    }
                }
            }
        });
        if let Some(done) = run {
            f(done);
        }
    }

    /// Calls `f(index, bits)` for every non-zero page word, in increasing order, reading (not
    /// clearing) the words the summary shows dirty.
    fn for_each_dirty_word(&self, mut f: impl FnMut(usize, u64)) {
        let top = self.levels.len() - 1;
        self.visit(top, 0, &mut f);
    }

    fn visit(&self, level: usize, index: usize, f: &mut impl FnMut(usize, u64)) {
        let mut bits = self.levels[level][index].load(LOAD);
        if level == 0 {
            if bits != 0 {
                f(index, bits);
            }
            return;
        }
        while bits != 0 {
            let child = index * WORD_BITS + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            self.visit(level - 1, child, f);
        }
    }

    /// Marks pages `first..=last` (both within the bitmap).
    fn mark_pages(&self, first: usize, last: usize) {
        let (mut lo, mut hi) = (first, last);
        for (depth, level) in self.levels.iter().enumerate() {
            let (first_word, last_word) = (lo / WORD_BITS, hi / WORD_BITS);
            for word in first_word..=last_word {
                let bits = mask(
                    if word == first_word {
                        lo % WORD_BITS
                    } else {
                        0
                    },
                    if word == last_word {
                        hi % WORD_BITS
                    } else {
                        63
                    },
                );
                if depth == 0 || level[word].load(CHECK) & bits != bits {
                    level[word].fetch_or(bits, RMW);
                }
            }
            (lo, hi) = (first_word, last_word);
        }
    }

    /// ORs `bits` into word `index` of `level`, then makes sure every ancestor bit is set.
    #[inline]
    fn raise(&self, level: usize, index: usize, bits: u64) {
        self.levels[level][index].fetch_or(bits, RMW);
        let mut index = index;
        for above in &self.levels[level + 1..] {
            let bit = 1 << (index % WORD_BITS);
            index /= WORD_BITS;
            if above[index].load(CHECK) & bit == 0 {
                above[index].fetch_or(bit, RMW);
            }
        }
    }
}

/// The destructive walk shared by `harvest`, `get_and_reset` and `reset`: it takes the summary
/// words top-down and yields the non-zero page words it takes, in increasing order. What it holds
/// when dropped (summary bits taken, words under them not yet taken) is given back.
struct Walk<'a> {
    bitmap: &'a AtomicHBitmap,
    /// `held[k]` for each summary level `k >= 1` (`held[0]` unused): the index of the word of
    /// that level being descended, and the bits taken from it whose subtrees are still to visit.
    held: Vec<(usize, u64)>,
    /// Page words whose summary bits are taken, to be taken in order from `next`: read together
    /// first, so that their cache misses overlap (on x86 each swap is a full barrier that would
    /// otherwise wait for its own miss).
    batch: [usize; BATCH],
    next: usize,
    len: usize,
}

/// Page words read ahead by a walk.
const BATCH: usize = 16;

impl<'a> Walk<'a> {
    fn new(bitmap: &'a AtomicHBitmap) -> Self {
        let top = bitmap.levels.len() - 1;
        let mut held = vec![(0, 0); top + 1];
        held[top] = (0, bitmap.levels[top][0].swap(0, RMW));
        Walk {
            bitmap,
            held,
            batch: [0; BATCH],
            next: 0,
            len: 0,
        }
    }

    /// The index of the next page word whose summary bit is set, the bit taken (the word is
    /// left to the caller), descending only into the subtrees whose summary bits are set.
    fn next_index(&mut self) -> Option<usize> {
        self.next_child(1)
    }

    /// The next word of level `stop - 1` whose bit in level `stop` is set: its index, the bit
    /// taken (the word is left to the caller). Levels below `stop` must hold nothing.
    fn next_child(&mut self, stop: usize) -> Option<usize> {
        let levels = &self.bitmap.levels;
        loop {
            // The lowest level with subtrees left to visit; the levels below it hold nothing.
            let mut level = (stop..self.held.len()).find(|&k| self.held[k].1 != 0)?;
            loop {
                let (index, bits) = self.held[level];
                let child = index * WORD_BITS + bits.trailing_zeros() as usize;
                self.held[level].1 = bits & (bits - 1);
                if level == stop {
                    return Some(child);
                }
                let taken = levels[level - 1][child].swap(0, RMW);
                self.held[level - 1] = (child, taken);
                level -= 1;
                if taken == 0 {
                    // A summary bit over a clean word: cleared, nothing under it.
                    break;
                }
            }
        }
    }

    /// Takes the next non-zero word of level 1 (the summary of the page words): `(index, bits)`.
    /// The caller takes the page words of its bits: they are no longer held by the walk, so it
    /// must not stop before it has (`get_and_reset` and `reset` run to the end, and cannot fail).
    fn next_summary(&mut self) -> Option<(usize, u64)> {
        if self.held.len() == 2 {
            // Level 1 is the top: its one word was taken when the walk began.
            let (index, bits) = std::mem::take(&mut self.held[1]);
            return (bits != 0).then_some((index, bits));
        }
        loop {
            let child = self.next_child(2)?;
            let bits = self.bitmap.levels[1][child].swap(0, RMW);
            if bits != 0 {
                return Some((child, bits));
            }
        }
    }

    /// The next non-zero page word, taken (swapped to zero): `(index, bits)`.
    fn next_word(&mut self) -> Option<(usize, u64)> {
        let pages = &self.bitmap.levels[0];
        loop {
            if self.next == self.len {
                (self.next, self.len) = (0, 0);
                while self.len < BATCH {
                    // The current level-1 word's bits first, without the climb of `next_index`.
                    let (parent, bits) = &mut self.held[1];
                    let index = if *bits != 0 {
                        let index = *parent * WORD_BITS + bits.trailing_zeros() as usize;
                        *bits &= *bits - 1;
                        index
                    } else {
                        match self.next_index() {
                            Some(index) => index,
                            None => break,
                        }
                    };
                    self.batch[self.len] = index;
                    self.len += 1;
                }
                if self.len == 0 {
                    return None;
                }
                let ahead = self.batch[..self.len]
                    .iter()
                    .fold(0, |acc, &index| acc | pages[index].load(Ordering::Relaxed));
                std::hint::black_box(ahead);
            }
            let index = self.batch[self.next];
            self.next += 1;
            let taken = pages[index].swap(0, RMW);
            if taken != 0 {
                return Some((index, taken));
            }
        }
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        for &index in &self.batch[self.next..self.len] {
            self.bitmap
                .raise(1, index / WORD_BITS, 1 << (index % WORD_BITS));
        }
        for (level, &(index, bits)) in self.held.iter().enumerate().skip(1) {
            if bits != 0 {
                self.bitmap.raise(level, index, bits);
            }
        }
    }
}

/// The iterator of [`AtomicHBitmap::harvest`]: runs of dirty page indexes, in increasing order.
pub struct Harvest<'a> {
    walk: Walk<'a>,
    /// The page word being split into runs, and its bits not yet put into a run.
    word: usize,
    bits: u64,
    /// The run being extended: its pages are taken but not yet returned.
    run: Option<Range<usize>>,
}

impl Iterator for Harvest<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        loop {
            if self.bits == 0 {
                match self.walk.next_word() {
                    Some((word, bits)) => (self.word, self.bits) = (word, bits),
                    None => return self.run.take(),
                }
            }
            let offset = self.bits.trailing_zeros() as usize;
            let ones = (!(self.bits >> offset)).trailing_zeros() as usize;
            let end_bit = offset + ones;
            self.bits = if end_bit == WORD_BITS {
                0
            } else {
                self.bits & (u64::MAX << end_bit)
            };
            let start = self.word * WORD_BITS + offset;
            let end = start + ones;
            let finished = match self.run.take() {
                Some(run) if run.end == start => {
                    self.run = Some(run.start..end);
                    None
                }
                earlier => {
                    self.run = Some(start..end);
                    earlier
                }
            };
            if finished.is_some() {
                return finished;
            }
            if end_bit != WORD_BITS {
                // A clean page follows within the word: the run cannot grow.
                return self.run.take();
            }
        }
    }
}

impl Drop for Harvest<'_> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            self.walk.bitmap.mark_pages(run.start, run.end - 1);
        }
        if self.bits != 0 {
            self.walk.bitmap.raise(0, self.word, self.bits);
        }
    }
}

impl Clone for AtomicHBitmap {
    /// A copy of the marks, read as `AtomicBitmap::clone` reads them (`Acquire` loads), visiting
    /// only dirty words. The copy's summary is exact for what it copied, so a mark racing with
    /// the clone is either in the copy with its summary bits or not in it at all.
    fn clone(&self) -> Self {
        let copy = AtomicHBitmap {
            levels: self
                .levels
                .iter()
                .map(|level| zeroed(level.len()))
                .collect(),
            size: self.size,
            byte_size: self.byte_size,
            page_size: self.page_size,
        };
        self.for_each_dirty_word(|index, bits| copy.raise(0, index, bits));
        copy
    }
}

impl Default for AtomicHBitmap {
    /// An empty bitmap of 4 KiB pages, as `AtomicBitmap::default()`.
    fn default() -> Self {
        AtomicHBitmap::new(0, NonZeroUsize::new(0x1000).expect("non-zero"))
    }
}

impl fmt::Debug for AtomicHBitmap {
    /// The geometry and the dirty pages as runs (read without clearing them).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Runs<'a>(&'a AtomicHBitmap);
        impl fmt::Debug for Runs<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut list = f.debug_list();
                self.0.for_each_dirty_run(|run| {
                    list.entry(&run);
                });
                list.finish()
            }
        }
        f.debug_struct("AtomicHBitmap")
            .field("size", &self.size)
            .field("byte_size", &self.byte_size)
            .field("page_size", &self.page_size)
            .field("dirty", &Runs(self))
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn bitmap(pages: usize) -> AtomicHBitmap {
        AtomicHBitmap::new(pages * 128, NonZeroUsize::new(128).unwrap())
    }

    #[test]
    fn level_geometry() {
        assert_eq!(level_sizes(0), [0, 1]);
        assert_eq!(level_sizes(64), [1, 1]);
        assert_eq!(level_sizes(65), [2, 1]);
        assert_eq!(level_sizes(64 * 64 + 1), [65, 2, 1]);
        // 1 TiB of 4 KiB pages: the summary is 1/63 of the page bits.
        let sizes = level_sizes(1 << 28);
        assert_eq!(sizes, [1 << 22, 1 << 16, 1 << 10, 16, 1]);
        let b = AtomicHBitmap::new(1 << 40, NonZeroUsize::new(4096).unwrap());
        let page_bits = (1 << 22) * 8;
        assert!(b.heap_bytes() > page_bits && b.heap_bytes() < page_bits + page_bits / 62);
    }

    #[test]
    fn runs_cross_words_and_levels() {
        let b = bitmap(64 * 64 * 3);
        b.set_bit(0);
        b.set_addr_range(63 * 128, 3 * 128); // pages 63..66
        b.set_addr_range(4000 * 128, 200 * 128); // across a level-1 word boundary (4096)
        b.set_bit(64 * 64 * 3 - 1);
        assert_eq!(b.dirty_pages(), 1 + 3 + 200 + 1);
        let runs: Vec<_> = b.harvest().collect();
        assert_eq!(runs, [0..1, 63..66, 4000..4200, 12287..12288]);
        assert_eq!(b.dirty_pages(), 0);
        assert_eq!(b.harvest().next(), None);
        assert!(b.get_and_reset().iter().all(|&w| w == 0));
    }

    #[test]
    fn full_bitmap_is_one_run() {
        let b = bitmap(64 * 64 * 2 + 5);
        b.set_addr_range(0, usize::MAX);
        let runs: Vec<_> = b.harvest().collect();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0], 0..b.len());
    }

    /// Sets every page of `words` (as `get_and_reset` returns them) in `b`.
    fn set_words(b: &AtomicHBitmap, words: &[u64]) {
        for (index, &word) in words.iter().enumerate() {
            for bit in (0..64).filter(|bit| word & (1 << bit) != 0) {
                b.set_bit(index * 64 + bit);
            }
        }
    }

    #[test]
    fn dropped_harvest_gives_back() {
        let b = bitmap(10_000);
        for page in (0..10_000).step_by(7) {
            b.set_bit(page);
        }
        b.set_addr_range(128 * 500, 128 * 300);
        let expected = b.clone().get_and_reset();
        for taken in 0..6 {
            let mut harvest = b.harvest();
            let returned: Vec<_> = harvest.by_ref().take(taken).collect();
            assert_eq!(returned.len(), taken);
            drop(harvest);
            // What was returned plus what is left is what was marked, with nothing twice.
            let left = b.clone();
            for run in returned {
                for page in run {
                    assert!(!left.is_bit_set(page), "page {page} returned and left");
                    left.set_bit(page);
                }
            }
            assert_eq!(left.get_and_reset(), expected);
            set_words(&b, &expected);
        }
    }

    #[test]
    fn enlarge_keeps_marks_and_grows_levels() {
        let mut b = bitmap(10);
        b.set_bit(3);
        b.enlarge(128 * 64 * 64 * 2);
        assert_eq!(b.levels.len(), 3);
        b.set_bit(64 * 64 + 1);
        assert_eq!(b.harvest().collect::<Vec<_>>(), [3..4, 4097..4098]);
    }

    #[test]
    fn debug_shows_runs() {
        let b = bitmap(100);
        b.set_addr_range(128, 256);
        assert_eq!(
            format!("{b:?}"),
            "AtomicHBitmap { size: 100, byte_size: 12800, page_size: 128, dirty: [1..3] }"
        );
    }
}
