// SPDX-License-Identifier: GPL-2.0-or-later

//! End-to-end tests of the `qbitmap` command line: every command, both output formats, every
//! exit status, and agreement with QEMU's own tools (qemu-img, qemu-io, qemu-nbd + nbdinfo) on
//! images each side made. Tests needing a QEMU tool print why and pass when it is absent.

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin_cmd;
use assert_cmd::Command;
use hbitmap_testkit::qcow2::{be32, be64, directory_entry, put32, put64, L1_TABLE_OFFSET};
use hbitmap_testkit::tools::{self, have, run};
use hbitmap_testkit::Rng;
use predicates::prelude::*;
use predicates::str::contains;
use serde_json::{json, Value};
use tempfile::TempDir;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn qbitmap() -> Command {
    cargo_bin_cmd!("qbitmap")
}

/// Runs qbitmap with `args`, expecting success, and returns its stdout.
fn ok(args: &[&str]) -> String {
    tools::run(env!("CARGO_BIN_EXE_qbitmap"), args)
}

/// Runs qbitmap with `args`, expecting success and JSON on stdout.
fn ok_json(args: &[&str]) -> Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qbitmap {args:?}: {e}: {out}"))
}

/// A temporary directory and a qcow2 image of `size` bytes in it, made by `qbitmap create`.
fn image(size: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("disk.qcow2");
    ok(&["create", s(&path), size]);
    (dir, path)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn list_json(path: &Path) -> Value {
    ok_json(&["list", s(path), "--output=json"])
}

fn bitmap<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {list}"))
}

/// `dump --output=json` extents as (offset, length) pairs.
fn extents(path: &Path, name: &str) -> Vec<(u64, u64)> {
    extents_of(&ok_json(&["dump", s(path), name, "--output=json"]))
}

fn extents_of(dump: &Value) -> Vec<(u64, u64)> {
    dump["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Sets or clears a bitmap's in-use flag directly in the image file, as a QEMU that crashed
/// with the image open leaves it.
fn set_in_use(path: &Path, name: &str, in_use: bool) {
    let mut data = fs::read(path).unwrap();
    let entry = directory_entry(&data, name);
    let flags_at = entry + 12;
    let mut flags = be32(&data, flags_at);
    if in_use {
        flags |= 1;
    } else {
        flags &= !1;
    }
    put32(&mut data, flags_at, flags);
    fs::write(path, data).unwrap();
}

// ---------------------------------------------------------------------------------------------
// create, list

#[test]
fn create_and_list_an_empty_image() {
    let (_dir, path) = image("1G");
    let list = list_json(&path);
    assert_eq!(list["image"], s(&path));
    assert_eq!(list["virtual-size"], GIB);
    assert_eq!(list["cluster-size"], 64 * KIB);
    assert_eq!(list["bitmaps"], json!([]));
    qbitmap()
        .args(["list", s(&path)])
        .assert()
        .success()
        .stdout(contains(
            "virtual size 1 GiB (1073741824 bytes), cluster size 64 KiB",
        ))
        .stdout(contains("No bitmaps."));
    // --json is --output=json.
    assert_eq!(ok_json(&["list", s(&path), "--json"]), list);
    // -U reads without locks.
    assert_eq!(ok_json(&["-U", "list", s(&path), "--json"]), list);
    assert_eq!(ok_json(&["list", "-U", s(&path), "--json"]), list);
}

#[test]
fn create_takes_sizes_and_cluster_size() {
    let dir = TempDir::new().unwrap();
    for (size, cluster, bytes, cluster_bytes) in [
        ("1T", None, 1u64 << 40, 64 * KIB),
        ("1.5G", Some("cluster_size=4K"), 3 << 29, 4 * KIB),
        ("10485760", Some("cluster_size=2M"), 10 * MIB, 2 * MIB),
        ("64k", Some("compat=1.1,cluster_size=512"), 64 * KIB, 512),
    ] {
        let path = dir.path().join(format!("{size}.qcow2"));
        let mut args = vec!["create", s(&path), size];
        if let Some(cluster) = cluster {
            args.extend(["-o", cluster]);
        }
        ok(&args);
        let list = list_json(&path);
        assert_eq!(list["virtual-size"], bytes, "{size}");
        assert_eq!(list["cluster-size"], cluster_bytes, "{size}");
    }
}

#[test]
fn create_refuses_impossible_images() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("x.qcow2");
    qbitmap()
        .args(["create", s(&path), "1000"])
        .assert()
        .code(1)
        .stderr(contains(s(&path)).and(contains("multiple of 512")));
    qbitmap()
        .args(["create", s(&path), "8E"])
        .assert()
        .code(1)
        .stderr(contains("too large"));
    let nowhere = dir.path().join("no/such/dir/x.qcow2");
    qbitmap()
        .args(["create", s(&nowhere), "1G"])
        .assert()
        .code(1)
        .stderr(contains(s(&nowhere)));
}

#[test]
fn list_shows_names_granularities_flags_and_dirty_bytes() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "active"]);
    ok(&["add", s(&path), "frozen", "-g", "128K", "--disabled"]);
    ok(&["add", s(&path), "fine", "--granularity=512"]);
    ok(&["set", s(&path), "active", "0", "100K"]);
    let list = list_json(&path);
    assert_eq!(
        bitmap(&list, "active"),
        &json!({"name": "active", "granularity": 65536, "flags": ["auto"], "dirty-bytes": 131072})
    );
    assert_eq!(
        bitmap(&list, "frozen"),
        &json!({"name": "frozen", "granularity": 131072, "flags": [], "dirty-bytes": 0})
    );
    assert_eq!(bitmap(&list, "fine")["granularity"], 512);
    let human = ok(&["list", s(&path)]);
    let lines: Vec<&str> = human.lines().collect();
    assert!(lines[1].starts_with("NAME"), "{human}");
    assert!(
        lines[1].contains("GRANULARITY") && lines[1].contains("FLAGS"),
        "{human}"
    );
    let active = lines.iter().find(|l| l.starts_with("active")).unwrap();
    assert!(active.contains("64 KiB") && active.contains("auto") && active.contains("128 KiB"));
    let frozen = lines.iter().find(|l| l.starts_with("frozen")).unwrap();
    assert!(frozen.contains("128 KiB") && frozen.contains(" - ") && frozen.contains("0 B"));
    let fine = lines.iter().find(|l| l.starts_with("fine")).unwrap();
    assert!(fine.contains("512 B"));
    // Columns line up: every row is as long as the header up to the last column.
    let flags_at = lines[1].find("FLAGS").unwrap();
    for line in &lines[2..] {
        assert_eq!(&line[flags_at - 2..flags_at], "  ", "{human}");
    }
}

// ---------------------------------------------------------------------------------------------
// add, remove, clear, enable, disable

#[test]
fn add_refuses_duplicates_and_bad_granularities() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    qbitmap()
        .args(["add", s(&path), "b"])
        .assert()
        .code(1)
        .stderr(contains(s(&path)).and(contains("already exists")));
    for bad in ["3000", "256", "4G", "x"] {
        qbitmap()
            .args(["add", s(&path), "c", "-g", bad])
            .assert()
            .code(2)
            .stderr(contains("granularity"));
    }
    assert_eq!(list_json(&path)["bitmaps"].as_array().unwrap().len(), 1);
}

#[test]
fn remove_clear_enable_disable() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "a"]);
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "a", "1M", "1M"]);
    assert_eq!(bitmap(&list_json(&path), "a")["dirty-bytes"], MIB);

    ok(&["clear", s(&path), "a"]);
    assert_eq!(bitmap(&list_json(&path), "a")["dirty-bytes"], 0);

    ok(&["disable", s(&path), "a"]);
    assert_eq!(bitmap(&list_json(&path), "a")["flags"], json!([]));
    ok(&["disable", s(&path), "a"]);
    assert_eq!(bitmap(&list_json(&path), "a")["flags"], json!([]));
    ok(&["enable", s(&path), "a"]);
    assert_eq!(bitmap(&list_json(&path), "a")["flags"], json!(["auto"]));

    ok(&["remove", s(&path), "b"]);
    let list = list_json(&path);
    assert_eq!(list["bitmaps"].as_array().unwrap().len(), 1);
    assert_eq!(list["bitmaps"][0]["name"], "a");
    ok(&["rm", s(&path), "a"]);
    assert_eq!(list_json(&path)["bitmaps"], json!([]));
}

#[test]
fn commands_on_a_missing_bitmap_fail() {
    let (_dir, path) = image("1G");
    for args in [
        vec!["dump", s(&path), "nope"],
        vec!["remove", s(&path), "nope"],
        vec!["clear", s(&path), "nope"],
        vec!["enable", s(&path), "nope"],
        vec!["disable", s(&path), "nope"],
        vec!["set", s(&path), "nope", "0", "1"],
        vec!["reset", s(&path), "nope", "0", "64K"],
        vec!["merge", s(&path), "nope", "nope2"],
    ] {
        qbitmap()
            .args(&args)
            .assert()
            .code(1)
            .stderr(contains(s(&path)).and(contains("nope")));
    }
}

#[test]
fn commands_on_a_missing_or_bad_image_fail() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.qcow2");
    for args in [
        vec!["list", s(&missing)],
        vec!["dump", s(&missing), "b"],
        vec!["add", s(&missing), "b"],
        vec!["check", s(&missing)],
    ] {
        qbitmap()
            .args(&args)
            .assert()
            .code(1)
            .stdout("")
            .stderr(contains(s(&missing)));
    }
    let not_qcow2 = dir.path().join("raw.img");
    fs::write(&not_qcow2, vec![0u8; 4096]).unwrap();
    qbitmap()
        .args(["list", s(&not_qcow2)])
        .assert()
        .code(1)
        .stderr(contains(s(&not_qcow2)));
}

// ---------------------------------------------------------------------------------------------
// set, reset, dump

#[test]
fn set_reset_and_dump() {
    // 1 GiB + 100 KiB: the last granule is partial.
    let size = GIB + 100 * KIB;
    let (_dir, path) = image(&size.to_string());
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "1"]);
    ok(&["set", s(&path), "b", "1M", "1M"]);
    ok(&["set", s(&path), "b", "2M", "64K"]);
    ok(&["set", s(&path), "b", &(size - 1).to_string(), "1"]);
    ok(&["set", s(&path), "b", "0", "0"]);
    assert_eq!(
        extents(&path, "b"),
        vec![
            (0, 64 * KIB),
            (MIB, MIB + 64 * KIB),
            (GIB + 64 * KIB, 36 * KIB)
        ]
    );
    ok(&["reset", s(&path), "b", "1M", "64K"]);
    ok(&["reset", s(&path), "b", &(GIB + 64 * KIB).to_string(), "36K"]);
    let dump = ok_json(&["dump", s(&path), "b", "--output=json"]);
    assert_eq!(
        dump,
        json!({
            "name": "b", "granularity": 65536, "virtual-size": size, "dirty-bytes": 65536 + MIB,
            "extents": [{"offset": 0, "length": 65536}, {"offset": MIB + 65536, "length": MIB}]
        })
    );
    assert_eq!(ok_json(&["dump", s(&path), "b", "--json"]), dump);

    // The human form: a table with exact bytes and sizes for people, then the totals.
    let human = ok(&["dump", s(&path), "b"]);
    let lines: Vec<&str> = human.lines().collect();
    assert!(
        lines[0].contains("'b'") && lines[0].contains("granularity 64 KiB"),
        "{human}"
    );
    assert!(
        lines[1].contains("OFFSET") && lines[1].contains("LENGTH"),
        "{human}"
    );
    assert!(
        lines[2].trim_start().starts_with('0') && lines[2].ends_with("64 KiB"),
        "{human}"
    );
    assert!(
        lines[3].contains("1114112") && lines[3].ends_with("1 MiB"),
        "{human}"
    );
    assert!(lines[4].contains("1.06 MiB dirty in 2 extents"), "{human}");
}

#[test]
fn set_and_reset_refuse_bad_ranges() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "1M"]);
    for args in [
        ["set", "1G", "1"],
        ["set", "0", "2G"],
        ["reset", "1023M", "2M"],
    ] {
        qbitmap()
            .args([args[0], s(&path), "b", args[1], args[2]])
            .assert()
            .code(1)
            .stderr(contains("past the virtual size"));
    }
    qbitmap()
        .args(["set", s(&path), "b", "18446744073709551615", "2"])
        .assert()
        .code(1);
    qbitmap()
        .args(["reset", s(&path), "b", "4K", "64K"])
        .assert()
        .code(1)
        .stderr(contains("not aligned"));
    assert_eq!(extents(&path, "b"), vec![(0, MIB)]);
    // Nothing was left in use by the refused commands.
    assert_eq!(bitmap(&list_json(&path), "b")["flags"], json!(["auto"]));
}

#[test]
fn in_use_bitmaps() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "64K", "64K"]);
    set_in_use(&path, "b", true);

    let list = list_json(&path);
    assert_eq!(
        bitmap(&list, "b"),
        &json!({"name": "b", "granularity": 65536, "flags": ["in-use", "auto"], "dirty-bytes": null})
    );
    let human = ok(&["list", s(&path)]);
    assert!(human.contains("in-use,auto"), "{human}");

    qbitmap()
        .args(["dump", s(&path), "b"])
        .assert()
        .code(1)
        .stdout("")
        .stderr(
            contains(s(&path))
                .and(contains("in use"))
                .and(contains("inconsistent")),
        );
    for flag in ["--force", "--inspect", "-f"] {
        let dump = ok_json(&["dump", s(&path), "b", flag, "--output=json"]);
        assert_eq!(extents_of(&dump), vec![(64 * KIB, 64 * KIB)]);
    }
    qbitmap()
        .args(["dump", s(&path), "b", "--force"])
        .assert()
        .success()
        .stdout(contains("65536"))
        .stderr(contains("warning").and(contains("in use")));
    for command in ["set", "clear", "enable", "disable"] {
        let mut args = vec![command, s(&path), "b"];
        if command == "set" {
            args.extend(["0", "1"]);
        }
        qbitmap()
            .args(&args)
            .assert()
            .code(1)
            .stderr(contains(s(&path)).and(contains("in use")));
    }
    // check reports it; an in-use bitmap is a state, not damage: exit 0, as qemu-img check.
    qbitmap()
        .args(["check", s(&path)])
        .assert()
        .code(0)
        .stdout(contains("WARNING").and(contains("'b' is in use")))
        .stdout(contains("no errors, 1 warning found"));
    let report = qbitmap()
        .args(["check", s(&path), "--json"])
        .assert()
        .code(0)
        .get_output()
        .stdout
        .clone();
    let report: Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(report["clean"], false);
    assert_eq!(report["errors"], json!([]));
    assert_eq!(report["corruptions"], 0);
    assert_eq!(report["in-use-bitmaps"], json!(["b"]));
    assert_eq!(report["warnings"].as_array().unwrap().len(), 1);
    // The same finding, typed.
    assert_eq!(
        report["findings"],
        json!([{
            "severity": "warning",
            "subject": {"type": "bitmap", "name": "b"},
            "kind": "InUse",
            "text": report["warnings"][0],
        }])
    );

    // An in-use bitmap can still be removed.
    ok(&["remove", s(&path), "b"]);
    assert_eq!(list_json(&path)["bitmaps"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// merge

#[test]
fn merge_within_an_image_and_from_another() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    ok(&["create", s(&a), "1G"]);
    ok(&["create", s(&b), "1G"]);
    ok(&["add", s(&a), "x"]);
    ok(&["add", s(&a), "y"]);
    ok(&["set", s(&a), "x", "0", "64K"]);
    ok(&["set", s(&a), "y", "1M", "64K"]);
    ok(&["merge", s(&a), "x", "y"]);
    assert_eq!(extents(&a, "y"), vec![(0, 64 * KIB), (MIB, 64 * KIB)]);
    assert_eq!(extents(&a, "x"), vec![(0, 64 * KIB)]);

    ok(&["add", s(&b), "z", "-g", "128K"]);
    ok(&["set", s(&b), "z", "10M", "1"]);
    ok(&["merge", s(&a), "z", "x", "-b", s(&b)]);
    assert_eq!(extents(&a, "x"), vec![(0, 64 * KIB), (10 * MIB, 128 * KIB)]);
    assert_eq!(extents(&b, "z"), vec![(10 * MIB, 128 * KIB)]);
    // -b naming the image itself merges within it; -U applies to the source image.
    ok(&["-U", "merge", s(&a), "x", "y", "--source-image", s(&a)]);
    assert_eq!(
        extents(&a, "y"),
        vec![(0, 64 * KIB), (MIB, 64 * KIB), (10 * MIB, 128 * KIB)]
    );

    qbitmap()
        .args(["merge", s(&a), "nope", "x", "-b", s(&b)])
        .assert()
        .code(1)
        .stderr(contains(s(&b)).and(contains("nope")));
    qbitmap()
        .args([
            "merge",
            s(&a),
            "x",
            "y",
            "-b",
            s(&dir.path().join("missing")),
        ])
        .assert()
        .code(1)
        .stderr(contains("missing"));
}

// ---------------------------------------------------------------------------------------------
// import

#[test]
fn dump_after_import_round_trips_extents() {
    let size = 4 * GIB + 12 * KIB;
    let (dir, path) = image(&size.to_string());
    // A reproducible scatter of aligned extents, the last one ending at the (unaligned) end.
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    let granule = 64 * KIB;
    let mut expected = Vec::new();
    let mut offset = 0;
    while offset < size - 16 * MIB {
        offset += (1 + rng.below(256)) * granule;
        let length = (1 + rng.below(32)) * granule;
        expected.push((offset, length));
        offset += length;
    }
    let last = (size / granule) * granule;
    expected.push((last, size - last));
    let doc = json!({
        "name": "whatever", "granularity": granule, "virtual-size": size,
        "extents": expected.iter().map(|&(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>()
    });
    let file = dir.path().join("extents.json");
    fs::write(&file, doc.to_string()).unwrap();
    ok(&["import", s(&path), "b", s(&file)]);
    let dump = ok_json(&["dump", s(&path), "b", "--output=json"]);
    assert_eq!(extents_of(&dump), expected);
    assert_eq!(dump["granularity"], granule);
    assert_eq!(
        dump["dirty-bytes"],
        expected.iter().map(|e| e.1).sum::<u64>()
    );
    assert_eq!(bitmap(&list_json(&path), "b")["flags"], json!(["auto"]));

    // A dump imported again (from standard input) gives the same dump.
    qbitmap()
        .args(["import", s(&path), "copy", "-"])
        .write_stdin(serde_json::to_string(&dump).unwrap())
        .assert()
        .success();
    let copy = ok_json(&["dump", s(&path), "copy", "--output=json"]);
    assert_eq!(copy["extents"], dump["extents"]);
    qbitmap()
        .args(["import", s(&path), "copy2"])
        .write_stdin(serde_json::to_string(&dump).unwrap())
        .assert()
        .success();
    assert_eq!(extents(&path, "copy2"), expected);
}

#[test]
fn import_merges_unsorted_overlapping_extents() {
    let (_dir, path) = image("1G");
    qbitmap()
        .args(["import", s(&path), "b", "--disabled"])
        .write_stdin(
            r#"{"extents": [
                {"offset": 1048576, "length": 131072},
                {"offset": 0, "length": 65536},
                {"offset": 1114112, "length": 131072},
                {"offset": 65536, "length": 65536},
                {"offset": 5242880, "length": 0}
            ]}"#,
        )
        .assert()
        .success();
    assert_eq!(extents(&path, "b"), vec![(0, 128 * KIB), (MIB, 192 * KIB)]);
    assert_eq!(bitmap(&list_json(&path), "b")["flags"], json!([]));
}

#[test]
fn import_replaces_and_takes_granularity_from_flag_json_or_bitmap() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b", "-g", "1M", "--disabled"]);
    ok(&["set", s(&path), "b", "100M", "1"]);
    let input = r#"[{"offset": 0, "length": 4096}]"#;
    // An existing bitmap keeps its granularity and flags; its content is replaced.
    qbitmap()
        .args(["import", s(&path), "b"])
        .write_stdin(input)
        .assert()
        .success()
        .stderr(contains("warning").and(contains("1 extent")));
    let list = list_json(&path);
    assert_eq!(
        bitmap(&list, "b"),
        &json!({"name": "b", "granularity": MIB, "flags": [], "dirty-bytes": MIB})
    );
    // -g wins over everything.
    qbitmap()
        .args(["import", s(&path), "b", "-g", "4K"])
        .write_stdin(input)
        .assert()
        .success()
        .stderr("");
    assert_eq!(bitmap(&list_json(&path), "b")["granularity"], 4096);
    assert_eq!(extents(&path, "b"), vec![(0, 4096)]);
    // Else the JSON's granularity; else 64K.
    qbitmap()
        .args(["import", s(&path), "c"])
        .write_stdin(r#"{"granularity": 131072, "extents": []}"#)
        .assert()
        .success();
    qbitmap()
        .args(["import", s(&path), "d"])
        .write_stdin("[]")
        .assert()
        .success();
    let list = list_json(&path);
    assert_eq!(bitmap(&list, "c")["granularity"], 131072);
    assert_eq!(bitmap(&list, "d")["granularity"], 65536);
    assert_eq!(bitmap(&list, "d")["flags"], json!(["auto"]));
}

#[test]
fn import_refuses_bad_input() {
    let (dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "64K"]);
    for (input, message) in [
        (
            r#"[{"offset": 1073741824, "length": 1}]"#,
            "past the image's virtual size",
        ),
        (
            r#"[{"offset": 1073676288, "length": 131072}]"#,
            "past the image's virtual size",
        ),
        (
            r#"[{"offset": 18446744073709551615, "length": 2}]"#,
            "past 2^64",
        ),
        ("not json", "invalid JSON"),
        (r#"{"offset": 0}"#, "extents"),
        (r#"[{"offset": -5, "length": 1}]"#, "standard input"),
        (r#"[{"offset": 0, "size": 1}]"#, "standard input"),
        (r#"{"granularity": 1000, "extents": []}"#, "power of two"),
    ] {
        qbitmap()
            .args(["import", s(&path), "b"])
            .write_stdin(input)
            .assert()
            .code(1)
            .stderr(contains(message));
    }
    qbitmap()
        .args(["import", s(&path), "b", s(&dir.path().join("missing.json"))])
        .assert()
        .code(1)
        .stderr(contains("missing.json"));
    // The bitmap is as it was.
    assert_eq!(extents(&path, "b"), vec![(0, 64 * KIB)]);
}

// ---------------------------------------------------------------------------------------------
// check

#[test]
fn check_passes_a_clean_image() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "10M"]);
    qbitmap()
        .args(["check", s(&path)])
        .assert()
        .success()
        .stdout(contains("no errors were found (1 bitmap checked)"));
    let report = ok_json(&["check", s(&path), "--output=json"]);
    for (key, value) in [
        ("image", json!(s(&path))),
        ("filename", json!(s(&path))),
        ("format", json!("qcow2")),
        ("bitmaps", json!(1)),
        ("clean", json!(true)),
        ("check-errors", json!(0)),
        ("corruptions", json!(0)),
        ("leaks", json!(0)),
        ("errors", json!([])),
        ("warnings", json!([])),
        ("notes", json!([])),
        ("leaked", json!([])),
        ("in-use-bitmaps", json!([])),
        ("damaged-bitmaps", json!([])),
        ("stale-extension", json!(false)),
        ("broken-extension", json!(false)),
    ] {
        assert_eq!(report[key], value, "{key}: {report}");
    }
    // The figures qemu-img check gives, when it is installed.
    if let Ok(output) = Command::new("qemu-img")
        .args(["check", "--output=json", s(&path)])
        .output()
    {
        let qemu: Value = serde_json::from_slice(&output.stdout).unwrap();
        for key in ["image-end-offset", "total-clusters", "check-errors"] {
            assert_eq!(report[key], qemu[key], "{key}: {report} against {qemu}");
        }
    } else {
        eprintln!("qemu-img is not installed: figures not compared with it");
    }
}

#[test]
fn check_fails_a_damaged_image() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "10M"]);
    let before = fs::read(&path).unwrap();
    // The bitmap table moved off a cluster boundary.
    let mut data = before.clone();
    let entry = directory_entry(&data, "b");
    let table = be64(&data, entry);
    put64(&mut data, entry, table + 512);
    fs::write(&path, &data).unwrap();
    let output = qbitmap()
        .args(["check", s(&path), "--output=json"])
        .output()
        .unwrap();
    // QEMU refuses to open an image with such a bitmap, so qemu-img check cannot check it:
    // exit 1, as qemu-img's.
    assert_eq!(output.status.code(), Some(1));
    if have("check_fails_a_damaged_image", &["qemu-img"]) {
        let qemu = std::process::Command::new("qemu-img")
            .args(["check", s(&path)])
            .output()
            .unwrap();
        assert_eq!(qemu.status.code(), Some(1), "qemu-img check agrees");
    }
    if output.stdout.is_empty() {
        // Too broken to open: the error names the image.
        assert!(String::from_utf8_lossy(&output.stderr).contains(s(&path)));
    } else {
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["clean"], false);
        assert!(!report["errors"].as_array().unwrap().is_empty());
    }
    // check changes nothing.
    assert_eq!(fs::read(&path).unwrap(), data);
}

/// Overlapping structures are corruption, as for `qemu-img check`: a bitmap table over the L1
/// table, a data cluster shared by two bitmaps.
#[test]
fn check_reports_overlaps() {
    let (_dir, path) = image("1G");
    for name in ["a", "b"] {
        ok(&["add", s(&path), name]);
        ok(&["set", s(&path), name, "0", "10M"]);
    }
    let clean = fs::read(&path).unwrap();
    let table_of = |data: &[u8], name: &str| be64(data, directory_entry(data, name)) as usize;
    let l1 = be64(&clean, L1_TABLE_OFFSET);
    let data_a = be64(&clean, table_of(&clean, "a"));

    let mut over_l1 = clean.clone();
    let entry = directory_entry(&over_l1, "b");
    put64(&mut over_l1, entry, l1);
    let mut shared = clean.clone();
    let table_b = table_of(&shared, "b");
    put64(&mut shared, table_b, data_a);

    for (data, expected) in [
        (over_l1, "overlaps the active L1 table"),
        (shared, "data cluster of bitmap 'a'"),
    ] {
        fs::write(&path, &data).unwrap();
        let output = qbitmap()
            .args(["check", s(&path), "--output=json"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{expected}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        let errors = report["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.as_str().unwrap().contains(expected)),
            "{expected}: {errors:?}"
        );
        // Typed: a cross-link of a bitmap, with the same text.
        let findings = report["findings"].as_array().unwrap();
        assert!(
            findings.iter().any(|f| f["severity"] == "error"
                && f["kind"] == "CrossLink"
                && f["subject"]["type"] == "bitmap"
                && f["text"].as_str().unwrap().contains(expected)),
            "{expected}: {findings:?}"
        );
        let list = qbitmap().args(["list", s(&path)]).output().unwrap();
        assert!(
            !list.status.success(),
            "{expected}: list accepted the image"
        );
        assert_eq!(fs::read(&path).unwrap(), data, "check changed the image");
    }
}

// ---------------------------------------------------------------------------------------------
// bad usage

#[test]
fn bad_usage_exits_2() {
    let (_dir, path) = image("1G");
    let p = s(&path);
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["list"],
        vec!["list", p, "extra"],
        vec!["list", p, "--output=xml"],
        vec!["list", p, "--json", "--output=human"],
        vec!["dump", p],
        vec!["add", p],
        vec!["add", p, "b", "-g"],
        vec!["set", p, "b", "0"],
        vec!["set", p, "b", "zero", "1"],
        vec!["set", p, "b", "0", "12Q"],
        vec!["reset", p, "b", "-1", "1"],
        vec!["merge", p, "a"],
        vec!["create", p],
        vec!["create", p, "1X"],
        vec!["create", p, "1G", "-o", "cluster_size=3000"],
        vec!["create", p, "1G", "-o", "cluster_size=4M"],
        vec!["create", p, "1G", "-o", "preallocation=full"],
        vec!["-U", "add", p, "b"],
        vec!["-U", "set", p, "b", "0", "1"],
        vec!["--bogus", "list", p],
        vec!["demo", "--seed", "x"],
    ] {
        qbitmap()
            .args(&args)
            .assert()
            .code(2)
            .stdout("")
            .stderr(contains("error").or(contains("Usage")));
    }
    // Nothing happened to the image.
    assert_eq!(list_json(&path)["bitmaps"], json!([]));
}

#[test]
fn help_and_version_exit_0() {
    qbitmap().arg("--help").assert().success().stdout(
        contains("Usage: qbitmap")
            .and(contains("import"))
            .and(contains("demo")),
    );
    qbitmap()
        .args(["help", "dump"])
        .assert()
        .success()
        .stdout(contains("--force"));
    qbitmap()
        .arg("--version")
        .assert()
        .success()
        .stdout(contains("qbitmap"));
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    let (_dir, path) = image("1T");
    ok(&["add", s(&path), "b"]);
    // Every other granule dirty over 64 MiB: plenty of lines.
    let extents: Vec<Value> = (0..512u64)
        .map(|i| json!({"offset": i * 128 * KIB, "length": 64 * KIB}))
        .collect();
    qbitmap()
        .args(["import", s(&path), "b"])
        .write_stdin(Value::from(extents).to_string())
        .assert()
        .success();
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin!("qbitmap"))
        .args(["dump", s(&path), "b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");
}

// ---------------------------------------------------------------------------------------------
// demo

#[test]
fn demo_runs_and_passes() {
    let dir = TempDir::new().unwrap();
    let out = qbitmap()
        .args(["demo", s(dir.path())])
        .assert()
        .success()
        .stderr("")
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    for expected in [
        "Bitmaps:",
        "demo-first-half",
        "First extents of 'demo'",
        "Totals:",
        "read back equal to what was tracked",
        "ops/s",
        "MB/s",
        "PASS",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    // The image is kept, and the other commands read it.
    let image = dir.path().join("demo.qcow2");
    let list = list_json(&image);
    assert_eq!(list["virtual-size"], 1u64 << 40);
    assert_eq!(bitmap(&list, "demo")["flags"], json!(["auto"]));
    assert_eq!(bitmap(&list, "demo-first-half")["flags"], json!([]));
    assert_eq!(bitmap(&list, "demo")["granularity"], 65536);
    ok(&["check", s(&image)]);
}

#[test]
fn demo_is_reproducible() {
    let dirs = [TempDir::new().unwrap(), TempDir::new().unwrap()];
    let mut dumps = Vec::new();
    for (dir, seed) in dirs.iter().zip(["7", "7"]) {
        ok(&[
            "demo",
            s(dir.path()),
            "--writes=30000",
            "--seed",
            seed,
            "--no-qemu",
        ]);
        let image = dir.path().join("demo.qcow2");
        dumps.push(ok(&["dump", s(&image), "demo", "--json"]));
    }
    assert_eq!(dumps[0], dumps[1]);
    ok(&[
        "demo",
        s(dirs[0].path()),
        "--writes=30000",
        "--seed=8",
        "--no-qemu",
    ]);
    let image = dirs[0].path().join("demo.qcow2");
    assert_ne!(ok(&["dump", s(&image), "demo", "--json"]), dumps[0]);
}

#[test]
fn demo_without_a_directory_cleans_up() {
    let tmp = TempDir::new().unwrap();
    qbitmap()
        .args(["demo", "--writes", "20000", "--no-qemu"])
        .env("TMPDIR", tmp.path())
        .assert()
        .success()
        .stdout(contains("(temporary)").and(contains("PASS")));
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Agreement with QEMU

/// `qemu-img info --output=json`'s bitmaps as sorted (name, granularity, flags).
fn qemu_img_bitmaps(path: &Path) -> Vec<(String, u64, Value)> {
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", s(path)])).unwrap();
    let mut bitmaps: Vec<_> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"].clone(),
            )
        })
        .collect();
    bitmaps.sort_by(|a, b| a.0.cmp(&b.0));
    bitmaps
}

fn qbitmap_bitmaps(path: &Path) -> Vec<(String, u64, Value)> {
    let list = list_json(path);
    let mut bitmaps: Vec<_> = list["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"].clone(),
            )
        })
        .collect();
    bitmaps.sort_by(|a, b| a.0.cmp(&b.0));
    bitmaps
}

/// A qemu-nbd serving `path` read-only with bitmap `name`, stopped when dropped.
struct NbdServer {
    child: Child,
    socket: PathBuf,
}

impl NbdServer {
    fn start(path: &Path, name: &str, dir: &Path) -> NbdServer {
        let socket = dir.join(format!("nbd-{name}.sock"));
        let child = StdCommand::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "qcow2",
                "-t",
                "-B",
                name,
                "-k",
                s(&socket),
                s(path),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = NbdServer { child, socket };
        server.wait_until_serving();
        server
    }

    /// Waits until the server greets a client. qemu-nbd creates its socket file a moment before
    /// it listens on it (a client that only waits for the file can be refused), and listens
    /// before it opens the image (a connection is then queued, not served): the NBD greeting
    /// comes from its main loop, with the image open (an auto bitmap marked in use) and SIGTERM
    /// handled. The servers are persistent (`-t`), so the probe connection costs nothing.
    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut probe) = UnixStream::connect(&self.socket) {
                let left = deadline.saturating_duration_since(Instant::now());
                probe
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let mut magic = [0u8; 8];
                if probe.read_exact(&mut magic).is_ok() {
                    assert_eq!(&magic, b"NBDMAGIC", "not an NBD server");
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu-nbd exited early: {status}");
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server with SIGTERM (a clean shutdown: QEMU stores its bitmaps), or with
    /// SIGKILL when SIGTERM has not ended it within 10 s. Returns the exit status and whether
    /// SIGTERM ended it.
    fn terminate(&mut self) -> (ExitStatus, bool) {
        run("kill", &["-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        (self.child.wait().unwrap(), false)
    }

    /// What `nbdinfo --json --map=qemu:dirty-bitmap:NAME` prints.
    fn nbdinfo_map(&self, name: &str) -> String {
        let uri = format!("nbd+unix:///?socket={}", s(&self.socket));
        run(
            "nbdinfo",
            &["--json", &format!("--map=qemu:dirty-bitmap:{name}"), &uri],
        )
    }

    /// The dirty extents nbdinfo reads through the qemu:dirty-bitmap meta context.
    fn dirty_extents(&self, name: &str) -> Vec<(u64, u64)> {
        let map = self.nbdinfo_map(name);
        let entries: Vec<Value> = serde_json::from_str(&map).unwrap();
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for entry in entries {
            if entry["type"].as_u64().unwrap() & 1 == 0 {
                continue;
            }
            let (offset, length) = (
                entry["offset"].as_u64().unwrap(),
                entry["length"].as_u64().unwrap(),
            );
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += length,
                _ => extents.push((offset, length)),
            }
        }
        extents
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io_writes(path: &Path, writes: &[(&str, &str)]) {
    let mut args = vec!["-f", "qcow2"];
    let commands: Vec<String> = writes
        .iter()
        .map(|(offset, length)| format!("write {offset} {length}"))
        .collect();
    for command in &commands {
        args.extend(["-c", command.as_str()]);
    }
    args.push(s(path));
    run("qemu-io", &args);
}

#[test]
fn agrees_with_qemu_on_an_image_qemu_made() {
    if !have(
        "agrees_with_qemu_on_an_image_qemu_made",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("qemu.qcow2");
    // An odd size: the last granule of each bitmap is partial.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&path), "100000K"],
    );
    run("qemu-img", &["bitmap", "--add", s(&path), "tracking"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "128K", s(&path), "coarse"],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "4K", s(&path), "fine"],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&path), "frozen"],
    );
    // QEMU tracks the writes in every enabled bitmap.
    qemu_io_writes(
        &path,
        &[
            ("0", "4k"),
            ("1M", "300k"),
            ("50M", "1"),
            ("99999k", "1k"),
            ("7M", "2M"),
        ],
    );
    assert_eq!(qbitmap_bitmaps(&path), qemu_img_bitmaps(&path));
    let list = list_json(&path);
    assert_eq!(list["virtual-size"], 100_000 * KIB);
    assert_eq!(bitmap(&list, "frozen")["dirty-bytes"], 0);
    assert_eq!(
        extents(&path, "tracking"),
        vec![
            (0, 64 * KIB),
            (MIB, 320 * KIB),
            (7 * MIB, 2 * MIB),
            (50 * MIB, 64 * KIB),
            (99_968 * KIB, 32 * KIB)
        ]
    );
    assert_eq!(extents(&path, "fine")[0], (0, 4 * KIB));
    ok(&["check", s(&path)]);

    if !have(
        "agrees_with_qemu_on_an_image_qemu_made (NBD)",
        &["qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    for name in ["tracking", "coarse", "fine", "frozen"] {
        let server = NbdServer::start(&path, name, dir.path());
        assert_eq!(extents(&path, name), server.dirty_extents(name), "{name}");
    }
}

#[test]
fn qemu_agrees_with_what_qbitmap_writes() {
    if !have("qemu_agrees_with_what_qbitmap_writes", &["qemu-img"]) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ours.qcow2");
    ok(&["create", s(&path), "10G", "-o", "cluster_size=128K"]);
    ok(&["add", s(&path), "a"]);
    ok(&["add", s(&path), "b", "-g", "1M", "--disabled"]);
    ok(&["add", s(&path), "c", "-g", "512"]);
    ok(&["set", s(&path), "a", "0", "1G"]);
    ok(&["set", s(&path), "a", "5G", "3"]);
    ok(&["set", s(&path), "b", "9G", "1G"]);
    ok(&["set", s(&path), "c", "1000", "5000"]);
    ok(&["reset", s(&path), "a", "64K", "128K"]);
    let extents_c: Vec<Value> = (0..2000u64)
        .map(|i| json!({"offset": 3 * GIB + i * 3 * MIB, "length": 512 * (1 + i % 7)}))
        .collect();
    qbitmap()
        .args(["import", s(&path), "d"])
        .write_stdin(Value::from(extents_c).to_string())
        .assert()
        .success();
    ok(&["add", s(&path), "gone"]);
    ok(&["remove", s(&path), "gone"]);
    ok(&["merge", s(&path), "c", "d"]);

    let check = run("qemu-img", &["check", s(&path)]);
    assert!(check.contains("No errors were found"), "{check}");
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(&path)])).unwrap();
    assert_eq!(info["virtual-size"], 10 * GIB);
    assert_eq!(info["cluster-size"], 128 * KIB);
    assert_eq!(qbitmap_bitmaps(&path), qemu_img_bitmaps(&path));

    // QEMU can use them: merge one into a new bitmap, then read it back here.
    run("qemu-img", &["bitmap", "--add", s(&path), "qemu-made"]);
    run(
        "qemu-img",
        &["bitmap", "--merge", "a", s(&path), "qemu-made"],
    );
    assert_eq!(extents(&path, "qemu-made"), extents(&path, "a"));
    run("qemu-img", &["bitmap", "--clear", s(&path), "b"]);
    assert_eq!(extents(&path, "b"), vec![]);
    run("qemu-img", &["bitmap", "--remove", s(&path), "qemu-made"]);
    assert_eq!(qbitmap_bitmaps(&path), qemu_img_bitmaps(&path));
    ok(&["check", s(&path)]);

    if !have(
        "qemu_agrees_with_what_qbitmap_writes (NBD)",
        &["qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    for name in ["a", "c", "d"] {
        let server = NbdServer::start(&path, name, dir.path());
        assert_eq!(extents(&path, name), server.dirty_extents(name), "{name}");
    }
}

#[test]
fn force_share_reads_an_image_qemu_has_open() {
    if !have("force_share_reads_an_image_qemu_has_open", &["qemu-nbd"]) {
        return;
    }
    let (dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "64K"]);
    // A writable qemu-nbd holds QEMU's write lock (and marks its auto bitmap in use).
    let socket = dir.path().join("rw.sock");
    let child = StdCommand::new("qemu-nbd")
        .args(["-f", "qcow2", "-t", "-k", s(&socket), s(&path)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = NbdServer { child, socket };
    server.wait_until_serving();
    qbitmap()
        .args(["list", s(&path)])
        .assert()
        .code(1)
        .stderr(contains(s(&path)).and(contains("lock")));
    qbitmap()
        .args(["add", s(&path), "c"])
        .assert()
        .code(1)
        .stderr(contains("lock"));
    let list = ok_json(&["-U", "list", s(&path), "--output=json"]);
    assert_eq!(bitmap(&list, "b")["flags"], json!(["in-use", "auto"]));
    assert_eq!(bitmap(&list, "b")["dirty-bytes"], Value::Null);
    // A clean shutdown (SIGTERM) lets QEMU store the bitmap as it closes the image.
    let (status, clean) = server.terminate();
    assert!(clean, "qemu-nbd ignored SIGTERM and was killed");
    assert!(status.success() || status.code().is_none(), "{status}");
    assert_eq!(bitmap(&list_json(&path), "b")["flags"], json!(["auto"]));
    assert_eq!(extents(&path, "b"), vec![(0, 64 * KIB)]);
}

/// `dump --output=nbdinfo` prints what nbdinfo prints for the bitmap exported by qemu-nbd, byte
/// for byte, on images QEMU made and wrote: every cluster size, odd disk sizes (a partial last
/// granule), clean and fully dirty bitmaps, extents past 4 GiB (nbdinfo merges the replies to
/// its requests of at most 4 GiB).
#[test]
fn dump_nbdinfo_prints_what_nbdinfo_prints() {
    if !have(
        "dump_nbdinfo_prints_what_nbdinfo_prints",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
    ) {
        return;
    }
    let dir = TempDir::new().unwrap();
    /// Cluster size, virtual size, qemu-io writes (offset, length).
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        (
            "512",
            "1000001K",
            &[("0", "1"), ("511", "2"), ("1000000k", "1k")],
        ),
        (
            "4K",
            "9999872",
            &[("4095", "4097"), ("1M", "70000"), ("9999360", "512")],
        ),
        (
            "64K",
            "6G",
            &[
                ("4G", "1M"),
                ("-z 3G", "1G"),
                ("-z 4G", "1G"),
                ("6143M", "1M"),
            ],
        ),
        ("2M", "100001K", &[("3M", "5M"), ("100000k", "1k")]),
        ("1M", "3M", &[("0", "3M")]),
    ];
    for (index, (cluster_size, size, writes)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("disk{index}.qcow2"));
        let options = format!("cluster_size={cluster_size}");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &options,
                s(&path),
                size,
            ],
        );
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", "512", s(&path), "fine"],
        );
        run("qemu-img", &["bitmap", "--add", s(&path), "default"]);
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", "1M", s(&path), "coarse"],
        );
        run("qemu-img", &["bitmap", "--add", s(&path), "clean"]);
        run("qemu-img", &["bitmap", "--disable", s(&path), "clean"]);
        qemu_io_writes(&path, writes);
        for name in ["fine", "default", "coarse", "clean"] {
            let ours = ok(&["dump", s(&path), name, "--output=nbdinfo"]);
            let sockets = dir.path().join(format!("sockets{index}"));
            fs::create_dir_all(&sockets).unwrap();
            let server = NbdServer::start(&path, name, &sockets);
            let theirs = server.nbdinfo_map(name);
            assert_eq!(ours, theirs, "{} {size} cluster_size={cluster_size}", name);
        }
    }
}

/// Retries reach the same end state: `add --exist-ok` accepts the bitmap `add` would have made
/// (and nothing else), `remove --missing-ok` a bitmap already gone.
#[test]
fn add_exist_ok_and_remove_missing_ok() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b", "-g", "128K", "--disabled"]);
    ok(&["set", s(&path), "b", "0", "1M"]);
    let before = fs::read(&path).unwrap();
    ok(&[
        "add",
        s(&path),
        "b",
        "-g",
        "128K",
        "--disabled",
        "--exist-ok",
    ]);
    assert!(
        fs::read(&path).unwrap() == before,
        "--exist-ok changed the image"
    );
    for (args, why) in [
        (
            &["-g", "64K", "--disabled"][..],
            "granularity is 128 KiB, not 64 KiB",
        ),
        (&["-g", "128K"][..], "it is disabled"),
    ] {
        qbitmap()
            .args(["add", s(&path), "b", "--exist-ok"])
            .args(args)
            .assert()
            .code(1)
            .stderr(contains(why));
    }
    qbitmap()
        .args(["add", s(&path), "b", "-g", "128K", "--disabled"])
        .assert()
        .code(1)
        .stderr(contains("already exists"));
    set_in_use(&path, "b", true);
    qbitmap()
        .args([
            "add",
            s(&path),
            "b",
            "-g",
            "128K",
            "--disabled",
            "--exist-ok",
        ])
        .assert()
        .code(1)
        .stderr(contains("in use"));
    ok(&["add", s(&path), "new", "--exist-ok"]);
    assert_eq!(bitmap(&list_json(&path), "new")["flags"], json!(["auto"]));

    ok(&["remove", s(&path), "b"]);
    qbitmap()
        .args(["remove", s(&path), "b"])
        .assert()
        .code(1)
        .stderr(contains("no bitmap named 'b'"));
    let before = fs::read(&path).unwrap();
    ok(&["remove", s(&path), "b", "--missing-ok"]);
    assert!(
        fs::read(&path).unwrap() == before,
        "--missing-ok changed the image"
    );
    ok(&["remove", s(&path), "new", "--missing-ok"]);
    assert_eq!(list_json(&path)["bitmaps"], json!([]));
}

/// The manual pages and completions come from the clap definition: one page per command, the
/// options of each, and no trace of the hidden `generate` command.
#[test]
fn generates_manual_pages_and_completions() {
    let dir = TempDir::new().unwrap();
    ok(&["generate", "man", s(dir.path())]);
    let mut pages: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    assert!(pages.contains(&"qbitmap.1".to_string()), "{pages:?}");
    assert!(pages.contains(&"qbitmap-remove.1".to_string()), "{pages:?}");
    assert!(!pages.iter().any(|p| p.contains("generate")), "{pages:?}");
    let dump = fs::read_to_string(dir.path().join("qbitmap-dump.1")).unwrap();
    assert!(dump.contains("nbdinfo") && dump.contains(".TH"), "{dump}");
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["generate", shell]);
        assert!(script.contains("exist-ok") && script.contains("missing-ok"));
        assert!(
            !script.contains("generate"),
            "{shell} completes the hidden command"
        );
    }
    assert!(!ok(&["--help"]).contains("generate"));
}

// ---------------------------------------------------------------------------------------------
// check -r

/// Raises the refcount of the header cluster from 1 to 2: a leak (refcount above references).
fn leak_the_header_cluster(path: &Path) {
    let mut data = fs::read(path).unwrap();
    let be64 = |data: &[u8], at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    let table = be64(&data, 48) as usize;
    let block = be64(&data, table) as usize;
    // 16-bit refcounts (qbitmap create's refcount_order 4): entry 0 is the header's.
    assert_eq!(&data[block..block + 2], &[0, 1]);
    data[block + 1] = 2;
    fs::write(path, data).unwrap();
}

#[test]
fn check_exit_codes_and_repair_of_leaks() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    ok(&["set", s(&path), "b", "0", "10M"]);
    let content = ok(&["dump", s(&path), "b", "--output=json"]);
    leak_the_header_cluster(&path);
    // Leaks only: exit 3, as qemu-img check.
    qbitmap()
        .args(["check", s(&path)])
        .assert()
        .code(3)
        .stdout(contains("1 leaked cluster at 0x0..0x10000").and(contains("-r leaks")));
    let output = qbitmap()
        .args(["check", s(&path), "--output=json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (report["leaks"].clone(), report["corruptions"].clone()),
        (json!(1), json!(0))
    );
    assert!(report.get("leaks-fixed").is_none(), "{report}");
    // -r leaks frees it, names it, and the check made after it is clean.
    let report = ok_json(&["check", "-r", "leaks", s(&path), "--output=json"]);
    assert_eq!(report["leaks-fixed"], 1, "{report}");
    assert_eq!(report["corruptions-fixed"], 0);
    assert_eq!(report["leaks"], 0);
    assert_eq!(report["clean"], true);
    let changes = report["changes"].to_string();
    assert!(changes.contains("freed 1 leaked cluster"), "{changes}");
    assert_eq!(ok(&["dump", s(&path), "b", "--output=json"]), content);
    qbitmap()
        .args(["check", "-r", "all", s(&path)])
        .assert()
        .success()
        .stdout(contains("Nothing to repair"));
    // -r writes: -U is bad usage.
    qbitmap()
        .args(["-U", "check", "-r", "leaks", s(&path)])
        .assert()
        .code(2);
}

#[test]
fn check_repair_all_removes_an_in_use_bitmap() {
    let (_dir, path) = image("1G");
    for name in ["keep", "crashed"] {
        ok(&["add", s(&path), name]);
        ok(&["set", s(&path), name, "1M", "3M"]);
    }
    let kept = ok(&["dump", s(&path), "keep", "--output=json"]);
    set_in_use(&path, "crashed", true);
    let report = ok_json(&["check", "-r", "all", s(&path), "--json"]);
    // In use is a state, not damage: a change, not a corruption fixed.
    assert_eq!(report["corruptions-fixed"], 0, "{report}");
    assert!(report["leaks-fixed"].as_u64().unwrap() > 0, "{report}");
    let changes = report["changes"].to_string();
    assert!(
        changes.contains("removed bitmap 'crashed': marked in use"),
        "{changes}"
    );
    assert_eq!(report["in-use-bitmaps"], json!([]));
    assert_eq!(report["clean"], true);
    let names: Vec<Value> = list_json(&path)["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    assert_eq!(names, [json!("keep")]);
    assert_eq!(ok(&["dump", s(&path), "keep", "--output=json"]), kept);
}

/// Damage outside the bitmaps: the repair is refused with the reason, exit 1, nothing written.
#[test]
fn check_repair_refuses_what_it_cannot_map() {
    let (_dir, path) = image("1G");
    ok(&["add", s(&path), "b"]);
    let mut data = fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(data[40..48].try_into().unwrap()) as usize;
    data[l1..l1 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    fs::write(&path, &data).unwrap();
    qbitmap()
        .args(["check", s(&path)])
        .assert()
        .code(2)
        .stdout(contains("L1 table entry 0"));
    for mode in ["leaks", "all"] {
        qbitmap()
            .args(["check", "-r", mode, s(&path)])
            .assert()
            .code(1)
            .stderr(
                contains("refusing to repair")
                    .and(contains("metadata other than the bitmaps"))
                    .and(contains("L1 table entry 0")),
            );
        assert_eq!(fs::read(&path).unwrap(), data, "-r {mode} wrote");
    }
}
