//! The C ABI: QEMU's `include/qemu/hbitmap.h`, drop-in.
//!
//! This is the only layer with `extern "C"` and raw pointers. Every exported function checks the
//! preconditions that the original guards with `assert()` and, when one is broken, prints the
//! function, the rule and the values on stderr and aborts, as a failed assertion would. Nothing
//! unwinds into C: the checks run before the safe core is called, and a panic escaping an
//! `extern "C"` function aborts the process.

mod hbitmap;
mod qcow2;

pub use self::hbitmap::*;
pub use self::qcow2::*;

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
