#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""meson dist script: makes the release tarball build offline, as distributions build it.

    dist_vendor.py CARGO

Runs in the tree meson dist is packing (MESON_DIST_ROOT): `cargo vendor` copies every crate
that Cargo.lock names into vendor/, and the tree's .cargo/config.toml gets the source
replacement that makes cargo take them from there instead of crates.io. A build from the
unpacked tarball then needs no network (CARGO_NET_OFFLINE=true, an empty CARGO_HOME).
"""

import os
import subprocess
import sys
from pathlib import Path

REPLACEMENT = """
# Added by meson/dist_vendor.py to the release tarball: the crates come from vendor/
# (`cargo vendor` of Cargo.lock), never from the network.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
"""


def main() -> None:
    cargo = sys.argv[1] if len(sys.argv) > 1 else "cargo"
    root = Path(os.environ["MESON_DIST_ROOT"])
    config = root / ".cargo" / "config.toml"
    text = config.read_text() if config.exists() else ""
    if "[source.crates-io]" in text:
        sys.exit(f"dist_vendor: {config} already replaces crates.io; not vendoring twice")
    # --locked: the tarball's crates are exactly those the repository's Cargo.lock was tested with.
    subprocess.run([cargo, "vendor", "--locked", "--quiet", "--manifest-path",
                    str(root / "Cargo.toml"), str(root / "vendor")],
                   cwd=root, check=True, stdout=subprocess.DEVNULL)
    config.parent.mkdir(exist_ok=True)
    config.write_text(text + REPLACEMENT)
    crates = sum(1 for entry in (root / "vendor").iterdir() if entry.is_dir())
    print(f"dist_vendor: {crates} crates vendored into the tarball's vendor/")


if __name__ == "__main__":
    main()
