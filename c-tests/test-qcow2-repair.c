/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Check and repair of a qcow2 image through the C ABI, as a hypervisor would call them: a
 * bitmap left in use (loaded and never stored, as after a crash) is found by
 * hbitmap_qcow2_check, removed by hbitmap_qcow2_repair(HBITMAP_QCOW2_REPAIR_ALL) with its
 * clusters freed, and the intact bitmap keeps its content. Prints TAP.
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

int main(void)
{
    char path[] = "/tmp/hbitmap-c-repair-XXXXXX";
    int fd = mkstemp(path);
    const uint64_t size = 64 << 20;
    HBitmapQcow2 *image = NULL;
    HBitmap *tracked = NULL;
    HBitmap *kept = hbitmap_alloc(size, 16);
    HBitmap *reread = NULL;
    HBitmapQcow2CheckResult result;
    char *message = NULL;
    char *findings = NULL;
    int ret;

    if (fd < 0) {
        perror("mkstemp");
        return 1;
    }
    close(fd);
    hbitmap_set(kept, 5 << 20, 3 << 20);

    ret = hbitmap_qcow2_create(path, size, 65536, &image, &message);
    ok(ret == 0, "create", take(&message));
    ret = hbitmap_qcow2_store(image, "kept", kept, HBITMAP_QCOW2_BITMAP_AUTO, &message);
    ok(ret == 0, "store 'kept'", take(&message));
    ret = hbitmap_qcow2_add(image, "crashed", 65536, true, &message);
    ok(ret == 0, "add 'crashed'", take(&message));
    ret = hbitmap_qcow2_load(image, "crashed", &tracked, &message);
    ok(ret == 0, "load 'crashed' (marked in use)", take(&message));
    /* Closing without storing it leaves it in use, as a crash would. */
    ret = hbitmap_qcow2_close(image, &message);
    ok(ret == -EBUSY, "close reports 'crashed' left in use", take(&message));
    hbitmap_free(tracked);

    ret = hbitmap_qcow2_open(path, HBITMAP_QCOW2_OPEN_WRITE, &image, &message);
    ok(ret == 0, "open for writing", take(&message));
    memset(&result, 0xff, sizeof result);
    ret = hbitmap_qcow2_check(image, &result, &findings, &message);
    ok(ret == 0, "check", take(&message));
    ok(result.in_use_bitmaps == 1 && result.corruptions == 0 && result.check_errors == 0,
       "check finds one bitmap in use and no corruption", take(&findings));
    ok(result.image_end_offset > 0, "check gives the image end offset", NULL);

    ret = hbitmap_qcow2_repair(image, 99, &result, NULL, &message);
    ok(ret == -EINVAL, "an unknown repair mode is refused", take(&message));
    ret = hbitmap_qcow2_repair(image, HBITMAP_QCOW2_REPAIR_ALL, &result, &findings, &message);
    ok(ret == 0, "repair all", take(&message));
    ok(strstr(findings, "REPAIRED: removed bitmap 'crashed'") != NULL,
       "the repair names the bitmap it removed", findings);
    take(&findings);
    ok(result.in_use_bitmaps == 0 && result.leaks == 0 && result.corruptions == 0,
       "the image is consistent after the repair", NULL);
    ok(hbitmap_qcow2_bitmap_count(image) == 1, "one bitmap left", NULL);
    ret = hbitmap_qcow2_inspect(image, "kept", &reread, &message);
    ok(ret == 0, "inspect 'kept'", take(&message));
    ok(reread && hbitmap_count(reread) == hbitmap_count(kept) &&
       hbitmap_get(reread, 5 << 20) && !hbitmap_get(reread, 4 << 20),
       "'kept' has its content", NULL);
    ret = hbitmap_qcow2_close(image, &message);
    ok(ret == 0, "close", take(&message));

    hbitmap_free(reread);
    hbitmap_free(kept);
    unlink(path);
    return tap_done();
}
