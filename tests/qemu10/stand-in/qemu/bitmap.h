/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's qemu/bitmap.h: test-hbitmap.c needs only bitops. */
#include "qemu/bitops.h"
