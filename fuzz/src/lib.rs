//! Fuzz harnesses for `hbitmap`. The logic lives in `harness.rs`, which depends only on
//! `hbitmap` and `std` so that `tests/fuzz_regressions.rs` of the main crate can include it
//! with `#[path]` and replay `fuzz/regressions/` without libFuzzer.
pub mod harness;
