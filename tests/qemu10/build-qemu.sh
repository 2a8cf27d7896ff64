#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds QEMU (10.0.2, or another version of versions.sh) from its source tarball with
# util/hbitmap.c taken out and libhbitmap linked in its place, as a packager would
# (contrib/qemu/), plus what QEMU's dirty-bitmap iotests need.
#
#   build-qemu.sh [--qemu VERSION] TARBALL LIBHBITMAP_PREFIX WORKDIR
#
# LIBHBITMAP_PREFIX is where `meson install` put libhbitmap (its hbitmap.pc is found there).
# WORKDIR keeps the patched source and the build: a second run only relinks what changed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
version=$qemu_default_version
if [[ ${1:-} == --qemu ]]; then version=${2:?--qemu needs a version}; shift 2; fi
[[ $# == 3 ]] || { echo "usage: build-qemu.sh [--qemu VERSION] TARBALL LIBHBITMAP_PREFIX WORKDIR" >&2; exit 2; }
qemu_version "$version"
tarball=$(realpath "$1"); prefix=$(realpath "$2"); mkdir -p "$3"; work=$(realpath "$3")
src=$work/$qemu_top
build=$src/build

if [[ ! -f $src/.libhbitmap-patched ]]; then
  rm -rf "$src"
  tar -xJf "$tarball" -C "$work"
  # The packager's change: util/hbitmap.c out, dependency('hbitmap') in, QEMU's header replaced.
  patch -s -p1 -d "$src" < "$repo/contrib/qemu/$qemu_patch"
  cp "$repo/contrib/qemu/hbitmap.h" "$src/include/qemu/hbitmap.h"
  rm "$src/util/hbitmap.c"
  # What this build environment needs, not the packager's change: the Debian (+ds) tarball has
  # no edk2 firmware to unpack, and the iotests need only a small PC with virtio disks,
  sed -i "s/find_program('bzip2', required: get_option('install_blobs'))/find_program('no-edk2-blobs-in-this-tarball', required: false)/" "$src/meson.build"
  # and the floppy drive some block-layer iotests attach (118, 172, 186), and what the version
  # needs besides (versions.sh).
  printf '%s\n' CONFIG_I440FX=y CONFIG_VIRTIO_PCI=y CONFIG_VIRTIO_BLK=y CONFIG_VIRTIO_SCSI=y \
    CONFIG_FDC_ISA=y "${qemu_devices[@]}" > "$src/configs/devices/x86_64-softmmu/libhbitmap-iotests.mak"
  touch "$src/.libhbitmap-patched"
fi

pc=$(find "$prefix" -name hbitmap.pc -print -quit)
[[ -n $pc ]] || { echo "build-qemu.sh: no hbitmap.pc under $prefix" >&2; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
libdir=$(pkg-config --variable=libdir hbitmap)

if [[ ! -f $build/build.ninja ]]; then
  mkdir -p "$build"
  (cd "$build" && ../configure --target-list=x86_64-softmmu --disable-tcg --enable-tools \
      --enable-zstd --enable-fdt=system --disable-docs --disable-werror --disable-guest-agent \
      "${qemu_configure[@]}" ${qemu_meson:+--meson="$qemu_meson"} \
      --disable-install-blobs --firmwarepath=/usr/share/seabios \
      --without-default-devices --with-devices-x86_64=libhbitmap-iotests \
      --extra-ldflags="-Wl,-rpath,$libdir" >"$work/configure.log" 2>&1) \
    || { tail -n 40 "$work/configure.log" >&2; exit 1; }
fi

ninja -C "$build" qemu-system-x86_64 qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon \
  tests/unit/test-hbitmap >"$work/ninja.log" 2>&1 || { tail -n 40 "$work/ninja.log" >&2; exit 1; }
# The pc machine loads kvmvapic.bin even under -accel qtest; configure set up its make build.
make -C "$build/pc-bios/optionrom" >"$work/optionrom.log" 2>&1 \
  || { tail -n 20 "$work/optionrom.log" >&2; exit 1; }

# Binaries run from the build tree look for firmware under qemu-bundle/ (relocated paths).
bundle=$build/qemu-bundle
mkdir -p "$bundle/usr/share" "$bundle/usr/local/share/qemu"
ln -sfn /usr/share/seabios "$bundle/usr/share/seabios"
ln -sf "$build"/pc-bios/optionrom/*.bin "$bundle/usr/local/share/qemu/"
echo "QEMU $version built against libhbitmap ($libdir) in $build"
