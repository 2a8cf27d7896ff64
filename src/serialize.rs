// SPDX-License-Identifier: GPL-2.0-or-later

//! Serialization of the last level in QEMU's format: little-endian 64-bit words, independent of
//! the host's word size, in chunks aligned to `64 << granularity` items. Only the last level is
//! stored; [`HBitmap::deserialize_finish`] rebuilds the summary levels.

use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::bitmap::{bulk_write, HBitmap, Violation, BITS_PER_LEVEL, LEVELS};

/// Granularities from this one up cannot be serialized: `64 << granularity` must fit 64 bits.
pub const MAX_SERIALIZABLE_GRANULARITY: u32 = 58;

/// The first `words * 8` bytes of `buf`, or the violation when it is shorter.
fn chunk_buffer(buf: &mut [u8], words: usize) -> Result<&mut [u8], Violation> {
    let needed = words * 8;
    let len = buf.len();
    buf.get_mut(..needed).ok_or(Violation::BufferTooShort {
        len: len as u64,
        needed: needed as u64,
    })
}

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
        self.try_serialization_align()
            .unwrap_or_else(|why| panic!("HBitmap::serialization_align: {why}"))
    }

    /// [`serialization_align`](Self::serialization_align), returning the broken precondition
    /// instead of panicking.
    pub fn try_serialization_align(&self) -> Result<u64, Violation> {
        if self.is_serializable() {
            Ok(64 << self.granularity())
        } else {
            Err(Violation::NotSerializable(self.granularity()))
        }
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

    /// Bytes that serializing the chunk `start..start + count` takes (0 for an empty chunk).
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or a bitmap that is not serializable.
    pub fn serialization_size(&self, start: u64, count: u64) -> u64 {
        self.try_serialization_size(start, count)
            .unwrap_or_else(|why| panic!("HBitmap::serialization_size: {why}"))
    }

    /// [`serialization_size`](Self::serialization_size), returning the broken precondition
    /// instead of panicking.
    pub fn try_serialization_size(&self, start: u64, count: u64) -> Result<u64, Violation> {
        Ok(self
            .check_chunk(start, count)?
            .map_or(0, |words| words.len() as u64 * 8))
    }

    /// Writes the chunk `start..start + count` into `buf` as little-endian 64-bit words.
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or when `buf` is shorter than
    /// [`serialization_size`](Self::serialization_size).
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, count: u64) {
        self.try_serialize_part(buf, start, count)
            .unwrap_or_else(|why| panic!("HBitmap::serialize_part: {why}"));
    }

    /// [`serialize_part`](Self::serialize_part), returning the broken precondition (and
    /// writing nothing) instead of panicking.
    pub fn try_serialize_part(
        &self,
        buf: &mut [u8],
        start: u64,
        count: u64,
    ) -> Result<(), Violation> {
        if let Some(words) = self.check_chunk(start, count)? {
            let out = chunk_buffer(buf, words.len())?;
            self.read_words_le(words, bulk_write::as_uninit(out));
        }
        Ok(())
    }

    /// Loads the chunk `start..start + count` from `buf` (little-endian 64-bit words). With
    /// `finish` false the summary levels are stale until
    /// [`deserialize_finish`](Self::deserialize_finish) is called.
    ///
    /// # Panics
    /// As [`serialize_part`](Self::serialize_part).
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, count: u64, finish: bool) {
        self.try_deserialize_part(buf, start, count, finish)
            .unwrap_or_else(|why| panic!("HBitmap::deserialize_part: {why}"));
    }

    /// [`deserialize_part`](Self::deserialize_part), returning the broken precondition (and
    /// changing nothing) instead of panicking.
    pub fn try_deserialize_part(
        &mut self,
        buf: &[u8],
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), Violation> {
        if let Some(words) = self.check_chunk(start, count)? {
            let needed = words.len() * 8;
            if buf.len() < needed {
                return Err(Violation::BufferTooShort {
                    len: buf.len() as u64,
                    needed: needed as u64,
                });
            }
            self.write_words_le(words, &buf[..needed]);
            self.after_deserialize(finish);
        }
        Ok(())
    }

    /// Makes the chunk `start..start + count` clean (whole words), as a deserialization step.
    /// Pages that are clean already are not written: a fresh bitmap stays unbacked.
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or a bitmap that is not serializable.
    pub fn deserialize_zeroes(&mut self, start: u64, count: u64, finish: bool) {
        self.try_deserialize_zeroes(start, count, finish)
            .unwrap_or_else(|why| panic!("HBitmap::deserialize_zeroes: {why}"));
    }

    /// [`deserialize_zeroes`](Self::deserialize_zeroes), returning the broken precondition (and
    /// changing nothing) instead of panicking.
    pub fn try_deserialize_zeroes(
        &mut self,
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), Violation> {
        if let Some(words) = self.check_chunk(start, count)? {
            self.zero_words(words);
            self.after_deserialize(finish);
        }
        Ok(())
    }

    /// Makes the chunk `start..start + count` dirty (whole words, so the last chunk's padding
    /// bits are set too, as in the original), as a deserialization step.
    ///
    /// # Panics
    /// On a misaligned or out-of-range chunk, or a bitmap that is not serializable.
    pub fn deserialize_ones(&mut self, start: u64, count: u64, finish: bool) {
        self.try_deserialize_ones(start, count, finish)
            .unwrap_or_else(|why| panic!("HBitmap::deserialize_ones: {why}"));
    }

    /// [`deserialize_ones`](Self::deserialize_ones), returning the broken precondition (and
    /// changing nothing) instead of panicking.
    pub fn try_deserialize_ones(
        &mut self,
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), Violation> {
        if let Some(words) = self.check_chunk(start, count)? {
            self.fill_words(words);
            self.after_deserialize(finish);
        }
        Ok(())
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
