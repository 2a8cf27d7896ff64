// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"fmt"
	"testing"

	"libhbitmap.org/go/hbitmap"
)

// Images QEMU's tools make, 512 B to 2 MiB clusters, with bitmaps qemu-img bitmap adds, writes
// QEMU records in them (qemu-io) and an internal snapshot (qemu-img snapshot -c): the binding
// lists what qemu-img info lists and streams the extents QEMU serves over NBD.
func TestQemuImages(t *testing.T) {
	need(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	for _, cluster := range []int{512, 4096, 65536, 2 << 20} {
		cluster := cluster
		t.Run(fmt.Sprintf("cluster-%d", cluster), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := qemuImage(t, dir, "disk.qcow2", "64M", cluster)
			run(t, "qemu-img", "bitmap", "--add", path, "default")
			run(t, "qemu-img", "bitmap", "--add", "-g", "512", path, "fine")
			run(t, "qemu-img", "bitmap", "--add", "-g", "1M", path, "coarse")
			run(t, "qemu-img", "bitmap", "--add", "-g", "64K", "--disable", path, "off")
			run(t, "qemu-img", "bitmap", "--add", path, "tab\there")
			run(t, "qemu-img", "bitmap", "--add", path, "\xff\xfe")
			qemuWrite(t, path, 0, 4096)
			qemuWrite(t, path, 5<<20+1000, 70000)
			run(t, "qemu-img", "snapshot", "-c", "snap", path)
			qemuWrite(t, path, 60<<20, 4<<20)
			qemuWrite(t, path, 33<<20, 512)
			agreeWithQemu(t, dir, path)

			image, err := hbitmap.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer image.Close()
			size, err := image.VirtualSize()
			if err != nil || size != 64<<20 {
				t.Fatalf("virtual size %d %v", size, err)
			}
			cs, err := image.ClusterSize()
			if err != nil || cs != uint64(cluster) {
				t.Fatalf("cluster size %d %v", cs, err)
			}
			b, err := image.Lookup("fine")
			if err != nil {
				t.Fatal(err)
			}
			// 'fine' (512 B granules) holds each write rounded out to 512 bytes.
			want := int64(4096 + (5<<20+1000+70000+511)/512*512 - (5<<20+1000)/512*512 + 4<<20 + 512)
			if b.Granularity != 512 || b.DirtyBytes != want {
				t.Fatalf("'fine': %+v, want %d dirty bytes", b, want)
			}
			off, err := image.Lookup("off")
			if err != nil || off.DirtyBytes != 0 || off.Auto {
				t.Fatalf("'off' recorded writes while disabled: %+v %v", off, err)
			}
			// The non-UTF-8 name is usable by its bytes.
			if _, err := image.Lookup("\xff\xfe"); err != nil {
				t.Fatal(err)
			}
			got := extentsOf(t, image, "\xff\xfe")
			if !sameExtents(got, extentsOf(t, image, "default")) {
				t.Fatalf("'\\xff\\xfe' and 'default' should be equal: %v", got)
			}
		})
	}
}

// An image the binding creates and fills is read by QEMU as written.
func TestBindingImagesQemuReads(t *testing.T) {
	need(t, "qemu-img", "qemu-nbd", "nbdinfo")
	for _, cluster := range []uint64{512, 65536, 2 << 20} {
		cluster := cluster
		t.Run(fmt.Sprintf("cluster-%d", cluster), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := dir + "/made.qcow2"
			image, err := hbitmap.Create(path, 1<<30, hbitmap.ClusterSize(cluster))
			if err != nil {
				t.Fatal(err)
			}
			if err := image.Add("a"); err != nil {
				t.Fatal(err)
			}
			if err := image.Add("b", hbitmap.Granularity(4096), hbitmap.Disabled()); err != nil {
				t.Fatal(err)
			}
			for i := uint64(0); i < 100; i++ {
				if err := image.Set("a", i*7<<20, 100<<10); err != nil {
					t.Fatal(err)
				}
			}
			if err := image.Set("b", 1000, 1); err != nil {
				t.Fatal(err)
			}
			if err := image.Close(); err != nil {
				t.Fatal(err)
			}
			agreeWithQemu(t, dir, path)
			image, err = hbitmap.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer image.Close()
			// QEMU's default granularity: the cluster size clamped to 4K..64K.
			g := cluster
			if g < 4096 {
				g = 4096
			} else if g > 65536 {
				g = 65536
			}
			a := extentsOf(t, image, "a")
			if len(a) != 100 || a[1] != (hbitmap.Extent{Offset: 7 << 20, Length: (100<<10 + g - 1) / g * g}) {
				t.Fatalf("'a': %d extents, %v...", len(a), a[:2])
			}
			if b := extentsOf(t, image, "b"); len(b) != 1 || b[0] != (hbitmap.Extent{Offset: 0, Length: 4096}) {
				t.Fatalf("'b': %v", b)
			}
		})
	}
}
