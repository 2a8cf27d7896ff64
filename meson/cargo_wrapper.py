#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Builds libhbitmap with cargo for meson, and lists the files that build depends on.

  cargo_wrapper.py build --cargo CARGO --manifest-path Cargo.toml --target-dir DIR
                         --profile {dev,release} --version 1.0.0 --soversion 1
                         --depfile FILE OUTPUT...
      Runs `cargo build --lib`, then puts cargo's cdylib in the first OUTPUT's directory as
      libhbitmap.so.VERSION with the libhbitmap.so.SOVERSION and libhbitmap.so symlinks, and its
      staticlib as libhbitmap.a. Writes a ninja depfile naming every source cargo read, so that
      ninja reruns cargo when any of them changes.

  cargo_wrapper.py build-bin --cargo CARGO --manifest-path Cargo.toml --target-dir DIR
                             --profile {dev,release} --package PKG --depfile FILE OUTPUT
      Runs `cargo build -p PKG --bin NAME` (NAME: OUTPUT's file name) and copies the binary to
      OUTPUT, with a depfile as for the library.

  cargo_wrapper.py list-sources SRCDIR
      Prints, one a line, the files of SRCDIR that the library is built from (for depend_files).
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Files outside src/ that change what cargo builds.
TOP_LEVEL_INPUTS = ("Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml")


def list_sources(srcdir: Path) -> None:
    files = [srcdir / name for name in TOP_LEVEL_INPUTS if (srcdir / name).exists()]
    files += sorted((srcdir / "src").rglob("*.rs"))
    files += [srcdir / "qbitmap" / "Cargo.toml"]
    files += sorted((srcdir / "qbitmap" / "src").rglob("*.rs"))
    for path in files:
        print(path.relative_to(srcdir).as_posix())


def replace_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def install_copy(src: Path, dst: Path) -> None:
    # A fresh copy (new mtime) replaced atomically: ninja sees the outputs newer than the inputs.
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    os.replace(tmp, dst)


def escape_dep(path: str) -> str:
    return path.replace("\\", "\\\\").replace(" ", "\\ ").replace("$", "$$").replace("#", "\\#")


def write_depfile(cargo_depfile: Path, output: str, depfile: Path) -> None:
    """Rewrites cargo's Makefile-style dep-info for ninja, with meson's output as the target."""
    text = cargo_depfile.read_text()
    # "target: dep dep ..."; a dep's spaces are backslash-escaped, ': ' ends the target.
    first = text.splitlines()[0] if text else ""
    _, sep, deps = first.partition(": ")
    if not sep:
        raise SystemExit(f"cargo_wrapper: cannot read cargo's dep-info {cargo_depfile}")
    depfile.write_text(f"{escape_dep(output)}: {deps.strip()}\n")


def cargo_cwd(args: argparse.Namespace) -> Path:
    """Where cargo runs: the source tree, whose .cargo/config.toml (the code generation flags;
    in a release tarball, the vendored crates) cargo reads from its working directory upward,
    wherever meson's build directory is."""
    return Path(args.manifest_path).resolve().parent


def build(args: argparse.Namespace) -> None:
    cmd = [
        *args.cargo,
        "build",
        "--lib",
        "--manifest-path",
        args.manifest_path,
        "--target-dir",
        args.target_dir,
    ]
    if args.profile == "release":
        cmd.append("--release")
    env = dict(os.environ)
    # A meson build never rewrites the committed header in the source tree.
    env.pop("HBITMAP_UPDATE_HEADER", None)
    print("cargo_wrapper:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env, cwd=cargo_cwd(args))
    if result.returncode != 0:
        sys.exit(result.returncode)

    built = Path(args.target_dir) / ("debug" if args.profile == "dev" else "release")
    outdir = Path(args.outputs[0]).parent
    real = outdir / f"libhbitmap.so.{args.version}"
    install_copy(built / "libhbitmap.so", real)
    replace_symlink(real.name, outdir / f"libhbitmap.so.{args.soversion}")
    replace_symlink(f"libhbitmap.so.{args.soversion}", outdir / "libhbitmap.so")
    install_copy(built / "libhbitmap.a", outdir / "libhbitmap.a")
    for output in args.outputs:
        if not os.path.lexists(output):
            raise SystemExit(f"cargo_wrapper: expected output {output} was not produced")
    if args.depfile:
        write_depfile(built / "libhbitmap.d", args.outputs[0], Path(args.depfile))


def build_bin(args: argparse.Namespace) -> None:
    output = Path(args.outputs[0])
    cmd = [
        *args.cargo,
        "build",
        "--package",
        args.package,
        "--bin",
        output.name,
        "--manifest-path",
        args.manifest_path,
        "--target-dir",
        args.target_dir,
    ]
    if args.profile == "release":
        cmd.append("--release")
    env = dict(os.environ)
    env.pop("HBITMAP_UPDATE_HEADER", None)
    print("cargo_wrapper:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env, cwd=cargo_cwd(args))
    if result.returncode != 0:
        sys.exit(result.returncode)
    built = Path(args.target_dir) / ("debug" if args.profile == "dev" else "release")
    install_copy(built / output.name, output)
    if args.depfile:
        write_depfile(built / f"{output.name}.d", str(output), Path(args.depfile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list-sources")
    listing.add_argument("srcdir", type=Path)
    b = sub.add_parser("build")
    b.add_argument("--cargo", nargs="+", required=True)
    b.add_argument("--manifest-path", required=True)
    b.add_argument("--target-dir", required=True)
    b.add_argument("--profile", choices=("dev", "release"), required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--soversion", required=True)
    b.add_argument("--depfile")
    b.add_argument("outputs", nargs="+")
    t = sub.add_parser("build-bin")
    t.add_argument("--cargo", nargs="+", required=True)
    t.add_argument("--manifest-path", required=True)
    t.add_argument("--target-dir", required=True)
    t.add_argument("--profile", choices=("dev", "release"), required=True)
    t.add_argument("--package", required=True)
    t.add_argument("--depfile")
    t.add_argument("outputs", nargs=1)
    args = parser.parse_args()
    if args.command != "list-sources":
        # cargo runs in the source tree (cargo_cwd): paths given relative to here stay right.
        args.target_dir = os.path.abspath(args.target_dir)
        args.manifest_path = os.path.abspath(args.manifest_path)
    if args.command == "list-sources":
        list_sources(args.srcdir)
    elif args.command == "build-bin":
        build_bin(args)
    else:
        build(args)


if __name__ == "__main__":
    main()
