/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * A program built against an installed libhbitmap with nothing but
 * `pkg-config --cflags --libs hbitmap` (meson/staged_install.py). It prints the file that
 * provided hbitmap_alloc, so the script can tell the installed library was the one run.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hbitmap.h>

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "install-consumer: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            return 1;                                                            \
        }                                                                        \
    } while (0)

int main(void)
{
    HBitmap *hb = hbitmap_alloc(1 << 20, 9);
    HBitmapIter hbi;
    Dl_info info;
    char *digest;

    CHECK(hb != NULL);
    hbitmap_set(hb, 1000, 10);         /* group 1: items 512..1023 */
    hbitmap_set(hb, 1 << 19, 1);       /* group 1024 */
    CHECK(hbitmap_count(hb) == 1024);
    hbitmap_iter_init(&hbi, hb, 0);
    CHECK(hbitmap_iter_next(&hbi, true) == 512);
    CHECK(hbitmap_iter_next(&hbi, true) == 1 << 19);
    CHECK(hbitmap_iter_next(&hbi, true) == -1);
    digest = hbitmap_sha256(hb, NULL);
    CHECK(digest != NULL && strlen(digest) == 64);
    free(digest);
    hbitmap_free(hb);

    if (dladdr((void *)hbitmap_alloc, &info) && info.dli_fname) {
        printf("hbitmap_alloc from %s\n", info.dli_fname);
    }
    printf("install-consumer: OK\n");
    return 0;
}
