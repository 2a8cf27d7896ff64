//! Generates the C header from the FFI layer with cbindgen (into `OUT_DIR`, and into
//! `include/hbitmap.h` when `HBITMAP_UPDATE_HEADER` is set) and gives the shared library its
//! SONAME.

use std::env;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // cbindgen reads the whole crate.
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=cbindgen.toml");
    println!("cargo::rerun-if-env-changed=HBITMAP_UPDATE_HEADER");
    println!("cargo::rustc-cdylib-link-arg=-Wl,-soname,libhbitmap.so.1");
    // Never set: src/ffi marks each API generation's part with it for cbindgen (cbindgen.toml).
    println!(
        "cargo::rustc-check-cfg=cfg(hbitmap_omit, values(\"original\", \"qemu10\", \"qcow2\"))"
    );

    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("generating the C header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let header = redirect_qemu10_names(&String::from_utf8(generated).expect("UTF-8 header"));
    std::fs::write(out_dir.join("hbitmap.h"), &header).expect("writing the header");
    if env::var_os("HBITMAP_UPDATE_HEADER").is_some() {
        std::fs::write(crate_dir.join("include/hbitmap.h"), &header).expect("writing the header");
    }
}

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
