// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"libhbitmap.org/go/hbitmap"
)

// Bad input gives a typed error each, writes nothing and neither panics nor aborts.
func TestBadInput(t *testing.T) {
	need(t, "qemu-img")
	dir := t.TempDir()

	t.Run("missing file", func(t *testing.T) {
		_, err := hbitmap.Open(filepath.Join(dir, "nope.qcow2"))
		if !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, syscall.ENOENT) {
			t.Fatalf("%v", err)
		}
		e := errno(t, err)
		if e.Op != "open" || !strings.Contains(e.Error(), "nope.qcow2") {
			t.Fatalf("the error names neither the operation nor the image: %v", e)
		}
	})

	t.Run("raw image", func(t *testing.T) {
		path := filepath.Join(dir, "raw.img")
		run(t, "qemu-img", "create", "-q", "-f", "raw", path, "1M")
		before := digest(t, path)
		_, err := hbitmap.Open(path, hbitmap.ReadWrite())
		if !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("%v", err)
		}
		if digest(t, path) != before {
			t.Fatal("written")
		}
	})

	t.Run("truncated qcow2", func(t *testing.T) {
		path := qemuImage(t, dir, "truncated.qcow2", "64M", 65536)
		run(t, "qemu-img", "bitmap", "--add", path, "b")
		info, _ := os.Stat(path)
		for _, size := range []int64{0, 50, 4096, info.Size() - 65536} {
			if err := os.Truncate(path, size); err != nil {
				t.Fatal(err)
			}
			before := digest(t, path)
			image, err := hbitmap.Open(path, hbitmap.ReadWrite())
			if err == nil {
				image.Close()
				t.Fatalf("truncated to %d: opened", size)
			}
			if e := errno(t, err); e.Errno != syscall.EINVAL && e.Errno != syscall.EIO {
				t.Fatalf("truncated to %d: %v", size, err)
			}
			if digest(t, path) != before {
				t.Fatalf("truncated to %d: written", size)
			}
		}
	})

	t.Run("held by qemu-storage-daemon", func(t *testing.T) {
		need(t, "qemu-storage-daemon")
		path := qemuImage(t, dir, "held.qcow2", "64M", 65536)
		run(t, "qemu-img", "bitmap", "--add", path, "b")
		socket := filepath.Join(dir, "qsd.sock")
		daemon := exec.Command("qemu-storage-daemon",
			"--blockdev", "driver=file,filename="+path+",node-name=file",
			"--blockdev", "driver=qcow2,file=file,node-name=disk",
			"--nbd-server", "addr.type=unix,addr.path="+socket,
			"--export", "type=nbd,id=e,node-name=disk,writable=on")
		var stderr strings.Builder
		daemon.Stderr = &stderr
		if err := daemon.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = daemon.Process.Kill()
			_ = daemon.Wait()
		}()
		// The daemon opens the image before it listens: once the socket answers, it holds it.
		// (Opening the image meanwhile would race with the daemon for the lock.)
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if conn, err := net.Dial("unix", socket); err == nil {
				conn.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("qemu-storage-daemon did not start: %s", stderr.String())
			}
		}
		_, err := hbitmap.Open(path, hbitmap.ReadWrite())
		if !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("open for writing of an image QEMU holds: %v", err)
		}
		if !strings.Contains(err.Error(), "held.qcow2") {
			t.Fatalf("the error does not name the image: %v", err)
		}
		// Read-only with force-share (qemu-img -U) works, and refuses writes.
		image, err := hbitmap.Open(path, hbitmap.ForceShare())
		if err != nil {
			t.Fatal(err)
		}
		defer image.Close()
		bitmaps, err := image.Bitmaps()
		if err != nil || len(bitmaps) != 1 || !bitmaps[0].InUse {
			t.Fatalf("QEMU holds 'b' in use: %+v %v", bitmaps, err)
		}
		if err := image.Add("c"); !errors.Is(err, syscall.EROFS) {
			t.Fatalf("add on a read-only image: %v", err)
		}
		if err := image.Extents("b", func(hbitmap.Extent) error { return nil }); !errors.Is(err, syscall.EBUSY) {
			t.Fatalf("extents of a bitmap QEMU has in use: %v", err)
		}
	})

	t.Run("bitmap names", func(t *testing.T) {
		path := qemuImage(t, dir, "names.qcow2", "64M", 65536)
		run(t, "qemu-img", "bitmap", "--add", path, "b")
		image, err := hbitmap.Open(path, hbitmap.ReadWrite())
		if err != nil {
			t.Fatal(err)
		}
		defer image.Close()
		before := digest(t, path)
		calls := map[string]func(name string) error{
			"add":     func(n string) error { return image.Add(n) },
			"remove":  func(n string) error { return image.Remove(n) },
			"clear":   func(n string) error { return image.Clear(n) },
			"enable":  func(n string) error { return image.Enable(n) },
			"disable": func(n string) error { return image.Disable(n) },
			"set":     func(n string) error { return image.Set(n, 0, 1) },
			"reset":   func(n string) error { return image.Reset(n, 0, 65536) },
			"merge":   func(n string) error { return image.Merge(n, "b") },
			"merge into": func(n string) error {
				return image.Merge("b", n)
			},
			"import": func(n string) error { return image.Import(n, nil) },
			"extents": func(n string) error {
				return image.Extents(n, func(hbitmap.Extent) error { return nil })
			},
			"lookup": func(n string) error { _, err := image.Lookup(n); return err },
			"load":   func(n string) error { _, err := image.Load(n); return err },
			"inspect": func(n string) error {
				_, err := image.Inspect(n)
				return err
			},
		}
		for op, call := range calls {
			// A NUL byte: EINVAL, the library is not called.
			err := call("a\x00b")
			if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "NUL") {
				t.Errorf("%s of a name with a NUL: %v", op, err)
			}
			if op == "add" || op == "import" {
				continue
			}
			// Missing names, UTF-8 or not: ENOENT naming the bitmap.
			for _, name := range []string{"missing", "\xff\xfe", "tab\there"} {
				err := call(name)
				if !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s of missing %q: %v", op, name, err)
				} else if e := errno(t, err); !strings.Contains(e.Error(), "missing") && !strings.Contains(e.Error(), `\xff\xfe`) && !strings.Contains(e.Error(), `tab\there`) {
					t.Errorf("%s of missing %q: the error does not name it: %v", op, name, err)
				}
			}
		}
		// Names QEMU would not create.
		for _, name := range []string{"", strings.Repeat("x", 1024)} {
			if err := image.Add(name); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("add %q: %v", name, err)
			}
		}
		if err := image.Add("g", hbitmap.Granularity(1000)); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("granularity 1000: %v", err)
		}
		if digest(t, path) != before {
			t.Fatal("a refused call wrote to the image")
		}
		// A name that is not UTF-8 can be created, used and removed.
		if err := image.Add("\xff\xfe"); err != nil {
			t.Fatal(err)
		}
		if err := image.Set("\xff\xfe", 0, 1); err != nil {
			t.Fatal(err)
		}
		if err := image.Close(); err != nil {
			t.Fatal(err)
		}
		agreeWithQemu(t, dir, path)
		out := run(t, "qemu-img", "info", path)
		if !strings.Contains(string(out), "\xff\xfe") {
			t.Fatalf("qemu-img info does not show the name's bytes:\n%s", out)
		}
	})

	t.Run("options", func(t *testing.T) {
		path := qemuImage(t, dir, "options.qcow2", "64M", 65536)
		if _, err := hbitmap.Open(path, hbitmap.ReadWrite(), hbitmap.ForceShare()); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("ReadWrite with ForceShare: %v", err)
		}
		if _, err := hbitmap.Open(path + "\x00x"); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("a path with a NUL: %v", err)
		}
		if _, err := hbitmap.Create(filepath.Join(dir, "c.qcow2"), 1000); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("a size not a multiple of 512: %v", err)
		}
		if _, err := hbitmap.Create(filepath.Join(dir, "c.qcow2"), 1<<20, hbitmap.ClusterSize(3000)); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("cluster size 3000: %v", err)
		}
		image, err := hbitmap.Open(path, hbitmap.ReadWrite())
		if err != nil {
			t.Fatal(err)
		}
		defer image.Close()
		if _, err := image.Repair(hbitmap.RepairMode(7)); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("repair mode 7: %v", err)
		}
		// An HBitmap of another size cannot be stored.
		hb, _ := hbitmap.NewHBitmap(1<<20, 16)
		defer hb.Close()
		if err := image.Store("x", hb, true); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("store of a bitmap of another size: %v", err)
		}
		hb.Close()
		if err := image.Store("x", hb, true); !errors.Is(err, syscall.EBADF) {
			t.Fatalf("store of a closed bitmap: %v", err)
		}
	})
}
