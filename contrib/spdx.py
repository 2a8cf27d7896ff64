#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The SPDX-License-Identifier line of every source file: checks it, adds or corrects it.

    spdx.py --check [ROOT]     list every source file whose line is missing or wrong; exit 1 if any
    spdx.py --fix [ROOT]       write the right line into them (idempotent: a second run changes nothing)
    spdx.py --self-test        the tool's own tests, in a temporary folder

ROOT defaults to this checkout. The files are git's (tracked and untracked, not ignored), or,
outside a git checkout (a release tarball), every file below ROOT but the build folders.

A file's license is that of the longest folder of LICENSES containing it; a folder that is a
cargo package must declare the same `license` in its Cargo.toml (checked). The line goes first,
after a `#!` line, in the file's own comment syntax. Generated files (GENERATED) are not
edited: their generator writes the line, and --check verifies it did. Data, documents,
vendored sources and the fuzz corpus carry no line (SKIP_DIRS, DATA).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_LICENSE = "GPL-2.0-or-later"
# Folder (relative to ROOT, '/'-separated) -> license of the files below it.
LICENSES = {
    "": DEFAULT_LICENSE,
    "atomic-hbitmap": "Apache-2.0 OR BSD-3-Clause",
}
# Written by a generator that emits the line itself (-> how to regenerate).
GENERATED = {
    "include/hbitmap.h": "cbindgen (cbindgen.toml's header): HBITMAP_UPDATE_HEADER=1 cargo build",
}
# Folders that hold no sources of this project: build output, vendored crates, fuzz data.
SKIP_DIRS = {".git", "target", "build", "vendor", "subprojects", "node_modules", "__pycache__",
             "fuzz/corpus", "fuzz/artifacts", "fuzz/regressions", "fuzz/target"}
# Not source: documents, data, lock files, patches to other projects, manifests without comments.
DATA = {".md", ".rst", ".txt", ".json", ".lock", ".sum", ".mod", ".patch", ".qcow2", ".img",
        ".raw", ".bin", ".png", ".svg", ".gitignore", ".gitattributes", ".typed"}
HEADER_LINES = 5  # where an existing line is looked for

# How a file is commented: (prefix, suffix, blank line after).
# Go and Rust: a blank line keeps the line out of the package or module documentation.
SLASH = ("// ", "", True)
BLOCK = ("/* ", " */", False)
HASH = ("# ", "", False)
BY_SUFFIX = {".rs": SLASH, ".go": SLASH, ".c": BLOCK, ".h": BLOCK, ".py": HASH, ".pyi": HASH,
             ".sh": HASH, ".toml": HASH, ".yml": HASH, ".yaml": HASH, ".cfg": HASH, ".pyx": HASH}
BY_NAME = {"meson.build": HASH, "meson_options.txt": HASH, "meson.options": HASH,
           "Makefile": HASH, "Dockerfile": HASH}

SPDX = re.compile(r"SPDX-License-Identifier:\s*(.*?)\s*(\*/)?\s*$")
GENERATED_MARK = re.compile(r"^// Code generated .* DO NOT EDIT\.$|@generated", re.M)


def license_of(rel):
    """The license of the file at rel (a '/'-separated path below ROOT)."""
    best = ""
    for folder in LICENSES:
        if folder and (rel == folder or rel.startswith(folder + "/")) and len(folder) > len(best):
            best = folder
    return LICENSES[best]


def skipped_dir(rel_dir):
    return any(rel_dir == d or rel_dir.startswith(d + "/") for d in SKIP_DIRS) or \
        any(part in SKIP_DIRS for part in rel_dir.split("/"))


def syntax_of(path, text):
    """The comment syntax of a source file, None for a file that is not source."""
    name = path.name
    if name in BY_NAME:
        return BY_NAME[name]
    suffix = path.suffix
    if suffix in DATA or name in DATA:
        return None
    if suffix in BY_SUFFIX:
        return BY_SUFFIX[suffix]
    if text.startswith("#!") and re.match(r"#![^\n]*\b(bash|sh|python3?|env)\b", text):
        return HASH
    return None


def files(root):
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], check=True, capture_output=True).stdout
        rels = [r for r in out.decode().split("\0") if r]
        # A path listed but deleted in the work tree (not yet committed) is not a file.
        rels = [r for r in rels if (root / r).is_file()]
    except (OSError, subprocess.CalledProcessError):
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = sorted(d for d in dirnames
                                 if not skipped_dir(f"{rel_dir}/{d}".lstrip("/")))
            rels += [f"{rel_dir}/{f}".lstrip("/") for f in sorted(filenames)]
    return sorted(r for r in rels if not skipped_dir(os.path.dirname(r)))


def expected_line(syntax, license):
    prefix, suffix, _ = syntax
    return f"{prefix}SPDX-License-Identifier: {license}{suffix}"


def fixed(text, syntax, license):
    """text with the right SPDX line (None when it already has it)."""
    want = expected_line(syntax, license)
    lines = text.split("\n")
    for i, line in enumerate(lines[:HEADER_LINES]):
        found = SPDX.search(line)
        if found:
            if line == want:
                return None
            lines[i] = want
            return "\n".join(lines)
    at = 1 if text.startswith("#!") else 0
    insert = [want]
    if syntax[2] and len(lines) > at and lines[at].strip():
        insert.append("")
    if not text:
        return want + "\n"
    return "\n".join(lines[:at] + insert + lines[at:])


def replace(path, text):
    """Writes text to path as a new file renamed over the old one, keeping its mode: a script
    running meanwhile (bash reads as it goes) keeps reading its old text."""
    tmp = path.with_name(f".{path.name}.spdx-tmp")
    tmp.write_text(text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)


def cargo_license(manifest):
    """The `license` of a Cargo.toml's [package], None if it has none."""
    section = None
    for line in manifest.read_text().splitlines():
        head = re.match(r"\s*\[([^\]]+)\]", line)
        if head:
            section = head.group(1).strip()
        m = re.match(r'\s*license\s*=\s*"([^"]*)"', line)
        if m and section == "package":
            return m.group(1)
    return None


def run(root, fix):
    problems, changed = [], []
    for rel in files(root):
        path = root / rel
        if path.name == "Cargo.toml":
            declared = cargo_license(path)
            want = license_of(rel)
            if declared is not None and declared != want:
                problems.append(f"{rel}: license = \"{declared}\", but spdx.py's LICENSES give its "
                                f"folder {want}")
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary data
        syntax = syntax_of(path, text)
        if rel in GENERATED:
            # Checked, never edited: the generator writes the line.
            want = license_of(rel)
            head = "\n".join(text.split("\n")[:HEADER_LINES])
            found = SPDX.search(head) or re.search(r"SPDX-License-Identifier:\s*(\S[^*\n]*?)\s*(\*/|$)", head, re.M)
            if not found or found.group(1) != want:
                problems.append(f"{rel}: generated without 'SPDX-License-Identifier: {want}'; "
                                f"fix its generator, {GENERATED[rel]}")
            continue
        if syntax is None or GENERATED_MARK.search(text[:2000]):
            continue
        new = fixed(text, syntax, license_of(rel))
        if new is None:
            continue
        if fix:
            replace(path, new)
            changed.append(rel)
        else:
            problems.append(f"{rel}: missing or wrong, want '{expected_line(syntax, license_of(rel))}'")
    return problems, changed


def self_test():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {
            "a.rs": ("//! Module doc.\nfn f() {}\n",
                     "// SPDX-License-Identifier: GPL-2.0-or-later\n\n//! Module doc.\nfn f() {}\n"),
            "b.c": ("/*\n * C.\n */\n", "/* SPDX-License-Identifier: GPL-2.0-or-later */\n/*\n * C.\n */\n"),
            "s": ("#!/bin/sh\necho\n", "#!/bin/sh\n# SPDX-License-Identifier: GPL-2.0-or-later\necho\n"),
            "x/meson.build": ("project('x')\n", "# SPDX-License-Identifier: GPL-2.0-or-later\nproject('x')\n"),
            "g.go": ("// Package g does.\npackage g\n",
                     "// SPDX-License-Identifier: GPL-2.0-or-later\n\n// Package g does.\npackage g\n"),
            "atomic-hbitmap/src/lib.rs": ("// SPDX-License-Identifier: GPL-2.0-or-later\nfn f() {}\n",
                                          "// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause\nfn f() {}\n"),
            "atomic-hbitmap/Cargo.toml": ('[package]\nlicense = "Apache-2.0 OR BSD-3-Clause"\n',
                                          '# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause\n'
                                          '[package]\nlicense = "Apache-2.0 OR BSD-3-Clause"\n'),
            "README.md": ("# r\n", "# r\n"),
            "fuzz/regressions/t/seed.py": ("x\n", "x\n"),
            "gen.go": ("// Code generated by x. DO NOT EDIT.\npackage g\n",
                       "// Code generated by x. DO NOT EDIT.\npackage g\n"),
            "include/hbitmap.h": ("/* SPDX-License-Identifier: GPL-2.0-or-later */\n", None),
        }
        for rel, (before, _) in cases.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(before)
        problems, _ = run(root, fix=False)
        assert len(problems) == 7, problems
        _, changed = run(root, fix=True)
        assert len(changed) == 7, changed
        for rel, (before, after) in cases.items():
            got = (root / rel).read_text()
            assert got == (after if after is not None else before), (rel, got)
        again, changed = run(root, fix=True)
        assert not again and not changed, (again, changed)
        (root / "include/hbitmap.h").write_text("/* nothing */\n")
        (root / "atomic-hbitmap/Cargo.toml").write_text('[package]\nlicense = "MIT"\n')
        problems, _ = run(root, fix=True)
        assert len(problems) == 2 and "generator" in problems[1] and "MIT" in problems[0], problems
    print("spdx.py self-test: passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--fix", action="store_true")
    mode.add_argument("--self-test", action="store_true")
    parser.add_argument("root", nargs="?", default=Path(__file__).resolve().parent.parent, type=Path)
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return 0
    problems, changed = run(args.root.resolve(), fix=args.fix)
    for rel in changed:
        print(f"spdx.py: wrote the SPDX line of {rel}")
    for problem in problems:
        print(f"spdx.py: {problem}", file=sys.stderr)
    if problems:
        if args.check:
            print(f"spdx.py: {len(problems)} file(s) to fix; run contrib/spdx.py --fix", file=sys.stderr)
        return 1
    if args.check:
        print("spdx.py: every source file has its SPDX-License-Identifier")
    return 0


if __name__ == "__main__":
    sys.exit(main())
