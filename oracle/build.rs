// SPDX-License-Identifier: GPL-2.0-or-later

//! Builds the C oracles of the differential tests:
//! - the original `util/hbitmap.c` (QEMU 4.0), linked with `qemu_`-prefixed names, cfg `oracle`,
//!   when `../shared/reference` is there (the project's development and CI machines);
//! - QEMU 10.0.2's `util/hbitmap.c` (current QEMU's API), linked with `qemu10_`-prefixed names,
//!   cfg `oracle_qemu10`: by `../shared/reference/build-qemu10.sh` when it is there, else by
//!   this repository's `tests/qemu10/build-oracle.sh`, which fetches Debian's qemu source
//!   tarball itself (apt-get; nothing is fetched when `CARGO_NET_OFFLINE` is `true` and the
//!   tarball is not kept under `target/qemu-sources`).
//!
//! When an oracle cannot be built, `hbitmap_oracle::AVAILABLE` or
//! `hbitmap_oracle::qemu10::AVAILABLE_QEMU10` is false, and the tests skip.
//!
//! Environment:
//! - `HBITMAP_REFERENCE`: the reference folder instead of `../shared/reference`;
//! - `HBITMAP_QEMU10_REFERENCE`: a folder where `build-qemu10.sh` already ran (it holds
//!   `libqemu10_hbitmap.a`): linked from there, so that each target folder need not fetch QEMU's
//!   tarball again. If the folder holds only the tarball, it is built from that tarball into
//!   `OUT_DIR`;
//! - `QEMU10_TARBALL`: QEMU's tarball, passed on to the build script.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU10_TARBALL: &str = "qemu_10.0.2+ds.orig.tar.xz";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(oracle)");
    println!("cargo::rustc-check-cfg=cfg(oracle_qemu10)");
    println!("cargo::rerun-if-env-changed=HBITMAP_REFERENCE");
    println!("cargo::rerun-if-env-changed=HBITMAP_QEMU10_REFERENCE");
    println!("cargo::rerun-if-env-changed=QEMU10_TARBALL");
    println!("cargo::rerun-if-env-changed=CARGO_NET_OFFLINE");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let reference = match env::var_os("HBITMAP_REFERENCE") {
        Some(dir) => PathBuf::from(dir),
        None => manifest.join("../../shared/reference"),
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    let original = build_original(&reference, &out);
    let qemu10 = build_qemu10(&reference, &manifest, &out);
    if let Err(why) = &qemu10 {
        println!(
            "cargo::warning=QEMU 10 oracle not built ({why}): its differential tests will skip"
        );
        println!("cargo::rustc-env=HBITMAP_ORACLE_QEMU10_MISSING={why}");
    }
    if original || qemu10.is_ok() {
        link_glib();
    }
}

/// The original, from `build.sh`.
fn build_original(reference: &Path, out: &Path) -> bool {
    let script = reference.join("build.sh");
    println!("cargo::rerun-if-changed={}", script.display());
    if !script.exists() {
        println!(
            "cargo::warning=no reference at {}: differential tests will skip",
            script.display()
        );
        return false;
    }
    let out = out.join("reference");
    let status = Command::new("bash").arg(&script).arg(&out).status();
    match status {
        Ok(status) if status.success() => {}
        other => {
            println!("cargo::warning=building the reference failed ({other:?}): differential tests will skip");
            return false;
        }
    }
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static=qemu_hbitmap");
    println!("cargo::rustc-cfg=oracle");
    true
}

/// QEMU 10's, from a folder already built by `build-qemu10.sh` or `build-oracle.sh`, else by
/// running one of them into `OUT_DIR`. The error says why it is missing.
fn build_qemu10(reference: &Path, manifest: &Path, out: &Path) -> Result<(), String> {
    let prebuilt = env::var_os("HBITMAP_QEMU10_REFERENCE").map(PathBuf::from);
    let dir = match prebuilt {
        Some(dir) if dir.join("libqemu10_hbitmap.a").is_file() => {
            println!(
                "cargo::rerun-if-changed={}",
                dir.join("libqemu10_hbitmap.a").display()
            );
            dir
        }
        prebuilt => {
            let shared = reference.join("build-qemu10.sh");
            println!("cargo::rerun-if-changed={}", shared.display());
            let own = manifest.join("../tests/qemu10/build-oracle.sh");
            let script = if shared.exists() { shared } else { own };
            println!("cargo::rerun-if-changed={}", script.display());
            let dir = out.join("reference-qemu10");
            let mut command = Command::new("bash");
            command.arg(&script).arg(&dir);
            // The same tarball, whichever script: the shared one reads QEMU10_TARBALL,
            // fetch-qemu-source.sh QEMU_TARBALL.
            let mut tarball = env::var_os("QEMU10_TARBALL").map(PathBuf::from);
            // A tarball kept beside an unbuilt HBITMAP_QEMU10_REFERENCE saves the download.
            let kept = prebuilt.map(|prebuilt| prebuilt.join(QEMU10_TARBALL));
            if tarball.is_none() {
                tarball = kept.filter(|tarball| tarball.is_file());
            }
            if tarball.is_none() && env::var("CARGO_NET_OFFLINE").as_deref() == Ok("true") {
                let cached = manifest.join("../target/qemu-sources").join(QEMU10_TARBALL);
                if !cached.is_file() {
                    return Err(format!(
                        "CARGO_NET_OFFLINE is true and {} is not kept",
                        cached.display()
                    ));
                }
                tarball = Some(cached);
            }
            if let Some(tarball) = tarball {
                command.env("QEMU10_TARBALL", &tarball);
                command.env("QEMU_TARBALL", &tarball);
            }
            match command.status() {
                Ok(status) if status.success() => dir,
                Ok(status) => {
                    return Err(format!(
                        "{} {} failed ({status}); set HBITMAP_QEMU10_REFERENCE to a built copy \
                         or QEMU10_TARBALL to {QEMU10_TARBALL}",
                        script.display(),
                        dir.display()
                    ))
                }
                Err(error) => return Err(format!("cannot run bash: {error}")),
            }
        }
    };
    println!("cargo::rustc-link-search=native={}", dir.display());
    println!("cargo::rustc-link-lib=static=qemu10_hbitmap");
    println!("cargo::rustc-cfg=oracle_qemu10");
    Ok(())
}

fn link_glib() {
    let glib = Command::new("pkg-config")
        .args(["--libs", "glib-2.0"])
        .output()
        .unwrap();
    for flag in String::from_utf8_lossy(&glib.stdout).split_whitespace() {
        if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo::rustc-link-lib={lib}");
        } else if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo::rustc-link-search=native={dir}");
        }
    }
}
