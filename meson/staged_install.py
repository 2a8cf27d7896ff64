#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Staged-install test: `meson install --destdir` into a temporary directory, then check the
installed files and build a program from them with nothing but pkg-config, as a packager's user
would. Run by `meson test` (suite 'install'); HBITMAP_KEEP_STAGE=1 keeps the directory."""

import argparse
import filecmp
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class Failure(Exception):
    pass


def run(cmd, quiet=False, **kwargs):
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if result.returncode != 0 or not quiet:
        print(result.stdout, end="")
        print(result.stderr, end="", file=sys.stderr)
    if result.returncode != 0:
        raise Failure(f"{cmd[0]} exited with {result.returncode}")
    return result.stdout


def check(cond, message):
    if not cond:
        raise Failure(message)


def staged(stage: Path, prefix: str, subdir: str) -> Path:
    path = Path(subdir) if os.path.isabs(subdir) else Path(prefix) / subdir
    return stage / path.relative_to(path.anchor)


def check_files(args, libdir: Path, includedir: Path) -> None:
    real = libdir / f"libhbitmap.so.{args.version}"
    major = libdir / f"libhbitmap.so.{args.soversion}"
    dev = libdir / "libhbitmap.so"
    check(real.is_file() and not real.is_symlink(), f"{real} is not a regular file")
    check(major.is_symlink() and os.readlink(major) == real.name,
          f"{major} is not a symlink to {real.name}")
    check(dev.is_symlink() and os.readlink(dev) == major.name,
          f"{dev} is not a symlink to {major.name}")
    check((libdir / "libhbitmap.a").is_file(), "libhbitmap.a is not installed")
    header = includedir / "hbitmap.h"
    check(header.is_file(), f"{header} is not installed")
    check(filecmp.cmp(header, Path(args.srcdir) / "include" / "hbitmap.h", shallow=False),
          "the installed hbitmap.h differs from include/hbitmap.h")
    if shutil.which("readelf"):
        dynamic = run(["readelf", "-d", real], quiet=True)
        check(f"Library soname: [libhbitmap.so.{args.soversion}]" in dynamic,
              f"{real} does not have the SONAME libhbitmap.so.{args.soversion}")
    print("installed files: OK")


def check_tool(args, stage: Path) -> None:
    """qbitmap, its manual pages (one per command, as generated from its clap definition) and
    its completions are installed, and work from the stage."""
    exe = staged(stage, args.prefix, args.bindir) / "qbitmap"
    check(exe.is_file() and os.access(exe, os.X_OK), f"{exe} is not an installed executable")
    version = run([exe, "--version"], quiet=True).strip()
    check(version == f"qbitmap {args.version}", f"qbitmap --version says {version!r}")
    help_text = run([exe, "--help"], quiet=True)
    commands_part = help_text.split("Commands:", 1)[1].split("Options:", 1)[0]
    commands = [m.group(1) for m in re.finditer(r"^  ([a-z][a-z-]*)\b", commands_part, re.M)]
    commands = [c for c in commands if c != "help"]
    check("dump" in commands and "add" in commands, f"unexpected qbitmap --help: {help_text}")
    man1 = staged(stage, args.prefix, args.mandir) / "man1"
    expected = {"qbitmap.1"} | {f"qbitmap-{c}.1" for c in commands}
    installed = {p.name for p in man1.glob("qbitmap*.1")} if man1.is_dir() else set()
    check(installed == expected,
          f"manual pages in {man1}: {sorted(installed)}, expected {sorted(expected)}")
    for page in sorted(expected):
        check(".TH " in (man1 / page).read_text(), f"{page} has no .TH title line")
    if shutil.which("man"):
        rendered = run(["man", "-l", man1 / "qbitmap-dump.1"], quiet=True,
                       env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"})
        check("nbdinfo" in rendered, "qbitmap-dump(1) does not render its --output=nbdinfo text")
    datadir = staged(stage, args.prefix, args.datadir)
    bash = datadir / "bash-completion" / "completions" / "qbitmap"
    zsh = datadir / "zsh" / "site-functions" / "_qbitmap"
    fish = datadir / "fish" / "vendor_completions.d" / "qbitmap.fish"
    for path in (bash, zsh, fish):
        check(path.is_file() and "exist-ok" in path.read_text(),
              f"{path} is not installed or does not complete add --exist-ok")
        check("generate" not in path.read_text(), f"{path} offers the hidden generate command")
    completed = run(["bash", "-c", f"source {shlex.quote(str(bash))}; COMP_WORDS=(qbitmap ad); "
                     "COMP_CWORD=1; _qbitmap qbitmap ad qbitmap; echo \"${COMPREPLY[*]}\""],
                    quiet=True).split()
    check(completed == ["add"], f"bash completes 'qbitmap ad' to {completed}, not add")
    for shell, path in (("zsh", zsh), ("fish", fish)):
        if shutil.which(shell):
            run([shell, "-n", path], quiet=True)
    print(f"qbitmap, {len(expected)} manual pages, completions: OK")


def check_pkg_config(args, stage: Path, libdir: Path, env: dict) -> None:
    pc = libdir / "pkgconfig" / "hbitmap.pc"
    check(pc.is_file(), f"{pc} is not installed")
    text = pc.read_text()
    check(re.search(r"^Name: hbitmap$", text, re.M), "hbitmap.pc has no 'Name: hbitmap'")
    check(re.search(r"^Libs: .*-lhbitmap\b", text, re.M), "hbitmap.pc Libs lack -lhbitmap")
    check(re.search(r"^license=GPL-2\.0-or-later$", text, re.M),
          "hbitmap.pc does not give the license (license=GPL-2.0-or-later)")
    version = run([args.pkg_config, "--modversion", "hbitmap"], env=env).strip()
    check(version == args.version, f"pkg-config says version {version}, not {args.version}")


def build_and_run(args, name, flags, libdir, shared: bool, tmp: Path, exe=None) -> None:
    if exe is None:
        exe = tmp / name
        run([*args.cc, args.consumer, "-o", exe, *flags])
    needed = run(["readelf", "-d", exe], quiet=True) if shutil.which("readelf") else None
    if needed is not None:
        links_shared = f"[libhbitmap.so.{args.soversion}]" in needed
        check(links_shared == shared,
              f"{name}: {'no' if shared else 'a'} DT_NEEDED libhbitmap.so.{args.soversion}")
    run_env = dict(os.environ)
    run_env.pop("LD_LIBRARY_PATH", None)
    if shared:
        run_env["LD_LIBRARY_PATH"] = str(libdir)
    out = run([exe], env=run_env)
    check("install-consumer: OK" in out, f"{name} did not report OK")
    if shared:
        provider = re.search(r"hbitmap_alloc from (\S+)", out)
        check(provider and Path(provider.group(1)).resolve().parent == libdir.resolve(),
              f"{name} did not run the staged library")
    print(f"{name}: OK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--meson", required=True)
    parser.add_argument("--pkg-config", required=True)
    parser.add_argument("--builddir", required=True)
    parser.add_argument("--srcdir", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--libdir", required=True)
    parser.add_argument("--includedir", required=True)
    parser.add_argument("--bindir", required=True)
    parser.add_argument("--mandir", required=True)
    parser.add_argument("--datadir", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--soversion", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--cc", nargs="+", required=True)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hbitmap-stage-"))
    stage = tmp / "stage"
    try:
        run([args.meson, "install", "-C", args.builddir, "--no-rebuild", "--quiet",
             "--destdir", stage])
        libdir = staged(stage, args.prefix, args.libdir)
        includedir = staged(stage, args.prefix, args.includedir)
        check_files(args, libdir, includedir)
        check_tool(args, stage)

        # Only the staged .pc, its paths moved into the stage.
        env = dict(os.environ)
        env["PKG_CONFIG_LIBDIR"] = str(libdir / "pkgconfig")
        env.pop("PKG_CONFIG_PATH", None)
        env["PKG_CONFIG_SYSROOT_DIR"] = str(stage)
        check_pkg_config(args, stage, libdir, env)

        shared_flags = shlex.split(run([args.pkg_config, "--cflags", "--libs", "hbitmap"],
                                       env=env))
        build_and_run(args, "consumer-shared", shared_flags, libdir, True, tmp)

        # Static: the archive by name, the rest from Libs.private, no libhbitmap.so at run time.
        static_flags = shlex.split(run([args.pkg_config, "--static", "--cflags", "--libs",
                                        "hbitmap"], env=env))
        static_flags = ["-l:libhbitmap.a" if f == "-lhbitmap" else f for f in static_flags]
        build_and_run(args, "consumer-static", static_flags, libdir, False, tmp)

        # A meson project: dependency('hbitmap') through the same hbitmap.pc.
        project = tmp / "meson-consumer"
        project.mkdir()
        shutil.copy(args.consumer, project / "consumer.c")
        (project / "meson.build").write_text(
            "project('consumer', 'c')\n"
            "executable('consumer', 'consumer.c',\n"
            "  dependencies: dependency('hbitmap', version: '"
            + args.version + "'))\n")
        meson_env = dict(env)
        meson_env["CC"] = shlex.join(args.cc)
        run([args.meson, "setup", tmp / "meson-build", project], quiet=True, env=meson_env)
        run([args.meson, "compile", "-C", tmp / "meson-build"], quiet=True, env=meson_env)
        build_and_run(args, "meson-consumer", None, libdir, True, tmp,
                      exe=tmp / "meson-build" / "consumer")
    except Failure as failure:
        print(f"staged_install: FAILED: {failure} (HBITMAP_KEEP_STAGE=1 keeps {tmp})",
              file=sys.stderr)
        return 1
    finally:
        if os.environ.get("HBITMAP_KEEP_STAGE"):
            print(f"stage kept in {stage}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("staged install: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
