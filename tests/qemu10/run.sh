#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Current QEMU's hbitmap API, proven on QEMU itself (10.0.2 by default; 7.2 and 10.2.2 with
# --qemu, see versions.sh), all from Debian's qemu source tarball, fetched by
# fetch-qemu-source.sh and kept (nothing of QEMU's is in this repository):
#   1. include/hbitmap.h in mode 10 declares exactly that QEMU's functions, with its types;
#   2. QEMU's own tests/unit/test-hbitmap.c, unmodified, passes against the shared and the
#      static library;
#   3. QEMU built with the packager's change (contrib/qemu/) runs libhbitmap's code: no
#      hbitmap_* function of its own is left in its binaries;
#   4. QEMU's test-hbitmap from that build, and all of QEMU's block layer with its binaries:
#      the qcow2 auto iotests group and the block-job, NBD and bitmap tests outside it, each
#      that fails compared with QEMU's own util/hbitmap.c swapped in (block-layer.sh);
#   5. (10.0.2) this project's qcow2 interoperability tests against those binaries;
#   6. (--compare-own) every one of those iotests on QEMU's own hbitmap.c too, and its
#      test-hbitmap: the tests whose result differs notice a difference between libhbitmap
#      and that version.
#
#   run.sh [--qemu VERSION] [--compare-own] LIBHBITMAP_PREFIX WORKDIR
#
# LIBHBITMAP_PREFIX: where `meson install` put this library. WORKDIR: the QEMU build, kept
# between runs; WORKDIR/results.txt gets the summary. Needs nothing outside this repository but
# Debian's archive (or QEMU_TARBALL, see fetch-qemu-source.sh) and QEMU's build dependencies
# (.ci/test-all installs them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
version=$qemu_default_version compare_own=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --qemu) version=${2:?--qemu needs a version}; shift 2 ;;
    --compare-own) compare_own=1; shift ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# == 2 ]] || { echo "usage: run.sh [--qemu VERSION] [--compare-own] LIBHBITMAP_PREFIX WORKDIR" >&2; exit 2; }
qemu_version "$version"
prefix=$(realpath "$1"); mkdir -p "$2"; work=$(realpath "$2")
step() { printf '\n--> %s\n' "$*"; }
results=$work/results.txt
: >"$results"
result() { echo "$*" | tee -a "$results"; }

step "QEMU $version's source: Debian's qemu source tarball ($qemu_what)"
tarball=$("$here/fetch-qemu-source.sh" "$version")
echo "$tarball (sha256 checked)"
# QEMU's header and unit test, untouched, for the steps that need no QEMU build.
upstream=$work/upstream
rm -rf "$upstream"; mkdir -p "$upstream"
tar -xJf "$tarball" -C "$upstream" --strip-components=1 \
  "$qemu_top/include/qemu/hbitmap.h" "$qemu_top/tests/unit/test-hbitmap.c"
stand_in=$here/stand-in

pc=$(find "$prefix" -name hbitmap.pc -print -quit)
export PKG_CONFIG_PATH=$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
libdir=$(pkg-config --variable=libdir hbitmap)
glib=$(pkg-config --cflags --libs glib-2.0)

step "mode 10 header against QEMU $version's include/qemu/hbitmap.h"
python3 "$here/check_header.py" "$upstream/include/qemu/hbitmap.h" "$stand_in" \
  "$(pkg-config --variable=includedir hbitmap)" | tee -a "$results"

step "QEMU $version's tests/unit/test-hbitmap.c, unmodified, against libhbitmap"
shim=$work/unit-test-include
mkdir -p "$shim/qemu"
cp "$repo/contrib/qemu/hbitmap.h" "$shim/qemu/hbitmap.h"
for kind in shared static; do
  if [[ $kind == shared ]]; then
    libs=(-Wl,-rpath,"$libdir" $(pkg-config --libs hbitmap))
  else
    libs=(-Wl,-Bstatic -lhbitmap -Wl,-Bdynamic $(pkg-config --libs-only-L hbitmap)
          $(pkg-config --static --libs-only-l hbitmap | sed 's/-lhbitmap//'))
  fi
  # -I order: the shim (QEMU's header replaced as a packager does), then QEMU's stand-ins.
  cc -O1 -g -std=gnu11 -w -I"$shim" -I"$stand_in/qemu" -I"$stand_in" \
    $(pkg-config --cflags hbitmap) "$upstream/tests/unit/test-hbitmap.c" \
    -o "$work/test-hbitmap-$kind" "${libs[@]}" $glib
  out=$("$work/test-hbitmap-$kind")
  passed=$(grep -c '^ok ' <<<"$out" || true)
  if grep -q '^not ok' <<<"$out" || [[ $passed != 40 ]]; then
    echo "$out" | grep -v '^ok ' >&2
    echo "QEMU's test-hbitmap ($kind library): $passed of 40 passed" >&2
    exit 1
  fi
  result "QEMU's test-hbitmap, $kind library: 40 of 40 passed"
done

step "QEMU $version built with util/hbitmap.c replaced by libhbitmap"
"$here/build-qemu.sh" --qemu "$version" "$tarball" "$prefix" "$work"
build=$work/$qemu_top/build
bins=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon
      tests/unit/test-hbitmap)
api=$(nm -D --defined-only "$libdir/libhbitmap.so.1" | awk '$3 ~ /^hbitmap_/ {print $3}')
for bin in "${bins[@]}"; do
  # A function of the API defined in the binary itself would be QEMU's own hbitmap.c.
  own=$(nm "$build/$bin" | awk '$2 ~ /^[TtWw]$/ {print $3}' | grep -Fxf <(echo "$api") | head -n 3 || true)
  used=$(nm -D "$build/$bin" | awk '$1 == "U" && $2 ~ /^hbitmap_/' | wc -l)
  lib=$(ldd "$build/$bin" | awk '/libhbitmap/ {print $3}')
  if [[ -n $own || $used == 0 || -z $lib ]]; then
    echo "$bin: own hbitmap functions [$own], $used from libhbitmap, linked to [$lib]" >&2
    exit 1
  fi
  result "$bin: no hbitmap_* of its own, $used hbitmap_* functions from libhbitmap"
done
"$build/tests/unit/test-hbitmap" | tail -n 1
passed=$("$build/tests/unit/test-hbitmap" | grep -c '^ok ')
[[ $passed == 40 ]] || { echo "QEMU's own build of test-hbitmap: $passed of 40" >&2; exit 1; }
result "QEMU's test-hbitmap (QEMU's build): 40 of 40 passed"

step "all of QEMU's block layer: the qcow2 auto group and the block-job tests, libhbitmap against QEMU $version's own hbitmap.c"
# QEMU's own util/hbitmap.c as a stand-in libhbitmap.so.1, swapped in through LD_LIBRARY_PATH.
own=$work/own-hbitmap
[[ -f $own/libhbitmap.so.1 ]] || "$here/build-own-hbitmap.sh" "$version" "$own"
block_layer_args=()
((compare_own)) && block_layer_args=(--both)
"$here/block-layer.sh" "${block_layer_args[@]}" "$work/$qemu_top" "$own" "$work/block-layer"
cat "$work/block-layer/summary.txt" >>"$results"

if ((compare_own)); then
  step "QEMU $version's unit test and hbitmap_status with its own util/hbitmap.c swapped in"
  echo "qemu-img now runs $(LD_LIBRARY_PATH=$own ldd "$build/qemu-img" | awk '/libhbitmap/ {print $3}')"
  # The one behaviour that changed within current QEMU's API (QEMU 8.0): hbitmap_status of a
  # range that starts dirty: 7.2 says "clean" when a clean item follows within the range.
  cat >"$work/status-probe.c" <<'PROBE'
#define HBITMAP_QEMU_API 10
#include <hbitmap.h>
#include <stdio.h>
int main(void)
{
    HBitmap *hb = hbitmap_alloc(1024, 0);
    int64_t run, end;
    hbitmap_set(hb, 512, 256);
    bool a = hbitmap_status(hb, 512, 512, &run);
    hbitmap_set(hb, 768, 256);
    bool b = hbitmap_status(hb, 512, 512, &end);
    printf("hbitmap_status(512, 512): dirty [512, 768) then clean: %s, pnum %lld; "
           "dirty to the end: %s, pnum %lld\n", a ? "true" : "false", (long long)run,
           b ? "true" : "false", (long long)end);
    hbitmap_free(hb);
    return 0;
}
PROBE
  cc -o "$work/status-probe" "$work/status-probe.c" -Wl,-rpath,"$libdir" $(pkg-config --cflags --libs hbitmap)
  result "libhbitmap: $("$work/status-probe")"
  result "QEMU $version's own hbitmap.c: $(LD_LIBRARY_PATH=$own "$work/status-probe")"
  own_unit=$(LD_LIBRARY_PATH=$own "$build/tests/unit/test-hbitmap" | grep -c '^ok ' || true)
  result "with QEMU $version's own hbitmap.c: test-hbitmap $own_unit of 40 passed (libhbitmap: 40); the iotests of both: $work/block-layer/block-layer.md"
fi

if [[ $version != "$qemu_default_version" ]]; then
  echo "(this project's interoperability tests run against $qemu_default_version's build only)"
  exit 0
fi

step "this project's qcow2 interoperability tests against QEMU $version linked to libhbitmap"
tools=$work/bin
mkdir -p "$tools"
for bin in qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon; do
  ln -sf "$build/$bin" "$tools/"
done
echo "qemu-img on PATH: $(PATH="$tools:$PATH" command -v qemu-img), linked to $(ldd "$tools/qemu-img" | awk '/libhbitmap/ {print $3}')"
(cd "$repo" && PATH="$tools:$PATH" cargo test --profile release-tests --test qcow2_interop -- --nocapture 2>&1) \
  >"$work/interop.log" || { tail -n 40 "$work/interop.log" >&2; exit 1; }
grep '^test result' "$work/interop.log" | sed 's/^/interop tests: /' | tee -a "$results"
if grep -i 'skipped' "$work/interop.log"; then
  echo "the interop tests skipped cases against QEMU's build" >&2
  exit 1
fi
