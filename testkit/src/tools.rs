// SPDX-License-Identifier: GPL-2.0-or-later

//! The external programs tests run (QEMU's tools, nbdinfo) and what a test does without them.
//!
//! A user's clone may lack them: a test then says it is skipped and passes. The README's test
//! command installs them and sets `HBITMAP_REQUIRE_TOOLS=1`, under which a missing program
//! fails the test instead, and `HBITMAP_REQUIRE_ORACLES=1` where it built the C oracles (from
//! `../shared/reference`), under which a missing oracle fails the differential tests: a green
//! run there proves the claims, never a silent skip.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Set (to anything but `0`) by the test command: every tool a test asks for must be there.
pub const REQUIRE_TOOLS: &str = "HBITMAP_REQUIRE_TOOLS";

/// Set (to anything but `0`) by the test command where it built the oracles.
pub const REQUIRE_ORACLES: &str = "HBITMAP_REQUIRE_ORACLES";

fn set(variable: &str) -> bool {
    std::env::var_os(variable).is_some_and(|v| v != "0")
}

/// Whether `tool` is a program on `PATH`.
pub fn installed(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Whether the test command requires every tool (see [`REQUIRE_TOOLS`]).
pub fn required() -> bool {
    set(REQUIRE_TOOLS)
}

/// True when every tool is installed. Otherwise a test named `test` is skipped (a line on
/// stderr, which the test harness does not capture) or, where tools are required, fails.
pub fn have(test: &str, tools: &[&str]) -> bool {
    for tool in tools {
        if !installed(tool) {
            assert!(
                !required(),
                "{test}: {tool} is not installed, and {REQUIRE_TOOLS} says the tools are"
            );
            let _ = writeln!(
                std::io::stderr(),
                "skipping {test}: {tool} is not installed"
            );
            return false;
        }
    }
    true
}

/// An oracle a test compares against (the original C, QEMU 10's C) is missing: skip, or fail
/// where the test command built the oracles.
pub fn oracle_missing(test: &str, why: &str) {
    assert!(
        !set(REQUIRE_ORACLES),
        "{test}: {why}, and {REQUIRE_ORACLES} says the oracles were built"
    );
    let _ = writeln!(std::io::stderr(), "skipping {test}: {why}");
}

/// Standard output and error of a finished program, for messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `program` to its end.
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn shown<S: AsRef<OsStr>>(args: &[S]) -> Vec<Cow<'_, str>> {
    args.iter().map(|a| a.as_ref().to_string_lossy()).collect()
}

/// Runs `program` and returns its standard output, panicking with its output unless it
/// succeeds.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let output = output(program, args);
    assert!(
        output.status.success(),
        "{program} {:?} failed ({}): {}",
        shown(args),
        output.status,
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `program`, panicking unless it exits with `code`; returns its standard output and
/// error.
pub fn run_expecting<S: AsRef<OsStr>>(program: &str, args: &[S], code: i32) -> String {
    let output = output(program, args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "{program} {:?} should exit {code}: {}",
        shown(args),
        text(&output)
    );
    text(&output)
}

/// The bitmaps `qemu-img info` lists for a qcow2 image: (name, granularity, flags).
pub fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let args = [OsStr::new("info"), "-U".as_ref(), "--output=json".as_ref()];
    let args: Vec<&OsStr> = args
        .into_iter()
        .chain(["-f".as_ref(), "qcow2".as_ref(), path.as_os_str()])
        .collect();
    let info: Value = serde_json::from_str(&run("qemu-img", &args)).expect("qemu-img info's JSON");
    let Some(bitmaps) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    bitmaps
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| f.as_str().expect("a flag").to_string())
                .collect();
            (
                b["name"].as_str().expect("a name").to_string(),
                b["granularity"].as_u64().expect("a granularity"),
                flags,
            )
        })
        .collect()
}
