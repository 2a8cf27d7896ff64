// SPDX-License-Identifier: GPL-2.0-or-later

//! The shared library is a drop-in for QEMU's util/hbitmap.c: it exports every function of the
//! original, nothing but the library's own C API, under the SONAME libhbitmap.so.1.
//!
//! `cargo test` compiles the library with all its crate types next to this test's executable
//! (`target/<profile>/deps/libhbitmap.so`); `cargo build` puts it in `target/<profile>/`.
//! Skips, saying so, when binutils' `nm` or `readelf` is missing.

use std::path::PathBuf;
use std::process::Command;

/// The 28 functions of the original util/hbitmap.c (its static inline hbitmap_iter_next_word
/// lives in the header).
const ORIGINAL_FUNCTIONS: [&str; 28] = [
    "hbitmap_alloc",
    "hbitmap_truncate",
    "hbitmap_merge",
    "hbitmap_can_merge",
    "hbitmap_empty",
    "hbitmap_granularity",
    "hbitmap_count",
    "hbitmap_set",
    "hbitmap_reset",
    "hbitmap_reset_all",
    "hbitmap_get",
    "hbitmap_is_serializable",
    "hbitmap_serialization_align",
    "hbitmap_serialization_size",
    "hbitmap_serialize_part",
    "hbitmap_deserialize_part",
    "hbitmap_deserialize_zeroes",
    "hbitmap_deserialize_ones",
    "hbitmap_deserialize_finish",
    "hbitmap_sha256",
    "hbitmap_free",
    "hbitmap_iter_init",
    "hbitmap_iter_skip_words",
    "hbitmap_next_zero",
    "hbitmap_next_dirty_area",
    "hbitmap_create_meta",
    "hbitmap_free_meta",
    "hbitmap_iter_next",
];

/// Prefixes of the library's own C API: the original's functions and the qcow2 layer's.
/// What current QEMU's API (mode 10 of the header) adds: its new functions, and the changed
/// ones under the symbols the header binds them to.
const QEMU10_FUNCTIONS: [&str; 9] = [
    "hbitmap_alloc_qemu10",
    "hbitmap_truncate_qemu10",
    "hbitmap_merge_qemu10",
    "hbitmap_reset_qemu10",
    "hbitmap_iter_next_qemu10",
    "hbitmap_next_zero_qemu10",
    "hbitmap_next_dirty_area_qemu10",
    "hbitmap_next_dirty",
    "hbitmap_status",
];

/// This library's own qcow2 functions.
const QCOW2_PREFIX: &str = "hbitmap_qcow2_";

/// Every qcow2 function, exactly: a new export must be listed here (and documented).
const QCOW2_FUNCTIONS: [&str; 24] = [
    "hbitmap_qcow2_open",
    "hbitmap_qcow2_create",
    "hbitmap_qcow2_close",
    "hbitmap_qcow2_virtual_size",
    "hbitmap_qcow2_bitmap_count",
    "hbitmap_qcow2_bitmap_info",
    "hbitmap_qcow2_load",
    "hbitmap_qcow2_inspect",
    "hbitmap_qcow2_store",
    "hbitmap_qcow2_add",
    "hbitmap_qcow2_remove",
    "hbitmap_qcow2_release",
    "hbitmap_qcow2_clear",
    "hbitmap_qcow2_set_enabled",
    "hbitmap_qcow2_merge",
    "hbitmap_qcow2_check",
    "hbitmap_qcow2_repair",
    "hbitmap_qcow2_cluster_size",
    "hbitmap_qcow2_add_ex",
    "hbitmap_qcow2_merge_from",
    "hbitmap_qcow2_set_range",
    "hbitmap_qcow2_import",
    "hbitmap_qcow2_bitmap_dirty_bytes",
    "hbitmap_qcow2_dirty_extents",
];

fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("target/<profile>/deps");
    [deps.join("libhbitmap.so"), deps.join("../libhbitmap.so")]
        .into_iter()
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "libhbitmap.so is neither in {} nor its parent",
                deps.display()
            )
        })
}

/// The tool's standard output, or `None` (after saying so) when it is not installed.
fn run(tool: &str, args: &[&str]) -> Option<String> {
    let lib = cdylib();
    let output = match Command::new(tool).args(args).arg(&lib).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Skipped, or a failure where the test command requires the tools.
            hbitmap_testkit::tools::have(&format!("the export checks with {tool}"), &[tool]);
            return None;
        }
        Err(e) => panic!("running {tool}: {e}"),
    };
    assert!(
        output.status.success(),
        "{tool} {args:?} {} failed: {}",
        lib.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8(output.stdout).expect("UTF-8 output"))
}

/// Names of the defined dynamic symbols: `nm -D --defined-only` lines are `ADDRESS TYPE NAME`.
fn exported_symbols() -> Option<Vec<String>> {
    let listing = run("nm", &["-D", "--defined-only"])?;
    Some(
        listing
            .lines()
            .filter_map(|line| line.split_whitespace().nth(2))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect(),
    )
}

#[test]
fn exports_every_function_of_the_original() {
    let Some(symbols) = exported_symbols() else {
        return;
    };
    let missing: Vec<_> = ORIGINAL_FUNCTIONS
        .iter()
        .filter(|f| !symbols.iter().any(|s| s == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "{} does not export {missing:?}",
        cdylib().display()
    );
}

#[test]
fn exports_every_function_of_current_qemu() {
    let Some(symbols) = exported_symbols() else {
        return;
    };
    let missing: Vec<_> = QEMU10_FUNCTIONS
        .iter()
        .filter(|f| !symbols.iter().any(|s| s == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "{} does not export {missing:?}",
        cdylib().display()
    );
}

#[test]
fn exports_nothing_but_the_c_api() {
    let Some(symbols) = exported_symbols() else {
        return;
    };
    let foreign: Vec<_> = symbols
        .iter()
        .filter(|s| {
            !(ORIGINAL_FUNCTIONS.contains(&s.as_str())
                || QEMU10_FUNCTIONS.contains(&s.as_str())
                || s.starts_with(QCOW2_PREFIX))
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "{} exports symbols outside the C API (both hbitmap generations and {QCOW2_PREFIX}*): \
         {foreign:?}",
        cdylib().display()
    );
}

#[test]
fn exports_exactly_the_qcow2_functions() {
    let Some(symbols) = exported_symbols() else {
        return;
    };
    let mut exported: Vec<&str> = symbols
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with(QCOW2_PREFIX))
        .collect();
    exported.sort_unstable();
    let mut expected = QCOW2_FUNCTIONS.to_vec();
    expected.sort_unstable();
    assert_eq!(exported, expected, "{}", cdylib().display());
}

#[test]
fn soname_is_libhbitmap_so_1() {
    let Some(dynamic) = run("readelf", &["-d"]) else {
        return;
    };
    let soname = dynamic
        .lines()
        .find(|line| line.contains("(SONAME)"))
        .and_then(|line| line.split('[').nth(1))
        .and_then(|rest| rest.split(']').next());
    assert_eq!(
        soname,
        Some("libhbitmap.so.1"),
        "SONAME of {}",
        cdylib().display()
    );
}
