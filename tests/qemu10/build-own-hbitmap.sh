#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds a QEMU version's own util/hbitmap.c as a stand-in for libhbitmap.so.1: the same
# exported names (those the mode-10 header binds to NAME_qemu10 included), so a QEMU built
# against libhbitmap runs QEMU's own bitmap code when this folder comes first in
# LD_LIBRARY_PATH. run.sh runs QEMU's tests both ways: a test whose result differs notices a
# difference between libhbitmap and that version's hbitmap.c.
#
#   build-own-hbitmap.sh VERSION OUTDIR       (VERSION as for fetch-qemu-source.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
[[ $# == 2 ]] || { echo "usage: build-own-hbitmap.sh VERSION OUTDIR" >&2; exit 2; }
. "$here/versions.sh"
qemu_version "$1"
mkdir -p "$2"; out=$(cd "$2" && pwd)
tarball=$("$here/fetch-qemu-source.sh" "$1")
src=$out/src
rm -rf "$src"; mkdir -p "$src"
tar -xJf "$tarball" -C "$src" --strip-components=1 \
  "$qemu_top/util/hbitmap.c" "$qemu_top/include/qemu/hbitmap.h"
inc=$out/include
rm -rf "$inc"; mkdir -p "$inc/qemu"
cp "$src/include/qemu/hbitmap.h" "$inc/qemu/"
cp "$here/stand-in/qemu/bitops.h" "$here/stand-in/qemu/host-utils.h" "$inc/qemu/"

# The names libhbitmap exports under NAME_qemu10 for current QEMU's API (its header's labels).
renames=()
for name in $(grep -oE '__asm__\("hbitmap_[a-z_0-9]+_qemu10"\)' "$repo/include/hbitmap.h" \
              | sed -E 's/__asm__\("(.*)_qemu10"\)/\1/' | sort -u); do
  renames+=("-D$name=${name}_qemu10")
done
((${#renames[@]})) || { echo "build-own-hbitmap.sh: no NAME_qemu10 labels in include/hbitmap.h" >&2; exit 1; }
${CC:-cc} -O2 -g -fPIC -shared -std=gnu11 -w -I"$inc" -I"$here/stand-in" "${renames[@]}" \
  $(pkg-config --cflags glib-2.0) "$src/util/hbitmap.c" \
  -Wl,-soname,libhbitmap.so.1 -o "$out/libhbitmap.so.1" $(pkg-config --libs glib-2.0)
echo "QEMU $1's own util/hbitmap.c as $out/libhbitmap.so.1" >&2
