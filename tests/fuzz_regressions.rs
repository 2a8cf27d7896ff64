// SPDX-License-Identifier: GPL-2.0-or-later

//! Replays the committed fuzz regression inputs (`fuzz/regressions/<target>/`) through the same
//! harness code the libFuzzer targets run (`fuzz/src/harness.rs`, included here), without
//! libFuzzer. Inputs of known, unfixed library bugs are listed in `KNOWN_FAILURES` and replayed
//! only by the `#[ignore]`d test `known_failures`.

#[allow(dead_code, clippy::all)]
#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// Inputs that still fail, with the reason (run with `cargo test --test fuzz_regressions --
/// --ignored`). Paths relative to `fuzz/regressions/`.
const KNOWN_FAILURES: &[(&str, &str)] = &[(
    "hbitmap_ops/known-padding-grow-count",
    "deserialize_ones on the last chunk sets padding bits; hbitmap_truncate growing the bitmap \
     turns them into dirty groups that hbitmap_count does not include (QEMU does the same)",
)];

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    // A missing or empty directory is a failure: replaying nothing proves nothing.
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    out.retain(|p| p.is_file());
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out.sort();
    out
}

fn is_known_failure(target: &str, path: &Path) -> bool {
    let name = format!("{target}/{}", path.file_name().unwrap().to_string_lossy());
    KNOWN_FAILURES.iter().any(|(known, _)| *known == name)
}

fn replay(target: &str, run: fn(&[u8])) {
    let mut ran = 0;
    for path in inputs(target) {
        if is_known_failure(target, &path) {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} panicked", path.display());
        ran += 1;
    }
    assert!(ran > 0, "{target}: every input is a known failure");
    eprintln!("{target}: {ran} inputs");
}

/// Every corpus folder is replayed by a test below: a new target's inputs cannot sit unread.
#[test]
fn every_corpus_is_replayed() {
    const REPLAYED: [&str; 4] = [
        "qcow2_open",
        "qcow2_mutate",
        "hbitmap_ops",
        "deserialize_part",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut replayed = REPLAYED.map(String::from).to_vec();
    replayed.sort();
    assert_eq!(found, replayed);
}

#[test]
fn qcow2_open() {
    replay("qcow2_open", harness::qcow2_open);
}

#[test]
fn qcow2_mutate() {
    replay("qcow2_mutate", harness::qcow2_mutate);
}

#[test]
fn hbitmap_ops() {
    replay("hbitmap_ops", harness::hbitmap_ops);
}

#[test]
fn deserialize_part() {
    replay("deserialize_part", harness::deserialize_part);
}

#[test]
#[ignore = "known library bugs found by fuzzing, not fixed yet (see KNOWN_FAILURES)"]
fn known_failures() {
    let mut failed = Vec::new();
    for &(name, why) in KNOWN_FAILURES {
        let (target, _) = name.split_once('/').unwrap();
        let run: fn(&[u8]) = match target {
            "qcow2_open" => harness::qcow2_open,
            "qcow2_mutate" => harness::qcow2_mutate,
            "hbitmap_ops" => harness::hbitmap_ops_strict,
            "deserialize_part" => harness::deserialize_part,
            _ => panic!("unknown target in {name}"),
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(name);
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(format!("{name}: {why}"));
        }
    }
    assert!(failed.is_empty(), "still failing:\n{}", failed.join("\n"));
}
