// SPDX-License-Identifier: GPL-2.0-or-later

//! The C ABI: QEMU's `include/qemu/hbitmap.h`, drop-in, in both of its generations.
//!
//! `hbitmap.rs` holds what both share; `original.rs` what only the original API (QEMU 4.0) has
//! and `qemu10.rs` what only current QEMU's (7.2 to 10) has. Functions whose signature or
//! meaning changed are exported twice: under the original name and under the name plus
//! `_qemu10`, which the header, in current QEMU's mode, declares under the original name with an
//! assembler label (as glibc's `__REDIRECT` does). One library thus serves both generations,
//! even in one process. The `hbitmap_omit` cfgs are never set when compiling: cbindgen turns
//! them into the header's `#if !defined(HBITMAP_OMIT_...)` around each generation's part.
//!
//! This is the only layer with `extern "C"` and raw pointers. Every exported function checks the
//! preconditions that the original guards with `assert()` and, when one is broken, prints the
//! function, the rule and the values on stderr and aborts, as a failed assertion would. Nothing
//! unwinds into C: the checks run before the safe core is called, and a panic escaping an
//! `extern "C"` function aborts the process.
#![allow(unsafe_code)]

mod hbitmap;
#[cfg(not(hbitmap_omit = "original"))]
mod original;
#[cfg(not(hbitmap_omit = "qcow2"))]
mod qcow2;
#[cfg(not(hbitmap_omit = "qemu10"))]
mod qemu10;
#[cfg(test)]
mod tests;

pub use self::hbitmap::*;
#[cfg(not(hbitmap_omit = "original"))]
pub use self::original::*;
#[cfg(not(hbitmap_omit = "qcow2"))]
pub use self::qcow2::*;
#[cfg(not(hbitmap_omit = "qemu10"))]
pub use self::qemu10::*;

/// Ends the process after a broken precondition, naming the function and what was wrong.
#[cold]
#[inline(never)]
pub(crate) fn violated(function: &str, why: &dyn std::fmt::Display) -> ! {
    eprintln!("libhbitmap: {function}: precondition failed: {why}");
    std::process::abort()
}

/// Unwraps a precondition check, aborting with its message when it failed.
macro_rules! require {
    ($function:literal, $check:expr) => {
        match $check {
            Ok(value) => value,
            Err(why) => $crate::ffi::violated($function, &why),
        }
    };
}
pub(crate) use require;

/// Ends the process after a NULL pointer was passed where a valid one is required.
#[cold]
#[inline(never)]
pub(crate) fn null_pointer(function: &str, what: &str) -> ! {
    violated(function, &format_args!("{what} is NULL"))
}

/// Borrows a caller's pointer, aborting on NULL.
///
/// # Safety
/// A non-NULL `ptr` must point to a live `T` that nothing mutates for `'a`.
#[inline(always)]
pub(crate) unsafe fn borrow<'a, T>(function: &str, what: &str, ptr: *const T) -> &'a T {
    if ptr.is_null() {
        null_pointer(function, what);
    }
    // SAFETY: non-NULL checked above; liveness and exclusivity are the caller's contract.
    unsafe { &*ptr }
}

/// Borrows a caller's pointer mutably, aborting on NULL.
///
/// # Safety
/// A non-NULL `ptr` must point to a live `T` that nothing else accesses for `'a`.
#[inline(always)]
pub(crate) unsafe fn borrow_mut<'a, T>(function: &str, what: &str, ptr: *mut T) -> &'a mut T {
    if ptr.is_null() {
        null_pointer(function, what);
    }
    // SAFETY: non-NULL checked above; liveness and exclusivity are the caller's contract.
    unsafe { &mut *ptr }
}
