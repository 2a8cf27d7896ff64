/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's block/block.h: the sector size test-hbitmap.c uses. */
#ifndef STANDIN_BLOCK_BLOCK_H
#define STANDIN_BLOCK_BLOCK_H
#define BDRV_SECTOR_BITS 9
#define BDRV_SECTOR_SIZE (1ULL << BDRV_SECTOR_BITS)
#endif
