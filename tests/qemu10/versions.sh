# SPDX-License-Identifier: GPL-2.0-or-later
# The QEMU versions the drop-in is proven on, sourced by fetch-qemu-source.sh, build-qemu.sh and
# run.sh. `qemu_version VERSION` sets, or fails naming the known ones:
#   qemu_suite     the Debian suite whose qemu source package has that upstream version
#   qemu_tarball   its upstream tarball, qemu_sha256 that tarball's sha256 (pinned here)
#   qemu_top       the folder the tarball unpacks to
#   qemu_patch     the packager's change to QEMU's build files (contrib/qemu/)
#   qemu_meson     the meson QEMU's configure is given (empty: its own choice)
#   qemu_configure the configure options this version has and the others lack
#   qemu_devices   device symbols this version's minimal build needs besides build-qemu.sh's
#   qemu_what      why this version
qemu_versions="7.2 10.0.2 10.2.2"
qemu_default_version=10.0.2

qemu_version() {
  qemu_meson=""
  qemu_configure=()
  qemu_devices=()
  case $1 in
    7.2)
      qemu_what="Debian 12's QEMU (7.2+dfsg)"
      qemu_suite=bookworm
      qemu_tarball=qemu_7.2+dfsg.orig.tar.xz
      qemu_sha256=91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f
      qemu_top=qemu-7.2.0
      qemu_patch=qemu-7.2-use-libhbitmap.patch
      # Debian 12 builds its 7.2 with its own meson (1.0); 7.2 predates meson 1.5.
      [[ -x /usr/bin/meson ]] && qemu_meson=/usr/bin/meson
      ;;
    10.0.2)
      qemu_what="the installed qemu-utils' QEMU (Debian 12 backports, 10.0.2+ds)"
      qemu_suite=bookworm-backports
      qemu_tarball=qemu_10.0.2+ds.orig.tar.xz
      qemu_sha256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
      qemu_top=qemu-10.0.2
      qemu_patch=qemu-10-use-libhbitmap.patch
      qemu_configure=(--disable-rust)
      # The PCI bridge iotest 200 attaches (7.2 builds it with PCI, without a symbol).
      qemu_devices=(CONFIG_PCI_BRIDGE=y)
      ;;
    10.2.2)
      qemu_what="QEMU 10.2.2 (Debian unstable, 10.2.2+ds)"
      qemu_suite=sid
      qemu_tarball=qemu_10.2.2+ds.orig.tar.xz
      qemu_sha256=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
      qemu_top=qemu-10.2.2
      qemu_patch=qemu-10-use-libhbitmap.patch
      qemu_configure=(--disable-rust)
      # Without CXL, 10.2.2's ACPI tables call cxl_fmws_get_all_sorted, which its CXL stubs
      # lack: qemu-system-x86_64 does not link. A build with CXL has it, with what CXL needs
      # that the Kconfig does not select: its type 3 device (its mailbox code calls it) and the
      # PCIe root port its own port derives from.
      qemu_devices=(CONFIG_PCI_BRIDGE=y CONFIG_PCI_EXPRESS=y CONFIG_PCIE_PORT=y CONFIG_PXB=y
                    CONFIG_CXL=y CONFIG_CXL_MEM_DEVICE=y)
      ;;
    *)
      echo "unknown QEMU version '$1' (known: $qemu_versions)" >&2
      return 1
      ;;
  esac
}
