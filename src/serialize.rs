//! Serialization of the last level in QEMU's format: little-endian 64-bit words, independent of
//! the host's word size, in chunks aligned to `64 << granularity` items. Only the last level is
//! stored; [`HBitmap::deserialize_finish`] rebuilds the summary levels.

use std::mem::MaybeUninit;
use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::bitmap::{
    padding_ones, storage, words, BlockSet, HBitmap, Violation, BITS_PER_LEVEL, BLOCK_WORDS, LAST,
    LEVELS, SENTINEL,
};

/// Granularities from this one up cannot be serialized: `64 << granularity` must fit 64 bits.
pub const MAX_SERIALIZABLE_GRANULARITY: u32 = 58;

impl HBitmap {
    /// Whether the bitmap can be serialized (granularity below 58).
    pub fn is_serializable(&self) -> bool {
        self.granularity < MAX_SERIALIZABLE_GRANULARITY
    }

    /// Items covered by one serialized word: chunk starts and lengths are multiples of this.
    ///
    /// # Panics
    /// When the bitmap is not serializable.
    pub fn serialization_align(&self) -> u64 {
        assert!(
            self.is_serializable(),
            "HBitmap::serialization_align: granularity {} is not below 58",
            self.granularity
        );
        64 << self.granularity
    }

    /// Checks a chunk (item range) and returns the range of last-level words it covers.
    /// `Ok(None)` for an empty chunk.
    pub(crate) fn check_chunk(
        &self,
        start: u64,
        count: u64,
    ) -> Result<Option<Range<usize>>, Violation> {
        if count == 0 {
            return Ok(None);
        }
        if !self.is_serializable() {
            return Err(Violation::NotSerializable(self.granularity));
        }
        let align = 64u64 << self.granularity;
        let Some(last) = start.checked_add(count - 1) else {
            return Err(Violation::RangeWraps { start, count });
        };
        if start & (align - 1) != 0 {
            return Err(Violation::ChunkStart { start, align });
        }
        let last_group = last >> self.granularity;
        if last_group >= self.groups {
            return Err(Violation::RangeOutOfRange {
                start,
                count,
                last: last_group,
                groups: self.groups,
            });
        }
        if last_group != self.groups - 1 && count & (align - 1) != 0 {
            return Err(Violation::ChunkCount { count, align });
        }
        let first_word = ((start >> self.granularity) >> BITS_PER_LEVEL) as usize;
        let last_word = (last_group >> BITS_PER_LEVEL) as usize;
        Ok(Some(first_word..last_word + 1))
    }

    fn chunk_or_panic(&self, what: &str, start: u64, count: u64) -> Option<Range<usize>> {
        match self.check_chunk(start, count) {
            Ok(words) => words,
            Err(why) => panic!("HBitmap::{what}: {why}"),
        }
    }

    /// Bytes that serializing the chunk `start..start + count` takes (0 for an empty chunk).
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or a bitmap that is not serializable.
    pub fn serialization_size(&self, start: u64, count: u64) -> u64 {
        self.chunk_or_panic("serialization_size", start, count)
            .map_or(0, |words| words.len() as u64 * 8)
    }

    /// Writes the chunk `start..start + count` into `buf` as little-endian 64-bit words.
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or when `buf` is shorter than
    /// [`serialization_size`](Self::serialization_size).
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, count: u64) {
        if let Some(words) = self.chunk_or_panic("serialize_part", start, count) {
            let needed = words.len() * 8;
            assert!(
                buf.len() >= needed,
                "HBitmap::serialize_part: buffer of {} bytes, {needed} needed",
                buf.len()
            );
            self.serialize_words(words, storage::as_uninit(&mut buf[..needed]));
        }
    }

    /// Writes the last level's `words` into `out` (8 bytes each) as little-endian words; `out`
    /// is only written, never read (a C caller's buffer may be uninitialized). While the summary
    /// is right (no deserialization pending), blocks it shows clean are written as zeros
    /// without being read: the clean pages of a sparse bitmap may never have been touched, and
    /// reading them would fault every one of them in.
    pub(crate) fn serialize_words(&self, words: Range<usize>, out: &mut [MaybeUninit<u8>]) {
        let level = &self.levels[LAST];
        if self.stale || cfg!(target_endian = "big") {
            return write_le_words(&level[words], out);
        }
        let summary = &self.levels[LAST - 1];
        let clean = |block: usize| {
            let first = block * BLOCK_WORDS;
            words::bits_clear(summary, first..(first + BLOCK_WORDS).min(level.len()))
        };
        let bulk = storage::BulkWrite::whole(out);
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

    /// Loads the chunk `start..start + count` from `buf` (little-endian 64-bit words). With
    /// `finish` false the summary levels are stale until
    /// [`deserialize_finish`](Self::deserialize_finish) is called.
    ///
    /// # Panics
    /// As [`serialize_part`](Self::serialize_part).
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, count: u64, finish: bool) {
        if let Some(words) = self.chunk_or_panic("deserialize_part", start, count) {
            let needed = words.len() * 8;
            assert!(
                buf.len() >= needed,
                "HBitmap::deserialize_part: buffer of {} bytes, {needed} needed",
                buf.len()
            );
            self.deserialize_words(words.clone(), &buf[..needed]);
            self.full.refresh(&self.levels[LAST], words);
            self.after_deserialize(finish);
        }
    }

    /// Makes the chunk `start..start + count` clean (whole words), as a deserialization step.
    /// Pages that are clean already are not written: a fresh bitmap stays unbacked.
    pub fn deserialize_zeroes(&mut self, start: u64, count: u64, finish: bool) {
        if let Some(words) = self.chunk_or_panic("deserialize_zeroes", start, count) {
            let (upper, lower) = self.levels.split_at_mut(LAST);
            let known_clean = known_clean(&upper[LAST - 1], &self.unsummarized, words.start);
            let dst = bytemuck::cast_slice_mut(&mut lower[0][words.clone()]);
            storage::BulkWrite::new(dst.len()).clear(dst, known_clean);
            if !words.is_empty() {
                self.full.words_unfilled(words.start, words.end - 1);
            }
            self.after_deserialize(finish);
        }
    }

    /// Decodes little-endian `bytes` into the last level's `words`, remembering the blocks it
    /// fills with dirty words as unsummarized. On a little-endian host it is a copy that writes
    /// blocks of zeros only where the words are not known to be clean.
    fn deserialize_words(&mut self, words: Range<usize>, bytes: &[u8]) {
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
        storage::copy_into_ours(
            bytemuck::cast_slice_mut(&mut lower[0][words.clone()]),
            bytes,
            known_clean,
            |run| copied.push(words_of(words.start, run)),
        );
        for run in copied {
            self.unsummarized.insert(run);
        }
    }

    /// Makes the chunk `start..start + count` dirty (whole words, so the last chunk's padding
    /// bits are set too, as in the original), as a deserialization step.
    pub fn deserialize_ones(&mut self, start: u64, count: u64, finish: bool) {
        if let Some(words) = self.chunk_or_panic("deserialize_ones", start, count) {
            self.levels[LAST][words.clone()].fill(u64::MAX);
            self.full.refresh(&self.levels[LAST], words.clone());
            self.unsummarized.insert(words);
            self.after_deserialize(finish);
        }
    }

    fn after_deserialize(&mut self, finish: bool) {
        if finish {
            self.deserialize_finish();
        } else {
            self.stale = true;
        }
    }

    /// Rebuilds the summary levels from the last level and recounts the dirty groups.
    pub fn deserialize_finish(&mut self) {
        let words = self.levels[LAST].len();
        // The full-block summary followed every step already.
        self.summarize_written(std::slice::from_ref(&(0..words)));
    }

    /// `deserialize_finish` for a bitmap whose last level changed only at `written` (ascending
    /// ranges starting at multiples of 64 words) since its summaries were last right, as a
    /// fresh bitmap's are: only those ranges are summarized, so loading a sparse bitmap never
    /// reads its untouched pages. The levels above are rebuilt whole (they are 64 times
    /// smaller), and the count comes from the ranges: outside them the last level must be
    /// clean.
    pub(crate) fn finish_loaded(&mut self, written: &[Range<usize>]) {
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

    /// SHA-256 of the last level's words as they lie in memory, in lowercase hex: the
    /// original's `hbitmap_sha256`.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        let words = &self.levels[LAST];
        let mut block = [0u8; 8 * 512];
        for chunk in words.chunks(512) {
            let bytes = &mut block[..chunk.len() * 8];
            for (out, word) in bytes.chunks_exact_mut(8).zip(chunk) {
                out.copy_from_slice(&word.to_ne_bytes());
            }
            hasher.update(bytes);
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
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
        storage::BulkWrite::whole(out).copy(out, bytemuck::cast_slice(words));
    } else {
        for (bytes, word) in out.chunks_exact_mut(8).zip(words) {
            for (byte, value) in bytes.iter_mut().zip(word.to_le_bytes()) {
                byte.write(value);
            }
        }
    }
}

const _: () = assert!(LEVELS == 7);
