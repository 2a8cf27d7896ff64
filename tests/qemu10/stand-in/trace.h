/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's generated trace.h: hbitmap's trace points, compiled out. */
#ifndef STANDIN_TRACE_H
#define STANDIN_TRACE_H
#define trace_hbitmap_iter_skip_words(...) do { } while (0)
#define trace_hbitmap_set(...) do { } while (0)
#define trace_hbitmap_reset(...) do { } while (0)
#endif
