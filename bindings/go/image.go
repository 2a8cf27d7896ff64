// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap

/*
#cgo pkg-config: hbitmap
#include <stdlib.h>
#include <hbitmap.h>
*/
import "C"

import (
	"runtime"
	"strings"
	"sync"
	"syscall"
	"unsafe"
)

// Image is an open qcow2 image. Its methods may be called from several goroutines (see the
// package documentation); Close it when done.
type Image struct {
	mu       sync.Mutex
	h        *C.HBitmapQcow2
	path     string
	writable bool
}

type openConfig struct {
	write, forceShare bool
}

// OpenOption is an option of [Open].
type OpenOption func(*openConfig)

// ReadWrite opens the image for writing, taking QEMU's write locks (refused with EAGAIN while
// another process holds the image). Without it an image is opened read-only.
func ReadWrite() OpenOption { return func(c *openConfig) { c.write = true } }

// ForceShare opens the image read-only without taking or honouring QEMU's locks, as qemu-img
// -U does: to read the bitmaps of an image a running VM holds (what it reads may be stale).
func ForceShare() OpenOption { return func(c *openConfig) { c.forceShare = true } }

// Open opens the qcow2 image at path, read-only unless [ReadWrite] is given. The image is
// validated whole: a file that is not qcow2, or a malformed bitmaps extension, gives EINVAL; a
// missing file ENOENT (fs.ErrNotExist); an image QEMU holds EAGAIN.
func Open(path string, options ...OpenOption) (*Image, error) {
	var config openConfig
	for _, option := range options {
		option(&config)
	}
	if config.write && config.forceShare {
		return nil, refuse("open", path, "", syscall.EINVAL, "ReadWrite and ForceShare exclude each other")
	}
	var flags C.uint32_t
	if config.write {
		flags |= C.HBITMAP_QCOW2_OPEN_WRITE
	}
	if config.forceShare {
		flags |= C.HBITMAP_QCOW2_OPEN_FORCE_SHARE
	}
	cpath, err := cString("open", path, "", "path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cpath))
	var h *C.HBitmapQcow2
	var msg *C.char
	if ret := C.hbitmap_qcow2_open(cpath, flags, &h, &msg); ret != 0 {
		return nil, fail("open", path, "", ret, msg)
	}
	return newImage(h, path, config.write), nil
}

type createConfig struct {
	clusterSize uint64
}

// CreateOption is an option of [Create].
type CreateOption func(*createConfig)

// ClusterSize sets the cluster size of a new image: a power of two from 512 B to 2 MiB
// (default 64 KiB).
func ClusterSize(bytes uint64) CreateOption {
	return func(c *createConfig) { c.clusterSize = bytes }
}

// Create creates (or overwrites) path as an empty qcow2 v3 image of size bytes (a multiple of
// 512) and opens it for writing.
func Create(path string, size uint64, options ...CreateOption) (*Image, error) {
	config := createConfig{clusterSize: 65536}
	for _, option := range options {
		option(&config)
	}
	cpath, err := cString("create", path, "", "path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cpath))
	var h *C.HBitmapQcow2
	var msg *C.char
	if ret := C.hbitmap_qcow2_create(cpath, C.uint64_t(size), C.uint64_t(config.clusterSize), &h, &msg); ret != 0 {
		return nil, fail("create", path, "", ret, msg)
	}
	return newImage(h, path, true), nil
}

func newImage(h *C.HBitmapQcow2, path string, writable bool) *Image {
	image := &Image{h: h, path: path, writable: writable}
	runtime.SetFinalizer(image, func(image *Image) { _ = image.Close() })
	return image
}

// Close flushes and closes the image and releases its locks. Bitmaps loaded with [Image.Load]
// on a writable image and neither stored nor released stay marked in use: the image is closed
// anyway and EBUSY returned, naming them. Closing a closed image does nothing.
func (image *Image) Close() error {
	image.mu.Lock()
	defer image.mu.Unlock()
	if image.h == nil {
		return nil
	}
	var msg *C.char
	ret := C.hbitmap_qcow2_close(image.h, &msg)
	image.h = nil
	runtime.SetFinalizer(image, nil)
	if ret != 0 {
		return fail("close", image.path, "", ret, msg)
	}
	return nil
}

// lock locks the image and returns an error if it is closed.
func (image *Image) lock(op, bitmap string) error {
	image.mu.Lock()
	if image.h == nil {
		image.mu.Unlock()
		return refuse(op, image.path, bitmap, syscall.EBADF, "the image is closed")
	}
	return nil
}

// Path returns the path the image was opened with.
func (image *Image) Path() string { return image.path }

// Writable reports whether the image was opened for writing.
func (image *Image) Writable() bool { return image.writable }

// VirtualSize returns the virtual size of the disk in bytes: the size of every bitmap.
func (image *Image) VirtualSize() (uint64, error) {
	if err := image.lock("virtual size", ""); err != nil {
		return 0, err
	}
	defer image.mu.Unlock()
	return uint64(C.hbitmap_qcow2_virtual_size(image.h)), nil
}

// ClusterSize returns the cluster size of the image in bytes.
func (image *Image) ClusterSize() (uint64, error) {
	if err := image.lock("cluster size", ""); err != nil {
		return 0, err
	}
	defer image.mu.Unlock()
	return uint64(C.hbitmap_qcow2_cluster_size(image.h)), nil
}

// Bitmap describes one persistent bitmap of an image.
type Bitmap struct {
	// Name is the name's bytes as stored (up to a NUL byte, as QEMU reads it), UTF-8 or not.
	Name string
	// NameBytes holds the same bytes as Name.
	NameBytes []byte
	// Granularity is the number of bytes of the disk per bit.
	Granularity uint64
	// InUse is the in_use flag: a program that had the image open did not store the bitmap,
	// so its content is inconsistent; it can only be removed, cleared or inspected.
	InUse bool
	// Auto is the auto flag: the bitmap is enabled (QEMU records writes in it).
	Auto bool
	// DirtyBytes is the number of dirty bytes (the total length of the dirty extents), or -1
	// for a bitmap in use.
	DirtyBytes int64
}

// Bitmaps returns the image's bitmaps in directory order, with their dirty bytes (which reads
// each bitmap).
func (image *Image) Bitmaps() ([]Bitmap, error) {
	if err := image.lock("list", ""); err != nil {
		return nil, err
	}
	defer image.mu.Unlock()
	count := int(C.hbitmap_qcow2_bitmap_count(image.h))
	bitmaps := make([]Bitmap, 0, count)
	for i := 0; i < count; i++ {
		info, err := image.info(i)
		if err != nil {
			return nil, err
		}
		bitmap := Bitmap{
			Name:        info.Name,
			NameBytes:   []byte(info.Name),
			Granularity: info.Granularity,
			InUse:       info.InUse,
			Auto:        info.Auto,
			DirtyBytes:  -1,
		}
		if !info.InUse {
			var dirty C.uint64_t
			var msg *C.char
			if ret := C.hbitmap_qcow2_bitmap_dirty_bytes(image.h, C.size_t(i), &dirty, &msg); ret != 0 {
				return nil, fail("list", image.path, info.Name, ret, msg)
			}
			bitmap.DirtyBytes = int64(dirty)
		}
		bitmaps = append(bitmaps, bitmap)
	}
	return bitmaps, nil
}

// info describes bitmap number i, without its dirty bytes; the image is locked.
func (image *Image) info(i int) (Bitmap, error) {
	var info C.HBitmapQcow2BitmapInfo
	var msg *C.char
	if ret := C.hbitmap_qcow2_bitmap_info(image.h, C.size_t(i), &info, &msg); ret != 0 {
		return Bitmap{}, fail("list", image.path, "", ret, msg)
	}
	name := C.GoString(&info.name[0])
	return Bitmap{
		Name:        name,
		NameBytes:   []byte(name),
		Granularity: uint64(info.granularity),
		InUse:       bool(info.in_use),
		Auto:        bool(info.auto_),
		DirtyBytes:  -1,
	}, nil
}

// find returns the description of bitmap name (without its dirty bytes) and its index; the
// image is locked.
func (image *Image) find(op, name string) (Bitmap, int, error) {
	count := int(C.hbitmap_qcow2_bitmap_count(image.h))
	for i := 0; i < count; i++ {
		info, err := image.info(i)
		if err != nil {
			return Bitmap{}, 0, err
		}
		if info.Name == name {
			return info, i, nil
		}
	}
	return Bitmap{}, 0, refuse(op, image.path, name, syscall.ENOENT, "no bitmap named '%s' in the image", quoteName(name))
}

// Lookup describes bitmap name as [Image.Bitmaps] does; ENOENT (fs.ErrNotExist) if there is
// none.
func (image *Image) Lookup(name string) (Bitmap, error) {
	if err := image.lock("lookup", name); err != nil {
		return Bitmap{}, err
	}
	defer image.mu.Unlock()
	if strings.IndexByte(name, 0) >= 0 {
		_, err := cString("lookup", image.path, name, "bitmap name", name)
		return Bitmap{}, err
	}
	info, index, err := image.find("lookup", name)
	if err != nil || info.InUse {
		return info, err
	}
	var dirty C.uint64_t
	var msg *C.char
	if ret := C.hbitmap_qcow2_bitmap_dirty_bytes(image.h, C.size_t(index), &dirty, &msg); ret != 0 {
		return Bitmap{}, fail("lookup", image.path, name, ret, msg)
	}
	info.DirtyBytes = int64(dirty)
	return info, nil
}

type addConfig struct {
	granularity       uint64
	disabled, existOK bool
}

// AddOption is an option of [Image.Add] and [Image.Import].
type AddOption func(*addConfig)

// Granularity sets the bytes of the disk per bit: a power of two from 512 B to 2 GiB. The
// default is QEMU's: the cluster size clamped to 4 KiB..64 KiB (for [Image.Import] of an
// existing bitmap, its granularity).
func Granularity(bytes uint64) AddOption {
	return func(c *addConfig) { c.granularity = bytes }
}

// Disabled adds the bitmap disabled (without the auto flag): QEMU does not record writes in
// it.
func Disabled() AddOption { return func(c *addConfig) { c.disabled = true } }

// ExistOK makes [Image.Add] succeed, changing nothing, when a bitmap of that name exists with
// the same granularity and state and is not in use: a retry after a crash converges. An
// existing bitmap that differs is still EEXIST. [Image.Import] ignores it (it replaces).
func ExistOK() AddOption { return func(c *addConfig) { c.existOK = true } }

func addOptions(options []AddOption) addConfig {
	var config addConfig
	for _, option := range options {
		option(&config)
	}
	return config
}

// Add adds an empty bitmap, enabled unless [Disabled] is given. EEXIST if the name exists
// (unless [ExistOK]); EINVAL for a name QEMU would not create (empty, over 1023 bytes, with a
// NUL) or a bad granularity; EROFS on a read-only image.
func (image *Image) Add(name string, options ...AddOption) error {
	config := addOptions(options)
	return image.withName("add", name, func(cname *C.char, msg **C.char) C.int {
		var flags C.uint32_t
		if config.disabled {
			flags |= C.HBITMAP_QCOW2_ADD_DISABLED
		}
		if config.existOK {
			flags |= C.HBITMAP_QCOW2_ADD_EXIST_OK
		}
		return C.hbitmap_qcow2_add_ex(image.h, cname, C.uint64_t(config.granularity), flags, msg)
	})
}

// RemoveOption is an option of [Image.Remove].
type RemoveOption func(*bool)

// MissingOK makes [Image.Remove] succeed when the bitmap does not exist (a retry after it was
// removed).
func MissingOK() RemoveOption { return func(missingOK *bool) { *missingOK = true } }

// Remove removes a bitmap (also one in use) and frees its clusters. ENOENT if it does not
// exist, unless [MissingOK] is given.
func (image *Image) Remove(name string, options ...RemoveOption) error {
	missingOK := false
	for _, option := range options {
		option(&missingOK)
	}
	err := image.withName("remove", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_remove(image.h, cname, msg)
	})
	if missingOK && err != nil && err.(*Error).Errno == syscall.ENOENT {
		return nil
	}
	return err
}

// Clear makes a bitmap empty, keeping its granularity and flags. EBUSY for a bitmap in use.
func (image *Image) Clear(name string) error {
	return image.withName("clear", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_clear(image.h, cname, msg)
	})
}

// Enable sets the bitmap's auto flag: QEMU records the VM's writes in it when it runs.
func (image *Image) Enable(name string) error {
	return image.withName("enable", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_set_enabled(image.h, cname, true, msg)
	})
}

// Disable drops the bitmap's auto flag: QEMU no longer records writes in it.
func (image *Image) Disable(name string) error {
	return image.withName("disable", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_set_enabled(image.h, cname, false, msg)
	})
}

// Set marks the bytes offset..offset+length of a bitmap dirty (whole granules), in one
// crash-safe store. EINVAL (nothing written) for a range ending past the virtual size.
func (image *Image) Set(name string, offset, length uint64) error {
	return image.withName("set", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_set_range(image.h, cname, C.uint64_t(offset), C.uint64_t(length), true, msg)
	})
}

// Reset marks the bytes offset..offset+length of a bitmap clean. The range must start and end
// on granule boundaries (or end at the virtual size): EINVAL otherwise, nothing written.
func (image *Image) Reset(name string, offset, length uint64) error {
	return image.withName("reset", name, func(cname *C.char, msg **C.char) C.int {
		return C.hbitmap_qcow2_set_range(image.h, cname, C.uint64_t(offset), C.uint64_t(length), false, msg)
	})
}

// Merge merges bitmap source into bitmap target of the same image (target |= source); the
// granularities may differ.
func (image *Image) Merge(source, target string) error {
	if err := image.lock("merge", target); err != nil {
		return err
	}
	defer image.mu.Unlock()
	return image.mergeLocked(image, source, target)
}

// MergeFrom merges bitmap source of another image (of the same virtual size, open read-only
// or not) into bitmap target of this one.
func (image *Image) MergeFrom(other *Image, source, target string) error {
	if other == image {
		return image.Merge(source, target)
	}
	// Lock in a fixed order, so that two opposite merges cannot deadlock.
	first, second := image, other
	if uintptr(unsafe.Pointer(other)) < uintptr(unsafe.Pointer(image)) {
		first, second = other, image
	}
	if err := first.lock("merge", target); err != nil {
		return err
	}
	defer first.mu.Unlock()
	if err := second.lock("merge", target); err != nil {
		return err
	}
	defer second.mu.Unlock()
	return image.mergeLocked(other, source, target)
}

func (image *Image) mergeLocked(other *Image, source, target string) error {
	csource, err := cString("merge", image.path, source, "bitmap name", source)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(csource))
	ctarget, err := cString("merge", image.path, target, "bitmap name", target)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(ctarget))
	var msg *C.char
	if ret := C.hbitmap_qcow2_merge_from(image.h, other.h, csource, ctarget, &msg); ret != 0 {
		bitmap := target
		if strings.Contains(C.GoString(msg), "'"+quoteName(source)+"'") {
			bitmap = source
		}
		return fail("merge", image.path, bitmap, ret, msg)
	}
	return nil
}

// Extent is a range of bytes of the disk (or of items of an [HBitmap]).
type Extent struct {
	// Offset is the first byte (item).
	Offset uint64
	// Length is the number of bytes (items).
	Length uint64
}

// End returns Offset + Length.
func (e Extent) End() uint64 { return e.Offset + e.Length }

// Import creates or replaces a bitmap with exactly the given byte ranges dirty (any order,
// overlapping or not; a range that does not cover whole granules dirties the granules it
// touches), enabled unless [Disabled] is given, at the [Granularity] given (default: the
// existing bitmap's, else QEMU's default). EINVAL, nothing written, for a range past the
// virtual size.
func (image *Image) Import(name string, extents []Extent, options ...AddOption) error {
	config := addOptions(options)
	return image.withName("import", name, func(cname *C.char, msg **C.char) C.int {
		var flags C.uint32_t
		if !config.disabled {
			flags |= C.HBITMAP_QCOW2_BITMAP_AUTO
		}
		var first *C.HBitmapQcow2Extent
		if len(extents) > 0 {
			// Extent and HBitmapQcow2Extent have one layout (two uint64), checked in layout.go.
			first = (*C.HBitmapQcow2Extent)(unsafe.Pointer(&extents[0]))
		}
		return C.hbitmap_qcow2_import(image.h, cname, C.uint64_t(config.granularity), first, C.size_t(len(extents)), flags, msg)
	})
}

// withName runs call with the image locked and name as a C string, making its error.
func (image *Image) withName(op, name string, call func(*C.char, **C.char) C.int) error {
	if err := image.lock(op, name); err != nil {
		return err
	}
	defer image.mu.Unlock()
	cname, err := cString(op, image.path, name, "bitmap name", name)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cname))
	var msg *C.char
	if ret := call(cname, &msg); ret != 0 {
		return fail(op, image.path, name, ret, msg)
	}
	return nil
}

// cString copies s for C; a NUL byte in it is refused (C would see the string end there).
func cString(op, path, bitmap, what, s string) (*C.char, error) {
	if i := strings.IndexByte(s, 0); i >= 0 {
		return nil, refuse(op, path, bitmap, syscall.EINVAL, "the %s holds a NUL byte at %d: it cannot be passed to the library", what, i)
	}
	return C.CString(s), nil
}
