//! The preconditions the core asserts (and the C ABI aborts on), checked before each call so
//! that Python gets a `ValueError` instead of a panic. The messages are the core's own wording
//! (`src/bitmap/precondition.rs`); the core keeps its checks private to the crate, so they are
//! restated here, each with the function of the core that it guards.

use hbitmap::serialize::MAX_SERIALIZABLE_GRANULARITY;
use hbitmap::HBitmap;

/// What the checks need of a bitmap: its geometry, fixed for its life (the binding exposes no
/// resize), so that checking needs no lock.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Size in items.
    pub size: u64,
    /// log2 of the items per group.
    pub granularity: u32,
    /// Groups (bits).
    pub groups: u64,
}

impl Geometry {
    pub fn of(bitmap: &HBitmap) -> Geometry {
        Geometry {
            size: bitmap.size(),
            granularity: bitmap.granularity(),
            groups: bitmap.groups(),
        }
    }
}

/// An item within the bitmap (`HBitmap::get`).
pub fn item(bitmap: Geometry, item: u64) -> Result<(), String> {
    let group = item >> bitmap.granularity;
    if group < bitmap.groups {
        Ok(())
    } else {
        Err(format!(
            "item {item} is in group {group}, beyond the bitmap's {} groups",
            bitmap.groups
        ))
    }
}

/// A range `start..start + count` within the bitmap (`HBitmap::set`, `HBitmap::reset`); an
/// empty range is always valid.
pub fn range(bitmap: Geometry, start: u64, count: u64) -> Result<(), String> {
    if count == 0 {
        return Ok(());
    }
    let Some(last) = start.checked_add(count - 1) else {
        return Err(format!("range start {start} count {count} wraps past 2^64"));
    };
    let last = last >> bitmap.granularity;
    if last >= bitmap.groups {
        return Err(format!(
            "range start {start} count {count} ends in group {last}, beyond the bitmap's {} \
             groups",
            bitmap.groups
        ));
    }
    Ok(())
}

/// A serialization chunk (`HBitmap::serialization_size`, `serialize_part`, `deserialize_part`):
/// a serializable granularity, a start aligned to `64 << granularity` items, a length aligned
/// too unless the chunk ends with the bitmap's last group. Returns the chunk's size in bytes.
pub fn chunk(bitmap: Geometry, start: u64, count: u64) -> Result<u64, String> {
    if count == 0 {
        return Ok(0);
    }
    let granularity = bitmap.granularity;
    if granularity >= MAX_SERIALIZABLE_GRANULARITY {
        return Err(format!(
            "granularity {granularity} is not below 58: not serializable"
        ));
    }
    range(bitmap, start, count)?;
    let align = 64u64 << granularity;
    if start & (align - 1) != 0 {
        return Err(format!("chunk start {start} is not a multiple of {align}"));
    }
    let last_group = (start + (count - 1)) >> granularity;
    if last_group != bitmap.groups - 1 && count & (align - 1) != 0 {
        return Err(format!(
            "chunk count {count} is not a multiple of {align} and the chunk is not the last one"
        ));
    }
    let first_word = (start >> granularity) >> 6;
    let last_word = last_group >> 6;
    Ok((last_word - first_word + 1) * 8)
}

/// Equal sizes in items (`HBitmap::union_with`).
pub fn union(target: Geometry, source: Geometry) -> Result<(), String> {
    if target.size == source.size {
        Ok(())
    } else {
        Err(format!(
            "sizes differ: this bitmap has {} items, the other {}",
            target.size, source.size
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_match_the_core() {
        for (size, granularity) in [(1u64 << 20, 0u32), (1_000_003, 3), (4096, 12), (100, 0)] {
            let bitmap = HBitmap::new(size, granularity).unwrap();
            let align = bitmap.serialization_align();
            let mut start = 0;
            while start < size {
                for count in [align, 2 * align, size - start] {
                    let count = count.min(size - start);
                    let ours = chunk(Geometry::of(&bitmap), start, count);
                    let aligned_or_last = count % align == 0
                        || (start + count - 1) >> granularity == bitmap.groups() - 1;
                    assert_eq!(ours.is_ok(), aligned_or_last, "{start} {count}");
                    if let Ok(bytes) = ours {
                        assert_eq!(bytes, bitmap.serialization_size(start, count));
                    }
                }
                start += align;
            }
        }
    }

    #[test]
    fn ranges_are_refused_where_the_core_would_panic() {
        let bitmap = HBitmap::new(1001, 3).unwrap(); // 126 groups: the last one 1000..1008
        assert!(range(Geometry::of(&bitmap), 0, 1001).is_ok());
        assert!(range(Geometry::of(&bitmap), 1007, 1).is_ok());
        assert!(range(Geometry::of(&bitmap), 1008, 0).is_ok());
        assert!(range(Geometry::of(&bitmap), 1008, 1).is_err());
        assert!(range(Geometry::of(&bitmap), u64::MAX, 2).is_err());
        assert!(item(Geometry::of(&bitmap), 1007).is_ok());
        assert!(item(Geometry::of(&bitmap), 1008).is_err());
        // Exactly where the core panics (tests only: the binding never lets it).
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let edges = [
            0,
            1,
            7,
            8,
            999,
            1000,
            1007,
            1008,
            1009,
            u64::MAX - 1,
            u64::MAX,
        ];
        for &start in &edges {
            for &count in &edges {
                let mut copy = bitmap.clone();
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    copy.set(start, count)
                }))
                .is_err();
                assert_eq!(
                    range(Geometry::of(&bitmap), start, count).is_err(),
                    panicked,
                    "{start} {count}"
                );
                let panicked =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy.get(start)))
                        .is_err();
                assert_eq!(
                    item(Geometry::of(&bitmap), start).is_err(),
                    panicked,
                    "{start}"
                );
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    copy.serialization_size(start, count)
                }))
                .is_err();
                assert_eq!(
                    chunk(Geometry::of(&bitmap), start, count).is_err(),
                    panicked,
                    "{start} {count}"
                );
            }
        }
        std::panic::set_hook(quiet);
    }
}
