// SPDX-License-Identifier: GPL-2.0-or-later

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

include!("src/ffi/header_redirect.rs");
