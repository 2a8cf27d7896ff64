/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Memory footprint of an hbitmap implementation, loaded with dlopen so that two can be compared:
 *
 *   cc -O2 -o footprint benches/footprint.c -ldl
 *   ./footprint target/release/libhbitmap.so
 *   ./footprint REF/libhbitmap_seed.so
 *
 * A bitmap of 2^34 items at granularity 0 (2 GiB of last level): anonymous RSS growth after
 * creating it, after setting 1% of it in pieces of 4096 items, after reset_all, and for a fresh
 * bitmap that the dirty one is moved into through serialization in 1 MiB chunks (a migration's
 * destination).
 */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct HBitmap HBitmap;

static long rss_anon_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;

    while (f && fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "RssAnon:", 8)) {
            kib = atol(line + 8);
        }
    }
    if (f) {
        fclose(f);
    }
    return kib;
}

static void *sym(void *lib, const char *name)
{
    void *p = dlsym(lib, name);

    if (!p) {
        fprintf(stderr, "footprint: %s\n", dlerror());
        exit(2);
    }
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: footprint LIBRARY.so\n");
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "footprint: %s\n", dlerror());
        return 2;
    }
    HBitmap *(*alloc)(uint64_t, int) = sym(lib, "hbitmap_alloc");
    void (*set)(HBitmap *, uint64_t, uint64_t) = sym(lib, "hbitmap_set");
    void (*reset_all)(HBitmap *) = sym(lib, "hbitmap_reset_all");
    uint64_t (*count)(const HBitmap *) = sym(lib, "hbitmap_count");
    void (*serialize)(const HBitmap *, uint8_t *, uint64_t, uint64_t) =
        sym(lib, "hbitmap_serialize_part");
    void (*deserialize)(HBitmap *, uint8_t *, uint64_t, uint64_t, bool) =
        sym(lib, "hbitmap_deserialize_part");
    void (*finish)(HBitmap *) = sym(lib, "hbitmap_deserialize_finish");

    const uint64_t items = 1ull << 34, piece = 4096, chunk = 8ull << 20;
    /* Warm up the allocator so that its own first allocations are not counted. */
    HBitmap *warm = alloc(1000, 0);
    set(warm, 1, 1);
    uint8_t *buf = calloc(1, chunk / 8);

    long base = rss_anon_kib();
    HBitmap *hb = alloc(items, 0);
    long after_alloc = rss_anon_kib();
    uint64_t x = 88172645463325252ull;
    for (uint64_t i = 0; i < items / 100 / piece; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set(hb, (x % items) & ~(piece - 1), piece);
    }
    long after_set = rss_anon_kib();

    HBitmap *copy = alloc(items, 0);
    for (uint64_t at = 0; at < items; at += chunk) {
        serialize(hb, buf, at, chunk);
        deserialize(copy, buf, at, chunk, false);
    }
    finish(copy);
    long after_copy = rss_anon_kib();
    bool same = count(copy) == count(hb);

    reset_all(hb);
    long after_reset = rss_anon_kib();

    printf("%s (KiB of anonymous RSS)\n", argv[1]);
    printf("  after alloc:              +%ld\n", after_alloc - base);
    printf("  after setting 1%%:         +%ld\n", after_set - base);
    printf("  fresh bitmap filled:      +%ld%s\n", after_copy - after_set,
           same ? "" : " (COUNTS DIFFER)");
    printf("  after reset_all:          +%ld (the first bitmap)\n",
           after_reset - after_copy + (after_set - base));
    return same ? 0 : 1;
}
