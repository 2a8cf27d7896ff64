// SPDX-License-Identifier: GPL-2.0-or-later

//! Ownership of a meta bitmap. Its parent owns it, and the C ABI hands out a pointer to it that
//! QEMU's migration code uses between writes to the parent (`hbitmap_reset(meta, ...)` after
//! sending a chunk). So the meta bitmap lives at a fixed heap address for its whole life and is
//! reached only through the raw pointer it was allocated as, never through a `Box`: using a
//! `Box` asserts unique access to its contents, which would invalidate the pointer given to C.
#![allow(unsafe_code)]

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::HBitmap;

/// A meta bitmap owned by its parent bitmap.
pub(crate) struct MetaBitmap(NonNull<HBitmap>);

// SAFETY: a `MetaBitmap` owns its bitmap exclusively, as a `Box` would; it is reached through
// its parent, so moving or sharing the parent between threads moves or shares it too.
unsafe impl Send for MetaBitmap {}
// SAFETY: as for `Send`: shared access goes through `&HBitmap` only.
unsafe impl Sync for MetaBitmap {}

impl MetaBitmap {
    pub(crate) fn new(mut bitmap: HBitmap) -> MetaBitmap {
        bitmap.owned_by_parent = true;
        MetaBitmap(NonNull::from(Box::leak(Box::new(bitmap))))
    }

    /// The address handed to C: valid until the parent drops the meta bitmap.
    pub(crate) fn as_ptr(&self) -> *mut HBitmap {
        self.0.as_ptr()
    }
}

impl Deref for MetaBitmap {
    type Target = HBitmap;

    fn deref(&self) -> &HBitmap {
        // SAFETY: allocated in `new`, freed only in `drop`; accesses through the C pointer and
        // through the parent never overlap (the C ABI borrows one bitmap per call).
        unsafe { self.0.as_ref() }
    }
}

impl DerefMut for MetaBitmap {
    fn deref_mut(&mut self) -> &mut HBitmap {
        // SAFETY: as in `deref`; `&mut self` comes from the parent, borrowed exclusively.
        unsafe { self.0.as_mut() }
    }
}

impl Drop for MetaBitmap {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::leak` in `new` and is freed only here.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl Clone for MetaBitmap {
    fn clone(&self) -> Self {
        MetaBitmap::new((**self).clone())
    }
}

impl fmt::Debug for MetaBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}
