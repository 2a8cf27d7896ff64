/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Stand-in for QEMU's qemu/osdep.h: the little of it that util/hbitmap.c and
 * tests/unit/test-hbitmap.c use, for 64-bit Linux with GLib. Lets those two files of QEMU be
 * compiled alone, outside QEMU's build.
 */
#ifndef STANDIN_QEMU_OSDEP_H
#define STANDIN_QEMU_OSDEP_H

#include <assert.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <glib.h>

/* Included first by every QEMU source file: renames QEMU's API when building a prefixed copy. */
#ifdef STANDIN_PREFIX_HEADER
#include STANDIN_PREFIX_HEADER
#endif

typedef struct Error Error;

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
/* d is a power of two wherever QEMU's hbitmap code rounds. */
#define ROUND_UP(n, d) (((n) + (d) - 1) & -(0 ? (n) : (d)))
#define QEMU_IS_ALIGNED(n, m) (((n) % (m)) == 0)
#ifndef ARRAY_SIZE
#define ARRAY_SIZE(x) (sizeof(x) / sizeof((x)[0]))
#endif

#endif
