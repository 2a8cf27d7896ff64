/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Replaces QEMU's include/qemu/hbitmap.h: the hierarchical bitmap is libhbitmap's, in
 * current QEMU's API (HBITMAP_QEMU_API 10). See contrib/qemu/README.md.
 *
 * This work is licensed under the terms of the GNU GPL, version 2 or later.
 */
#ifndef QEMU_HBITMAP_H
#define QEMU_HBITMAP_H

#include "bitops.h"
#include "host-utils.h"

#define HBITMAP_QEMU_API 10
#include <hbitmap.h>

#endif
