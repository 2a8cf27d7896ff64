// SPDX-License-Identifier: GPL-2.0-or-later

// Package hbitmap reads and edits the persistent dirty bitmaps of qcow2 images offline (the
// disks of a stopped VM), and builds bitmaps in memory in QEMU's format, through libhbitmap's
// C library (cgo, found with pkg-config as "hbitmap").
//
// It is thin glue over the library: every operation is one or a few calls of the C ABI
// (hbitmap_qcow2_* and hbitmap_*), whose behaviour is qbitmap's and QEMU's. What a C caller
// would abort on (an item past the end, a granularity of 64 or more, a misaligned
// serialization chunk, a name with a NUL byte...) is checked here first and returned as an
// error: a Go program never aborts on bad arguments.
//
// # Images
//
// [Open] opens an image read-only unless given [ReadWrite]; [ForceShare] reads an image
// another process (QEMU) holds, as qemu-img -U does. Writing takes QEMU's image locks, so an
// image a running QEMU holds is refused (EAGAIN). Every change is crash-consistent: after a
// crash the image holds the state before or after it. Close an image with [Image.Close]; a
// finalizer closes an image that was forgotten, but only Close reports the errors of closing.
//
// # Bitmap names
//
// Names are bytes, as in QEMU: a Go string holds any bytes, UTF-8 or not, and a name is
// passed as its exact bytes. A name holding a NUL byte cannot be passed (the C ABI takes
// NUL-terminated strings) and is refused with EINVAL; [Image.Bitmaps] shows such a stored
// name up to the NUL, as QEMU does.
//
// # Errors
//
// Every error the package returns is an [*Error] carrying the operation, the image, the
// bitmap, the errno and the library's message; errors.Is works with the errno and with the
// io/fs errors it stands for:
//
//	errors.Is(err, fs.ErrNotExist)  // no such image file or no such bitmap (ENOENT)
//	errors.Is(err, syscall.EBUSY)   // the bitmap is in use (inconsistent)
//	errors.Is(err, syscall.EAGAIN)  // another process (QEMU) holds the image
//	errors.Is(err, syscall.EEXIST)  // the bitmap exists already
//	errors.Is(err, syscall.EINVAL)  // a malformed image or a bad argument
//
// # Goroutines
//
// An [*Image] and an [*HBitmap] may be used from several goroutines: each method holds the
// object's mutex for its whole call, so calls on one object run one after the other. A
// callback given to an iteration runs with that mutex held and must not call methods of the
// same object. [Image.MergeFrom] and [Image.Store] hold both objects' mutexes, in one order:
// images (by address) before bitmaps. A callback of an image's iteration may call the methods
// of an [*HBitmap] (to copy extents into it, say), which keeps to that order; a callback of a
// bitmap's iteration must not call an image's methods while another goroutine may be storing
// that bitmap.
//
// # License
//
// The package links libhbitmap, which is licensed GPL-2.0-or-later, and is under the same
// license: a program that links it and is distributed takes on the GPL's terms. Programs that
// cannot can run the qbitmap command as a separate process and read its JSON output (see the
// package's README).
package hbitmap
