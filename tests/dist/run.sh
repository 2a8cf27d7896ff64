#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# The release tarball, as a distribution builds it: `meson dist` packs the committed tree with
# the crates vendored (meson/dist_vendor.py); the tarball is unpacked elsewhere, checked (license
# text, SPDX lines, vendored crates) and built out of tree with no network at all (its own
# network namespace when run as root, CARGO_NET_OFFLINE=true and an empty CARGO_HOME in any
# case), and its meson tests (the C tests, header, install) run against that build.
#
#   tests/dist/run.sh [WORKDIR]          default WORKDIR: build/dist-check (emptied first)
#
# meson dist packs HEAD: commit first.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${1:-$repo/build/dist-check}
rm -rf "$work"; mkdir -p "$work"; work=$(cd "$work" && pwd)
step() { printf '\n--> %s\n' "$*"; }
fail() { echo "dist: $*" >&2; exit 1; }

step "meson dist (vendored crates)"
meson setup "$work/setup" "$repo" >"$work/setup.log" 2>&1 || { tail -n 30 "$work/setup.log" >&2; exit 1; }
meson dist -C "$work/setup" --no-tests --formats xztar --allow-dirty >"$work/dist.log" 2>&1 \
  || { tail -n 30 "$work/dist.log" >&2; exit 1; }
grep 'dist_vendor:' "$work/dist.log" || true
tarball=$(find "$work/setup/meson-dist" -name 'hbitmap-*.tar.xz' -print -quit)
[[ -n $tarball ]] || fail "meson dist made no tarball"
echo "$(basename "$tarball"): $(du -h "$tarball" | cut -f1)"

step "its contents"
tar -xJf "$tarball" -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'hbitmap-*' -print -quit)
cmp -s "$src/COPYING" /usr/share/common-licenses/GPL-2 && echo "COPYING: the GPL-2.0 text" \
  || { [[ -s $src/COPYING ]] && grep -q 'GNU GENERAL PUBLIC LICENSE' "$src/COPYING" \
       && grep -q 'Version 2, June 1991' "$src/COPYING"; } || fail "COPYING is not the GPL-2.0 text"
grep -q '^replace-with = "vendored-sources"' "$src/.cargo/config.toml" \
  || fail ".cargo/config.toml does not take the crates from vendor/"
for crate in $(awk '/^name = / {gsub(/"/, "", $3); n = $3} /^source = "registry/ {print n}' "$src/Cargo.lock" | sort -u); do
  compgen -G "$src/vendor/$crate*" >/dev/null || fail "crate $crate of Cargo.lock is not in vendor/"
done
echo "vendor/: $(ls "$src/vendor" | wc -l) crates, every registry crate of Cargo.lock"
[[ ! -e $src/target && ! -e $src/build && ! -e $src/.git ]] || fail "build output or .git in the tarball"
python3 "$src/contrib/spdx.py" --check "$src"

step "offline, out-of-tree build and meson tests from the tarball"
offline=(env CARGO_NET_OFFLINE=true CARGO_HOME="$work/empty-cargo-home"
         RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" HBITMAP_REFERENCE=/nonexistent)
mkdir -p "$work/empty-cargo-home"
if [[ $(id -u) == 0 ]] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  offline=(unshare -n "${offline[@]}")
  echo "no network: a network namespace of its own, CARGO_NET_OFFLINE=true, empty CARGO_HOME"
else
  echo "no network: CARGO_NET_OFFLINE=true, empty CARGO_HOME"
fi
"${offline[@]}" meson setup "$work/build" "$src" --buildtype=debugoptimized >"$work/build-setup.log" 2>&1 \
  || { tail -n 30 "$work/build-setup.log" >&2; exit 1; }
"${offline[@]}" meson compile -C "$work/build" >"$work/compile.log" 2>&1 \
  || { tail -n 40 "$work/compile.log" >&2; exit 1; }
"${offline[@]}" meson test -C "$work/build" --print-errorlogs >"$work/test.log" 2>&1 \
  || { tail -n 60 "$work/test.log" >&2; exit 1; }
grep -E '^(Ok|Expected Fail|Fail|Unexpected Pass|Skipped|Timeout):' "$work/test.log"
! grep -qE '^(Fail|Timeout|Unexpected Pass): +[1-9]' "$work/test.log" || fail "meson tests failed"
echo "the release tarball builds offline and passes its meson tests"
