//! Builds the original C hbitmap from `../shared/reference` when it is there (the project's
//! development and CI machines) and links it with `qemu_`-prefixed names. Elsewhere (a user's
//! clone) nothing is built and `hbitmap_oracle::AVAILABLE` is false.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(oracle)");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let reference = manifest.join("../../shared/reference");
    let script = reference.join("build.sh");
    println!("cargo::rerun-if-changed={}", script.display());
    println!("cargo::rerun-if-env-changed=HBITMAP_REFERENCE");
    let script = match env::var_os("HBITMAP_REFERENCE") {
        Some(dir) => PathBuf::from(dir).join("build.sh"),
        None => script,
    };
    if !script.exists() {
        println!(
            "cargo::warning=no reference at {}: differential tests will skip",
            script.display()
        );
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("reference");
    let status = Command::new("bash").arg(&script).arg(&out).status();
    match status {
        Ok(status) if status.success() => {}
        other => {
            println!("cargo::warning=building the reference failed ({other:?}): differential tests will skip");
            return;
        }
    }
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static=qemu_hbitmap");
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
    println!("cargo::rustc-cfg=oracle");
}
