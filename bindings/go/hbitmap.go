// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap

/*
#include <stdlib.h>
#include <hbitmap.h>
*/
import "C"

import (
	"runtime"
	"sync"
	"syscall"
	"unsafe"
)

// HBitmap is QEMU's hierarchical dirty bitmap in memory: size items, one bit per group of
// 2^granularity items. A bitmap of an image ([Image.Load], [Image.Inspect]) is byte-addressed
// over the virtual size; one made to be stored ([Image.Store]) must be too. Its methods may be
// called from several goroutines; Close it when done (a finalizer frees a forgotten one).
//
// Items are checked against the size before every call: an item or a range past the end is an
// error (EINVAL), where the C library would abort.
type HBitmap struct {
	mu          sync.Mutex
	h           *C.HBitmap
	size        uint64
	granularity uint
	groups      uint64
}

// maxGroups is the largest number of groups of a bitmap (2^41, HBITMAP_LOG_MAX_SIZE).
const maxGroups = uint64(1) << 41

// groupsFor is the number of groups of size items, rounded up as the library does (the sum
// wraps for sizes within 2^granularity of 2^64).
func groupsFor(size uint64, granularity uint) uint64 {
	return (size + (uint64(1) << granularity) - 1) >> granularity
}

// NewHBitmap returns an empty bitmap of size items with one bit per 2^granularity items.
// EINVAL for a granularity of 64 or more, EFBIG for a size needing more than 2^41 groups.
// Memory is taken only as bits are set.
func NewHBitmap(size uint64, granularity uint) (*HBitmap, error) {
	if granularity >= 64 {
		return nil, refuse("new bitmap", "", "", syscall.EINVAL, "granularity %d is not below 64", granularity)
	}
	if groups := groupsFor(size, granularity); groups > maxGroups {
		return nil, refuse("new bitmap", "", "", syscall.EFBIG, "size %d at granularity %d needs %d groups, more than 2^41", size, granularity, groups)
	}
	return wrapHBitmap(C.hbitmap_alloc(C.uint64_t(size), C.int(granularity)), size), nil
}

// wrapHBitmap takes ownership of a bitmap of size items the library allocated.
func wrapHBitmap(h *C.HBitmap, size uint64) *HBitmap {
	granularity := uint(C.hbitmap_granularity(h))
	hb := &HBitmap{h: h, size: size, granularity: granularity, groups: groupsFor(size, granularity)}
	runtime.SetFinalizer(hb, func(hb *HBitmap) { hb.Close() })
	return hb
}

// Close frees the bitmap. Closing a closed bitmap does nothing.
func (hb *HBitmap) Close() {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if hb.h != nil {
		C.hbitmap_free(hb.h)
		hb.h = nil
		runtime.SetFinalizer(hb, nil)
	}
}

func (hb *HBitmap) lock(op string) error {
	hb.mu.Lock()
	if hb.h == nil {
		hb.mu.Unlock()
		return refuse(op, "", "", syscall.EBADF, "the bitmap is closed")
	}
	return nil
}

// Size returns the number of items.
func (hb *HBitmap) Size() uint64 { return hb.size }

// Granularity returns log2 of the items per bit.
func (hb *HBitmap) Granularity() uint { return hb.granularity }

// checkRange refuses a range ending past the size (or past the last group, for a size whose
// group count wrapped).
func (hb *HBitmap) checkRange(op string, start, count uint64) error {
	end := start + count
	if end < start || end > hb.size || (count > 0 && (end-1)>>hb.granularity >= hb.groups) {
		return refuse(op, "", "", syscall.EINVAL, "range start %d count %d ends past the bitmap's %d items", start, count, hb.size)
	}
	return nil
}

// Set marks the items start..start+count dirty (the groups they touch, whole). An empty
// range does nothing.
func (hb *HBitmap) Set(start, count uint64) error {
	if err := hb.lock("set"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	if err := hb.checkRange("set", start, count); err != nil {
		return err
	}
	C.hbitmap_set(hb.h, C.uint64_t(start), C.uint64_t(count))
	return nil
}

// Reset marks the items start..start+count clean. As in QEMU's original hbitmap, a group the
// range covers only in part is reset whole. An empty range does nothing.
func (hb *HBitmap) Reset(start, count uint64) error {
	if err := hb.lock("reset"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	if err := hb.checkRange("reset", start, count); err != nil {
		return err
	}
	C.hbitmap_reset(hb.h, C.uint64_t(start), C.uint64_t(count))
	return nil
}

// ResetAll makes the bitmap empty.
func (hb *HBitmap) ResetAll() error {
	if err := hb.lock("reset all"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	C.hbitmap_reset_all(hb.h)
	return nil
}

// Get reports whether the group holding item is dirty.
func (hb *HBitmap) Get(item uint64) (bool, error) {
	if err := hb.lock("get"); err != nil {
		return false, err
	}
	defer hb.mu.Unlock()
	if item >= hb.size || item>>hb.granularity >= hb.groups {
		return false, refuse("get", "", "", syscall.EINVAL, "item %d is past the bitmap's %d items", item, hb.size)
	}
	return bool(C.hbitmap_get(hb.h, C.uint64_t(item))), nil
}

// Count returns the number of dirty items as QEMU counts them: dirty groups times
// 2^granularity (the last group counts whole, even past the size).
func (hb *HBitmap) Count() (uint64, error) {
	if err := hb.lock("count"); err != nil {
		return 0, err
	}
	defer hb.mu.Unlock()
	return uint64(C.hbitmap_count(hb.h)), nil
}

// extentBatch is how many extents one C call returns.
const extentBatch = 1024

// Extents calls fn with each maximal dirty range of items at or after start, in order (a
// range running across start begins at start; ends are clipped to the size). It stops at the
// first error fn returns and returns it. The bitmap is locked meanwhile: fn must not call its
// methods.
func (hb *HBitmap) Extents(start uint64, fn func(Extent) error) error {
	if err := hb.lock("extents"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	return extents(hb.h, start, fn)
}

// extents streams the extents of a live bitmap in batches of extentBatch.
func extents(h *C.HBitmap, start uint64, fn func(Extent) error) error {
	batch := make([]Extent, extentBatch)
	out := (*C.HBitmapQcow2Extent)(unsafe.Pointer(&batch[0]))
	next := start
	for {
		n := int(C.hbitmap_qcow2_dirty_extents(h, C.uint64_t(next), out, extentBatch))
		for _, extent := range batch[:n] {
			if err := fn(extent); err != nil {
				return err
			}
		}
		if n < extentBatch {
			return nil
		}
		next = batch[n-1].End()
	}
}

// ExtentIterator walks the dirty extents of an [HBitmap] one by one, fetching them in
// batches:
//
//	for it := hb.Iter(0); it.Next(); {
//		use(it.Extent())
//	}
//
// It holds no lock between calls: changing the bitmap while iterating gives the extents of
// the bitmap as it is when each batch is fetched.
type ExtentIterator struct {
	hb    *HBitmap
	batch []Extent
	i     int
	next  uint64
	done  bool
	err   error
}

// Iter returns an iterator over the dirty extents at or after item start.
func (hb *HBitmap) Iter(start uint64) *ExtentIterator {
	return &ExtentIterator{hb: hb, next: start, i: -1}
}

// Next advances to the next extent and reports whether there is one.
func (it *ExtentIterator) Next() bool {
	if it.i+1 < len(it.batch) {
		it.i++
		return true
	}
	if it.done {
		return false
	}
	if err := it.hb.lock("extents"); err != nil {
		it.err, it.done = err, true
		return false
	}
	if it.batch == nil {
		it.batch = make([]Extent, extentBatch)
	}
	it.batch = it.batch[:extentBatch]
	out := (*C.HBitmapQcow2Extent)(unsafe.Pointer(&it.batch[0]))
	n := int(C.hbitmap_qcow2_dirty_extents(it.hb.h, C.uint64_t(it.next), out, extentBatch))
	it.hb.mu.Unlock()
	it.batch = it.batch[:n]
	it.done = n < extentBatch
	if n == 0 {
		return false
	}
	it.next = it.batch[n-1].End()
	it.i = 0
	return true
}

// Extent returns the current extent.
func (it *ExtentIterator) Extent() Extent { return it.batch[it.i] }

// Err returns the error that ended the iteration early (a closed bitmap), or nil.
func (it *ExtentIterator) Err() error { return it.err }

// SerializationAlign returns the items per serialized 64-bit word (64 << granularity): chunk
// starts, and the lengths of all chunks but the last, are multiples of it. EINVAL for a
// granularity of 58 or more (not serializable).
func (hb *HBitmap) SerializationAlign() (uint64, error) {
	if hb.granularity >= 58 {
		return 0, refuse("serialization align", "", "", syscall.EINVAL, "granularity %d is not below 58: not serializable", hb.granularity)
	}
	return uint64(64) << hb.granularity, nil
}

// checkChunk refuses what hbitmap_serialize_part and its kin abort on, and returns the bytes
// the chunk takes serialized.
func (hb *HBitmap) checkChunk(op string, start, count uint64) (uint64, error) {
	if count == 0 {
		return 0, nil
	}
	align, err := hb.SerializationAlign()
	if err != nil {
		err.(*Error).Op = op
		return 0, err
	}
	last := start + count - 1
	if last < start {
		return 0, refuse(op, "", "", syscall.EINVAL, "chunk start %d count %d wraps past 2^64", start, count)
	}
	if start%align != 0 {
		return 0, refuse(op, "", "", syscall.EINVAL, "chunk start %d is not a multiple of %d", start, align)
	}
	lastGroup := last >> hb.granularity
	if lastGroup >= hb.groups {
		return 0, refuse(op, "", "", syscall.EINVAL, "chunk start %d count %d ends past the bitmap's %d groups", start, count, hb.groups)
	}
	if lastGroup != hb.groups-1 && count%align != 0 {
		return 0, refuse(op, "", "", syscall.EINVAL, "chunk count %d is not a multiple of %d and the chunk is not the last one", count, align)
	}
	firstWord := (start >> hb.granularity) >> 6
	lastWord := lastGroup >> 6
	return (lastWord - firstWord + 1) * 8, nil
}

// SerializationSize returns the bytes the chunk start..start+count takes in QEMU's
// serialization format (0 for an empty chunk); EINVAL for a chunk [HBitmap.SerializePart]
// refuses.
func (hb *HBitmap) SerializationSize(start, count uint64) (uint64, error) {
	if err := hb.lock("serialization size"); err != nil {
		return 0, err
	}
	defer hb.mu.Unlock()
	return hb.checkChunk("serialization size", start, count)
}

// SerializePart writes the chunk of items start..start+count into buf in QEMU's format
// (little-endian 64-bit words) and returns the bytes written. The chunk must start on a
// multiple of [HBitmap.SerializationAlign] and be a multiple of it long, unless it runs to the
// end; buf must hold [HBitmap.SerializationSize] bytes. EINVAL otherwise.
func (hb *HBitmap) SerializePart(buf []byte, start, count uint64) (int, error) {
	if err := hb.lock("serialize"); err != nil {
		return 0, err
	}
	defer hb.mu.Unlock()
	need, err := hb.checkChunk("serialize", start, count)
	if err != nil || need == 0 {
		return 0, err
	}
	if uint64(len(buf)) < need {
		return 0, refuse("serialize", "", "", syscall.EINVAL, "buffer of %d bytes, %d needed", len(buf), need)
	}
	C.hbitmap_serialize_part(hb.h, (*C.uint8_t)(unsafe.Pointer(&buf[0])), C.uint64_t(start), C.uint64_t(count))
	return int(need), nil
}

// DeserializePart loads the chunk start..start+count from buf (QEMU's format), with the rules
// of [HBitmap.SerializePart]. With finish false the bitmap's summary is stale until
// [HBitmap.DeserializeFinish]: call it after the last chunk.
func (hb *HBitmap) DeserializePart(buf []byte, start, count uint64, finish bool) error {
	if err := hb.lock("deserialize"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	need, err := hb.checkChunk("deserialize", start, count)
	if err != nil || need == 0 {
		return err
	}
	if uint64(len(buf)) < need {
		return refuse("deserialize", "", "", syscall.EINVAL, "buffer of %d bytes, %d needed", len(buf), need)
	}
	C.hbitmap_deserialize_part(hb.h, (*C.uint8_t)(unsafe.Pointer(&buf[0])), C.uint64_t(start), C.uint64_t(count), C.bool(finish))
	return nil
}

// DeserializeZeroes makes the chunk start..start+count clean, as a deserialization step (the
// rules of [HBitmap.SerializePart]).
func (hb *HBitmap) DeserializeZeroes(start, count uint64, finish bool) error {
	if err := hb.lock("deserialize zeroes"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	if need, err := hb.checkChunk("deserialize zeroes", start, count); err != nil || need == 0 {
		return err
	}
	C.hbitmap_deserialize_zeroes(hb.h, C.uint64_t(start), C.uint64_t(count), C.bool(finish))
	return nil
}

// DeserializeOnes makes the chunk start..start+count dirty, as a deserialization step (the
// rules of [HBitmap.SerializePart]).
func (hb *HBitmap) DeserializeOnes(start, count uint64, finish bool) error {
	if err := hb.lock("deserialize ones"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	if need, err := hb.checkChunk("deserialize ones", start, count); err != nil || need == 0 {
		return err
	}
	C.hbitmap_deserialize_ones(hb.h, C.uint64_t(start), C.uint64_t(count), C.bool(finish))
	return nil
}

// DeserializeFinish brings the summary up to date after deserialization steps made with
// finish false.
func (hb *HBitmap) DeserializeFinish() error {
	if err := hb.lock("deserialize finish"); err != nil {
		return err
	}
	defer hb.mu.Unlock()
	C.hbitmap_deserialize_finish(hb.h)
	return nil
}
