#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hbitmap_fuzz::harness::qcow2_open(data);
});
