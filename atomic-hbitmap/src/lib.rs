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
/// `get_and_reset` returns these words. Level 1 holds one bit per word of level 0, level 2 one
/// bit per word of level 1, each set when that word may be non-zero. There is no level above:
/// a harvest reads level 2 in full (1,024 words for a 1 TiB guest of 4 KiB pages, 12,288 for
/// 12 TiB, a few microseconds), which keeps a mark to two summary reads. The summary adds 1/64 +
/// 1/4096 to the memory of the page bits (1 TiB: 32 MiB of page bits, 520 KiB of summary).
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
///   It touches a summary word only to set a bit that is clear: it reads the two ancestor words
///   and ORs only where a bit is missing, which after the first mark of a word is never.
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
/// - A mark ORs the page word with `AcqRel`, then reads its two ancestor words (`Relaxed`, in
///   either order) and ORs with `AcqRel` each whose bit is clear, bottom-up: after setting the
///   level-1 bit it reads the level-2 word again. It reads nothing before the OR.
/// - A harvest reads each level-2 word (`Relaxed`), takes the non-zero ones with an `AcqRel`
///   swap to zero, descends into the level-1 words whose bits it took, takes them the same way,
///   and takes each page word under their bits with an `AcqRel` swap to zero, always top-down:
///   a summary bit is cleared before the words under it are read. (The relaxed reads that come
///   before the swaps, at level 2 and of the words about to be taken, only filter out clean
///   words or bring lines into the cache: what is taken is what the swap returns.)
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
/// word, which therefore returns the page. A mark that happens before a harvest starts has set
/// or seen its level-2 bit before, so the harvest's read of that word sees the bit, or a value
/// written since by the swap of another harvest, which took the bit and, by the argument above,
/// the page. The `Acquire` loads of `is_bit_set` and of the non-destructive walks
/// (`dirty_pages`, `Clone`) read the words as `AtomicBitmap`'s loads do.
/// `tests/loom.rs` checks these claims over every interleaving of small models.
///
/// The page data too: a mark's OR releases, and the swap that takes the page acquires, so a
/// harvester that takes a page sees every write to guest memory made before the page was marked
/// (vm-memory marks after writing). This is why a mark is an OR even when its bit is already set:
/// skipping it would let a harvest take the bit without seeing the new data.
pub struct AtomicHBitmap {
    /// `levels[0]`: one bit per page; `levels[1]`: one bit per word of `levels[0]`; `levels[2]`:
    /// one bit per word of `levels[1]`, read in full by a harvest. Each has at least one word.
    levels: [Box<[AtomicU64]>; LEVELS],
    /// Pages tracked.
    size: usize,
    byte_size: usize,
    page_size: NonZeroUsize,
}

/// The levels: the page words and two summaries.
const LEVELS: usize = 3;

/// Words of each level for `pages` pages: the page words, then the two summaries (at least one
/// word each).
fn level_sizes(pages: usize) -> [usize; LEVELS] {
    let words = pages.div_ceil(WORD_BITS);
    let summary = words.div_ceil(WORD_BITS).max(1);
    [words, summary, summary.div_ceil(WORD_BITS)]
}

#[allow(clippy::len_without_is_empty)] // as vm-memory's AtomicBitmap
impl AtomicHBitmap {
    /// Creates a bitmap tracking `byte_size` bytes, one bit per page of `page_size` bytes (the
    /// last page may be partial: the number of pages is rounded up). All pages are clean. The
    /// memory comes zeroed from the allocator: pages of the bitmap are touched only when marked.
    pub fn new(byte_size: usize, page_size: NonZeroUsize) -> Self {
        let size = byte_size.div_ceil(page_size.get());
        AtomicHBitmap {
            levels: level_sizes(size).map(zeroed),
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
        // The words added to each level are clean, and the summary bits of the old ones stay
        // where they are.
        for (level, words) in self.levels.iter_mut().zip(level_sizes(self.size)) {
            if level.len() < words {
                let mut grown = std::mem::take(level).into_vec();
                grown.resize_with(words, || AtomicU64::new(0));
                *level = grown.into_boxed_slice();
            }
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
    #[inline]
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
    #[inline]
    pub fn set_addr_range(&self, start_addr: usize, len: usize) {
        if let Some((first, last)) = self.pages(start_addr, len) {
            if first / WORD_BITS == last / WORD_BITS {
                self.mark_word(first / WORD_BITS, mask(first % WORD_BITS, last % WORD_BITS));
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
    #[inline]
    pub fn set_bit(&self, index: usize) {
        if index < self.size {
            self.mark_word(index / WORD_BITS, 1 << (index % WORD_BITS));
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
    /// plus the two summary levels (1/64 and 1/4096 of that, and a word each). Allocated zeroed,
    /// it is touched only where pages are marked.
    pub fn heap_bytes(&self) -> usize {
        let words: usize = self.levels.iter().map(|level| level.len()).sum();
        words * size_of::<u64>()
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

    /// Takes every non-zero page word the summary shows, to the end, calling `f(index, bits)`
    /// for each in increasing order.
    fn take_words(&self, mut f: impl FnMut(usize, u64)) {
        let mut walk = Walk::new(self);
        let mut chunk = [(0, 0); WORD_BITS];
        loop {
            let len = walk.next_chunk(&mut chunk);
            if len == 0 {
                return;
            }
            for &(index, bits) in &chunk[..len] {
                f(index, bits);
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
            words: [(0, 0); WORD_BITS],
            next_word: 0,
            words_len: 0,
            base: 0,
            starts: 0,
            lasts: 0,
            open: None,
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
        for index in 0..self.levels[LEVELS - 1].len() {
            self.visit(LEVELS - 1, index, &mut f);
        }
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

    /// ORs `bits` into page word `index`, then makes sure both its summary bits are set: `raise`
    /// for level 0, written for the marks of single pages. The common case, both summary bits
    /// already set, is the OR, two loads and one branch; the updates are out of line.
    #[inline]
    fn mark_word(&self, index: usize, bits: u64) {
        let [pages, summary, top] = &self.levels;
        // The words are located before the OR: after it only the two summary words are read.
        let word = &pages[index];
        let parent = &summary[index / WORD_BITS];
        let grandparent = &top[index / WORD_BITS / WORD_BITS];
        let parent_bit = 1 << (index % WORD_BITS);
        let grandparent_bit = 1 << (index / WORD_BITS % WORD_BITS);
        // Nothing is read before the OR: on x86 the OR is a locked instruction, and every load
        // around it lengthens the chain of accesses a stream of marks waits on (an early read of
        // the parent, meant to overlap its cache miss with the page word's, measured slower for
        // two threads marking random pages, and no faster for one). The page word is not read ahead
        // either: on a page of the bitmap never written, that read would map the zero page and
        // the OR would then fault a second time.
        word.fetch_or(bits, RMW);
        // Both reads follow the OR; which of the two comes first does not matter (relaxed loads
        // of two locations). One branch on both, so that the loop of a caller marking many pages
        // stays short.
        let (parent_word, grandparent_word) = (parent.load(CHECK), grandparent.load(CHECK));
        if (parent_word & parent_bit == 0) | (grandparent_word & grandparent_bit == 0) {
            self.set_summary(index, parent_word & parent_bit != 0);
        }
    }

    /// The rare part of [`mark_word`](Self::mark_word): after the OR of page word `index` its
    /// reads found a summary bit clear (`parent_set`: whether its level-1 bit was set). Sets the
    /// bits bottom-up: a level-1 bit it sets is followed by a new read of the level-2 word.
    #[cold]
    #[inline(never)]
    fn set_summary(&self, index: usize, parent_set: bool) {
        let [_, summary, top] = &self.levels;
        let grandparent = &top[index / WORD_BITS / WORD_BITS];
        let grandparent_bit = 1 << (index / WORD_BITS % WORD_BITS);
        if !parent_set {
            summary[index / WORD_BITS].fetch_or(1 << (index % WORD_BITS), RMW);
        }
        // Read again even when the first read showed it clear: cheap here, and it skips the
        // RMW when a racing mark has set it since.
        if grandparent.load(CHECK) & grandparent_bit == 0 {
            grandparent.fetch_or(grandparent_bit, RMW);
        }
    }

    /// ORs `bits` into word `index` of `level`, then makes sure every ancestor bit is set.
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

/// The destructive walk shared by `harvest`, `get_and_reset` and `reset`: it reads the top level
/// in full, takes the summary words top-down and hands out the non-zero page words it takes, in
/// increasing order. What it holds when dropped (summary bits taken, words under them not yet
/// taken) is given back.
struct Walk<'a> {
    bitmap: &'a AtomicHBitmap,
    /// The next word of the top level to read.
    cursor: usize,
    /// `held[k]` for the summary levels `k` (`held[0]` unused): the index of the word of that
    /// level being descended, and the bits taken from it whose subtrees are still to visit.
    held: [(usize, u64); LEVELS],
}

/// Page words read ahead by a walk where the summary is sparse.
const BATCH: usize = 64;

impl<'a> Walk<'a> {
    fn new(bitmap: &'a AtomicHBitmap) -> Self {
        Walk {
            bitmap,
            cursor: 0,
            held: [(0, 0); LEVELS],
        }
    }

    /// With nothing held at level 1, takes the next non-zero word of level 1 into `held[1]`;
    /// `false` at the end.
    fn descend(&mut self) -> bool {
        let [_, summary, top] = &self.bitmap.levels;
        loop {
            if self.held[2].1 == 0 {
                // The next top word that reads non-zero, taken; its children are read ahead so
                // that their cache misses overlap (on x86 each swap is a full barrier that would
                // otherwise wait for its own miss).
                loop {
                    let Some(word) = top.get(self.cursor) else {
                        return false;
                    };
                    self.cursor += 1;
                    if word.load(CHECK) != 0 {
                        let taken = word.swap(0, RMW);
                        if taken != 0 {
                            let base = (self.cursor - 1) * WORD_BITS;
                            self.held[2] = (self.cursor - 1, taken);
                            let mut bits = taken;
                            let mut ahead = 0;
                            while bits != 0 {
                                ahead |= summary[base + bits.trailing_zeros() as usize].load(CHECK);
                                bits &= bits - 1;
                            }
                            std::hint::black_box(ahead);
                            break;
                        }
                    }
                }
            }
            let (index, bits) = self.held[2];
            let child = index * WORD_BITS + bits.trailing_zeros() as usize;
            self.held[2].1 = bits & (bits - 1);
            let taken = summary[child].swap(0, RMW);
            if taken != 0 {
                self.held[1] = (child, taken);
                return true;
            }
            // A summary bit over a clean word: cleared, nothing under it.
        }
    }

    /// Takes the next non-zero page words, in increasing order, into `out`: their number, 0 at
    /// the end. The caller owns them (it must return them or give them back): when the summary
    /// shows 64 dirty words in a row they are taken in one tight loop, otherwise up to [`BATCH`]
    /// words are read ahead together, then taken.
    fn next_chunk(&mut self, out: &mut [(usize, u64); WORD_BITS]) -> usize {
        let pages = &self.bitmap.levels[0];
        loop {
            if self.held[1].1 == 0 && !self.descend() {
                return 0;
            }
            let mut len = 0;
            if self.held[1].1 == u64::MAX {
                let base = self.held[1].0 * WORD_BITS;
                self.held[1].1 = 0;
                for (offset, word) in pages[base..base + WORD_BITS].iter().enumerate() {
                    let taken = word.swap(0, RMW);
                    out[len] = (base + offset, taken);
                    len += usize::from(taken != 0);
                }
            } else {
                // Indexes from this level-1 word and the following ones, up to a full one.
                let mut batch = [0; BATCH];
                let mut count = 0;
                loop {
                    let (parent, bits) = &mut self.held[1];
                    while *bits != 0 && count < BATCH {
                        batch[count] = *parent * WORD_BITS + bits.trailing_zeros() as usize;
                        *bits &= *bits - 1;
                        count += 1;
                    }
                    if count == BATCH || !self.descend() || self.held[1].1 == u64::MAX {
                        break;
                    }
                }
                let ahead = batch[..count]
                    .iter()
                    .fold(0, |acc, &index| acc | pages[index].load(CHECK));
                std::hint::black_box(ahead);
                for &index in &batch[..count] {
                    let taken = pages[index].swap(0, RMW);
                    out[len] = (index, taken);
                    len += usize::from(taken != 0);
                }
            }
            if len != 0 {
                return len;
            }
        }
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        for (level, &(index, bits)) in self.held.iter().enumerate().skip(1) {
            if bits != 0 {
                self.bitmap.raise(level, index, bits);
            }
        }
    }
}

/// The iterator of [`AtomicHBitmap::harvest`]: runs of dirty page indexes, in increasing order.
///
/// It takes page words a chunk at a time (see `Walk::next_chunk`) and splits one word at a time
/// into runs: the word's run starts and run ends as two masks, from which each call takes the
/// lowest of each, without a branch per bit.
pub struct Harvest<'a> {
    walk: Walk<'a>,
    /// Page words taken and not yet split: `words[next_word..words_len]`.
    words: [(usize, u64); WORD_BITS],
    next_word: usize,
    words_len: usize,
    /// The first page of the word being split.
    base: usize,
    /// The runs of that word not yet returned: their first pages (`starts`) and last pages
    /// (`lasts`), one bit each, so that the lowest of each mask are one run.
    starts: u64,
    lasts: u64,
    /// The run that reaches the end of the last word split, which the next word may extend.
    open: Option<(usize, usize)>,
}

impl Harvest<'_> {
    /// The next page word taken, from the chunk or from the walk; `None` at the end.
    fn next_word(&mut self) -> Option<(usize, u64)> {
        if self.next_word == self.words_len {
            self.next_word = 0;
            self.words_len = self.walk.next_chunk(&mut self.words);
            if self.words_len == 0 {
                return None;
            }
        }
        let word = self.words[self.next_word];
        self.next_word += 1;
        Some(word)
    }

    /// The lowest run left of the word being split.
    #[inline]
    fn pop(&mut self) -> Range<usize> {
        let start = self.base + self.starts.trailing_zeros() as usize;
        let end = self.base + self.lasts.trailing_zeros() as usize + 1;
        self.starts &= self.starts - 1;
        self.lasts &= self.lasts - 1;
        start..end
    }

    /// The next run once the word being split has none left.
    fn refill(&mut self) -> Option<Range<usize>> {
        loop {
            let Some((index, bits)) = self.next_word() else {
                return self.open.take().map(|(start, end)| start..end);
            };
            let base = index * WORD_BITS;
            if let (u64::MAX, Some((_, end))) = (bits, &mut self.open) {
                // A full word extends the open run (the common case of a dense bitmap).
                if *end == base {
                    *end += WORD_BITS;
                    continue;
                }
            }
            let mut starts = bits & !(bits << 1);
            let mut lasts = bits & !(bits >> 1);
            // The open run ends before this word, or its first run extends it.
            let mut finished = None;
            if let Some((start, end)) = self.open.take() {
                if end == base && bits & 1 != 0 {
                    let first_end = base + lasts.trailing_zeros() as usize + 1;
                    starts &= starts - 1;
                    lasts &= lasts - 1;
                    if first_end == base + WORD_BITS {
                        self.open = Some((start, first_end));
                    } else {
                        finished = Some(start..first_end);
                    }
                } else {
                    finished = Some(start..end);
                }
            }
            // A run left that reaches the end of the word stays open.
            if lasts >> (WORD_BITS - 1) != 0 {
                let high = WORD_BITS - 1 - starts.leading_zeros() as usize;
                starts &= !(1 << high);
                lasts &= !(1 << (WORD_BITS - 1));
                self.open = Some((base + high, base + WORD_BITS));
            }
            (self.base, self.starts, self.lasts) = (base, starts, lasts);
            if finished.is_some() {
                return finished;
            }
            if starts != 0 {
                return Some(self.pop());
            }
        }
    }
}

impl Iterator for Harvest<'_> {
    type Item = Range<usize>;

    #[inline]
    fn next(&mut self) -> Option<Range<usize>> {
        if self.starts != 0 {
            return Some(self.pop());
        }
        self.refill()
    }
}

impl Drop for Harvest<'_> {
    fn drop(&mut self) {
        let bitmap = self.walk.bitmap;
        while self.starts != 0 {
            let run = self.pop();
            bitmap.mark_pages(run.start, run.end - 1);
        }
        if let Some((start, end)) = self.open.take() {
            bitmap.mark_pages(start, end - 1);
        }
        for &(index, bits) in &self.words[self.next_word..self.words_len] {
            bitmap.raise(0, index, bits);
        }
    }
}

impl Clone for AtomicHBitmap {
    /// A copy of the marks, read as `AtomicBitmap::clone` reads them (`Acquire` loads), visiting
    /// only dirty words. The copy's summary is exact for what it copied, so a mark racing with
    /// the clone is either in the copy with its summary bits or not in it at all.
    fn clone(&self) -> Self {
        let copy = AtomicHBitmap {
            levels: self.levels.each_ref().map(|level| zeroed(level.len())),
            size: self.size,
            byte_size: self.byte_size,
            page_size: self.page_size,
        };
        self.for_each_dirty_word(|index, bits| copy.mark_word(index, bits));
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
        assert_eq!(level_sizes(0), [0, 1, 1]);
        assert_eq!(level_sizes(64), [1, 1, 1]);
        assert_eq!(level_sizes(65), [2, 1, 1]);
        assert_eq!(level_sizes(64 * 64 + 1), [65, 2, 1]);
        assert_eq!(level_sizes(64 * 64 * 64 + 1), [64 * 64 + 1, 65, 2]);
        // 1 TiB of 4 KiB pages: the summary is 1/64 + 1/4096 of the page bits.
        let sizes = level_sizes(1 << 28);
        assert_eq!(sizes, [1 << 22, 1 << 16, 1 << 10]);
        let b = AtomicHBitmap::new(1 << 40, NonZeroUsize::new(4096).unwrap());
        let page_bits = (1 << 22) * 8;
        assert_eq!(
            b.heap_bytes(),
            page_bits + page_bits / 64 + page_bits / 4096
        );
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
        b.enlarge(128 * 64 * 64 * 64 * 2);
        assert_eq!(b.levels.each_ref().map(|level| level.len()), [8193, 129, 3]);
        b.set_bit(64 * 64 + 1);
        b.set_bit(64 * 64 * 64 * 2 + 7);
        assert_eq!(
            b.harvest().collect::<Vec<_>>(),
            [3..4, 4097..4098, 524295..524296]
        );
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
