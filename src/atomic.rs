// SPDX-License-Identifier: GPL-2.0-or-later

//! From a VMM's [`AtomicHBitmap`] (guest pages marked by any thread) to an [`HBitmap`], the
//! bitmap that [`qcow2::Image::store_bitmap`](crate::qcow2::Image::store_bitmap) stores: bytes
//! as items, the page as the granularity.

use atomic_hbitmap::AtomicHBitmap;

use crate::{BitmapError, HBitmap};

/// Why an [`AtomicHBitmap`] cannot become an [`HBitmap`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FromAtomicError {
    /// An `HBitmap` group is `2^granularity` items: the page size must be a power of two.
    #[error("page size {0} is not a power of two")]
    PageSize(usize),
    /// The geometry is not one an `HBitmap` can have.
    #[error(transparent)]
    Geometry(#[from] BitmapError),
}

fn empty_like(atomic: &AtomicHBitmap) -> Result<HBitmap, FromAtomicError> {
    let page = atomic.page_size().get();
    if !page.is_power_of_two() {
        return Err(FromAtomicError::PageSize(page));
    }
    Ok(HBitmap::new(
        atomic.byte_size() as u64,
        page.trailing_zeros(),
    )?)
}

/// Marks pages `run` (as the atomic bitmap numbers them) in `bitmap`, whose items are bytes.
fn set_pages(bitmap: &mut HBitmap, run: std::ops::Range<usize>) {
    let page = 1u64 << bitmap.granularity();
    let start = run.start as u64 * page;
    let end = (run.end as u64 * page).min(bitmap.size());
    bitmap.set(start, end - start);
}

impl HBitmap {
    /// A copy of the pages marked in `atomic` (left marked), as a bitmap of
    /// `atomic.byte_size()` items at the granularity of its page size, which must be a power of
    /// two. Marks racing with the copy may or may not be in it.
    pub fn from_atomic(atomic: &AtomicHBitmap) -> Result<HBitmap, FromAtomicError> {
        let mut bitmap = empty_like(atomic)?;
        atomic.for_each_dirty_run(|run| set_pages(&mut bitmap, run));
        Ok(bitmap)
    }

    /// Takes the pages marked in `atomic` (a [harvest](AtomicHBitmap::harvest): each page is
    /// cleared as it is taken, and a mark racing with it is either taken or left for the next
    /// harvest) into a new bitmap, as [`from_atomic`](Self::from_atomic) makes it.
    pub fn take_atomic(atomic: &AtomicHBitmap) -> Result<HBitmap, FromAtomicError> {
        let mut bitmap = empty_like(atomic)?;
        bitmap.set_atomic_harvest(atomic);
        Ok(bitmap)
    }

    /// Harvests `atomic` into this bitmap (which must have its geometry: `byte_size()` items at
    /// the granularity of its page size), adding the pages taken to those already set. A VMM
    /// calls this at each pass to accumulate what it persists at the end.
    ///
    /// # Panics
    /// When the geometries differ.
    pub fn set_atomic_harvest(&mut self, atomic: &AtomicHBitmap) {
        assert!(
            self.size() == atomic.byte_size() as u64
                && 1u64.checked_shl(self.granularity()) == Some(atomic.page_size().get() as u64),
            "HBitmap::set_atomic_harvest: {} items at granularity {} do not match {} bytes in pages of {}",
            self.size(),
            self.granularity(),
            atomic.byte_size(),
            atomic.page_size()
        );
        for run in atomic.harvest() {
            set_pages(self, run);
        }
    }
}

impl TryFrom<&AtomicHBitmap> for HBitmap {
    type Error = FromAtomicError;

    /// [`HBitmap::from_atomic`]: a copy.
    fn try_from(atomic: &AtomicHBitmap) -> Result<HBitmap, FromAtomicError> {
        HBitmap::from_atomic(atomic)
    }
}

impl TryFrom<AtomicHBitmap> for HBitmap {
    type Error = FromAtomicError;

    /// The marks of a bitmap no thread marks any more.
    fn try_from(atomic: AtomicHBitmap) -> Result<HBitmap, FromAtomicError> {
        HBitmap::take_atomic(&atomic)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    fn extents(bitmap: &HBitmap) -> Vec<(u64, u64)> {
        bitmap.extents().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn pages_become_groups() {
        // 10 pages of 4 KiB and a partial last page of 100 bytes.
        let atomic = AtomicHBitmap::new(10 * 4096 + 100, NonZeroUsize::new(4096).unwrap());
        atomic.set_addr_range(4096 + 5, 2 * 4096); // pages 1..=3
        atomic.set_bit(10);
        let copy = HBitmap::from_atomic(&atomic).unwrap();
        assert_eq!(copy.size(), 10 * 4096 + 100);
        assert_eq!(copy.granularity(), 12);
        assert_eq!(
            extents(&copy),
            [(4096, 4 * 4096), (10 * 4096, 10 * 4096 + 100)]
        );
        assert_eq!(atomic.dirty_pages(), 4, "a copy leaves the pages marked");
        let taken = HBitmap::try_from(&atomic).unwrap();
        assert_eq!(taken, copy);
        let taken = HBitmap::take_atomic(&atomic).unwrap();
        assert_eq!(taken, copy);
        assert_eq!(atomic.dirty_pages(), 0);
        let mut accumulated = HBitmap::new(10 * 4096 + 100, 12).unwrap();
        atomic.set_bit(0);
        accumulated.set_atomic_harvest(&atomic);
        atomic.set_bit(9);
        accumulated.set_atomic_harvest(&atomic);
        assert_eq!(extents(&accumulated), [(0, 4096), (9 * 4096, 10 * 4096)]);
        assert_eq!(HBitmap::try_from(atomic).unwrap().count(), 0);
    }

    #[test]
    fn page_size_must_be_a_power_of_two() {
        let atomic = AtomicHBitmap::new(3000, NonZeroUsize::new(3).unwrap());
        assert_eq!(
            HBitmap::from_atomic(&atomic),
            Err(FromAtomicError::PageSize(3))
        );
    }

    #[test]
    #[should_panic(expected = "do not match")]
    fn geometry_must_match() {
        let atomic = AtomicHBitmap::new(1 << 20, NonZeroUsize::new(4096).unwrap());
        HBitmap::new(1 << 20, 16)
            .unwrap()
            .set_atomic_harvest(&atomic);
    }
}
