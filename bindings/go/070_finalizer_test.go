// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"runtime"
	"syscall"
	"testing"
	"time"

	"libhbitmap.org/go/hbitmap"
)

// An image that was never closed is closed by its finalizer once unreachable: its write lock
// goes, and the image opens for writing again.
func TestFinalizerClosesForgottenImage(t *testing.T) {
	path := t.TempDir() + "/forgotten.qcow2"
	func() {
		image, err := hbitmap.Create(path, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if err := image.Add("a"); err != nil {
			t.Fatal(err)
		}
		// While it is open, its lock keeps a second writer out (OFD locks: also in this
		// process).
		if second, err := hbitmap.Open(path, hbitmap.ReadWrite()); !errors.Is(err, syscall.EAGAIN) {
			if second != nil {
				second.Close()
			}
			t.Fatalf("a second writer: %v", err)
		}
		// image is dropped here without Close.
	}()
	hb, err := hbitmap.NewHBitmap(1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	_ = hb.Set(0, 1)
	hb = nil
	_ = hb
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		runtime.GC()
		image, err := hbitmap.Open(path, hbitmap.ReadWrite())
		if err == nil {
			bitmaps, err := image.Bitmaps()
			if err != nil || len(bitmaps) != 1 {
				t.Fatalf("%+v %v", bitmaps, err)
			}
			if err := image.Close(); err != nil {
				t.Fatal(err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the forgotten image still holds its lock: %v", err)
		}
	}
}
