// SPDX-License-Identifier: GPL-2.0-or-later

//! Items at or past 2^63 through the Rust API. The original's C returns items as `int64_t`, so
//! there they read as negative ("none"); the Rust API returns them as they are. The C ABI keeps
//! the original's results (the differential test compares them).

use hbitmap::HBitmap;

const TOP: u64 = 1 << 63;

#[test]
fn iteration_and_searches_reach_items_past_2_pow_63() {
    // Three groups of 2^62 items: 0, 2^62 and 2^63.
    let mut hb = HBitmap::new(3 << 62, 62).unwrap();
    hb.set(TOP, 1);
    assert_eq!(hb.iter().collect::<Vec<_>>(), [TOP]);
    assert_eq!(hb.next_dirty(0, u64::MAX), Some(TOP));
    assert_eq!(hb.next_dirty_area(0, u64::MAX), Some((TOP, 1 << 62)));
    assert_eq!(hb.extents().collect::<Vec<_>>(), vec![(TOP..3 << 62)]);
    assert_eq!(hb.status(1 << 62, 1 << 62), (false, 1 << 62));
    assert_eq!(hb.status(TOP + 5, 10), (true, 10));

    hb.set(0, TOP);
    hb.reset(TOP, 1 << 62);
    assert_eq!(hb.next_zero(0, u64::MAX), Some(TOP));
    assert_eq!(hb.next_zero(TOP + 7, 1), Some(TOP + 7));
    assert_eq!(hb.next_dirty_area(0, u64::MAX), Some((0, TOP)));
    assert_eq!(hb.status(0, 3 << 62), (true, TOP));

    hb.set(TOP, 1 << 62);
    assert_eq!(hb.iter().collect::<Vec<_>>(), [0, 1 << 62, TOP]);
    assert_eq!(hb.next_zero(0, u64::MAX), None);
    assert_eq!(hb.extents().collect::<Vec<_>>(), vec![(0..3 << 62)]);
}
