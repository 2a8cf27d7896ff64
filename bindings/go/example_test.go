// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"syscall"

	"libhbitmap.org/go/hbitmap"
)

// scratch returns a new temporary directory for an example.
func scratch() string {
	dir, err := os.MkdirTemp("", "hbitmap-example-")
	if err != nil {
		log.Fatal(err)
	}
	return dir
}

// Create an image, add a bitmap, mark what changed, and list the bitmaps.
func ExampleCreate() {
	dir := scratch()
	defer os.RemoveAll(dir)
	image, err := hbitmap.Create(filepath.Join(dir, "disk.qcow2"), 64<<30)
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	if err := image.Add("backup-0"); err != nil {
		log.Fatal(err)
	}
	if err := image.Add("nightly", hbitmap.Granularity(1<<20), hbitmap.Disabled()); err != nil {
		log.Fatal(err)
	}
	if err := image.Set("backup-0", 1<<30, 4<<20); err != nil {
		log.Fatal(err)
	}
	bitmaps, err := image.Bitmaps()
	if err != nil {
		log.Fatal(err)
	}
	for _, b := range bitmaps {
		fmt.Printf("%s: granularity %d, enabled %v, %d dirty bytes\n", b.Name, b.Granularity, b.Auto, b.DirtyBytes)
	}
	// Output:
	// backup-0: granularity 65536, enabled true, 4194304 dirty bytes
	// nightly: granularity 1048576, enabled false, 0 dirty bytes
}

// Stream the dirty extents of a bitmap: what an incremental backup copies.
func ExampleImage_Extents() {
	dir := scratch()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")
	image, err := hbitmap.Create(path, 64<<30)
	if err != nil {
		log.Fatal(err)
	}
	_ = image.Import("cp", []hbitmap.Extent{{Offset: 10 << 30, Length: 65536}, {Offset: 1 << 30, Length: 4 << 20}})
	image.Close()

	image, err = hbitmap.Open(path) // read-only
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	err = image.Extents("cp", func(e hbitmap.Extent) error {
		fmt.Printf("offset %d length %d\n", e.Offset, e.Length)
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output:
	// offset 1073741824 length 4194304
	// offset 10737418240 length 65536
}

// Errors carry the errno: errors.Is tells a missing image or bitmap, a bitmap in use, an image
// QEMU holds.
func ExampleError() {
	_, err := hbitmap.Open("/nonexistent/disk.qcow2")
	fmt.Println(errors.Is(err, fs.ErrNotExist))

	dir := scratch()
	defer os.RemoveAll(dir)
	image, err := hbitmap.Create(filepath.Join(dir, "disk.qcow2"), 1<<30)
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	err = image.Clear("nope")
	var e *hbitmap.Error
	if errors.As(err, &e) {
		fmt.Println(e.Op, e.Bitmap, e.Errno == syscall.ENOENT)
	}
	err = image.Add("a\x00b")
	fmt.Println(errors.Is(err, syscall.EINVAL))
	// Output:
	// true
	// clear nope true
	// true
}

// Add a checkpoint bitmap so that a retry converges, and rotate it.
func ExampleExistOK() {
	dir := scratch()
	defer os.RemoveAll(dir)
	image, err := hbitmap.Create(filepath.Join(dir, "disk.qcow2"), 1<<30)
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	for attempt := 0; attempt < 2; attempt++ {
		if err := image.Add("cp2", hbitmap.ExistOK()); err != nil {
			log.Fatal(err)
		}
	}
	_ = image.Import("cp1", []hbitmap.Extent{{Offset: 0, Length: 1}})
	if err := image.Merge("cp1", "cp2"); err != nil {
		log.Fatal(err)
	}
	for attempt := 0; attempt < 2; attempt++ {
		if err := image.Remove("cp1", hbitmap.MissingOK()); err != nil {
			log.Fatal(err)
		}
	}
	b, _ := image.Lookup("cp2")
	fmt.Println(b.Name, b.DirtyBytes)
	// Output: cp2 65536
}

// Build a bitmap in memory, serialize it in QEMU's format, and store it in an image.
func ExampleHBitmap() {
	hb, err := hbitmap.NewHBitmap(1<<30, 16) // 1 GiB, 64 KiB per bit
	if err != nil {
		log.Fatal(err)
	}
	defer hb.Close()
	_ = hb.Set(4096, 512)
	_ = hb.Set(10<<20, 3<<20)
	for it := hb.Iter(0); it.Next(); {
		fmt.Printf("dirty %#x..%#x\n", it.Extent().Offset, it.Extent().End())
	}
	size, _ := hb.SerializationSize(0, 1<<30)
	buf := make([]byte, size)
	if _, err := hb.SerializePart(buf, 0, 1<<30); err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(buf), "bytes serialized")

	dir := scratch()
	defer os.RemoveAll(dir)
	image, err := hbitmap.Create(filepath.Join(dir, "disk.qcow2"), 1<<30)
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	if err := image.Store("tracked", hb, true); err != nil {
		log.Fatal(err)
	}
	b, _ := image.Lookup("tracked")
	fmt.Println(b.Name, b.DirtyBytes)
	// Output:
	// dirty 0x0..0x10000
	// dirty 0xa00000..0xd00000
	// 2048 bytes serialized
	// tracked 3211264
}

// Bad arguments are errors, never an abort.
func ExampleHBitmap_Set() {
	hb, _ := hbitmap.NewHBitmap(1000, 0)
	defer hb.Close()
	fmt.Println(hb.Set(990, 20))
	// Output: hbitmap: set: range start 990 count 20 ends past the bitmap's 1000 items
}

// Check an image as qemu-img check does.
func ExampleImage_Check() {
	dir := scratch()
	defer os.RemoveAll(dir)
	image, err := hbitmap.Create(filepath.Join(dir, "disk.qcow2"), 1<<30)
	if err != nil {
		log.Fatal(err)
	}
	defer image.Close()
	_ = image.Add("a")
	result, err := image.Check()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(result.Clean(), result.Corruptions, result.Leaks, result.InUseBitmaps)
	// Output: true 0 0 0
}

// Open an image a running VM holds, read-only as qemu-img -U does.
func ExampleForceShare() {
	image, err := hbitmap.Open("/var/lib/vm/disk.qcow2", hbitmap.ForceShare())
	if err != nil {
		fmt.Println(errors.Is(err, fs.ErrNotExist))
		return
	}
	defer image.Close()
	// Output: true
}
