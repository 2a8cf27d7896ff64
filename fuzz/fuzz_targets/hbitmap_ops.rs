#![no_main]
// SPDX-License-Identifier: GPL-2.0-or-later

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hbitmap_fuzz::harness::hbitmap_ops(data);
});
