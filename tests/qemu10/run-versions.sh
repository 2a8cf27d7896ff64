#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# The QEMU versions the test command does not build (it builds 10.0.2, the installed
# qemu-utils' version): each built against the installed library and proven as run.sh does,
# with its own util/hbitmap.c swapped in for comparison (--compare-own). One QEMU build at a
# time; each is kept in target/qemu-VERSION-build for the next run.
#
#   tests/qemu10/run-versions.sh [--prefix DIR] [VERSION...]     default: 7.2 10.2.2
#
# --prefix: a libhbitmap already installed there by meson; else this script installs the
# checkout's into build/qemu-versions-prefix. The summary of each version is printed at the end
# and kept in target/qemu-VERSION-build/results.txt (the README's figures).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
prefix=""
if [[ ${1:-} == --prefix ]]; then prefix=$(realpath "${2:?--prefix needs a folder}"); shift 2; fi
versions=("$@")
((${#versions[@]})) || versions=(7.2 10.2.2)
for v in "${versions[@]}"; do qemu_version "$v"; done

cd "$repo"
if [[ -z $prefix ]]; then
  prefix=$repo/build/qemu-versions-prefix
  echo "--> installing libhbitmap into $prefix"
  rm -rf build/qemu-versions "$prefix"
  meson setup build/qemu-versions --buildtype=debugoptimized --prefix="$prefix" >/dev/null
  meson install -C build/qemu-versions --quiet >/dev/null
fi

status=0
for v in "${versions[@]}"; do
  printf '\n==> QEMU %s\n' "$v"
  start=$SECONDS
  if "$here/run.sh" --qemu "$v" --compare-own "$prefix" "target/qemu-$v-build"; then
    echo "QEMU $v: passed in $((SECONDS - start)) s" | tee -a "target/qemu-$v-build/results.txt"
  else
    echo "QEMU $v: FAILED (see target/qemu-$v-build)"
    status=1
  fi
done
printf '\n==> summary\n'
for v in "${versions[@]}"; do
  echo "QEMU $v:"
  sed 's/^/  /' "target/qemu-$v-build/results.txt" 2>/dev/null || echo "  no results"
done
exit $status
