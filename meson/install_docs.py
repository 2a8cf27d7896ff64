#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""meson install script: generates qbitmap's manual pages and shell completions with the built
binary's hidden `generate` command (from its clap definition) and installs them.

  install_docs.py QBITMAP MANDIR DATADIR

MANDIR and DATADIR are meson's options (relative to the prefix, or absolute). Installs
MANDIR/man1/qbitmap.1 and qbitmap-COMMAND.1, DATADIR/bash-completion/completions/qbitmap,
DATADIR/zsh/site-functions/_qbitmap and DATADIR/fish/vendor_completions.d/qbitmap.fish.
"""

import os
import subprocess
import sys
from pathlib import Path


def destination(directory: str) -> Path:
    path = Path(directory)
    if not path.is_absolute():
        return Path(os.environ["MESON_INSTALL_DESTDIR_PREFIX"]) / path
    destdir = os.environ.get("DESTDIR", "")
    return Path(destdir + str(path)) if destdir else path


def main() -> int:
    qbitmap, mandir, datadir = sys.argv[1:4]
    # meson passes the built target relative to the build directory.
    qbitmap = str(Path(os.environ.get("MESON_BUILD_ROOT", ".")) / qbitmap)
    if os.environ.get("MESON_INSTALL_DRY_RUN"):
        return 0
    man1 = destination(mandir) / "man1"
    subprocess.run([qbitmap, "generate", "man", str(man1)], check=True)
    completions = {
        "bash": Path("bash-completion") / "completions" / "qbitmap",
        "zsh": Path("zsh") / "site-functions" / "_qbitmap",
        "fish": Path("fish") / "vendor_completions.d" / "qbitmap.fish",
    }
    for shell, relative in completions.items():
        target = destination(datadir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        text = subprocess.run([qbitmap, "generate", shell], check=True, capture_output=True).stdout
        target.write_bytes(text)
    if not os.environ.get("MESON_INSTALL_QUIET"):
        print(f"Installing qbitmap's manual pages to {man1} and its completions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
