#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Checks that include/hbitmap.h, with HBITMAP_QEMU_API defined to 10, declares exactly the
functions of current QEMU's include/qemu/hbitmap.h (7.2 to 10), with the same types.

    check_header.py QEMU_HBITMAP_H STAND_IN_DIR OUR_INCLUDE_DIR

1. The set of hbitmap_* functions each header declares is the same (no more, no less).
2. Every prototype of QEMU's header, copied verbatim, compiles after ours with -Werror: C
   rejects a redeclaration whose return or parameter types differ.
3. QEMU's macros that the header defines have the same values, and HBitmapIter has QEMU's
   layout.
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOTYPE = re.compile(r"[A-Za-z_][^{}#]*\bhbitmap_\w+\s*\([^{}]*\)", re.S)
NAME = re.compile(r"\b(hbitmap_\w+)\s*\(")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def prototypes(text):
    text = "\n".join(l for l in strip_comments(text).splitlines() if not l.lstrip().startswith("#"))
    # Drop the asm labels: they name symbols, not declarations.
    text = re.sub(r'__asm__\s*\("[^"]*"\)', "", text)
    statements = (re.split(r"[{}]", chunk)[-1].strip() for chunk in text.split(";"))
    return [" ".join(s.split()) for s in statements if PROTOTYPE.fullmatch(s)]


def declared_names(decls):
    return {NAME.search(d).group(1) for d in decls}


def run(cmd, **kw):
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def main():
    qemu_header, stand_in, ours = map(Path, sys.argv[1:4])
    qemu_decls = prototypes(qemu_header.read_text())
    prologue = '#include "qemu/bitops.h"\n#include "qemu/host-utils.h"\n#define HBITMAP_QEMU_API 10\n#include <hbitmap.h>\n'
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text(prologue)
        pre = run(["cc", "-E", "-P", "-I", str(stand_in), "-I", str(ours), str(probe)])
        if pre.returncode:
            sys.exit(f"preprocessing our header in mode 10 failed:\n{pre.stderr}")
        our_names = declared_names(prototypes(pre.stdout))
        qemu_names = declared_names(qemu_decls)
        failed = False
        if our_names != qemu_names:
            print(f"only in ours: {sorted(our_names - qemu_names)}")
            print(f"only in QEMU's: {sorted(qemu_names - our_names)}")
            failed = True

        checks = "\n".join(f"{d};" for d in qemu_decls)
        layout = """
#include <stddef.h>
_Static_assert(sizeof(HBitmapIter) == 80, "HBitmapIter size");
_Static_assert(offsetof(HBitmapIter, hb) == 0, "hb");
_Static_assert(offsetof(HBitmapIter, granularity) == 8, "granularity");
_Static_assert(offsetof(HBitmapIter, pos) == 16, "pos");
_Static_assert(offsetof(HBitmapIter, cur) == 24, "cur");
_Static_assert(sizeof(((HBitmapIter *)0)->cur) / sizeof(unsigned long) == HBITMAP_LEVELS, "levels");
_Static_assert(BITS_PER_LEVEL == 6 && HBITMAP_LOG_MAX_SIZE == 41 && HBITMAP_LEVELS == 7, "macros");
"""
        probe.write_text(prologue + "\n/* QEMU's prototypes, verbatim */\n" + checks + layout)
        out = run(["cc", "-std=gnu11", "-Wall", "-Werror", "-c", "-o", "/dev/null",
                   "-I", str(stand_in), "-I", str(ours), str(probe)])
        if out.returncode:
            print(f"QEMU's prototypes conflict with ours:\n{out.stderr}")
            failed = True
    if failed:
        sys.exit(1)
    print(f"mode 10 header: the {len(qemu_names)} functions of QEMU's header, same types, "
          f"same HBitmapIter layout and macros")


if __name__ == "__main__":
    main()
