#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# `qbitmap check` against `qemu-img check` on the same image, in one run: a metadata-
# preallocated image (`qemu-img create -o preallocation=metadata`, 1 TiB by default: about
# 128 MiB of L2 tables and refcounts) made in a temporary directory, then each command run
# alternately RUNS times (default 5) without and with -r leaks / -r all, -r leaks on a copy
# with one leaked cluster, and check on a copy holding a bitmap. Prints each side's median wall time and median peak RSS (GNU time's
# %M), and the ratios.
#
#   benches/check-vs-qemu-img.sh [SIZE] [RUNS]      e.g. benches/check-vs-qemu-img.sh 1T 5
#
# Needs qemu-img, python3 and GNU time (/usr/bin/time, Debian package `time`); builds qbitmap (release)
# unless QBITMAP names a binary.
set -eu
size=${1:-1T}
runs=${2:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img is missing" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is missing (apt-get install time)" >&2; exit 1; }
if [ -z "${QBITMAP:-}" ]; then
    cargo build --release -q -p qbitmap --manifest-path "$here/Cargo.toml"
    QBITMAP=$(cargo metadata --format-version 1 --no-deps --manifest-path "$here/Cargo.toml" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/qbitmap
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
image=$dir/disk.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata "$image" "$size"
echo "image: $size preallocated ($(du -m "$image" | cut -f1) MiB of file), $runs runs each, alternating"

# One measurement: "seconds kib" of a command whose exit status may be 0 or 3.
measure() {
    /usr/bin/time -f '%e %M' -o "$dir/time" "$@" >/dev/null 2>&1 || true
    tail -n 1 "$dir/time"
}

median() {
    sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# A copy with one leaked cluster (the header's refcount raised from 1 to 2), for "-r leaks, one
# leak": each run repairs a fresh copy of it.
cp --sparse=always "$image" "$dir/leak.qcow2"
python3 - "$dir/leak.qcow2" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(48)
    table = struct.unpack(">Q", f.read(8))[0]
    f.seek(table)
    block = struct.unpack(">Q", f.read(8))[0]
    f.seek(block)
    f.write(struct.pack(">H", 2))
PY
# A copy with one bitmap, dirty over the first tenth of the disk: its clusters are checked
# against every guest data cluster too.
cp --sparse=always "$image" "$dir/bitmap.qcow2"
qemu-img bitmap --add "$dir/bitmap.qcow2" b0
"$QBITMAP" set "$dir/bitmap.qcow2" b0 0 "$(qemu-img info --output=json "$image" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"] // 10)')"
repair_copy() {
    cp --sparse=always "$dir/leak.qcow2" "$dir/work.qcow2"
    measure "$@" "$dir/work.qcow2"
}

for mode in "" leaks all one-leak bitmap; do
    : >"$dir/ours"
    : >"$dir/theirs"
    i=0
    while [ "$i" -lt "$runs" ]; do
        if [ -z "$mode" ]; then
            measure "$QBITMAP" check "$image" >>"$dir/ours"
            measure qemu-img check -q "$image" >>"$dir/theirs"
        elif [ "$mode" = bitmap ]; then
            measure "$QBITMAP" check "$dir/bitmap.qcow2" >>"$dir/ours"
            measure qemu-img check -q "$dir/bitmap.qcow2" >>"$dir/theirs"
        elif [ "$mode" = one-leak ]; then
            repair_copy "$QBITMAP" check -r leaks >>"$dir/ours"
            repair_copy qemu-img check -q -r leaks >>"$dir/theirs"
        else
            measure "$QBITMAP" check -r "$mode" "$image" >>"$dir/ours"
            measure qemu-img check -q -r "$mode" "$image" >>"$dir/theirs"
        fi
        i=$((i + 1))
    done
    ours_t=$(cut -d' ' -f1 "$dir/ours" | median)
    theirs_t=$(cut -d' ' -f1 "$dir/theirs" | median)
    ours_m=$(cut -d' ' -f2 "$dir/ours" | median)
    theirs_m=$(cut -d' ' -f2 "$dir/theirs" | median)
    case $mode in
    "") label=check ;;
    one-leak) label="-r leaks, 1 leak" ;;
    bitmap) label="check, 1 bitmap" ;;
    *) label="check -r $mode" ;;
    esac
    awk -v m="$label" -v a="$ours_t" -v b="$theirs_t" -v c="$ours_m" -v d="$theirs_m" \
        'BEGIN { printf "%-16s qbitmap %6.2f s %6.1f MiB | qemu-img %6.2f s %6.1f MiB | time %.2fx, memory %.2fx\n",
                 m, a, c / 1024, b, d / 1024, (b > 0 ? a / b : 0), (d > 0 ? c / d : 0) }'
done
