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

use sync::{fence, fence_for_loom, zeroed, AtomicU64, Ordering};

// The orderings used throughout; the type's documentation says why they suffice.
/// A mark: its OR of page words, and its read and update of the summary.
const MARK: Ordering = Ordering::SeqCst;
/// The read-modify-writes that clear: a harvest's swaps, the ANDs of `reset_addr_range` and
/// `reset_bit`.
const TAKE: Ordering = Ordering::AcqRel;
/// The reads of the non-destructive walks and of `is_bit_set`, as `AtomicBitmap`'s loads.
const LOAD: Ordering = Ordering::Acquire;
/// Reads that only decide which words a harvest takes or reads ahead.
const PEEK: Ordering = Ordering::Relaxed;

const WORD_BITS: usize = 64;
/// Page words under one summary bit: one 64-byte cache line of page bits, 512 pages.
const GROUP_WORDS: usize = 8;
/// Page words under one summary word.
const SUMMARY_WORD_SPAN: usize = GROUP_WORDS * WORD_BITS;

/// Bits `lo..=hi` of a word (`lo <= hi < 64`).
#[inline]
fn mask(lo: usize, hi: usize) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// The summary word and bit over page word `index`.
#[inline]
fn summary_bit(index: usize) -> (usize, u64) {
    (
        index / SUMMARY_WORD_SPAN,
        1 << (index / GROUP_WORDS % WORD_BITS),
    )
}

/// A page-granular dirty bitmap that any number of threads mark through `&self`, with a summary
/// that lets a harvest visit only the dirty pages.
///
/// # Structure
///
/// The page bits are 64-bit words, one bit per page, exactly as vm-memory's `AtomicBitmap`;
/// `get_and_reset` returns these words. Above them, one summary bit per group of 8 page words
/// (one cache line, 512 pages) is set when a word of the group may be non-zero. A harvest reads
/// the summary in full (8,192 words for a 1 TiB guest of 4 KiB pages, 98,304 for 12 TiB, read 8
/// at a time) and then only the groups it shows. A mark reads the summary above its word after
/// its OR (see below), and on x86 every read that follows the OR, a locked instruction, lengthens
/// the mark even when it hits the cache: one level, and a small one, keeps that to one read of a
/// line that stays cached. The summary is 1/512 of the page bits (1 TiB: 32 MiB of page bits,
/// 64 KiB of summary).
///
/// # Concurrency contract
///
/// Every method but [`enlarge`](Self::enlarge) takes `&self` and may run concurrently with any
/// other: marks ([`set_addr_range`](Self::set_addr_range), [`set_bit`](Self::set_bit), vm-memory's
/// `mark_dirty`) race freely with each other and with [`harvest`](Self::harvest),
/// [`get_and_reset`](Self::get_and_reset), [`reset_addr_range`](Self::reset_addr_range),
/// [`reset_bit`](Self::reset_bit) and [`reset`](Self::reset).
///
/// - A mark is one atomic OR per word of page bits (one for a page, one per 64 pages of a range),
///   then one read of the summary word above; it writes the summary only to set a bit that is
///   clear, which after the first mark of a group is never.
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
/// - A mark ORs its page words, then reads the summary word above them and ORs the bits it finds
///   clear, all `SeqCst` (on x86 the same instructions as weaker orderings). It reads nothing
///   before the OR.
/// - A harvest reads the summary words (`Relaxed`, eight at a time) and takes the non-zero ones
///   with an `AcqRel` swap to zero, up to 64 groups at a time; then a `SeqCst` fence; then it
///   reads each page word of those groups (`Relaxed`) and takes the non-zero ones with an
///   `AcqRel` swap.
///
/// Take a mark of page word `w`, under summary bit `s`, and a harvest that took `s`. If the
/// harvest's read of `w` sees the mark's OR, its swap of `w` takes the page (unless another
/// harvest's swap took it first). If it does not, that read comes before the OR in `w`'s
/// modification order, and then the mark's read of `s` cannot come before the harvest's swap of
/// `s` in `s`'s: each side would miss the other's write (the store-buffering outcome), which
/// C++20's rules for `SeqCst` (\[atomics.order\]) exclude when one side has a `SeqCst` fence
/// between its write and its read and the other side's write and read are `SeqCst`. So the mark
/// reads `s` clear, and sets it, or set again since by another mark; in both cases the next
/// harvest that takes `s` reads `w` with the mark's OR (the same argument, with the mark's read
/// of `s` before that harvest's swap). A mark that finds `s` set relies on it in the same way. A
/// mark that happens before a harvest starts has set or seen `s`, so the harvest's read of the
/// summary word sees `s`, or a value written since by the swap of another harvest, which took `s`
/// and, by the argument above, the page. The `Acquire` loads of `is_bit_set` and of the
/// non-destructive walks (`dirty_pages`, `Clone`) read the words as `AtomicBitmap`'s loads do.
/// `tests/loom.rs` checks these claims over every interleaving of small models; loom models
/// `SeqCst` accesses as `AcqRel`, so under loom a mark also has a `SeqCst` fence between its OR
/// and its read of the summary, which excludes the same outcome.
///
/// The page data too: a mark's OR releases, and the swap that takes the page acquires, so a
/// harvester that takes a page sees every write to guest memory made before the page was marked
/// (vm-memory marks after writing). This is why a mark is an OR even when its bit is already set:
/// skipping it would let a harvest take the bit without seeing the new data.
pub struct AtomicHBitmap {
    /// One bit per page: page word `i` is `pages[first + i]`.
    pages: Box<[AtomicU64]>,
    /// The first page word, chosen so that each group of page words is one cache line (a
    /// harvest then reads a group with one cache miss): `pages` has room for whole groups from
    /// there (`pages.len() / GROUP_WORDS` of them); the words past the last page word are never
    /// set.
    first: usize,
    /// One bit per group of [`GROUP_WORDS`] page words; at least one word.
    summary: Box<[AtomicU64]>,
    /// Pages tracked.
    size: usize,
    byte_size: usize,
    page_size: NonZeroUsize,
}

/// Zeroed room for `groups` groups of page words, and the index of its first word on a cache
/// line boundary. (The allocator aligns to 16 bytes; asking it for 64 would make it write the
/// zeros itself, touching every page of the bitmap at creation.)
fn page_words(groups: usize) -> (Box<[AtomicU64]>, usize) {
    let pages = zeroed(groups * GROUP_WORDS + GROUP_WORDS - 1);
    let to_line = pages.as_ptr().addr().wrapping_neg() % (GROUP_WORDS * size_of::<AtomicU64>());
    let first = to_line / size_of::<AtomicU64>();
    (pages, first)
}

/// Words of page bits, groups and summary words for `pages` pages.
fn level_sizes(pages: usize) -> (usize, usize, usize) {
    let words = pages.div_ceil(WORD_BITS);
    let groups = words.div_ceil(GROUP_WORDS);
    (words, groups, groups.div_ceil(WORD_BITS).max(1))
}

/// Words of page bits for `pages` pages.
fn page_word_count(pages: usize) -> usize {
    level_sizes(pages).0
}

#[allow(clippy::len_without_is_empty)] // as vm-memory's AtomicBitmap
impl AtomicHBitmap {
    /// Creates a bitmap tracking `byte_size` bytes, one bit per page of `page_size` bytes (the
    /// last page may be partial: the number of pages is rounded up). All pages are clean. The
    /// memory comes zeroed from the allocator: pages of the bitmap are touched only when marked.
    pub fn new(byte_size: usize, page_size: NonZeroUsize) -> Self {
        let size = byte_size.div_ceil(page_size.get());
        let (_, groups, summary) = level_sizes(size);
        let (pages, first) = page_words(groups);
        AtomicHBitmap {
            pages,
            first,
            summary: zeroed(summary),
            size,
            byte_size,
            page_size,
        }
    }

    /// Grows the bitmap by `additional_size` bytes; the new pages are clean and the marks already
    /// made are kept. (Like `AtomicBitmap::enlarge`, it panics if the byte size overflows `usize`
    /// in a debug build.)
    pub fn enlarge(&mut self, additional_size: usize) {
        let old_words = page_word_count(self.size);
        self.byte_size += additional_size;
        self.size = self.byte_size.div_ceil(self.page_size.get());
        // The words added are clean, and the summary bits of the old ones stay where they are.
        let (_, groups, summary) = level_sizes(self.size);
        if groups > self.pages.len() / GROUP_WORDS {
            let (pages, first) = page_words(groups);
            for index in 0..old_words {
                pages[first + index].store(self.word(index).load(PEEK), PEEK);
            }
            (self.pages, self.first) = (pages, first);
        }
        if summary > self.summary.len() {
            let mut grown = std::mem::take(&mut self.summary).into_vec();
            grown.resize_with(summary, || AtomicU64::new(0));
            self.summary = grown.into_boxed_slice();
        }
    }

    /// Whether page `index` is marked; pages past the end are never marked.
    pub fn is_bit_set(&self, index: usize) -> bool {
        index < self.size
            && self.word(index / WORD_BITS).load(LOAD) & (1 << (index % WORD_BITS)) != 0
    }

    /// Whether the page holding byte `addr` is marked.
    pub fn is_addr_set(&self, addr: usize) -> bool {
        self.is_bit_set(addr / self.page_size)
    }

    /// The pages holding bytes `start_addr..start_addr + len`, clamped to the bitmap; `None`
    /// when there are none. The end saturates at `usize::MAX`, as in `AtomicBitmap`.
    #[inline]
    fn page_range(&self, start_addr: usize, len: usize) -> Option<(usize, usize)> {
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
        if let Some((first, last)) = self.page_range(start_addr, len) {
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
        if let Some((first, last)) = self.page_range(start_addr, len) {
            for (word, bits) in word_masks(first, last) {
                self.word(word).fetch_and(!bits, TAKE);
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
            self.word(index / WORD_BITS)
                .fetch_and(!(1 << (index % WORD_BITS)), TAKE);
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

    /// The heap memory the bitmap holds, in bytes: the page bits (as much as `AtomicBitmap`'s, and
    /// up to 14 words to align them) plus the summary (1/512 of that, and a word). Allocated
    /// zeroed, it is touched only where pages are marked.
    pub fn heap_bytes(&self) -> usize {
        size_of_val(&*self.pages) + size_of_val(&*self.summary)
    }

    /// The page size given to [`new`](Self::new).
    pub fn page_size(&self) -> NonZeroUsize {
        self.page_size
    }

    /// Takes every page bit: the words of page bits (page `i` is bit `i % 64` of word `i / 64`),
    /// as `AtomicBitmap::get_and_reset` returns them, and clears them. Only dirty words are
    /// visited; the clean ones are zeros of a freshly allocated vector.
    pub fn get_and_reset(&self) -> Vec<u64> {
        let mut words = vec![0u64; page_word_count(self.size)];
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
        while let Some(group) = walk.next_group(true) {
            self.take_group(group, &mut f);
        }
    }

    /// Takes the non-zero words of group `group`, calling `f(index, bits)` for each in increasing
    /// order. All eight words are read first, then the non-zero ones taken: a branch per word
    /// would be mispredicted about once per group where the summary is sparse.
    #[inline]
    fn take_group(&self, group: usize, mut f: impl FnMut(usize, u64)) {
        let words = self.group(group);
        let mut dirty = words.iter().enumerate().fold(0u32, |acc, (i, word)| {
            acc | u32::from(word.load(PEEK) != 0) << i
        });
        while dirty != 0 {
            let offset = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            let taken = words[offset].swap(0, TAKE);
            if taken != 0 {
                f(group * GROUP_WORDS + offset, taken);
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
    /// clearing) the words of the groups the summary shows dirty.
    fn for_each_dirty_word(&self, mut f: impl FnMut(usize, u64)) {
        for (index, word) in self.summary.iter().enumerate() {
            let mut groups = word.load(LOAD);
            while groups != 0 {
                let group = index * WORD_BITS + groups.trailing_zeros() as usize;
                groups &= groups - 1;
                for (offset, word) in self.group(group).iter().enumerate() {
                    let bits = word.load(LOAD);
                    if bits != 0 {
                        f(group * GROUP_WORDS + offset, bits);
                    }
                }
            }
        }
    }

    /// Page word `index`.
    #[inline]
    fn word(&self, index: usize) -> &AtomicU64 {
        &self.pages[self.first + index]
    }

    /// The page words of group `group`, one cache line.
    #[inline]
    fn group(&self, group: usize) -> &[AtomicU64; GROUP_WORDS] {
        let start = self.first + group * GROUP_WORDS;
        self.pages[start..start + GROUP_WORDS]
            .try_into()
            .expect("a group is GROUP_WORDS words")
    }

    /// Marks pages `first..=last` (both within the bitmap): ORs each word of page bits, then sets
    /// the summary bits over them that are clear.
    fn mark_pages(&self, first: usize, last: usize) {
        for (word, bits) in word_masks(first, last) {
            self.word(word).fetch_or(bits, MARK);
        }
        fence_for_loom();
        let groups = (
            first / WORD_BITS / GROUP_WORDS,
            last / WORD_BITS / GROUP_WORDS,
        );
        for (word, bits) in word_masks(groups.0, groups.1) {
            let word = &self.summary[word];
            if word.load(MARK) & bits != bits {
                word.fetch_or(bits, MARK);
            }
        }
    }

    /// ORs `bits` into page word `index`, then makes sure its summary bit is set: the mark of a
    /// page, or of pages within one word. The common case, the summary bit already set, is the
    /// OR, one load and one branch; the update is out of line.
    #[inline]
    fn mark_word(&self, index: usize, bits: u64) {
        let (summary_index, bit) = summary_bit(index);
        // Both words are located before the OR, so that after it only the summary word is read.
        let (word, summary) = (self.word(index), &self.summary[summary_index]);
        // Nothing is read before the OR: on x86 the OR is a locked instruction, which waits for
        // the loads before it. The page word is not read ahead either: on a page of the bitmap
        // never written, that read would map the zero page and the OR would then fault again.
        word.fetch_or(bits, MARK);
        fence_for_loom();
        if summary.load(MARK) & bit == 0 {
            set_summary_bit(summary, bit);
        }
    }
}

/// The rare part of a mark: its summary bit was clear.
#[cold]
#[inline(never)]
fn set_summary_bit(word: &AtomicU64, bit: u64) {
    word.fetch_or(bit, MARK);
}

/// The words holding bits `first..=last` of an array of words, each with the mask of those bits.
fn word_masks(first: usize, last: usize) -> impl Iterator<Item = (usize, u64)> {
    let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
    (first_word..=last_word).map(move |word| {
        let lo = if word == first_word {
            first % WORD_BITS
        } else {
            0
        };
        let hi = if word == last_word {
            last % WORD_BITS
        } else {
            WORD_BITS - 1
        };
        (word, mask(lo, hi))
    })
}

/// The destructive walk shared by `harvest`, `get_and_reset` and `reset`: it reads the summary in
/// full, takes its non-zero words, and hands out the non-zero page words of the groups whose bits
/// it took, in increasing order. The summary bits it holds when dropped (taken, their groups not
/// yet visited) are given back.
struct Walk<'a> {
    bitmap: &'a AtomicHBitmap,
    /// The next summary word to read.
    cursor: usize,
    /// The summary word being visited, and the bits taken from it whose groups are not yet in
    /// `groups`.
    held: (usize, u64),
    /// Groups taken and not yet visited: `groups[group_at..groups_len]`.
    groups: [usize; BATCH],
    group_at: usize,
    groups_len: usize,
}

/// Summary words read together, so that a clean stretch is skipped eight words at a time.
const SCAN: usize = 8;
/// Groups taken together: their first words are read ahead, so that where the summary is sparse
/// their cache misses overlap (on x86 each swap is a locked instruction that would otherwise wait
/// for its own miss).
const BATCH: usize = 64;

impl<'a> Walk<'a> {
    fn new(bitmap: &'a AtomicHBitmap) -> Self {
        Walk {
            bitmap,
            cursor: 0,
            held: (0, 0),
            groups: [0; BATCH],
            group_at: 0,
            groups_len: 0,
        }
    }

    /// With nothing held, takes the next non-zero summary word into `held`; `false` at the end.
    fn take_summary_word(&mut self) -> bool {
        let summary = &self.bitmap.summary;
        while let Some(word) = summary.get(self.cursor) {
            if self.cursor % SCAN == 0 {
                if let Some(block) = summary.get(self.cursor..self.cursor + SCAN) {
                    if block.iter().fold(0, |acc, word| acc | word.load(PEEK)) == 0 {
                        self.cursor += SCAN;
                        continue;
                    }
                }
            }
            self.cursor += 1;
            if word.load(PEEK) != 0 {
                let taken = word.swap(0, TAKE);
                if taken != 0 {
                    self.held = (self.cursor - 1, taken);
                    return true;
                }
            }
        }
        false
    }

    /// With no group left to visit, takes up to [`BATCH`] groups from the summary and reads their
    /// first words ahead; `false` at the end.
    fn take_groups(&mut self) -> bool {
        let mut count = 0;
        loop {
            let (index, bits) = &mut self.held;
            while *bits != 0 && count < BATCH {
                self.groups[count] = *index * WORD_BITS + bits.trailing_zeros() as usize;
                *bits &= *bits - 1;
                count += 1;
            }
            if count == BATCH || !self.take_summary_word() {
                break;
            }
        }
        (self.group_at, self.groups_len) = (0, count);
        // Orders the swaps of the summary words before the reads of the page words under them
        // (see the type's documentation).
        fence(Ordering::SeqCst);
        let bitmap = self.bitmap;
        let ahead = self.groups[..count]
            .iter()
            .fold(0, |acc, &group| acc | bitmap.group(group)[0].load(PEEK));
        std::hint::black_box(ahead);
        count != 0
    }

    /// The next group to visit; when none is left, with `refill`, the first of a new batch.
    fn next_group(&mut self, refill: bool) -> Option<usize> {
        if self.group_at == self.groups_len && !(refill && self.take_groups()) {
            return None;
        }
        let group = self.groups[self.group_at];
        self.group_at += 1;
        Some(group)
    }

    /// Takes the next non-zero page words, in increasing order, into `out`: their number, 0 at
    /// the end. The caller owns them (it must return them or give them back).
    fn next_chunk(&mut self, out: &mut [(usize, u64); WORD_BITS]) -> usize {
        let mut len = 0;
        while len + GROUP_WORDS <= out.len() {
            // A chunk ends with the groups taken, unless it is empty.
            let Some(group) = self.next_group(len == 0) else {
                break;
            };
            self.bitmap.take_group(group, |index, bits| {
                out[len] = (index, bits);
                len += 1;
            });
        }
        len
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        let summary = &self.bitmap.summary;
        for &group in &self.groups[self.group_at..self.groups_len] {
            summary[group / WORD_BITS].fetch_or(1 << (group % WORD_BITS), MARK);
        }
        let (index, bits) = self.held;
        if bits != 0 {
            summary[index].fetch_or(bits, MARK);
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
            bitmap.mark_word(index, bits);
        }
    }
}

impl Clone for AtomicHBitmap {
    /// A copy of the marks, read as `AtomicBitmap::clone` reads them (`Acquire` loads), visiting
    /// only dirty words. The copy's summary is exact for what it copied, so a mark racing with
    /// the clone is either in the copy with its summary bits or not in it at all.
    fn clone(&self) -> Self {
        let (pages, first) = page_words(level_sizes(self.size).1);
        let copy = AtomicHBitmap {
            pages,
            first,
            summary: zeroed(self.summary.len()),
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
        assert_eq!(level_sizes(0), (0, 0, 1));
        assert_eq!(level_sizes(64), (1, 1, 1));
        assert_eq!(level_sizes(65), (2, 1, 1));
        assert_eq!(level_sizes(512 * 64), (512, 64, 1));
        assert_eq!(level_sizes(512 * 64 + 1), (513, 65, 2));
        assert_eq!(summary_bit(0), (0, 1));
        assert_eq!(summary_bit(7), (0, 1));
        assert_eq!(summary_bit(8), (0, 2));
        assert_eq!(summary_bit(511), (0, 1 << 63));
        assert_eq!(summary_bit(512), (1, 1));
        // 1 TiB of 4 KiB pages: the summary is 1/512 of the page bits.
        assert_eq!(level_sizes(1 << 28), (1 << 22, 1 << 19, 1 << 13));
        let b = AtomicHBitmap::new(1 << 40, NonZeroUsize::new(4096).unwrap());
        let page_bits = (1 << 22) * 8;
        assert_eq!(b.heap_bytes(), page_bits + 7 * 8 + page_bits / 512);
        assert_eq!(
            b.group(5).as_ptr().addr() % 64,
            0,
            "a group is a cache line"
        );
    }

    #[test]
    fn runs_cross_words_groups_and_summary_words() {
        let b = bitmap(32_768 * 2 + 100);
        b.set_bit(0);
        b.set_addr_range(63 * 128, 3 * 128); // pages 63..66: two words
        b.set_addr_range(500 * 128, 20 * 128); // across a group boundary (512)
        b.set_addr_range(32_700 * 128, 200 * 128); // across a summary word boundary (32768)
        b.set_bit(b.len() - 1);
        assert_eq!(b.dirty_pages(), 1 + 3 + 20 + 200 + 1);
        let runs: Vec<_> = b.harvest().collect();
        assert_eq!(
            runs,
            [0..1, 63..66, 500..520, 32_700..32_900, 65_635..65_636]
        );
        assert_eq!(b.dirty_pages(), 0);
        assert_eq!(b.harvest().next(), None);
        assert!(b.get_and_reset().iter().all(|&w| w == 0));
        assert!(b.summary.iter().all(|w| w.load(LOAD) == 0));
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
        assert_eq!((page_word_count(b.size), b.summary.len()), (8193, 17));
        assert_eq!(b.pages.len(), 1025 * GROUP_WORDS + GROUP_WORDS - 1);
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
