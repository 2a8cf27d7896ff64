// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"strings"
	"syscall"
	"testing"

	"libhbitmap.org/go/hbitmap"
)

// Check gives qemu-img check's figures; a bitmap left in use is found, and Repair(RepairAll)
// removes it, keeps the intact one, and leaves an image qemu-img check finds clean.
func TestCheckAndRepair(t *testing.T) {
	need(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := qemuImage(t, dir, "disk.qcow2", "128M", 65536)
	run(t, "qemu-img", "bitmap", "--add", path, "kept")
	run(t, "qemu-img", "snapshot", "-c", "snap", path)
	qemuWrite(t, path, 3<<20, 1<<20)

	image, err := hbitmap.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	result, err := image.Check()
	image.Close()
	if err != nil {
		t.Fatal(err)
	}
	q := qemuCheck(t, path)
	if !result.Clean() || result.ImageEndOffset != q.ImageEndOffset || result.Corruptions != q.Corruptions || result.Leaks != q.Leaks {
		t.Fatalf("check %+v, qemu-img check %+v", result, q)
	}

	// A bitmap loaded and never stored stays in use, as after a crash.
	image, err = hbitmap.Open(path, hbitmap.ReadWrite())
	if err != nil {
		t.Fatal(err)
	}
	if err := image.Add("crashed"); err != nil {
		t.Fatal(err)
	}
	tracked, err := image.Load("crashed")
	if err != nil {
		t.Fatal(err)
	}
	tracked.Close()
	err = image.Close()
	if !errors.Is(err, syscall.EBUSY) || !strings.Contains(err.Error(), "crashed") {
		t.Fatalf("close with a loaded bitmap: %v", err)
	}

	image, err = hbitmap.Open(path, hbitmap.ReadWrite())
	if err != nil {
		t.Fatal(err)
	}
	defer image.Close()
	result, err = image.Check()
	if err != nil {
		t.Fatal(err)
	}
	if result.InUseBitmaps != 1 || !result.Clean() {
		t.Fatalf("check: %+v", result)
	}
	found := false
	for _, f := range result.Findings {
		found = found || (f.Kind == "WARNING" && strings.Contains(f.Text, "'crashed'"))
	}
	if !found {
		t.Fatalf("no warning about 'crashed': %+v", result.Findings)
	}
	if _, err := image.Repair(hbitmap.RepairLeaks); err != nil {
		t.Fatalf("repair leaks: %v", err)
	}
	result, err = image.Repair(hbitmap.RepairAll)
	if err != nil {
		t.Fatal(err)
	}
	repaired := false
	for _, f := range result.Findings {
		repaired = repaired || (f.Kind == "REPAIRED" && strings.Contains(f.Text, "'crashed'"))
	}
	if !repaired || result.InUseBitmaps != 0 || !result.Clean() {
		t.Fatalf("repair all: %+v", result)
	}
	if err := image.Close(); err != nil {
		t.Fatal(err)
	}
	q = qemuCheck(t, path)
	if result.ImageEndOffset != q.ImageEndOffset {
		t.Fatalf("image end offset %d, qemu-img check says %d", result.ImageEndOffset, q.ImageEndOffset)
	}
	bitmaps := qemuBitmaps(t, path)
	if len(bitmaps) != 1 || bitmaps[0].Name != "kept" {
		t.Fatalf("after the repair: %+v", bitmaps)
	}
	agreeWithQemu(t, dir, path)

	// Repairing a read-only image is refused.
	ro, err := hbitmap.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.Repair(hbitmap.RepairAll); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("repair of a read-only image: %v", err)
	}
}
