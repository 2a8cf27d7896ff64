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

use std::ops::{Deref, DerefMut};

/// Levels at least this large get a mapping of their own.
#[cfg(target_os = "linux")]
const MAPPED_BYTES: usize = 256 << 10;

/// A zero-initialized array of `u64` whose length can change; new words are zero.
pub(crate) struct Words {
    repr: Repr,
}

enum Repr {
    Heap(Vec<u64>),
    #[cfg(target_os = "linux")]
    Mapped(linux::Mapping),
}

impl Words {
    /// `len` zero words.
    pub(crate) fn zeroed(len: usize) -> Words {
        #[cfg(target_os = "linux")]
        if len * 8 >= MAPPED_BYTES {
            if let Some(mapping) = linux::Mapping::zeroed(len) {
                return Words {
                    repr: Repr::Mapped(mapping),
                };
            }
        }
        Words {
            repr: Repr::Heap(vec![0; len]),
        }
    }

    /// Changes the length to `len`; words past the old length read as zero.
    pub(crate) fn resize_zeroed(&mut self, len: usize) {
        match &mut self.repr {
            Repr::Heap(vec) => {
                #[cfg(target_os = "linux")]
                if len > vec.len() && len * 8 >= MAPPED_BYTES {
                    if let Some(mut mapping) = linux::Mapping::zeroed(len) {
                        mapping[..vec.len()].copy_from_slice(vec);
                        self.repr = Repr::Mapped(mapping);
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
            }
            #[cfg(target_os = "linux")]
            Repr::Mapped(mapping) => {
                if !mapping.resize_zeroed(len) {
                    // The kernel refused to move the mapping: fall back to a copy.
                    let mut moved = Words::zeroed(len);
                    let kept = len.min(mapping.len());
                    moved[..kept].copy_from_slice(&mapping[..kept]);
                    *self = moved;
                }
            }
        }
    }

    /// Whether the words live in a mapping of their own.
    #[cfg(test)]
    pub(crate) fn is_mapped(&self) -> bool {
        !matches!(self.repr, Repr::Heap(_))
    }
}

impl Default for Words {
    fn default() -> Words {
        Words {
            repr: Repr::Heap(Vec::new()),
        }
    }
}

impl Deref for Words {
    type Target = [u64];

    #[inline(always)]
    fn deref(&self) -> &[u64] {
        match &self.repr {
            Repr::Heap(vec) => vec,
            #[cfg(target_os = "linux")]
            Repr::Mapped(mapping) => mapping,
        }
    }
}

impl DerefMut for Words {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u64] {
        match &mut self.repr {
            Repr::Heap(vec) => vec,
            #[cfg(target_os = "linux")]
            Repr::Mapped(mapping) => mapping,
        }
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

#[cfg(target_os = "linux")]
mod linux {
    use std::ops::{Deref, DerefMut};
    use std::ptr::NonNull;

    /// A private anonymous mapping holding `len` words.
    pub(super) struct Mapping {
        ptr: NonNull<u64>,
        len: usize,
        /// Length of the mapping: `len` words rounded up to whole pages.
        bytes: usize,
    }

    // SAFETY: the mapping is owned memory, like a Vec's buffer.
    unsafe impl Send for Mapping {}
    // SAFETY: shared access is read-only through `&[u64]`.
    unsafe impl Sync for Mapping {}

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096)
    }

    fn mapped_bytes(len: usize) -> Option<usize> {
        let page = page_size();
        len.checked_mul(8)?.checked_next_multiple_of(page)
    }

    impl Mapping {
        /// `len` (nonzero) zero words, or None if the kernel refuses the mapping.
        pub(super) fn zeroed(len: usize) -> Option<Mapping> {
            let bytes = mapped_bytes(len)?;
            // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice;
            // it aliases nothing.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return None;
            }
            Some(Mapping {
                ptr: NonNull::new(ptr.cast())?,
                len,
                bytes,
            })
        }

        /// Changes the length to `len` (nonzero) in place or by moving the pages; false (and
        /// nothing changed) if the kernel refuses.
        pub(super) fn resize_zeroed(&mut self, len: usize) -> bool {
            let Some(bytes) = mapped_bytes(len) else {
                return false;
            };
            if len > self.len {
                // Words past the old length in its last page may hold bits from before a
                // shrink; pages added below are fresh, hence zero.
                let (old, reused) = (self.len, len.min(self.bytes / 8));
                self.len = reused;
                self[old..].fill(0);
            }
            if bytes != self.bytes {
                // SAFETY: `ptr`/`bytes` describe our own mapping; MREMAP_MAYMOVE may move it,
                // and nothing borrows it across this call (`&mut self`).
                let moved = unsafe {
                    libc::mremap(
                        self.ptr.as_ptr().cast(),
                        self.bytes,
                        bytes,
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if moved == libc::MAP_FAILED {
                    return false;
                }
                let Some(ptr) = NonNull::new(moved.cast()) else {
                    return false;
                };
                self.ptr = ptr;
                self.bytes = bytes;
            }
            self.len = len;
            true
        }
    }

    impl Deref for Mapping {
        type Target = [u64];

        #[inline(always)]
        fn deref(&self) -> &[u64] {
            // SAFETY: the mapping holds `len` initialized (zero-filled by the kernel or written
            // since) words, aligned to a page, and lives as long as `self`.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
    }

    impl DerefMut for Mapping {
        #[inline(always)]
        fn deref_mut(&mut self) -> &mut [u64] {
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer borrowed. munmap of a valid mapping cannot
            // fail in a way we could act on.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_levels_stay_on_the_heap_and_large_ones_are_mapped() {
        assert!(!Words::zeroed(1).is_mapped());
        let words = Words::zeroed(1 << 20);
        assert_eq!(words.len(), 1 << 20);
        assert!(words.iter().all(|&w| w == 0));
        #[cfg(target_os = "linux")]
        assert!(words.is_mapped());
    }

    #[test]
    fn regrown_words_are_zero() {
        // Across the heap/mapping boundary and within one page of a mapping.
        for (first, small, large) in [
            (100, 10, 200),
            (1 << 16, 1 << 15, 1 << 17),
            (1 << 16, (1 << 16) - 3, 1 << 16),
            (40_000, 5, 1 << 15),
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
