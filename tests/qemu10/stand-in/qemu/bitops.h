/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's qemu/bitops.h: the bit and byte-order helpers hbitmap uses (LP64). */
#ifndef STANDIN_QEMU_BITOPS_H
#define STANDIN_QEMU_BITOPS_H

#include <endian.h>
#include <limits.h>
#include <stdint.h>

#define BITS_PER_BYTE CHAR_BIT
#define BITS_PER_LONG (sizeof(unsigned long) * BITS_PER_BYTE)
#define BIT_WORD(nr) ((nr) / BITS_PER_LONG)
#define BIT_MASK(nr) (1UL << ((nr) % BITS_PER_LONG))
#define BITS_TO_LONGS(nr) DIV_ROUND_UP(nr, BITS_PER_BYTE * sizeof(long))

static inline int test_bit(long nr, const unsigned long *addr)
{
    return 1UL & (addr[BIT_WORD(nr)] >> (nr & (BITS_PER_LONG - 1)));
}

static inline uint32_t le32_to_cpu(uint32_t v) { return le32toh(v); }
static inline uint64_t le64_to_cpu(uint64_t v) { return le64toh(v); }
static inline uint32_t cpu_to_le32(uint32_t v) { return htole32(v); }
static inline uint64_t cpu_to_le64(uint64_t v) { return htole64(v); }
static inline void le32_to_cpus(uint32_t *p) { *p = le32toh(*p); }
static inline void le64_to_cpus(uint64_t *p) { *p = le64toh(*p); }

#endif
