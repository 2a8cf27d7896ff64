/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The qcow2 edits a binding needs, through the C ABI: hbitmap_qcow2_add_ex (default
 * granularity, disabled, exist-ok), hbitmap_qcow2_set_range, hbitmap_qcow2_import,
 * hbitmap_qcow2_bitmap_dirty_bytes, hbitmap_qcow2_merge_from (another image, and the same
 * handle) and hbitmap_qcow2_dirty_extents (in batches). Prints TAP.
 */
#define _POSIX_C_SOURCE 200809L
#define HBITMAP_QCOW2_API
#include <hbitmap.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tap.h"

static int find_info(HBitmapQcow2 *image, const char *name, HBitmapQcow2BitmapInfo *info)
{
    size_t count = hbitmap_qcow2_bitmap_count(image);
    for (size_t i = 0; i < count; i++) {
        if (hbitmap_qcow2_bitmap_info(image, i, info, NULL) == 0 && strcmp(info->name, name) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* Every extent of bitmap `name`, read in batches of `batch`, into `out` (at most `cap`). */
static size_t extents_of(HBitmapQcow2 *image, const char *name, size_t batch,
                         HBitmapQcow2Extent *out, size_t cap)
{
    HBitmap *bitmap = NULL;
    size_t total = 0;
    uint64_t next = 0;
    if (hbitmap_qcow2_inspect(image, name, &bitmap, NULL) != 0) {
        return (size_t)-1;
    }
    for (;;) {
        size_t n = hbitmap_qcow2_dirty_extents(bitmap, next, out + total, batch);
        total += n;
        if (n < batch || total + batch > cap) {
            break;
        }
        next = out[total - 1].offset + out[total - 1].length;
    }
    hbitmap_free(bitmap);
    return total;
}

int main(void)
{
    char path[] = "/tmp/hbitmap-c-edit-XXXXXX";
    char other_path[] = "/tmp/hbitmap-c-edit-other-XXXXXX";
    const uint64_t size = (64 << 20) + 512; /* a partial last granule */
    HBitmapQcow2 *image = NULL;
    HBitmapQcow2 *other = NULL;
    HBitmapQcow2BitmapInfo info;
    HBitmapQcow2Extent got[64];
    char *message = NULL;
    uint64_t dirty = 0;
    size_t n;
    int fd, ret, index;

    fd = mkstemp(path);
    if (fd < 0) {
        perror("mkstemp");
        return 1;
    }
    close(fd);
    fd = mkstemp(other_path);
    if (fd < 0) {
        perror("mkstemp");
        return 1;
    }
    close(fd);

    ret = hbitmap_qcow2_create(path, size + 512, 1 << 20, &image, &message);
    ok(ret == 0, "create (1 MiB clusters)", take(&message));
    ok(hbitmap_qcow2_cluster_size(image) == 1 << 20, "cluster size", NULL);
    ret = hbitmap_qcow2_close(image, &message);
    ok(ret == 0, "close", take(&message));
    ret = hbitmap_qcow2_create(path, size, 65536, &image, &message);
    ok(ret == 0, "create again (64 KiB clusters, size not a multiple of the granule)",
       take(&message));
    ok(hbitmap_qcow2_cluster_size(image) == 65536, "cluster size 64 KiB", NULL);

    /* add_ex: default granularity, disabled, exist-ok. */
    ret = hbitmap_qcow2_add_ex(image, "a", 0, 0, &message);
    ok(ret == 0, "add_ex 'a' with the default granularity", take(&message));
    index = find_info(image, "a", &info);
    ok(index >= 0 && info.granularity == 65536 && info.auto_ && !info.in_use,
       "'a' has 64 KiB granularity, auto", NULL);
    ret = hbitmap_qcow2_add_ex(image, "a", 0, 0, &message);
    ok(ret == -EEXIST, "add_ex 'a' again without EXIST_OK: -EEXIST", take(&message));
    ret = hbitmap_qcow2_add_ex(image, "a", 65536, HBITMAP_QCOW2_ADD_EXIST_OK, &message);
    ok(ret == 0, "add_ex 'a' again with EXIST_OK: success", take(&message));
    ret = hbitmap_qcow2_add_ex(image, "a", 65536,
                               HBITMAP_QCOW2_ADD_EXIST_OK | HBITMAP_QCOW2_ADD_DISABLED, &message);
    ok(ret == -EEXIST, "EXIST_OK with another state: -EEXIST", take(&message));
    ret = hbitmap_qcow2_add_ex(image, "a", 4096, HBITMAP_QCOW2_ADD_EXIST_OK, &message);
    ok(ret == -EEXIST, "EXIST_OK with another granularity: -EEXIST", take(&message));
    ret = hbitmap_qcow2_add_ex(image, "d", 4096, HBITMAP_QCOW2_ADD_DISABLED, &message);
    ok(ret == 0, "add_ex 'd' disabled, 4 KiB", take(&message));
    ok(find_info(image, "d", &info) >= 0 && info.granularity == 4096 && !info.auto_,
       "'d' is disabled with 4 KiB granularity", NULL);
    ret = hbitmap_qcow2_add_ex(image, "e", 0, 4, &message);
    ok(ret == -EINVAL, "unknown add flags: -EINVAL", take(&message));

    /* set_range and dirty bytes. */
    ret = hbitmap_qcow2_set_range(image, "a", 100, 10, true, &message);
    ok(ret == 0, "set 100+10", take(&message));
    ret = hbitmap_qcow2_set_range(image, "a", (64 << 20), 10, true, &message);
    ok(ret == 0, "set in the partial last granule", take(&message));
    ret = hbitmap_qcow2_bitmap_dirty_bytes(image, (size_t)index, &dirty, &message);
    ok(ret == 0 && dirty == 65536 + 512, "dirty bytes: one granule plus the clipped last one",
       take(&message));
    ret = hbitmap_qcow2_set_range(image, "a", size - 10, 1024, true, &message);
    ok(ret == -EINVAL, "set past the virtual size: -EINVAL", take(&message));
    ret = hbitmap_qcow2_set_range(image, "a", 4096, 65536, false, &message);
    ok(ret == -EINVAL, "misaligned reset: -EINVAL", take(&message));
    ret = hbitmap_qcow2_set_range(image, "a", 0, 65536, false, &message);
    ok(ret == 0, "aligned reset", take(&message));
    ret = hbitmap_qcow2_set_range(image, "nope", 0, 65536, true, &message);
    ok(ret == -ENOENT, "set on a missing bitmap: -ENOENT", take(&message));
    n = extents_of(image, "a", 8, got, 64);
    ok(n == 1 && got[0].offset == 64 << 20 && got[0].length == 512,
       "extents of 'a': the last, partial granule", NULL);

    /* import: many extents, read back in small batches. */
    {
        HBitmapQcow2Extent in[40];
        for (int i = 0; i < 40; i++) {
            in[39 - i].offset = (uint64_t)i * 3 * 65536;
            in[39 - i].length = 65536 + (i % 2); /* odd ones dirty the next granule too */
        }
        ret = hbitmap_qcow2_import(image, "imp", 0, in, 40, HBITMAP_QCOW2_BITMAP_AUTO, &message);
        ok(ret == 0, "import 40 extents", take(&message));
        n = extents_of(image, "imp", 3, got, 64);
        int same = n == 40;
        for (size_t i = 0; same && i < n; i++) {
            same = got[i].offset == i * 3 * 65536 && got[i].length == 65536 * (1 + (i % 2));
        }
        ok(same, "the imported extents read back, in batches of 3", NULL);
        ok(find_info(image, "imp", &info) >= 0 && info.granularity == 65536 && info.auto_,
           "imported with the default granularity, auto", NULL);
        in[0].offset = size;
        ret = hbitmap_qcow2_import(image, "imp", 0, in, 40, 0, &message);
        ok(ret == -EINVAL, "an extent past the end: -EINVAL", take(&message));
        n = extents_of(image, "imp", 64, got, 64);
        ok(n == 40 && find_info(image, "imp", &info) >= 0 && info.auto_,
           "nothing written by the refused import", NULL);
        ret = hbitmap_qcow2_import(image, "empty", 4096, NULL, 0, 0, &message);
        ok(ret == 0 && find_info(image, "empty", &info) >= 0 && info.granularity == 4096 &&
               !info.auto_,
           "import of no extents, disabled", take(&message));
    }

    /* merge_from another image, and from the same handle. */
    ret = hbitmap_qcow2_create(other_path, size, 65536, &other, &message);
    ok(ret == 0, "create the other image", take(&message));
    ret = hbitmap_qcow2_add_ex(other, "src", 65536, 0, &message);
    ok(ret == 0, "add 'src' there", take(&message));
    ret = hbitmap_qcow2_set_range(other, "src", 10 << 20, 1 << 20, true, &message);
    ok(ret == 0, "set 10 MiB+1 MiB there", take(&message));
    ret = hbitmap_qcow2_merge_from(image, other, "src", "a", &message);
    ok(ret == 0, "merge 'src' of the other image into 'a'", take(&message));
    n = extents_of(image, "a", 8, got, 64);
    ok(n == 2 && got[0].offset == 10 << 20 && got[0].length == 1 << 20,
       "'a' has the other image's extent", NULL);
    ret = hbitmap_qcow2_merge_from(image, image, "imp", "a", &message);
    ok(ret == 0, "merge_from the same handle", take(&message));
    n = extents_of(image, "a", 64, got, 64);
    ok(n > 2, "'a' has the extents of 'imp' too", NULL);
    ret = hbitmap_qcow2_merge_from(image, other, "missing", "a", &message);
    ok(ret == -ENOENT, "merge of a missing source: -ENOENT", take(&message));
    ret = hbitmap_qcow2_close(other, &message);
    ok(ret == 0, "close the other image", take(&message));
    ret = hbitmap_qcow2_create(other_path, 1 << 20, 65536, &other, &message);
    ok(ret == 0, "an image of another size", take(&message));
    ret = hbitmap_qcow2_add_ex(other, "src", 0, 0, &message);
    ok(ret == 0, "add 'src' there", take(&message));
    ret = hbitmap_qcow2_merge_from(image, other, "src", "a", &message);
    ok(ret == -EINVAL, "merge across virtual sizes: -EINVAL", take(&message));
    ret = hbitmap_qcow2_close(other, &message);
    ok(ret == 0, "close it", take(&message));

    /* dirty_extents: start past the end, a start inside an extent. */
    {
        HBitmap *bitmap = hbitmap_alloc(1 << 20, 0);
        HBitmapQcow2Extent e[2];
        hbitmap_set(bitmap, 10, 20);
        hbitmap_set(bitmap, 100, 1);
        ok(hbitmap_qcow2_dirty_extents(bitmap, 15, e, 2) == 2 && e[0].offset == 15 &&
               e[0].length == 15 && e[1].offset == 100 && e[1].length == 1,
           "dirty_extents from inside an extent", NULL);
        ok(hbitmap_qcow2_dirty_extents(bitmap, 1 << 20, e, 2) == 0, "from the end: none", NULL);
        ok(hbitmap_qcow2_dirty_extents(bitmap, 0, NULL, 0) == 0, "max 0: none", NULL);
        hbitmap_free(bitmap);
    }

    /* In use: no dirty count. */
    {
        HBitmap *loaded = NULL;
        ret = hbitmap_qcow2_load(image, "d", &loaded, &message);
        ok(ret == 0, "load 'd' (marked in use)", take(&message));
        index = find_info(image, "d", &info);
        ret = hbitmap_qcow2_bitmap_dirty_bytes(image, (size_t)index, &dirty, &message);
        ok(ret == -EBUSY, "dirty bytes of a bitmap in use: -EBUSY", take(&message));
        ret = hbitmap_qcow2_set_range(image, "d", 0, 4096, true, &message);
        ok(ret == -EBUSY, "set_range on a bitmap in use: -EBUSY", take(&message));
        ret = hbitmap_qcow2_release(image, "d", &message);
        ok(ret == 0, "release 'd'", take(&message));
        hbitmap_free(loaded);
    }

    ret = hbitmap_qcow2_close(image, &message);
    ok(ret == 0, "close", take(&message));
    unlink(path);
    unlink(other_path);
    return tap_done();
}
