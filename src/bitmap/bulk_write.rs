// SPDX-License-Identifier: GPL-2.0-or-later

//! Bulk writes into bitmap memory and into callers' buffers: copies and clears of whole
//! serialized chunks that prefault what they will write, stream past the cache when large, and
//! leave clean pages of a bitmap unwritten so they stay unbacked.

// Streaming stores and the view of initialized bytes as possibly uninitialized ones.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::ops::Range;

use super::storage::{self, LARGE_BYTES};

/// Before a bulk write of `buf`, makes sure its pages exist: if the first whole page is not
/// resident, the rest is most likely fresh too, and one `MADV_POPULATE_WRITE` call allocates it
/// all at a fraction of the cost of a page fault per page. Contents are unchanged; errors (old
/// kernels, special mappings) just leave the faults to the writes.
fn prefault(buf: &mut [MaybeUninit<u8>]) {
    storage::populate(buf);
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

    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_setzero_si128};
    #[cfg(not(miri))]
    use std::arch::x86_64::{_mm_sfence, _mm_stream_si128};

    /// A non-temporal store of `value` to `dst`.
    ///
    /// # Safety
    /// `dst` is 16-byte aligned and valid for writing 16 bytes.
    #[inline(always)]
    unsafe fn stream(dst: *mut __m128i, value: __m128i) {
        // SAFETY: the caller's contract, which is also what the intrinsic requires.
        #[cfg(not(miri))]
        unsafe {
            _mm_stream_si128(dst, value)
        };
        // Miri does not implement non-temporal stores. An aligned ordinary store has the same
        // effect and the same precondition, which Miri then checks (a misaligned `dst` is
        // undefined behaviour there too), so the pointer arithmetic around it stays tested.
        // SAFETY: as above.
        #[cfg(miri)]
        unsafe {
            dst.write(value)
        };
    }

    /// Orders the streaming stores before any later store.
    #[inline(always)]
    fn fence() {
        // SAFETY: sfence has no preconditions (SSE, part of every x86-64 CPU).
        #[cfg(not(miri))]
        unsafe {
            _mm_sfence()
        };
        // Under Miri, `stream` makes ordinary stores, which need no fence.
    }

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
                stream(d, a);
                stream(d.add(1), b);
                stream(d.add(2), c);
                stream(d.add(3), e);
            }
        }
        super::copy_to_uninit(dst_blocks.into_remainder(), src_blocks.remainder());
        fence();
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
                stream(d, zero);
                stream(d.add(1), zero);
                stream(d.add(2), zero);
                stream(d.add(3), zero);
            }
        }
        dst_blocks.into_remainder().fill(MaybeUninit::new(0));
        fence();
    }
}

/// [`prefault`] for a buffer of ours that is about to be written whole (a run of bitmap data
/// read from an image): the 2 MiB-aligned stretches inside it may also be backed by huge pages,
/// which costs no extra memory since every byte of them is written, and makes populating them
/// several times cheaper.
pub(crate) fn prefault_whole(buf: &mut [u8]) {
    if buf.len() >= LARGE_BYTES {
        storage::allow_huge_pages(buf);
        storage::populate(as_uninit(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_copies_match_plain_ones_at_any_alignment() {
        // Stretches of 5000 bytes, alternately data and zeros, so that whole pages of zeros
        // meet destinations that hold zeros or something else. LARGE_BYTES (a few pages under
        // Miri) makes the first two copies stream.
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
            (16, 1, if cfg!(miri) { 1500 } else { 20000 }),
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

    /// Streaming copies and fills, whatever the alignment of the destination and the length:
    /// the unaligned head, the 64-byte blocks and the tail.
    #[test]
    fn streaming_writes_match_plain_ones() {
        let streaming = BulkWrite {
            streaming: true,
            prefaulted: false,
        };
        let src: Vec<u8> = (0..400u32).map(|i| (i * 13 + 1) as u8).collect();
        for to in [0, 1, 15, 16, 17, 63] {
            for len in [0, 1, 16, 65, 127, 321] {
                let mut dst = vec![0xa5u8; to + len + 16];
                streaming.copy(as_uninit(&mut dst[to..to + len]), &src[..len]);
                assert_eq!(&dst[to..to + len], &src[..len], "copy {to} {len}");
                assert!(dst[..to].iter().chain(&dst[to + len..]).all(|&b| b == 0xa5));
                streaming.zero(as_uninit(&mut dst[to..to + len]));
                assert!(dst[to..to + len].iter().all(|&b| b == 0), "zero {to} {len}");
                assert!(dst[..to].iter().chain(&dst[to + len..]).all(|&b| b == 0xa5));
            }
        }
    }
}
