// SPDX-License-Identifier: GPL-2.0-or-later

//! The helpers that `hbitmap`'s tests, benchmarks and fuzz targets share, so that each exists
//! once: a deterministic random generator ([`Rng`]), the engine of the differential tests
//! ([`differential`]), a naive model of the searches on the last
//! level's words ([`model`]), readers and patchers of qcow2 fields in an image's bytes
//! ([`qcow2`]), the open options every qcow2 test uses ([`RW`], [`RO`],
//! [`RO_FORCE_SHARE`]) and the external programs tests run, required or skipped ([`tools`]).
//!
//! Not published: the main crate and qbitmap take it as a dev-dependency (the main crate's tests
//! and benches link the same `hbitmap` as this crate, so the cycle is one cargo allows), the fuzz
//! crate as a dependency. Unit tests inside `src/` cannot use it: they build their own `hbitmap`,
//! whose types would not be this crate's.

pub mod differential;
pub mod model;
pub mod qcow2;
mod rng;
pub mod tools;

pub use qcow2::{RO, RO_FORCE_SHARE, RW};
pub use rng::Rng;
