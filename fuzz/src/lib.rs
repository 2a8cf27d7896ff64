// SPDX-License-Identifier: GPL-2.0-or-later

//! Fuzz harnesses for `hbitmap`. The logic lives in `harness.rs`, which depends only on
//! `hbitmap`, `hbitmap-testkit` (both also dependencies of the main crate's tests) and `std`, so
//! that `tests/fuzz_regressions.rs` of the main crate can include it with `#[path]` and replay
//! `fuzz/regressions/` without libFuzzer.
pub mod harness;
