//! The helpers that `hbitmap`'s tests, benchmarks and fuzz targets share, so that each exists
//! once: a deterministic random generator ([`Rng`]), a naive model of the searches on the last
//! level's words ([`model`]), readers and patchers of qcow2 fields in an image's bytes
//! ([`qcow2`]) and the open options every qcow2 test uses ([`RW`], [`RO`],
//! [`RO_FORCE_SHARE`]).
//!
//! Not published: the main crate takes it as a dev-dependency (its tests and benches link the
//! same `hbitmap` as this crate, so the cycle is one cargo allows), the fuzz crate as a
//! dependency.

pub mod model;
pub mod qcow2;
mod rng;

pub use qcow2::{RO, RO_FORCE_SHARE, RW};
pub use rng::Rng;
