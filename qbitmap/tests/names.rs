// SPDX-License-Identifier: GPL-2.0-or-later

//! Bitmap names are bytes: every command works on every name QEMU writes (TAB, newline, a
//! backslash, bytes that are not UTF-8, as `qemu-img bitmap --add` takes them) or reads (a NUL
//! byte, no byte at all: written into the directory by hand here, as no QEMU tool makes them),
//! addressed by its raw bytes or by the escaped form `list` prints; JSON output keeps every name
//! exactly. The test against QEMU's tools prints why and passes when they are absent.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use hbitmap_testkit::tools::{self, have, text};
use serde_json::Value;
use tempfile::TempDir;

const BITMAPS_EXT: u32 = 0x2385_2875;

/// The names under test and the escaped form qbitmap prints for each.
const NAMES: &[(&[u8], &str)] = &[
    (b"tab\there", "tab\\there"),
    (b"nl\nx", "nl\\nx"),
    (b"\xff\xfe\x80", "\\xff\\xfe\\x80"),
    (b"back\\slash", "back\\\\slash"),
    (b"\x1b[31mred", "\\x1b[31mred"),
    (b"a\0b", "a\\0b"),
    (b"", ""),
];

/// Names QEMU creates (the others are written by hand).
fn creatable(name: &[u8]) -> bool {
    !name.is_empty() && !name.contains(&0)
}

const QBITMAP: &str = env!("CARGO_BIN_EXE_qbitmap");

fn qbitmap(args: &[&OsStr]) -> Output {
    tools::output(QBITMAP, args)
}

/// Runs qbitmap, expecting success; returns stdout.
fn ok(args: &[&OsStr]) -> String {
    tools::run(QBITMAP, args)
}

/// Runs qbitmap, expecting exit status `code`; returns stdout and stderr.
fn fails(code: i32, args: &[&OsStr]) -> String {
    tools::run_expecting(QBITMAP, args, code)
}

fn os(text: &str) -> &OsStr {
    OsStr::new(text)
}

/// How a command line names a bitmap: the raw bytes, or `--escaped-names` and the printed form.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    Raw,
    Escaped,
}

/// The arguments of `command IMAGE NAME rest...` naming the bitmap in `form`.
fn cmd(
    form: Form,
    command: &str,
    image: &Path,
    name: &[u8],
    shown: &str,
    rest: &[&str],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if form == Form::Escaped {
        args.push("--escaped-names".into());
    }
    args.push(command.into());
    args.push(image.into());
    args.push(match form {
        Form::Raw => OsString::from_vec(name.to_vec()),
        Form::Escaped => shown.into(),
    });
    args.extend(rest.iter().map(OsString::from));
    args
}

fn refs(args: &[OsString]) -> Vec<&OsStr> {
    args.iter().map(OsString::as_os_str).collect()
}

fn decode_hex(hex: &str) -> Vec<u8> {
    assert_eq!(hex.len() % 2, 0, "{hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The name an object of qbitmap's JSON gives: "name-hex" when present, else "name".
fn json_name(object: &Value) -> Vec<u8> {
    match object.get("name-hex") {
        Some(hex) => decode_hex(hex.as_str().unwrap()),
        None => object["name"].as_str().unwrap().as_bytes().to_vec(),
    }
}

/// The bitmaps `list --output=json` gives: (name, flags, dirty bytes).
fn listed(image: &Path) -> Vec<(Vec<u8>, Vec<String>, u64)> {
    let list: Value =
        serde_json::from_str(&ok(&[os("list"), image.as_os_str(), os("--output=json")])).unwrap();
    list["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            if b.get("name-hex").is_none() {
                assert!(b["name"].is_string(), "{b}");
            } else {
                let hex = decode_hex(b["name-hex"].as_str().unwrap());
                assert!(
                    std::str::from_utf8(&hex).is_err(),
                    "name-hex only for non-UTF-8: {b}"
                );
                let shown = b["name"].as_str().unwrap();
                assert!(shown.contains("\\x"), "the escaped form in \"name\": {b}");
            }
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (json_name(b), flags, b["dirty-bytes"].as_u64().unwrap())
        })
        .collect()
}

fn listed_names(image: &Path) -> Vec<Vec<u8>> {
    listed(image).into_iter().map(|b| b.0).collect()
}

/// The dump of a bitmap through `--output=json`: its name and extents.
fn dumped(form: Form, image: &Path, name: &[u8], shown: &str) -> (Vec<u8>, Vec<(u64, u64)>) {
    let dump: Value = serde_json::from_str(&ok(&refs(&cmd(
        form,
        "dump",
        image,
        name,
        shown,
        &["--output=json"],
    ))))
    .unwrap();
    let extents = dump["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    (json_name(&dump), extents)
}

fn be16(data: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([data[at], data[at + 1]]))
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().unwrap())
}

fn be64(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

/// File offsets of the bitmaps extension's data and of the live directory entry of `name`.
fn directory_entry(data: &[u8], name: &[u8]) -> (usize, usize) {
    let mut ext = be32(data, 100) as usize;
    let ext_data = loop {
        let (kind, len) = (be32(data, ext), be32(data, ext + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == BITMAPS_EXT {
            break ext + 8;
        }
        ext += 8 + len.div_ceil(8) * 8;
    };
    let mut entry = be64(data, ext_data + 16) as usize;
    for _ in 0..be32(data, ext_data) {
        let name_size = be16(data, entry + 18);
        assert_eq!(be32(data, entry + 20), 0, "no extra data");
        if &data[entry + 24..entry + 24 + name_size] == name {
            return (ext_data, entry);
        }
        entry += (24 + name_size).div_ceil(8) * 8;
    }
    panic!("no directory entry for {}", String::from_utf8_lossy(name));
}

/// Writes what no QEMU tool writes but QEMU reads: bitmap `placeholder` (3 bytes) gets a NUL
/// as its second byte, and bitmap `last` (the directory's last entry, of 1 to 8 bytes) a
/// 0-byte name, its entry and the directory shrinking by the 8 bytes of its name field.
fn write_odd_names(path: &Path, placeholder: &[u8], last: &[u8]) {
    put_nul(path, placeholder);
    let mut data = fs::read(path).unwrap();
    let (ext, entry) = directory_entry(&data, last);
    let directory_end = be64(&data, ext + 16) + be64(&data, ext + 8);
    assert_eq!(
        entry as u64 + 32,
        directory_end,
        "the last entry, 8-byte name field"
    );
    data[entry + 18..entry + 20].fill(0);
    data[entry + 24..entry + 32].fill(0);
    let size = be64(&data, ext + 8) - 8;
    data[ext + 8..ext + 16].copy_from_slice(&size.to_be_bytes());
    fs::write(path, data).unwrap();
}

/// An image holding bitmap "other" and every name of [`NAMES`], in that order, made by
/// qbitmap (the NUL and empty names written by hand).
fn image_with_every_name(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("names.qcow2");
    ok(&[os("create"), path.as_os_str(), os("16M")]);
    ok(&[os("add"), path.as_os_str(), os("other")]);
    for &(name, _) in NAMES {
        let stored: &[u8] = match name {
            b"a\0b" => b"a-b",
            b"" => b"empty",
            _ => name,
        };
        ok(&refs(&cmd(Form::Raw, "add", &path, stored, "", &[])));
    }
    write_odd_names(&path, b"a-b", b"empty");
    path
}

/// Runs every command on every name, naming it in `form`.
fn every_command_on_every_name(form: Form) {
    let dir = TempDir::new().unwrap();
    let image = image_with_every_name(&dir);
    let img = image.as_os_str();
    let mut expected: Vec<Vec<u8>> = vec![b"other".to_vec()];
    expected.extend(NAMES.iter().map(|n| n.0.to_vec()));
    assert_eq!(listed_names(&image), expected);
    let check = ok(&[os("check"), img]);
    assert!(
        check.contains("no errors were found (8 bitmaps checked)"),
        "{check}"
    );
    let human = ok(&[os("list"), img]);
    for &(_, shown) in NAMES {
        let line = format!("\n{shown} ");
        assert!(
            human.contains(&line),
            "'{shown}' is not listed as such:\n{human}"
        );
    }
    let export = dir.path().join("export.json");
    for &(name, shown) in NAMES {
        if form == Form::Raw && name.contains(&0) {
            continue; // no argument carries a NUL byte: only the escaped form names it
        }
        let run = |command: &str, rest: &[&str]| {
            ok(&refs(&cmd(form, command, &image, name, shown, rest)))
        };
        let what = format!("{form:?} name '{shown}'");

        let header = run("dump", &[]);
        assert!(
            header.starts_with(&format!("Bitmap '{shown}' of {}:", image.display())),
            "{what}: {header}"
        );
        assert_eq!(
            dumped(form, &image, name, shown),
            (name.to_vec(), vec![]),
            "{what}"
        );
        run("set", &["64K", "128K"]);
        run("set", &["1M", "1"]);
        run("reset", &["64K", "64K"]);
        assert_eq!(
            dumped(form, &image, name, shown).1,
            [(128 << 10, 64 << 10), (1 << 20, 64 << 10)],
            "{what}"
        );

        // Export, import into a new bitmap and back.
        fs::write(&export, run("dump", &["--output=json"])).unwrap();
        let copy = [os("import"), img, os("copy"), export.as_os_str()];
        ok(&copy);
        ok(&[os("set"), img, os("copy"), os("4M"), os("64K")]);
        let copied = ok(&[os("dump"), img, os("copy"), os("--output=json")]);
        fs::write(&export, copied).unwrap();
        run("import", &[export.to_str().unwrap()]);
        assert_eq!(
            dumped(form, &image, name, shown).1,
            [
                (128 << 10, 64 << 10),
                (1 << 20, 64 << 10),
                (4 << 20, 64 << 10)
            ],
            "{what}"
        );
        ok(&[os("remove"), img, os("copy")]);

        // Merges both ways, within the image and from another.
        ok(&[os("set"), img, os("other"), os("8M"), os("64K")]);
        let mut merge = cmd(form, "merge", &image, name, shown, &[]);
        merge.insert(merge.len() - 1, "other".into()); // merge IMAGE other NAME
        ok(&refs(&merge));
        let merge_back = cmd(form, "merge", &image, name, shown, &["other"]);
        ok(&refs(&merge_back));
        let source = dir.path().join("source.qcow2");
        fs::copy(&image, &source).unwrap();
        ok(&[os("reset"), img, os("other"), os("0"), os("16M")]);
        let mut from_other = merge_back.clone();
        from_other.extend(["-b".into(), source.into_os_string()]);
        ok(&refs(&from_other));
        let (_, extents) = dumped(form, &image, name, shown);
        assert_eq!(extents.len(), 4, "{what}: {extents:?}");
        assert_eq!(extents[3], (8 << 20, 64 << 10), "{what}");
        let other = ok(&[os("dump"), img, os("other"), os("--output=json")]);
        assert!(
            other.contains("{\"offset\": 131072, \"length\": 65536}"),
            "{what}: {other}"
        );

        // Flags.
        let flags = |image: &Path| -> Vec<String> {
            let bitmaps = listed(image);
            bitmaps.into_iter().find(|b| b.0 == name).expect("listed").1
        };
        run("disable", &[]);
        assert!(flags(&image).is_empty(), "{what}");
        run("enable", &[]);
        assert_eq!(flags(&image), ["auto"], "{what}");

        run("clear", &[]);
        assert_eq!(dumped(form, &image, name, shown).1, [], "{what}");
        run("add", &["--exist-ok"]);
        let exists = fails(1, &refs(&cmd(form, "add", &image, name, shown, &[])));
        assert!(
            exists.contains(&format!("'{shown}' already exists")),
            "{what}: {exists}"
        );

        let check = ok(&[os("check"), img]);
        assert!(check.contains("no errors were found"), "{what}: {check}");

        run("remove", &[]);
        assert!(!listed_names(&image).contains(&name.to_vec()), "{what}");
        run("remove", &["--missing-ok"]);
        let missing = fails(1, &refs(&cmd(form, "dump", &image, name, shown, &[])));
        assert!(
            missing.contains(&format!("no bitmap named '{shown}'")),
            "{what}: {missing}"
        );
        let added = qbitmap(&refs(&cmd(form, "add", &image, name, shown, &[])));
        if creatable(name) {
            assert!(added.status.success(), "{what}: {}", text(&added));
            assert!(listed_names(&image).contains(&name.to_vec()), "{what}");
        } else {
            // QEMU refuses to create it too: empty, or a NUL no C string carries.
            assert_eq!(added.status.code(), Some(1), "{what}: {}", text(&added));
        }
    }
}

#[test]
fn every_command_works_on_raw_names() {
    every_command_on_every_name(Form::Raw);
}

#[test]
fn every_command_works_on_escaped_names() {
    every_command_on_every_name(Form::Escaped);
}

#[test]
fn json_output_keeps_every_name() {
    let dir = TempDir::new().unwrap();
    let image = image_with_every_name(&dir);
    let list: Value =
        serde_json::from_str(&ok(&[os("list"), image.as_os_str(), os("--output=json")])).unwrap();
    let bitmaps = list["bitmaps"].as_array().unwrap();
    // UTF-8 names are plain JSON strings; the other one adds its bytes in hexadecimal.
    assert_eq!(bitmaps[1]["name"], "tab\there");
    assert_eq!(bitmaps[2]["name"], "nl\nx");
    assert_eq!(bitmaps[3]["name"], "\\xff\\xfe\\x80");
    assert_eq!(bitmaps[3]["name-hex"], "fffe80");
    assert_eq!(bitmaps[6]["name"], "a\u{0}b");
    assert_eq!(bitmaps[7]["name"], "");
    let with_hex = bitmaps
        .iter()
        .filter(|b| b.get("name-hex").is_some())
        .count();
    assert_eq!(with_hex, 1);
    let dump = ok(&[
        os("dump"),
        image.as_os_str(),
        OsStr::from_bytes(b"\xff\xfe\x80"),
        os("--output=json"),
    ]);
    assert!(
        dump.starts_with(
            "{\n  \"name\": \"\\\\xff\\\\xfe\\\\x80\",\n  \"name-hex\": \"fffe80\",\n"
        ),
        "{dump}"
    );
}

#[test]
fn malformed_escaped_names_are_bad_usage() {
    let dir = TempDir::new().unwrap();
    let image = image_with_every_name(&dir);
    let before = fs::read(&image).unwrap();
    for bad in ["tab\\q", "end\\", "\\x4", "\\xzz"] {
        let out = fails(
            2,
            &[
                os("--escaped-names"),
                os("remove"),
                image.as_os_str(),
                os(bad),
            ],
        );
        assert!(out.contains("invalid escaped bitmap name"), "{bad}: {out}");
    }
    let out = fails(
        2,
        &[
            os("--escaped-names"),
            os("clear"),
            image.as_os_str(),
            OsStr::from_bytes(b"\xff"),
        ],
    );
    assert!(out.contains("invalid escaped bitmap name"), "{out}");
    // Without --escaped-names the same text is a name of its own, which does not exist.
    let out = fails(1, &[os("remove"), image.as_os_str(), os("tab\\there")]);
    assert!(out.contains("no bitmap named 'tab\\\\there'"), "{out}");
    assert_eq!(fs::read(&image).unwrap(), before, "nothing was written");
}

fn qemu_img(args: &[&OsStr]) -> Output {
    tools::output("qemu-img", args)
}

fn qemu_ok(args: &[&OsStr]) -> String {
    tools::run("qemu-img", args)
}

/// The bitmap names `qemu-img info` gives (QEMU's JSON replaces bytes that are not UTF-8 with
/// U+FFFD, so the comparison is with the lossy form).
fn qemu_names(image: &Path) -> Vec<String> {
    let info: Value = serde_json::from_str(&qemu_ok(&[
        os("info"),
        os("--output=json"),
        os("-U"),
        image.as_os_str(),
    ]))
    .unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|bitmaps| {
            bitmaps
                .iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn lossy(names: &[Vec<u8>]) -> Vec<String> {
    names
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// Names qemu-img writes are what qbitmap lists; names qbitmap writes are what qemu-img lists;
/// NUL and empty names read as QEMU reads them; both checks agree the image is clean.
#[test]
fn qemu_and_qbitmap_agree_on_names() {
    if !have("qemu_and_qbitmap_agree_on_names", &["qemu-img"]) {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("qemu.qcow2");
    let img = image.as_os_str();
    qemu_ok(&[
        os("create"),
        os("-q"),
        os("-f"),
        os("qcow2"),
        img,
        os("16M"),
    ]);
    let creatable: Vec<&[u8]> = NAMES.iter().map(|n| n.0).filter(|n| creatable(n)).collect();
    for &name in &creatable {
        qemu_ok(&[os("bitmap"), os("--add"), img, OsStr::from_bytes(name)]);
    }
    assert_eq!(listed_names(&image), creatable);
    // QEMU refuses to create an empty name, as qbitmap does.
    assert!(!qemu_img(&[os("bitmap"), os("--add"), img, os("")])
        .status
        .success());

    // qbitmap writes: data in every bitmap, one new name of its own, and the odd names.
    for &name in &creatable {
        ok(&[os("set"), img, OsStr::from_bytes(name), os("1M"), os("64K")]);
    }
    ok(&[os("add"), img, OsStr::from_bytes(b"\x01ctl \xc3")]);
    ok(&[os("add"), img, os("q-z")]);
    ok(&[os("add"), img, os("e")]);
    write_odd_names(&image, b"q-z", b"e");
    let ours = listed_names(&image);
    let mut expected: Vec<Vec<u8>> = creatable.iter().map(|n| n.to_vec()).collect();
    expected.extend([b"\x01ctl \xc3".to_vec(), b"q\0z".to_vec(), Vec::new()]);
    assert_eq!(ours, expected);
    // QEMU knows "q\0z" as "q".
    let mut qemu_view = lossy(&ours);
    qemu_view[ours.len() - 2] = "q".into();
    assert_eq!(qemu_names(&image), qemu_view);
    let checked = qemu_img(&[os("check"), os("-f"), os("qcow2"), img]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    ok(&[os("check"), img]);

    // QEMU's writes on names qbitmap wrote, and the data qbitmap stored, as QEMU reads them.
    qemu_ok(&[
        os("bitmap"),
        os("--clear"),
        img,
        OsStr::from_bytes(b"\x01ctl \xc3"),
    ]);
    qemu_ok(&[
        os("bitmap"),
        os("--remove"),
        img,
        OsStr::from_bytes(b"nl\nx"),
    ]);
    expected.retain(|n| n != b"nl\nx");
    // QEMU keeps a name only up to its NUL byte, and so writes "q\0z" back as "q".
    let renamed = expected.len() - 2;
    expected[renamed] = b"q".to_vec();
    assert_eq!(listed_names(&image), expected);
    for (name, _, dirty) in listed(&image) {
        let want = if creatable.contains(&name.as_slice()) {
            64 << 10
        } else {
            0
        };
        assert_eq!(dirty, want, "{}", String::from_utf8_lossy(&name));
    }
    ok(&[os("check"), img]);

    // A new name QEMU already sees (up to the NUL of "r\0s") would make QEMU refuse the image.
    ok(&[os("add"), img, os("r-s")]);
    put_nul(&image, b"r-s");
    let refused = fails(1, &[os("add"), img, os("r")]);
    assert!(
        refused.contains("QEMU reads the name of bitmap 'r\\0s'"),
        "{refused}"
    );
    // Such a pair written by hand: check says so, and qemu-img indeed refuses the image.
    ok(&[os("add"), img, os("q-y")]);
    put_nul(&image, b"q-y");
    // QEMU refuses the image, so qemu-img check cannot check it: exit 1, as qemu-img check's.
    let warned = fails(1, &[os("check"), img]);
    assert!(
        warned.contains("and so refuses to open the image"),
        "{warned}"
    );
    let qemu = qemu_img(&[os("check"), os("-f"), os("qcow2"), img]);
    assert_eq!(qemu.status.code(), Some(1), "{}", text(&qemu));
    let info = qemu_img(&[os("info"), img]);
    assert!(
        text(&info).contains("Bitmap already exists: q"),
        "{}",
        text(&info)
    );
    ok(&[os("--escaped-names"), os("remove"), img, os("q\\0y")]);
    assert_eq!(qemu_names(&image).last().map(String::as_str), Some("r"));
    let checked = qemu_img(&[os("check"), os("-f"), os("qcow2"), img]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
}

/// Makes the second of the 3 bytes of bitmap `name`'s name a NUL, as no QEMU tool writes it.
fn put_nul(path: &Path, name: &[u8]) {
    assert_eq!(name.len(), 3);
    let mut data = fs::read(path).unwrap();
    let (_, entry) = directory_entry(&data, name);
    data[entry + 25] = 0;
    fs::write(path, data).unwrap();
}
