// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"io/fs"
	"syscall"
	"testing"

	"libhbitmap.org/go/hbitmap"
)

// Every edit of the offline API on an image qemu-img made (with an internal snapshot), each
// followed by qemu-img check (clean), qemu-img info (same bitmaps) and nbdinfo through
// qemu-nbd (same extents), and by the content each edit should give.
func TestEdits(t *testing.T) {
	need(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	dir := t.TempDir()
	path := qemuImage(t, dir, "disk.qcow2", "256M", 65536)
	run(t, "qemu-img", "bitmap", "--add", path, "q")
	qemuWrite(t, path, 1<<20, 1<<20)
	run(t, "qemu-img", "snapshot", "-c", "snap", path)
	other := qemuImage(t, dir, "other.qcow2", "256M", 4096)
	run(t, "qemu-img", "bitmap", "--add", "-g", "4K", other, "o")
	qemuWrite(t, other, 100<<20, 8192)

	var image *hbitmap.Image
	reopen := func() {
		t.Helper()
		if image != nil {
			if err := image.Close(); err != nil {
				t.Fatal(err)
			}
		}
		var err error
		if image, err = hbitmap.Open(path, hbitmap.ReadWrite()); err != nil {
			t.Fatal(err)
		}
	}
	step := func(what string, err error, name string, want []hbitmap.Extent) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := image.Close(); err != nil {
			t.Fatalf("%s: close: %v", what, err)
		}
		image = nil
		agreeWithQemu(t, dir, path)
		reopen()
		if name != "" {
			if got := extentsOf(t, image, name); !sameExtents(got, want) {
				t.Fatalf("%s: '%s' has %v, want %v", what, name, got, want)
			}
		}
	}
	type E = hbitmap.Extent
	reopen()
	defer func() {
		if image != nil {
			image.Close()
		}
	}()

	step("add", image.Add("a", hbitmap.Granularity(65536)), "a", nil)
	step("add exist-ok", image.Add("a", hbitmap.Granularity(65536), hbitmap.ExistOK()), "a", nil)
	if err := image.Add("a", hbitmap.Granularity(4096), hbitmap.ExistOK()); !errors.Is(err, syscall.EEXIST) {
		t.Fatalf("exist-ok with another granularity: %v", err)
	}
	if err := image.Add("a"); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("add of an existing name: %v", err)
	}
	step("set", image.Set("a", 10<<20+1, 3<<20), "a", []E{{10 << 20, 3<<20 + 65536}})
	step("set again, adjacent", image.Set("a", 20<<20, 65536), "a", []E{{10 << 20, 3<<20 + 65536}, {20 << 20, 65536}})
	step("reset", image.Reset("a", 11<<20, 1<<20), "a", []E{{10 << 20, 1 << 20}, {12 << 20, 1<<20 + 65536}, {20 << 20, 65536}})
	if err := image.Reset("a", 11<<20+1, 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("a misaligned reset: %v", err)
	}
	if err := image.Set("a", 256<<20-1, 2); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("a set past the end: %v", err)
	}
	step("merge", image.Merge("q", "a"), "a", []E{{1 << 20, 1 << 20}, {10 << 20, 1 << 20}, {12 << 20, 1<<20 + 65536}, {20 << 20, 65536}})
	src, err := hbitmap.Open(other, hbitmap.ForceShare())
	if err != nil {
		t.Fatal(err)
	}
	err = image.MergeFrom(src, "o", "q")
	src.Close()
	step("merge from another image", err, "q", []E{{1 << 20, 1 << 20}, {100 << 20, 65536}})
	step("disable", image.Disable("a"), "", nil)
	if b, err := image.Lookup("a"); err != nil || b.Auto {
		t.Fatalf("disabled: %+v %v", b, err)
	}
	step("enable", image.Enable("a"), "", nil)
	step("clear", image.Clear("a"), "a", nil)
	step("import", image.Import("i", []E{{5 << 20, 100}, {0, 4096}, {4096, 4096}, {255 << 20, 1 << 20}}, hbitmap.Granularity(4096)),
		"i", []E{{0, 8192}, {5 << 20, 4096}, {255 << 20, 1 << 20}})
	if b, err := image.Lookup("i"); err != nil || !b.Auto || b.Granularity != 4096 {
		t.Fatalf("imported: %+v %v", b, err)
	}
	before := digest(t, path)
	if err := image.Import("i", []E{{0, 4096}, {256 << 20, 1}}); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("import past the end: %v", err)
	}
	if digest(t, path) != before {
		t.Fatal("a refused import wrote to the image")
	}
	step("import replacing, disabled, keeping the granularity", image.Import("i", []E{{6 << 20, 1}}, hbitmap.Disabled()), "i", []E{{6 << 20, 4096}})
	step("remove", image.Remove("a"), "", nil)
	step("remove missing-ok", image.Remove("a", hbitmap.MissingOK()), "", nil)
	if err := image.Remove("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("remove of a missing bitmap: %v", err)
	}

	// An HBitmap built in Go, stored, read back by QEMU.
	hb, err := hbitmap.NewHBitmap(256<<20, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	for _, e := range []E{{0, 1}, {64 << 20, 3 << 20}, {256<<20 - 1, 1}} {
		if err := hb.Set(e.Offset, e.Length); err != nil {
			t.Fatal(err)
		}
	}
	step("store", image.Store("built", hb, true), "built", []E{{0, 65536}, {64 << 20, 3 << 20}, {256<<20 - 65536, 65536}})

	// Load marks in use on a writable image; Store clears it, Release too.
	loaded, err := image.Load("built")
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := image.Lookup("built"); !b.InUse || b.DirtyBytes != -1 {
		t.Fatalf("loaded: %+v", b)
	}
	if err := image.Set("built", 0, 1); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("set of a loaded bitmap: %v", err)
	}
	if err := image.Extents("built", func(hbitmap.Extent) error { return nil }); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("extents of a bitmap in use: %v", err)
	}
	n := 0
	if err := image.InspectExtents("built", func(hbitmap.Extent) error { n++; return nil }); err != nil || n != 3 {
		t.Fatalf("inspect extents of a bitmap in use: %d %v", n, err)
	}
	if err := loaded.Set(100<<20, 1); err != nil {
		t.Fatal(err)
	}
	step("store the loaded bitmap", image.Store("built", loaded, true), "built",
		[]E{{0, 65536}, {64 << 20, 3 << 20}, {100 << 20, 65536}, {256<<20 - 65536, 65536}})
	loaded.Close()
	loaded, err = image.Load("built")
	if err != nil {
		t.Fatal(err)
	}
	loaded.Close()
	step("release", image.Release("built"), "", nil)

	// Repeated Close is harmless; a closed image refuses calls with EBADF.
	if err := image.Close(); err != nil {
		t.Fatal(err)
	}
	if err := image.Close(); err != nil {
		t.Fatal(err)
	}
	if err := image.Add("x"); !errors.Is(err, syscall.EBADF) {
		t.Fatalf("add on a closed image: %v", err)
	}
	image = nil
}
