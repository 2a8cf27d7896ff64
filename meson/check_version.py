#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""One version number: meson.build's project version must be Cargo.toml's package version, and
the built library's SONAME must carry meson.build's soversion."""

import argparse
import re
import shutil
import subprocess
import sys


def cargo_version(path: str) -> str:
    try:
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)["package"]["version"]
    except ImportError:  # Python < 3.11: the [package] table's version line
        text = open(path, encoding="utf-8").read()
        package = re.search(r"^\[package\]$(.*?)(?=^\[)", text, re.S | re.M)
        found = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
        if not found:
            sys.exit(f"check_version: no [package] version in {path}")
        return found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", required=True)
    parser.add_argument("--soversion", required=True)
    parser.add_argument("--cargo-toml", required=True)
    parser.add_argument("--library", required=True)
    args = parser.parse_args()

    failures = []
    cargo = cargo_version(args.cargo_toml)
    if cargo != args.version:
        failures.append(f"meson.build says version {args.version}, Cargo.toml says {cargo}")
    if args.version.split(".")[0] != args.soversion:
        failures.append(f"soversion {args.soversion} is not the major of {args.version}")

    readelf = shutil.which("readelf")
    if readelf:
        dynamic = subprocess.run([readelf, "-d", args.library], capture_output=True, text=True,
                                 check=True).stdout
        soname = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", dynamic)
        expected = f"libhbitmap.so.{args.soversion}"
        if not soname or soname.group(1) != expected:
            got = soname.group(1) if soname else "none"
            failures.append(f"{args.library} has SONAME {got}, expected {expected} (build.rs)")
    else:
        print("readelf not found: the SONAME is not checked")

    for failure in failures:
        print("check_version:", failure, file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"version {args.version}, SONAME libhbitmap.so.{args.soversion}: consistent")


if __name__ == "__main__":
    main()
