// SPDX-License-Identifier: GPL-2.0-or-later

// Shared by build.rs, which writes the header, and tests/header.rs, which checks it (through
// include!): it is not a module of the crate.

/// A function exported as `hbitmap_X_qemu10` is current QEMU's `hbitmap_X`: the header declares
/// it under that name, bound to the exported symbol by an assembler label (GCC and Clang; the
/// way glibc's `__REDIRECT` keeps two generations of a function in one library).
fn redirect_qemu10_names(header: &str) -> String {
    const SUFFIX: &str = "_qemu10(";
    let mut out = String::with_capacity(header.len() + 1024);
    let mut rest = header;
    while let Some(at) = rest.find(SUFFIX) {
        let name_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = &rest[name_start..at];
        let end = at + rest[at..].find(");").expect("a declaration ends with );") + 1;
        out.push_str(&rest[..at]);
        out.push_str(&rest[at + SUFFIX.len() - 1..end]);
        out.push_str(&format!(" __asm__(\"{name}_qemu10\")"));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}
