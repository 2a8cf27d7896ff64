#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Fetches QEMU's upstream source tarball from Debian's `qemu` source package, checks it against
# the sha256 recorded below, keeps it for the next run and prints its path.
#
#   fetch-qemu-source.sh [VERSION]      VERSION: 10.0.2 (default), 7.2 or 10.2.2 (versions.sh)
#
# The download goes through a private apt configuration (its own sources, lists and cache under
# the cache folder): the system's apt sources are neither read nor changed, and no root is needed
# beyond what apt-get itself wants. apt checks the file against Debian's signed index; the sha256
# in versions.sh pins the very tarball the project's results were measured with.
#
# Environment: HBITMAP_QEMU_SOURCES, the cache folder (default: target/qemu-sources of this
# checkout); QEMU_TARBALL, a copy of the tarball to use instead of fetching (still checked).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
version=${1:-$qemu_default_version}
# The version's Debian suite, upstream tarball and its sha256.
qemu_version "$version" || exit 2
suite=$qemu_suite tarball=$qemu_tarball sha256=$qemu_sha256

cache=${HBITMAP_QEMU_SOURCES:-$repo/target/qemu-sources}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

verify() {
  echo "$sha256  $1" | sha256sum -c --quiet - >/dev/null 2>&1
}

if [[ -n ${QEMU_TARBALL:-} ]]; then
  verify "$QEMU_TARBALL" || { echo "fetch-qemu-source.sh: $QEMU_TARBALL is not $tarball (sha256 differs)" >&2; exit 1; }
  realpath "$QEMU_TARBALL"
  exit 0
fi
if [[ -f $cache/$tarball ]] && verify "$cache/$tarball"; then
  echo "$cache/$tarball"
  exit 0
fi

command -v apt-get >/dev/null || {
  echo "fetch-qemu-source.sh: apt-get is needed to fetch $tarball (or set QEMU_TARBALL to a copy)" >&2
  exit 1
}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || { echo "fetch-qemu-source.sh: $keyring missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

apt=$cache/apt/$suite
rm -rf "$apt/sources"
mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/archives/partial"
cat > "$apt/sources/debian-src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: $keyring
EOF
opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$apt/sources"
      -o Dir::State::Lists="$apt/lists" -o Dir::Cache::Archives="$apt/archives"
      -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null)
# apt drops privileges to _apt for downloads; the cache may not be writable for that user.
[[ $(id -u) != 0 ]] || opts+=(-o APT::Sandbox::User=root)
log=$apt/fetch.log
echo "fetch-qemu-source.sh: fetching $tarball from Debian's qemu source package ($suite)" >&2
apt-get "${opts[@]}" -q update >"$log" 2>&1 \
  || { cat "$log" >&2; echo "fetch-qemu-source.sh: apt-get update ($suite) failed" >&2; exit 1; }
# The Debian revision moves (security updates); the upstream tarball is what matters: take the
# suite's source version whose files include it.
debver=$(apt-cache "${opts[@]}" showsrc qemu 2>>"$log" | awk -v want="$tarball" '
  /^Package: /      { pkg = $2 }
  /^Version: /      { ver = $2 }
  pkg == "qemu" && $NF == want && ver != "" && !found { print ver; found = 1 }')
[[ -n $debver ]] || {
  echo "fetch-qemu-source.sh: Debian's $suite has no qemu source package with $tarball" >&2
  exit 1
}
# --download-only: no unpacking, so dpkg-dev is not needed. Only the upstream tarball is used:
# a mirror that lacks the .dsc or the Debian changes (apt-get then fails) is not an error here.
(cd "$cache" && apt-get "${opts[@]}" -q source --download-only "qemu=$debver") >>"$log" 2>&1 || true
[[ -f $cache/$tarball ]] || {
  tail -n 20 "$log" >&2
  echo "fetch-qemu-source.sh: apt-get source qemu=$debver did not download $tarball" >&2
  exit 1
}
verify "$cache/$tarball" || {
  echo "fetch-qemu-source.sh: $cache/$tarball does not have the recorded sha256 $sha256" >&2
  exit 1
}
echo "$cache/$tarball"
