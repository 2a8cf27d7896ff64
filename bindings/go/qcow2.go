// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap

/*
#include <stdlib.h>
#include <hbitmap.h>
*/
import "C"

import (
	"strings"
	"syscall"
	"unsafe"
)

// Extents calls fn with each dirty extent of bitmap name, in order: maximal byte ranges,
// clipped to the virtual size. The bitmap is read once into memory (sparse: its clean part
// costs nothing) and its extents are streamed from it in batches, never as one slice. EBUSY
// for a bitmap in use (its content is inconsistent; see [Image.InspectExtents]); ENOENT for a
// missing one. It stops at the first error fn returns and returns it. The image is locked
// meanwhile: fn must not call its methods.
func (image *Image) Extents(name string, fn func(Extent) error) error {
	return image.extents("extents", name, false, fn)
}

// InspectExtents is [Image.Extents] also for a bitmap in use, whose content may be
// inconsistent.
func (image *Image) InspectExtents(name string, fn func(Extent) error) error {
	return image.extents("inspect extents", name, true, fn)
}

func (image *Image) extents(op, name string, inUseOK bool, fn func(Extent) error) error {
	if err := image.lock(op, name); err != nil {
		return err
	}
	defer image.mu.Unlock()
	if strings.IndexByte(name, 0) >= 0 {
		_, err := cString(op, image.path, name, "bitmap name", name)
		return err
	}
	if !inUseOK {
		info, _, err := image.find(op, name)
		if err != nil {
			return err
		}
		if info.InUse {
			return refuse(op, image.path, name, syscall.EBUSY, "bitmap '%s' is in use: a program that had the image open did not store it, so its content is inconsistent", quoteName(name))
		}
	}
	h, err := image.inspect(op, name)
	if err != nil {
		return err
	}
	defer C.hbitmap_free(h)
	return extents(h, 0, fn)
}

// inspect reads bitmap name into a new C bitmap; the image is locked.
func (image *Image) inspect(op, name string) (*C.HBitmap, error) {
	cname, err := cString(op, image.path, name, "bitmap name", name)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cname))
	var h *C.HBitmap
	var msg *C.char
	if ret := C.hbitmap_qcow2_inspect(image.h, cname, &h, &msg); ret != 0 {
		return nil, fail(op, image.path, name, ret, msg)
	}
	return h, nil
}

// Inspect reads bitmap name into a new byte-addressed [HBitmap] without changing the image,
// even when it is in use (its content may then be inconsistent).
func (image *Image) Inspect(name string) (*HBitmap, error) {
	if err := image.lock("inspect", name); err != nil {
		return nil, err
	}
	defer image.mu.Unlock()
	h, err := image.inspect("inspect", name)
	if err != nil {
		return nil, err
	}
	return wrapHBitmap(h, uint64(C.hbitmap_qcow2_virtual_size(image.h))), nil
}

// Load reads bitmap name into a new byte-addressed [HBitmap] to track writes in it. EBUSY for
// a bitmap in use. On a writable image the bitmap is marked in use on disk until
// [Image.Store] stores it back or [Image.Release] releases it: do one of them before Close.
func (image *Image) Load(name string) (*HBitmap, error) {
	if err := image.lock("load", name); err != nil {
		return nil, err
	}
	defer image.mu.Unlock()
	cname, err := cString("load", image.path, name, "bitmap name", name)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cname))
	var h *C.HBitmap
	var msg *C.char
	if ret := C.hbitmap_qcow2_load(image.h, cname, &h, &msg); ret != 0 {
		return nil, fail("load", image.path, name, ret, msg)
	}
	return wrapHBitmap(h, uint64(C.hbitmap_qcow2_virtual_size(image.h))), nil
}

// Release drops the in-use mark [Image.Load] set on bitmap name, when no write was tracked
// since: the stored content is still exact.
func (image *Image) Release(name string) error {
	return image.withName("release", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_release(image.h, cname, msg)
	})
}

// Store stores hb as bitmap name (created or replaced, in one crash-safe switch), enabled (the
// auto flag) or not. hb must be byte-addressed over the virtual size ([NewHBitmap] of
// [Image.VirtualSize] bytes) with a granularity of 9 to 31: EINVAL otherwise.
func (image *Image) Store(name string, hb *HBitmap, enabled bool) error {
	// Images before bitmaps: the package's one lock order.
	if err := image.lock("store", name); err != nil {
		return err
	}
	defer image.mu.Unlock()
	if err := hb.lock("store"); err != nil {
		err.(*Error).Path, err.(*Error).Bitmap = image.path, name
		return err
	}
	defer hb.mu.Unlock()
	cname, err := cString("store", image.path, name, "bitmap name", name)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cname))
	var flags C.uint32_t
	if enabled {
		flags = C.HBITMAP_QCOW2_BITMAP_AUTO
	}
	var msg *C.char
	if ret := C.hbitmap_qcow2_store(image.h, cname, hb.h, flags, &msg); ret != 0 {
		return fail("store", image.path, name, ret, msg)
	}
	return nil
}

// RepairMode says what [Image.Repair] repairs, as qemu-img check -r does.
type RepairMode int

const (
	// RepairLeaks frees leaked clusters (-r leaks).
	RepairLeaks RepairMode = C.HBITMAP_QCOW2_REPAIR_LEAKS
	// RepairAll also removes every bitmap that cannot be trusted (in use after a crash,
	// damaged, cross-linked) and a stale bitmaps extension (-r all).
	RepairAll RepairMode = C.HBITMAP_QCOW2_REPAIR_ALL
)

// Finding is one line of what a check found or a repair did.
type Finding struct {
	// Kind is "ERROR", "WARNING", "LEAK", "NOTE" or, after a repair, "REPAIRED".
	Kind string
	// Text says what, naming the bitmap or the clusters.
	Text string
}

// CheckResult holds qemu-img check's figures for an image and the findings.
type CheckResult struct {
	// Corruptions counts clusters whose refcount is below their references, plus every
	// other error found (qemu-img check's "corruptions").
	Corruptions uint64
	// Leaks counts clusters whose refcount is above their references.
	Leaks uint64
	// CheckErrors counts errors that stopped the check (I/O).
	CheckErrors uint64
	// ImageEndOffset is the end of the last cluster in use (0 when unknown).
	ImageEndOffset uint64
	// LeaksFixed is, after a repair, the number of leaked clusters freed.
	LeaksFixed uint64
	// CorruptionsFixed is, after a repair, the number of bitmaps removed and extension
	// problems dropped.
	CorruptionsFixed uint64
	// InUseBitmaps counts the bitmaps marked in use.
	InUseBitmaps int
	// DamagedBitmaps counts the bitmaps with a broken entry, table or a cross-link.
	DamagedBitmaps int
	// StaleExtension: the bitmaps extension is stale (the image has no usable bitmaps).
	StaleExtension bool
	// BrokenExtension: the bitmaps extension or its directory is unreadable or cross-linked.
	BrokenExtension bool
	// Findings lists every finding, and after a repair every change made first.
	Findings []Finding
}

// Clean reports whether the check found neither corruptions, leaks nor check errors, as
// qemu-img check's exit status 0. Bitmaps in use are a state, not damage.
func (r *CheckResult) Clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}

func checkResult(c *C.HBitmapQcow2CheckResult, findings *C.char) *CheckResult {
	result := &CheckResult{
		Corruptions:      uint64(c.corruptions),
		Leaks:            uint64(c.leaks),
		CheckErrors:      uint64(c.check_errors),
		ImageEndOffset:   uint64(c.image_end_offset),
		LeaksFixed:       uint64(c.leaks_fixed),
		CorruptionsFixed: uint64(c.corruptions_fixed),
		InUseBitmaps:     int(c.in_use_bitmaps),
		DamagedBitmaps:   int(c.damaged_bitmaps),
		StaleExtension:   bool(c.stale_extension),
		BrokenExtension:  bool(c.broken_extension),
	}
	if findings != nil {
		text := C.GoString(findings)
		C.free(unsafe.Pointer(findings))
		for _, line := range strings.Split(text, "\n") {
			if line == "" {
				continue
			}
			kind, rest, _ := strings.Cut(line, ": ")
			result.Findings = append(result.Findings, Finding{Kind: kind, Text: rest})
		}
	}
	return result
}

// Check checks the image from the file as qemu-img check does: the refcount of every cluster
// against its references, and every bitmap. It never writes.
func (image *Image) Check() (*CheckResult, error) {
	if err := image.lock("check", ""); err != nil {
		return nil, err
	}
	defer image.mu.Unlock()
	var result C.HBitmapQcow2CheckResult
	var findings, msg *C.char
	if ret := C.hbitmap_qcow2_check(image.h, &result, &findings, &msg); ret != 0 {
		return nil, fail("check", image.path, "", ret, msg)
	}
	return checkResult(&result, findings), nil
}

// Repair repairs a writable image as qemu-img check -r does and returns the check made after
// it, with LeaksFixed and CorruptionsFixed and the changes among the findings. ENOTSUP,
// nothing written, when the image cannot be mapped completely; EROFS on a read-only image.
func (image *Image) Repair(mode RepairMode) (*CheckResult, error) {
	if err := image.lock("repair", ""); err != nil {
		return nil, err
	}
	defer image.mu.Unlock()
	if mode != RepairLeaks && mode != RepairAll {
		return nil, refuse("repair", image.path, "", syscall.EINVAL, "unknown repair mode %d", mode)
	}
	var result C.HBitmapQcow2CheckResult
	var findings, msg *C.char
	if ret := C.hbitmap_qcow2_repair(image.h, C.uint32_t(mode), &result, &findings, &msg); ret != 0 {
		return nil, fail("repair", image.path, "", ret, msg)
	}
	return checkResult(&result, findings), nil
}
