// SPDX-License-Identifier: GPL-2.0-or-later

//! The one door into the last level's words for bulk work: serialization reads and writes runs
//! of words through it, and an image loader fills a fresh bitmap through [`Filling`]. Both keep
//! the bitmap's invariants here: the summaries (dirty and full-block) follow every write or are
//! marked stale until `summarize`, the count follows the summaries, and a loaded bitmap has no
//! padding bits.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::{
    bulk_write, padding_mask, padding_ones, words, BlockSet, HBitmap, BLOCK_WORDS, LAST, SENTINEL,
};

impl HBitmap {
    /// The last level's words, read-only.
    pub(crate) fn words(&self) -> &[u64] {
        &self.levels[LAST]
    }

    /// Writes the last level's `words` into `out` (8 bytes each) as little-endian words; `out`
    /// is only written, never read (a C caller's buffer may be uninitialized). While the summary
    /// is right (no deserialization pending), blocks it shows clean are written as zeros
    /// without being read: the clean pages of a sparse bitmap may never have been touched, and
    /// reading them would fault every one of them in.
    pub(crate) fn read_words_le(&self, words: Range<usize>, out: &mut [MaybeUninit<u8>]) {
        let level = &self.levels[LAST];
        if self.stale || cfg!(target_endian = "big") {
            return write_le_words(&level[words], out);
        }
        let summary = &self.levels[LAST - 1];
        let clean = |block: usize| {
            let first = block * BLOCK_WORDS;
            words::bits_clear(summary, first..(first + BLOCK_WORDS).min(level.len()))
        };
        let bulk = bulk_write::BulkWrite::whole(out);
        let mut at = words.start;
        while at < words.end {
            // The run of blocks, all clean or all dirty, that starts at `at`.
            let run_clean = clean(at / BLOCK_WORDS);
            let mut end = (at / BLOCK_WORDS + 1) * BLOCK_WORDS;
            while end < words.end && clean(end / BLOCK_WORDS) == run_clean {
                end += BLOCK_WORDS;
            }
            let end = end.min(words.end);
            let dst = &mut out[(at - words.start) * 8..(end - words.start) * 8];
            if run_clean {
                bulk.zero(dst);
            } else {
                bulk.copy(dst, bytemuck::cast_slice(&level[at..end]));
            }
            at = end;
        }
    }

    /// A deserialization step: decodes little-endian `bytes` (8 per word) into the last level's
    /// `words`. The dirty summary is stale until [`summarize`](Self::summarize).
    pub(crate) fn write_words_le(&mut self, words: Range<usize>, bytes: &[u8]) {
        self.decode_words(words.clone(), bytes);
        self.full.refresh(&self.levels[LAST], words);
        self.stale = true;
    }

    /// A deserialization step: makes `words` clean. Pages that are clean already are not
    /// written, so a fresh bitmap stays unbacked.
    pub(crate) fn zero_words(&mut self, words: Range<usize>) {
        let (upper, lower) = self.levels.split_at_mut(LAST);
        let known_clean = known_clean(&upper[LAST - 1], &self.unsummarized, words.start);
        let dst = bytemuck::cast_slice_mut(&mut lower[0][words.clone()]);
        bulk_write::BulkWrite::new(dst.len()).clear(dst, known_clean);
        if !words.is_empty() {
            self.full.words_unfilled(words.start, words.end - 1);
        }
        self.stale = true;
    }

    /// A deserialization step: makes `words` all ones, padding bits included, as the original.
    pub(crate) fn fill_words(&mut self, words: Range<usize>) {
        self.levels[LAST][words.clone()].fill(u64::MAX);
        self.full.refresh(&self.levels[LAST], words.clone());
        self.unsummarized.insert(words);
        self.stale = true;
    }

    /// Rebuilds the dirty summary levels from the last level and recounts the dirty groups
    /// (the full-block summary followed every step already).
    pub(crate) fn summarize(&mut self) {
        let words = self.levels[LAST].len();
        self.summarize_written(std::slice::from_ref(&(0..words)));
    }

    /// Decodes little-endian `bytes` into the last level's `words`, remembering the blocks it
    /// fills with dirty words as unsummarized. On a little-endian host it is a copy that writes
    /// blocks of zeros only where the words are not known to be clean.
    fn decode_words(&mut self, words: Range<usize>, bytes: &[u8]) {
        if cfg!(target_endian = "big") {
            for (word, bytes) in self.levels[LAST][words.clone()]
                .iter_mut()
                .zip(bytes.chunks_exact(8))
            {
                *word = u64::from_le_bytes(bytes.try_into().expect("chunks of 8"));
            }
            self.unsummarized.insert(words);
            return;
        }
        let (upper, lower) = self.levels.split_at_mut(LAST);
        let known_clean = known_clean(&upper[LAST - 1], &self.unsummarized, words.start);
        let mut copied = Vec::new();
        bulk_write::copy_into_ours(
            bytemuck::cast_slice_mut(&mut lower[0][words.clone()]),
            bytes,
            known_clean,
            |run| copied.push(words_of(words.start, run)),
        );
        for run in copied {
            self.unsummarized.insert(run);
        }
    }

    /// Fills this bitmap, which must be clean, word run by word run: see [`Filling`].
    ///
    /// # Panics
    /// When the bitmap is not clean or its summary is stale.
    pub(crate) fn filling(&mut self) -> Filling<'_> {
        assert!(
            self.count == 0 && !self.stale,
            "HBitmap::filling: the bitmap is not clean"
        );
        Filling {
            bitmap: self,
            written: Vec::new(),
        }
    }

    /// `deserialize_finish` for a bitmap whose last level changed only at `written` (ascending
    /// ranges starting at multiples of 64 words) since its summaries were last right, as a
    /// fresh bitmap's are: only those ranges are summarized, so loading a sparse bitmap never
    /// reads its untouched pages. The levels above are rebuilt whole (they are 64 times
    /// smaller), and the count comes from the ranges: outside them the last level must be
    /// clean.
    fn finish_loaded(&mut self, written: &[Range<usize>]) {
        self.summarize_written(written);
        for range in written {
            self.full.refresh(&self.levels[LAST], range.clone());
        }
    }

    /// The dirty summaries and the count of `finish_loaded`.
    fn summarize_written(&mut self, written: &[Range<usize>]) {
        let (upper, lower) = self.levels.split_at_mut(LAST);
        let (summary, words) = (&mut upper[LAST - 1], &lower[0]);
        let mut ones = 0;
        for range in written {
            debug_assert!(range.start % 64 == 0, "unaligned range {range:?}");
            let marks = range.start / 64..range.end.div_ceil(64);
            ones += words::summarize(&words[range.clone()], &mut summary[marks]);
        }
        // Padding bits past the last group are not counted.
        self.count = ones - padding_ones(words, self.groups);
        for level in (0..LAST - 1).rev() {
            let (upper, lower) = self.levels.split_at_mut(level + 1);
            words::summarize(&lower[0], &mut upper[level]);
        }
        self.levels[0][0] |= SENTINEL;
        self.stale = false;
        self.unsummarized.clear();
    }
}

/// A clean bitmap being filled from runs of little-endian words, as an image loader reads them:
/// straight into the last level, without a copy. When dropped, it clears the padding bits past
/// the last group (a loaded bitmap has none, whatever the source held) and summarizes only the
/// runs written, so loading a sparse bitmap never touches its clean pages.
pub(crate) struct Filling<'a> {
    bitmap: &'a mut HBitmap,
    /// Ascending runs written, each starting at a multiple of 64 words.
    written: Vec<Range<usize>>,
}

impl Filling<'_> {
    /// Words of the last level.
    pub(crate) fn word_count(&self) -> usize {
        self.bitmap.levels[LAST].len()
    }

    /// Fills `words` with what `read` writes into their bytes (little-endian words, as stored).
    /// The memory is prefaulted first, since every byte is about to be written. On error the
    /// run's words are cleared again.
    pub(crate) fn read_le<E>(
        &mut self,
        words: Range<usize>,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let dst = &mut self.bitmap.levels[LAST][words.clone()];
        bulk_write::prefault_whole(bytemuck::cast_slice_mut(dst));
        if let Err(error) = read(bytemuck::cast_slice_mut(dst)) {
            dst.fill(0);
            return Err(error);
        }
        if cfg!(target_endian = "big") {
            for word in dst.iter_mut() {
                *word = u64::from_le(*word);
            }
        }
        self.note(words);
        Ok(())
    }

    /// Fills the words from `first` on with the little-endian words of `bytes` (as many as fit).
    pub(crate) fn copy_le(&mut self, first: usize, bytes: &[u8]) {
        let words = &mut self.bitmap.levels[LAST][first..];
        let count = words.len().min(bytes.len() / 8);
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        }
        self.note(first..first + count);
    }

    /// Makes `words` all ones.
    pub(crate) fn ones(&mut self, words: Range<usize>) {
        self.bitmap.levels[LAST][words.clone()].fill(u64::MAX);
        self.note(words);
    }

    fn note(&mut self, words: Range<usize>) {
        match self.written.last_mut() {
            Some(last) if last.end == words.start => last.end = words.end,
            _ => self.written.push(words),
        }
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        let bitmap = &mut *self.bitmap;
        let padding = padding_mask(bitmap.groups);
        if let Some(last) = bitmap.levels[LAST].last_mut() {
            *last &= !padding;
        }
        // Runs start where the loader's clusters start; summaries work on 64-word blocks.
        let written: Vec<Range<usize>> = self
            .written
            .iter()
            .map(|run| run.start / 64 * 64..run.end)
            .collect();
        bitmap.finish_loaded(&written);
    }
}

/// Whether a (word-aligned) byte range of the last level's words from `first` on is known to be
/// clean without reading it: the summary marks none of its words, and deserialization put no
/// dirty words there since the summary was last right.
fn known_clean<'a>(
    summary: &'a [u64],
    unsummarized: &'a BlockSet,
    first: usize,
) -> impl Fn(Range<usize>) -> bool + 'a {
    move |bytes: Range<usize>| {
        let words = words_of(first, bytes);
        !unsummarized.touches(words.clone()) && words::bits_clear(summary, words)
    }
}

/// The last-level words that a byte range of the words from `first` on covers.
fn words_of(first: usize, bytes: Range<usize>) -> Range<usize> {
    first + bytes.start / 8..first + bytes.end.div_ceil(8)
}

/// Little-endian encoding of `words` into `out` (exactly 8 bytes per word).
pub(crate) fn write_le_words(words: &[u64], out: &mut [MaybeUninit<u8>]) {
    if cfg!(target_endian = "little") {
        // The words' memory is their encoding: a plain copy.
        bulk_write::BulkWrite::whole(out).copy(out, bytemuck::cast_slice(words));
    } else {
        for (bytes, word) in out.chunks_exact_mut(8).zip(words) {
            for (byte, value) in bytes.iter_mut().zip(word.to_le_bytes()) {
                byte.write(value);
            }
        }
    }
}
