// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! vm-memory's bitmap traits, so that `GuestMemoryMmap<AtomicHBitmap>` marks every guest write.

use std::num::NonZeroUsize;

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use crate::AtomicHBitmap;

impl<'a> WithBitmapSlice<'a> for AtomicHBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for AtomicHBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.set_addr_range(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for AtomicHBitmap {
    /// A bitmap of `len` bytes in pages of the host's page size, as `AtomicBitmap::with_len`.
    fn with_len(len: usize) -> Self {
        let page_size = NonZeroUsize::new(rustix::param::page_size())
            .expect("the host's page size is not zero");
        AtomicHBitmap::new(len, page_size)
    }
}
