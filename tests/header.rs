// SPDX-License-Identifier: GPL-2.0-or-later

//! The committed C header, `include/hbitmap.h`, is exactly what cbindgen generates from
//! `src/ffi/` today. build.rs writes the generated header to `OUT_DIR` on every build (an
//! integration test cannot see that directory), so this test regenerates it with the same
//! cbindgen version (the dev-dependency matches the build-dependency) and `cbindgen.toml`.

use std::path::Path;

const REFRESH: &str = "HBITMAP_UPDATE_HEADER=1 cargo build";

#[test]
fn committed_header_matches_src_ffi() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("generating the header from src/ffi/: {e}"));
    let mut raw = Vec::new();
    bindings.write(&mut raw);
    let generated =
        redirect_qemu10_names(&String::from_utf8(raw).expect("UTF-8 header")).into_bytes();
    let committed_path = crate_dir.join("include/hbitmap.h");
    let committed = std::fs::read(&committed_path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; create it with: {REFRESH}",
            committed_path.display()
        )
    });
    if generated == committed {
        return;
    }

    let generated = String::from_utf8_lossy(&generated);
    let committed = String::from_utf8_lossy(&committed);
    let (generated_lines, committed_lines): (Vec<_>, Vec<_>) =
        (generated.lines().collect(), committed.lines().collect());
    let line = generated_lines
        .iter()
        .zip(&committed_lines)
        .position(|(g, c)| g != c)
        .unwrap_or(generated_lines.len().min(committed_lines.len()));
    let show = |lines: &[&str]| {
        lines
            .get(line)
            .copied()
            .unwrap_or("<end of file>")
            .to_owned()
    };
    panic!(
        "include/hbitmap.h is out of date with src/ffi/ and cbindgen.toml.\n\
         First difference at line {}:\n  committed: {}\n  generated: {}\n\
         Refresh it with: {REFRESH}",
        line + 1,
        show(&committed_lines),
        show(&generated_lines),
    );
}

include!("../src/ffi/header_redirect.rs");
