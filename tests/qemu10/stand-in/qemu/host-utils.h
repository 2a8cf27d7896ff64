/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's qemu/host-utils.h: bit counts of a 64-bit word, 64 (or 32) for none. */
#ifndef STANDIN_QEMU_HOST_UTILS_H
#define STANDIN_QEMU_HOST_UTILS_H

#include <stdint.h>

static inline int ctz32(uint32_t v) { return v ? __builtin_ctz(v) : 32; }
static inline int ctzl(unsigned long v) { return v ? __builtin_ctzl(v) : 64; }
static inline int ctol(unsigned long v) { return ctzl(~v); }
static inline int ctpopl(unsigned long v) { return __builtin_popcountl(v); }

#endif
