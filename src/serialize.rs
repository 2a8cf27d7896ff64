//! Serialization of the last level in QEMU's format: little-endian 64-bit words, independent of
//! the host's word size, in chunks aligned to `64 << granularity` items. Only the last level is
//! stored; [`HBitmap::deserialize_finish`] rebuilds the summary levels.

use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::bitmap::{bulk_write, HBitmap, Violation, BITS_PER_LEVEL, LEVELS};

/// Granularities from this one up cannot be serialized: `64 << granularity` must fit 64 bits.
pub const MAX_SERIALIZABLE_GRANULARITY: u32 = 58;

impl HBitmap {
    /// Whether the bitmap can be serialized (granularity below 58).
    pub fn is_serializable(&self) -> bool {
        self.granularity() < MAX_SERIALIZABLE_GRANULARITY
    }

    /// Items covered by one serialized word: chunk starts and lengths are multiples of this.
    ///
    /// # Panics
    /// When the bitmap is not serializable.
    pub fn serialization_align(&self) -> u64 {
        assert!(
            self.is_serializable(),
            "HBitmap::serialization_align: granularity {} is not below 58",
            self.granularity()
        );
        64 << self.granularity()
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
            return Err(Violation::NotSerializable(self.granularity()));
        }
        let align = 64u64 << self.granularity();
        let Some(last) = start.checked_add(count - 1) else {
            return Err(Violation::RangeWraps { start, count });
        };
        if start & (align - 1) != 0 {
            return Err(Violation::ChunkStart { start, align });
        }
        let last_group = last >> self.granularity();
        if last_group >= self.groups() {
            return Err(Violation::RangeOutOfRange {
                start,
                count,
                last: last_group,
                groups: self.groups(),
            });
        }
        if last_group != self.groups() - 1 && count & (align - 1) != 0 {
            return Err(Violation::ChunkCount { count, align });
        }
        let first_word = ((start >> self.granularity()) >> BITS_PER_LEVEL) as usize;
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
            self.read_words_le(words, bulk_write::as_uninit(&mut buf[..needed]));
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
            self.write_words_le(words, &buf[..needed]);
            self.after_deserialize(finish);
        }
    }

    /// Makes the chunk `start..start + count` clean (whole words), as a deserialization step.
    /// Pages that are clean already are not written: a fresh bitmap stays unbacked.
    pub fn deserialize_zeroes(&mut self, start: u64, count: u64, finish: bool) {
        if let Some(words) = self.chunk_or_panic("deserialize_zeroes", start, count) {
            self.zero_words(words);
            self.after_deserialize(finish);
        }
    }

    /// Makes the chunk `start..start + count` dirty (whole words, so the last chunk's padding
    /// bits are set too, as in the original), as a deserialization step.
    pub fn deserialize_ones(&mut self, start: u64, count: u64, finish: bool) {
        if let Some(words) = self.chunk_or_panic("deserialize_ones", start, count) {
            self.fill_words(words);
            self.after_deserialize(finish);
        }
    }

    fn after_deserialize(&mut self, finish: bool) {
        if finish {
            self.deserialize_finish();
        }
    }

    /// Rebuilds the summary levels from the last level and recounts the dirty groups.
    pub fn deserialize_finish(&mut self) {
        self.summarize();
    }

    /// SHA-256 of the last level's words as they lie in memory, in lowercase hex: the
    /// original's `hbitmap_sha256`.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        let words = self.words();
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

const _: () = assert!(LEVELS == 7);
