// SPDX-License-Identifier: GPL-2.0-or-later

// Package cbench is the baseline of the binding's benchmarks: the same work done by C code
// calling the library directly, in one cgo call.
package cbench

/*
#cgo pkg-config: hbitmap
#include <stdlib.h>
#include <hbitmap.h>

// Opens path read-only, reads bitmap name and walks its extents in batches of 1024, as the
// binding does; returns 0 or a negative errno.
static int extents_c(const char *path, const char *name, uint64_t *count, uint64_t *bytes)
{
    HBitmapQcow2 *image = NULL;
    HBitmap *bitmap = NULL;
    HBitmapQcow2Extent batch[1024];
    uint64_t next = 0;
    int ret = hbitmap_qcow2_open(path, 0, &image, NULL);
    if (ret != 0) {
        return ret;
    }
    ret = hbitmap_qcow2_inspect(image, name, &bitmap, NULL);
    if (ret == 0) {
        *count = 0;
        *bytes = 0;
        for (;;) {
            size_t n = hbitmap_qcow2_dirty_extents(bitmap, next, batch, 1024);
            for (size_t i = 0; i < n; i++) {
                *count += 1;
                *bytes += batch[i].length;
            }
            if (n < 1024) {
                break;
            }
            next = batch[n - 1].offset + batch[n - 1].length;
        }
        hbitmap_free(bitmap);
    }
    hbitmap_qcow2_close(image, NULL);
    return ret;
}
*/
import "C"

import (
	"syscall"
	"unsafe"
)

// Extents opens path, reads bitmap name and returns the number of its extents and their total
// length, all in C.
func Extents(path, name string) (count, bytes uint64, err error) {
	cpath, cname := C.CString(path), C.CString(name)
	defer C.free(unsafe.Pointer(cpath))
	defer C.free(unsafe.Pointer(cname))
	var n, total C.uint64_t
	if ret := C.extents_c(cpath, cname, &n, &total); ret != 0 {
		return 0, 0, syscall.Errno(-ret)
	}
	return uint64(n), uint64(total), nil
}
