// SPDX-License-Identifier: GPL-2.0-or-later

//! The memory behind each level: a zero-initialized, resizable array of words.
//!
//! Small levels live on the heap. Large ones (the last level of any sizable bitmap) are private
//! anonymous mappings of their own, because the kernel then guarantees what a bitmap needs:
//! pages nobody wrote are zero without being touched. Creating a huge bitmap costs no memory
//! until bits are set, and growing one (a disk resize) extends the mapping in place or moves
//! its page tables (`mremap`) instead of copying and zero-filling: the new clean part stays
//! unbacked. The allocator cannot promise either: once a block has been freed and reused its
//! zeroing is a `memset` that makes every page resident.
//!
//! Elsewhere (non-Linux) every level lives on the heap.
#![allow(unsafe_code)]

use std::mem::{ManuallyDrop, MaybeUninit};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Levels at least this large get a mapping of their own, and bulk writes at least this large
/// use streaming stores.
///
/// Under Miri, which interprets every access thousands of times slower, a few pages: the unit
/// tests' small bitmaps then reach the mapped storage and the streaming stores too.
pub(super) const LARGE_BYTES: usize = if cfg!(miri) { 8 << 10 } else { 256 << 10 };

/// A zero-initialized array of `u64` whose length can change; new words are zero.
///
/// The pointer and length are kept outside the backing's variants so that indexing (the
/// iterator's and every update's hot path) is a plain slice access, without a branch on where
/// the words live.
pub(crate) struct Words {
    ptr: NonNull<u64>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// A `Vec<u64>`'s buffer with this capacity.
    Heap { capacity: usize },
    /// A private anonymous mapping of this many bytes (`len` words rounded up to pages).
    #[cfg(target_os = "linux")]
    Mapped { bytes: usize },
}

// SAFETY: `Words` owns its buffer exclusively, like a `Vec<u64>`.
unsafe impl Send for Words {}
// SAFETY: shared access is read-only, through `&[u64]`.
unsafe impl Sync for Words {}

impl Words {
    /// `len` zero words.
    pub(crate) fn zeroed(len: usize) -> Words {
        #[cfg(target_os = "linux")]
        if len * 8 >= LARGE_BYTES {
            if let Some(words) = linux::map_zeroed(len) {
                return words;
            }
        }
        Words::from_vec(vec![0; len])
    }

    fn from_vec(vec: Vec<u64>) -> Words {
        let mut vec = ManuallyDrop::new(vec);
        Words {
            // A Vec's pointer is never null (dangling but aligned when empty).
            ptr: NonNull::new(vec.as_mut_ptr()).expect("Vec pointers are not null"),
            len: vec.len(),
            backing: Backing::Heap {
                capacity: vec.capacity(),
            },
        }
    }

    /// Takes the heap buffer back as a Vec, leaving `self` empty; None for a mapping.
    fn take_vec(&mut self) -> Option<Vec<u64>> {
        let Backing::Heap { capacity } = self.backing else {
            return None;
        };
        // SAFETY: `ptr`, `len` and `capacity` came from a Vec<u64> (`from_vec`) that was not
        // dropped, and `self` forgets them just below, so the buffer has one owner again.
        let vec = unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, capacity) };
        // Field by field: assigning a whole `Words` would drop the old one.
        self.ptr = NonNull::dangling();
        self.len = 0;
        self.backing = Backing::Heap { capacity: 0 };
        Some(vec)
    }

    /// Changes the length to `len`; words past the old length read as zero.
    pub(crate) fn resize_zeroed(&mut self, len: usize) {
        if let Some(mut vec) = self.take_vec() {
            #[cfg(target_os = "linux")]
            if len > vec.len() && len * 8 >= LARGE_BYTES {
                if let Some(mut words) = linux::map_zeroed(len) {
                    words[..vec.len()].copy_from_slice(&vec);
                    *self = words;
                    return;
                }
            }
            if len < vec.len() {
                vec.truncate(len);
                vec.shrink_to_fit();
            } else {
                vec.reserve_exact(len - vec.len());
                vec.resize(len, 0);
            }
            *self = Words::from_vec(vec);
            return;
        }
        #[cfg(target_os = "linux")]
        if !linux::remap(self, len) {
            // The kernel refused to resize the mapping: fall back to a copy.
            let mut moved = Words::zeroed(len);
            let kept = len.min(self.len);
            moved[..kept].copy_from_slice(&self[..kept]);
            *self = moved;
        }
    }

    /// Whether the words live in a mapping of their own.
    #[cfg(test)]
    pub(crate) fn is_mapped(&self) -> bool {
        !matches!(self.backing, Backing::Heap { .. })
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        match self.backing {
            Backing::Heap { .. } => drop(self.take_vec()),
            #[cfg(target_os = "linux")]
            Backing::Mapped { bytes } => linux::unmap(self.ptr, bytes),
        }
    }
}

impl Default for Words {
    fn default() -> Words {
        Words::from_vec(Vec::new())
    }
}

impl Deref for Words {
    type Target = [u64];

    #[inline(always)]
    fn deref(&self) -> &[u64] {
        // SAFETY: `ptr` points to `len` initialized words (zero-filled at creation or written
        // since) owned by `self`, aligned, and valid as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Words {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<'a> IntoIterator for &'a Words {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Clone for Words {
    fn clone(&self) -> Words {
        let mut copy = Words::zeroed(self.len());
        copy.copy_from_slice(self);
        copy
    }
}

/// Asks the kernel to back `buf`'s pages now (one call instead of a fault per page); false
/// where it cannot (other systems, old kernels), leaving the faults to the writes.
pub(super) fn populate(buf: &mut [MaybeUninit<u8>]) {
    #[cfg(target_os = "linux")]
    linux::prefault(buf);
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Lets the 2 MiB-aligned stretches of `buf`, which is about to be written whole, be backed by
/// huge pages.
pub(super) fn allow_huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    linux::allow_huge_pages(buf);
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ptr::NonNull;

    use std::mem::MaybeUninit;

    use super::{Backing, Words};

    fn mapped_bytes(len: usize) -> Option<usize> {
        len.checked_mul(8)?.checked_next_multiple_of(page_size())
    }

    /// Keeps the kernel from reserving swap for the whole mapping up front. Miri emulates
    /// `mmap` (and `mremap`, `munmap`) but rejects this flag, which changes only the kernel's
    /// accounting: under Miri the mapping is made without it.
    const NORESERVE: libc::c_int = if cfg!(miri) { 0 } else { libc::MAP_NORESERVE };

    /// `len` (nonzero) zero words in a mapping of their own, or None if the kernel refuses.
    pub(super) fn map_zeroed(len: usize) -> Option<Words> {
        let bytes = mapped_bytes(len)?;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice; it
        // aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Words {
            ptr: NonNull::new(ptr.cast())?,
            len,
            backing: Backing::Mapped { bytes },
        })
    }

    /// Resizes the mapping of `words` to hold `len` (nonzero) words, in place or by moving its
    /// pages; false (and nothing changed) if the kernel refuses.
    pub(super) fn remap(words: &mut Words, len: usize) -> bool {
        let Backing::Mapped { bytes: old_bytes } = words.backing else {
            return false;
        };
        let Some(bytes) = mapped_bytes(len) else {
            return false;
        };
        if bytes != old_bytes {
            // SAFETY: `ptr`/`old_bytes` describe our own mapping; MREMAP_MAYMOVE may move it,
            // and nothing borrows it across this call (`&mut Words`).
            let moved = unsafe {
                libc::mremap(
                    words.ptr.as_ptr().cast(),
                    old_bytes,
                    bytes,
                    libc::MREMAP_MAYMOVE,
                )
            };
            let Some(ptr) = NonNull::new(moved.cast()).filter(|_| moved != libc::MAP_FAILED) else {
                return false;
            };
            words.ptr = ptr;
            words.backing = Backing::Mapped { bytes };
        }
        let old = words.len;
        words.len = len;
        if len > old {
            // Words past the old length within its last page may hold bits from before a
            // shrink; the pages added past `old_bytes` are fresh from the kernel, hence zero.
            let reused = len.min(old_bytes / 8);
            words[old..reused].fill(0);
        }
        true
    }

    pub(super) fn prefault(buf: &mut [MaybeUninit<u8>]) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let page = page_size();
        let start = buf.as_mut_ptr() as usize;
        let (Some(first), Some(end)) = (
            start.checked_next_multiple_of(page),
            (start + buf.len())
                .checked_div(page)
                .map(|pages| pages * page),
        ) else {
            return;
        };
        // Miri cannot run `mincore` or `madvise`; populating is only a hint, so there the
        // writes fault the pages in (Miri has no faults to save).
        if end <= first || cfg!(miri) {
            return;
        }
        let mut resident = 0u8;
        // SAFETY: `first` is a page inside `buf`, which is mapped; mincore writes one byte.
        let known = unsafe { libc::mincore(first as *mut libc::c_void, page, &mut resident) };
        if known == 0 && resident & 1 == 0 {
            // SAFETY: the pages lie within `buf`, which we may write; populating changes no
            // contents.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, MADV_POPULATE_WRITE) };
        }
    }

    pub(super) fn allow_huge_pages(buf: &mut [u8]) {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let (Some(first), end) = (
            start.checked_next_multiple_of(HUGE),
            (start + buf.len()) / HUGE * HUGE,
        ) else {
            return;
        };
        // Miri cannot run `madvise`; the advice is only a hint.
        if end > first && !cfg!(miri) {
            // SAFETY: the range lies within `buf`, memory we own and are about to overwrite
            // whole; the advice changes how it is backed, not its contents.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
    }

    pub(super) fn unmap(ptr: NonNull<u64>, bytes: usize) {
        // SAFETY: our own mapping, no longer borrowed. munmap of a valid mapping cannot fail in
        // a way we could act on.
        unsafe { libc::munmap(ptr.as_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fewest words that get a mapping of their own: 1 << 15 natively, 1024 under Miri.
    const LARGE: usize = LARGE_BYTES / 8;

    #[test]
    fn small_levels_stay_on_the_heap_and_large_ones_are_mapped() {
        assert!(!Words::zeroed(1).is_mapped());
        assert!(!Words::zeroed(LARGE / 2).is_mapped());
        // 1 << 20 words natively.
        let len = LARGE * if cfg!(miri) { 4 } else { 32 };
        let words = Words::zeroed(len);
        assert_eq!(words.len(), len);
        assert!(words.iter().all(|&w| w == 0));
        #[cfg(target_os = "linux")]
        assert!(words.is_mapped());
    }

    #[test]
    fn regrown_words_are_zero() {
        // Across the heap/mapping boundary and within one page of a mapping.
        for (first, small, large) in [
            (100, 10, 200),
            (2 * LARGE, LARGE, 4 * LARGE),
            (2 * LARGE, 2 * LARGE - 3, 2 * LARGE),
            (LARGE * 5 / 4, 5, LARGE),
            // Heap to mapping: the copy into a fresh mapping.
            (LARGE / 2, LARGE / 4, LARGE * 3),
        ] {
            let mut words = Words::zeroed(first);
            words.fill(u64::MAX);
            words.resize_zeroed(small);
            assert_eq!(words.len(), small);
            assert!(words.iter().all(|&w| w == u64::MAX));
            words.resize_zeroed(large);
            assert_eq!(words.len(), large);
            assert!(words[..small].iter().all(|&w| w == u64::MAX));
            assert!(
                words[small..].iter().all(|&w| w == 0),
                "{first} -> {small} -> {large}"
            );
            let copy = words.clone();
            assert_eq!(&copy[..], &words[..]);
        }
    }
}
