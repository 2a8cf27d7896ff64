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
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;

/// Levels at least this large get a mapping of their own, and bulk writes at least this large
/// use streaming stores.
const LARGE_BYTES: usize = 256 << 10;

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

/// Before a bulk write of `buf`, makes sure its pages exist: if the first whole page is not
/// resident, the rest is most likely fresh too, and one `MADV_POPULATE_WRITE` call allocates it
/// all at a fraction of the cost of a page fault per page. Contents are unchanged; errors (old
/// kernels, special mappings) just leave the faults to the writes.
fn prefault(buf: &mut [MaybeUninit<u8>]) {
    #[cfg(target_os = "linux")]
    linux::prefault(buf);
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Views initialized bytes as bytes that may be uninitialized, for the bulk writers of this
/// module, which take the latter so that a C caller's uninitialized buffer is never seen as
/// `[u8]`. They only ever store initialized bytes, so `bytes` stays initialized.
pub(crate) fn as_uninit(bytes: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`; every writer given the view stores
    // initialized bytes only, so nothing uninitialized becomes visible through `bytes`.
    unsafe { &mut *(bytes as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// `dst.copy_from_slice(src)` into bytes that may be uninitialized.
fn copy_to_uninit(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_to_uninit: lengths differ");
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(*s);
    }
}

/// Bulk writes shorter than this leave their pages to fault in one by one.
const PREFAULT_BYTES: usize = 64 << 10;

/// The unit in which bulk writes look for zeros: a page on common hosts.
const BLOCK: usize = 4096;

/// `dst.copy_from_slice(src)` into memory of ours (deserialization into a level), except that
/// blocks of zeros are not written where `dst` holds zeros already (see [`BulkWrite::clear`]).
/// `known_zero` may vouch for byte ranges of `dst` that need not even be read; `copied` hears
/// of every run of bytes copied.
pub(crate) fn copy_into_ours(
    dst: &mut [u8],
    src: &[u8],
    known_zero: impl Fn(Range<usize>) -> bool,
    mut copied: impl FnMut(Range<usize>),
) {
    assert_eq!(dst.len(), src.len(), "copy_into_ours: lengths differ");
    let bulk = BulkWrite::new(dst.len());
    let mut copy = |run: Range<usize>, dst: &mut [u8]| {
        if !run.is_empty() {
            bulk.copy(as_uninit(&mut dst[run.clone()]), &src[run.clone()]);
            copied(run);
        }
    };
    // Runs of blocks that hold a dirty bit are copied, the others cleared.
    let mut run = 0;
    for block in page_blocks(dst) {
        if is_zero(&src[block.clone()]) {
            copy(run..block.start, dst);
            if !known_zero(block.clone()) {
                bulk.zero_if_dirty(&mut dst[block.clone()]);
            }
            run = block.end;
        }
    }
    copy(run..dst.len(), dst);
}

/// `buf` cut at its page boundaries.
fn page_blocks(buf: &[u8]) -> impl Iterator<Item = Range<usize>> {
    let len = buf.len();
    let head = buf.as_ptr().align_offset(BLOCK).min(len);
    let mut at = 0;
    std::iter::from_fn(move || {
        (at < len).then(|| {
            let end = if at == 0 && head > 0 {
                head
            } else {
                (at + BLOCK).min(len)
            };
            std::mem::replace(&mut at, end)..end
        })
    })
}

fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let full = blocks.all(|block| {
        block.chunks_exact(8).fold(0, |any, word| {
            any | u64::from_ne_bytes(word.try_into().unwrap())
        }) == 0
    });
    full && blocks.remainder().iter().all(|&byte| byte == 0)
}

/// How the pieces of one bulk write (a serialized chunk, a deserialized one) are stored.
///
/// Pieces that are copied are prefaulted when long. In a large write on x86-64 they are
/// written with streaming stores: the destination of a multi-megabyte write is not about to be
/// read, and not reading it in first (as ordinary stores must) saves a third of the memory
/// traffic.
///
/// Pieces that are cleared in memory of ours are only written where they are not zero already:
/// the clean part of a fresh bitmap then reads as the kernel's shared zero page instead of being
/// given pages of its own, so a sparse bitmap loads at the cost of its dirty part, in time and
/// in memory. A caller's buffer is never read: it may be uninitialized.
#[derive(Clone, Copy)]
pub(crate) struct BulkWrite {
    streaming: bool,
    prefaulted: bool,
}

impl BulkWrite {
    /// For a write of `len` bytes in all, in pieces or at once.
    pub(crate) fn new(len: usize) -> BulkWrite {
        BulkWrite {
            streaming: len >= LARGE_BYTES && cfg!(target_arch = "x86_64"),
            prefaulted: false,
        }
    }

    /// For a write of every byte of `dst`, in pieces or at once: prefaults all of it now.
    pub(crate) fn whole(dst: &mut [MaybeUninit<u8>]) -> BulkWrite {
        if dst.len() >= PREFAULT_BYTES {
            prefault(dst);
        }
        BulkWrite {
            prefaulted: true,
            ..BulkWrite::new(dst.len())
        }
    }

    /// `dst.copy_from_slice(src)`.
    pub(crate) fn copy(self, dst: &mut [MaybeUninit<u8>], src: &[u8]) {
        if !self.prefaulted && dst.len() >= PREFAULT_BYTES {
            prefault(dst);
        }
        #[cfg(target_arch = "x86_64")]
        if self.streaming {
            return x86::stream_copy(dst, src);
        }
        copy_to_uninit(dst, src);
    }

    /// `dst.fill(0)`, without reading `dst`.
    pub(crate) fn zero(self, dst: &mut [MaybeUninit<u8>]) {
        #[cfg(target_arch = "x86_64")]
        if self.streaming {
            return x86::stream_zero(dst);
        }
        dst.fill(MaybeUninit::new(0));
    }

    /// `dst.fill(0)` in memory of ours, page by page, writing only the pages that are not zero
    /// already. Pages whose byte range `known_zero` vouches for are not even read.
    pub(crate) fn clear(self, dst: &mut [u8], known_zero: impl Fn(Range<usize>) -> bool) {
        for block in page_blocks(dst) {
            if !known_zero(block.clone()) {
                self.zero_if_dirty(&mut dst[block]);
            }
        }
    }

    fn zero_if_dirty(self, dst: &mut [u8]) {
        if !is_zero(dst) {
            self.zero(as_uninit(dst));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::mem::MaybeUninit;

    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_setzero_si128, _mm_sfence, _mm_stream_si128,
    };

    /// Copies with non-temporal stores (SSE2, part of every x86-64 CPU), then fences them so
    /// they are ordered before any later store.
    pub(super) fn stream_copy(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "stream_copy: lengths differ");
        // Streaming stores need 16-byte alignment: copy the bytes before it plainly.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let (dst_head, dst_body) = dst.split_at_mut(head);
        let (src_head, src_body) = src.split_at(head);
        super::copy_to_uninit(dst_head, src_head);
        let mut dst_blocks = dst_body.chunks_exact_mut(64);
        let mut src_blocks = src_body.chunks_exact(64);
        for (d, s) in (&mut dst_blocks).zip(&mut src_blocks) {
            let (d, s) = (
                d.as_mut_ptr().cast::<__m128i>(),
                s.as_ptr().cast::<__m128i>(),
            );
            // SAFETY: both blocks are 64 bytes long, so the four 16-byte accesses stay inside;
            // `d` is 16-byte aligned (the head was split off and 64 keeps the alignment), the
            // loads are unaligned ones.
            unsafe {
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
        }
        super::copy_to_uninit(dst_blocks.into_remainder(), src_blocks.remainder());
        // SAFETY: sfence has no preconditions (SSE, part of every x86-64 CPU).
        unsafe { _mm_sfence() };
    }

    /// Zeroes with non-temporal stores, fenced as in [`stream_copy`].
    pub(super) fn stream_zero(dst: &mut [MaybeUninit<u8>]) {
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let (dst_head, dst_body) = dst.split_at_mut(head);
        dst_head.fill(MaybeUninit::new(0));
        let mut dst_blocks = dst_body.chunks_exact_mut(64);
        for d in &mut dst_blocks {
            let d = d.as_mut_ptr().cast::<__m128i>();
            // SAFETY: the block is 64 bytes long and 16-byte aligned, as in `stream_copy`.
            unsafe {
                let zero = _mm_setzero_si128();
                _mm_stream_si128(d, zero);
                _mm_stream_si128(d.add(1), zero);
                _mm_stream_si128(d.add(2), zero);
                _mm_stream_si128(d.add(3), zero);
            }
        }
        dst_blocks.into_remainder().fill(MaybeUninit::new(0));
        // SAFETY: as in `stream_copy`.
        unsafe { _mm_sfence() };
    }
}

/// [`prefault`] for a buffer of ours that is about to be written whole (a run of bitmap data
/// read from an image): the 2 MiB-aligned stretches inside it may also be backed by huge pages,
/// which costs no extra memory since every byte of them is written, and makes populating them
/// several times cheaper.
pub(crate) fn prefault_whole(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    if buf.len() >= LARGE_BYTES {
        linux::allow_huge_pages(buf);
        linux::prefault(as_uninit(buf));
    }
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
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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
        if end <= first {
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
        if end > first {
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
    fn bulk_copies_match_plain_ones_at_any_alignment() {
        // Stretches of 5000 bytes, alternately data and zeros, so that whole pages of zeros
        // meet destinations that hold zeros or something else.
        let src: Vec<u8> = (0..LARGE_BYTES + 300)
            .map(|i| {
                if (i / 5000) % 2 == 1 {
                    0
                } else {
                    (i * 7 + i / 251) as u8 | 1
                }
            })
            .collect();
        for (from, to, len) in [
            (0, 0, LARGE_BYTES),
            (3, 5, LARGE_BYTES + 77),
            (16, 1, 20000),
        ] {
            for old in [0u8, 0xff] {
                let mut dst = vec![old; len + 40];
                copy_into_ours(
                    &mut dst[to..to + len],
                    &src[from..from + len],
                    |_| false,
                    |_| {},
                );
                assert_eq!(
                    &dst[to..to + len],
                    &src[from..from + len],
                    "{from} {to} {len} {old}"
                );
                assert!(dst[..to].iter().chain(&dst[to + len..]).all(|&b| b == old));
            }
        }
    }

    #[test]
    fn bulk_clears_zero_any_content() {
        for (to, len, streaming) in [(0, 3 * BLOCK, false), (5, LARGE_BYTES + 77, true)] {
            let mut dst: Vec<u8> = (0..len + 40).map(|i| (i % 3) as u8).collect();
            let outside: Vec<u8> = dst[..to].iter().chain(&dst[to + len..]).copied().collect();
            BulkWrite {
                streaming,
                prefaulted: false,
            }
            .clear(&mut dst[to..to + len], |_| false);
            assert!(dst[to..to + len].iter().all(|&b| b == 0), "{to} {len}");
            let after: Vec<u8> = dst[..to].iter().chain(&dst[to + len..]).copied().collect();
            assert_eq!(after, outside);
        }
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
