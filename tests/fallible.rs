// SPDX-License-Identifier: GPL-2.0-or-later

//! The `try_` methods: each returns the broken precondition its panicking counterpart panics on,
//! and changes nothing, so bindings can refuse bad arguments without aborting their host.

use hbitmap::{HBitmap, Violation};

fn sample() -> HBitmap {
    let mut bitmap = HBitmap::new(1000, 3).unwrap();
    bitmap.set(0, 100);
    bitmap.set(600, 8);
    bitmap
}

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let payload = std::panic::catch_unwind(f).expect_err("the panicking method must panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn violations_are_returned_and_nothing_changes() {
    let mut bitmap = sample();
    let before = bitmap.extents().collect::<Vec<_>>();
    assert_eq!(
        bitmap.try_set(990, 20),
        Err(Violation::RangeOutOfRange {
            start: 990,
            count: 20,
            last: 126,
            groups: 125
        })
    );
    assert_eq!(
        bitmap.try_reset(u64::MAX, 2),
        Err(Violation::RangeWraps {
            start: u64::MAX,
            count: 2
        })
    );
    assert_eq!(
        bitmap.try_get(1000),
        Err(Violation::ItemOutOfRange {
            item: 1000,
            group: 125,
            groups: 125
        })
    );
    assert!(matches!(
        bitmap.try_truncate(1 << 50),
        Err(Violation::Geometry(_))
    ));
    assert_eq!(
        bitmap.try_status(900, 200),
        Err(Violation::StatusRange {
            start: 900,
            count: 200,
            size: 1000
        })
    );
    assert_eq!(
        bitmap.try_serialize_part(&mut [0u8; 4], 0, 512),
        Err(Violation::BufferTooShort { len: 4, needed: 8 })
    );
    assert_eq!(
        bitmap.try_deserialize_part(&[0xff; 8], 8, 512, true),
        Err(Violation::ChunkStart {
            start: 8,
            align: 512
        })
    );
    assert_eq!(
        bitmap.try_deserialize_ones(0, 8, true),
        Err(Violation::ChunkCount {
            count: 8,
            align: 512
        })
    );
    assert_eq!(
        bitmap.try_deserialize_zeroes(0, 2000, true).unwrap_err(),
        Violation::RangeOutOfRange {
            start: 0,
            count: 2000,
            last: 249,
            groups: 125
        }
    );
    assert_eq!(bitmap.try_serialization_size(0, 1000), Ok(16));
    assert_eq!(bitmap.try_serialization_align(), Ok(512));
    assert_eq!(
        HBitmap::new(1 << 20, 58).unwrap().try_serialization_align(),
        Err(Violation::NotSerializable(58))
    );
    let mut other = HBitmap::new(2000, 3).unwrap();
    assert_eq!(
        bitmap.try_union_with(&other),
        Err(Violation::MergeSizes {
            a: 1000,
            b: 2000,
            result: 1000
        })
    );
    assert!(HBitmap::try_union_into(&sample(), &sample(), &mut other).is_err());
    assert_eq!(
        bitmap.try_create_meta(3).unwrap_err(),
        Violation::ChunkNotPowerOfTwo(3)
    );
    assert_eq!(bitmap.extents().collect::<Vec<_>>(), before);
    assert_eq!(other.count(), 0);
    assert!(bitmap.meta().is_none());
}

#[test]
fn valid_arguments_act_as_the_panicking_methods() {
    let mut a = sample();
    let mut b = sample();
    a.set(200, 300);
    b.try_set(200, 300).unwrap();
    a.reset(250, 16);
    b.try_reset(250, 16).unwrap();
    a.truncate(3000);
    b.try_truncate(3000).unwrap();
    assert_eq!(
        a.extents().collect::<Vec<_>>(),
        b.extents().collect::<Vec<_>>()
    );
    assert_eq!(b.try_get(210), Ok(true));
    assert_eq!(b.try_status(0, 3000), Ok(a.status(0, 3000)));
    let mut buf = vec![0u8; a.serialization_size(0, 3000) as usize];
    b.try_serialize_part(&mut buf, 0, 3000).unwrap();
    let mut c = HBitmap::new(3000, 3).unwrap();
    c.try_deserialize_part(&buf, 0, 3000, true).unwrap();
    assert_eq!(
        c.extents().collect::<Vec<_>>(),
        a.extents().collect::<Vec<_>>()
    );
    assert_eq!(b.try_create_meta(4).unwrap().granularity(), 5);
}

#[test]
fn panics_carry_the_same_violation() {
    let message = panic_message(|| sample().set(990, 20));
    assert_eq!(
        message,
        format!("HBitmap::set: {}", sample().try_set(990, 20).unwrap_err())
    );
    let message = panic_message(|| {
        HBitmap::new(1 << 20, 60).unwrap().serialization_align();
    });
    assert_eq!(
        message,
        "HBitmap::serialization_align: granularity 60 is not below 58: not serializable"
    );
    let message = panic_message(|| sample().serialize_part(&mut [0u8; 4], 0, 512));
    assert_eq!(
        message,
        "HBitmap::serialize_part: buffer of 4 bytes, 8 needed"
    );
}
