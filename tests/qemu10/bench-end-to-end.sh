#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# QEMU 10.0.2 on libhbitmap against QEMU on its own util/hbitmap.c, end to end: builds what
# benches/qemu_end_to_end.py needs (this library installed, QEMU built against it, QEMU's own
# hbitmap.c as a stand-in library, qbitmap), then runs it. A benchmark, not a test.
#
#   tests/qemu10/bench-end-to-end.sh [--rounds N]
#
# Uses the folders .ci/test-all leaves (build/ci-prefix, target/qemu10-build), building them
# when absent; needs QEMU's build dependencies (.ci/test-all installs them) and nbdinfo.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
. "$here/versions.sh"
qemu_version "$qemu_default_version"
prefix=build/ci-prefix work=target/qemu10-build
if [[ ! -f $prefix/include/hbitmap.h ]]; then
  [[ -f build/ci/build.ninja ]] || meson setup build/ci --buildtype=debugoptimized --prefix="$PWD/$prefix" >/dev/null
  meson install -C build/ci --quiet >/dev/null
fi
tarball=$("$here/fetch-qemu-source.sh" "$qemu_default_version")
"$here/build-qemu.sh" "$tarball" "$prefix" "$work"
[[ -f $work/own-hbitmap/libhbitmap.so.1 ]] || "$here/build-own-hbitmap.sh" "$qemu_default_version" "$work/own-hbitmap"
cargo build --release --quiet --bin qbitmap
echo "QEMU $qemu_default_version: $work/$qemu_top/build; its own hbitmap.c: $work/own-hbitmap; load: $(cut -d' ' -f1-3 /proc/loadavg)"
exec python3 benches/qemu_end_to_end.py --build "$work/$qemu_top/build" --own "$work/own-hbitmap" \
  --qbitmap target/release/qbitmap "$@"
