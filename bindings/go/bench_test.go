// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"libhbitmap.org/go/hbitmap"
	"libhbitmap.org/go/hbitmap/internal/cbench"
)

// The fragmented bitmap of the benchmark: a 1 TiB disk at 64 KiB granularity with every 16th
// granule dirty, 1,048,576 extents of 64 KiB.
const (
	benchSize   = 1 << 40
	benchStride = 16 << 16
)

func benchImage(b *testing.B) (path string, extents, bytes uint64) {
	b.Helper()
	path = filepath.Join(b.TempDir(), "1tib.qcow2")
	image, err := hbitmap.Create(path, benchSize)
	if err != nil {
		b.Fatal(err)
	}
	defer image.Close()
	var list []hbitmap.Extent
	for off := uint64(0); off < benchSize; off += benchStride {
		list = append(list, hbitmap.Extent{Offset: off, Length: 65536})
	}
	if err := image.Import("frag", list, hbitmap.Granularity(65536)); err != nil {
		b.Fatal(err)
	}
	return path, uint64(len(list)), uint64(len(list)) * 65536
}

// dumpDoc is what a program reads from qbitmap dump --output=json: its extents are
// {"offset": N, "length": N}, which encoding/json matches to Extent's fields.
type dumpDoc struct {
	Extents []hbitmap.Extent `json:"extents"`
}

// BenchmarkExtents1TiB lists the extents of a fragmented bitmap of a 1 TiB disk four ways,
// each from the image file to every extent in the program: through the binding, through the
// same C calls made from C, from qbitmap dump --output=json (a separate process, its JSON
// decoded), and from qemu-nbd serving the bitmap and nbdinfo --json --map reading it.
func BenchmarkExtents1TiB(b *testing.B) {
	need(b, "qbitmap", "qemu-nbd", "nbdinfo")
	path, wantExtents, wantBytes := benchImage(b)
	check := func(b *testing.B, n, total uint64) {
		if n != wantExtents || total != wantBytes {
			b.Fatalf("%d extents of %d bytes, want %d of %d", n, total, wantExtents, wantBytes)
		}
	}
	b.Run("binding", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			image, err := hbitmap.Open(path)
			if err != nil {
				b.Fatal(err)
			}
			var n, total uint64
			err = image.Extents("frag", func(e hbitmap.Extent) error {
				n++
				total += e.Length
				return nil
			})
			image.Close()
			if err != nil {
				b.Fatal(err)
			}
			check(b, n, total)
		}
	})
	b.Run("c", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			n, total, err := cbench.Extents(path, "frag")
			if err != nil {
				b.Fatal(err)
			}
			check(b, n, total)
		}
	})
	b.Run("qbitmap-json", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			out, err := exec.Command("qbitmap", "dump", "--output=json", path, "frag").Output()
			if err != nil {
				b.Fatal(err)
			}
			var doc dumpDoc
			if err := json.Unmarshal(out, &doc); err != nil {
				b.Fatal(err)
			}
			var total uint64
			for _, e := range doc.Extents {
				total += e.Length
			}
			check(b, uint64(len(doc.Extents)), total)
		}
	})
	b.Run("qemu-nbd-nbdinfo", func(b *testing.B) {
		dir := b.TempDir()
		for i := 0; i < b.N; i++ {
			n, total := nbdinfoExtents(b, dir, path, "frag")
			check(b, n, total)
		}
	})
}

// nbdinfoExtents serves the bitmap with qemu-nbd, reads it with nbdinfo --json --map and counts
// the dirty extents (adjacent ones merged).
func nbdinfoExtents(b *testing.B, dir, path, name string) (n, total uint64) {
	socket := filepath.Join(dir, "bench.sock")
	server := exec.Command("qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", name, "-k", socket, path)
	if err := server.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = server.Process.Kill()
		_ = server.Wait()
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("qemu-nbd did not start")
		}
	}
	out, err := exec.Command("nbdinfo", "--json", "--map=qemu:dirty-bitmap:"+name, "nbd+unix:///?socket="+socket).Output()
	if err != nil {
		b.Fatal(err)
	}
	var entries []struct {
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
		Type   uint64 `json:"type"`
	}
	if err := json.NewDecoder(bufio.NewReader(bytes.NewReader(out))).Decode(&entries); err != nil {
		b.Fatal(fmt.Errorf("nbdinfo output: %w", err))
	}
	var end uint64 = ^uint64(0)
	for _, e := range entries {
		if e.Type&1 == 0 {
			continue
		}
		if e.Offset != end {
			n++
		}
		total += e.Length
		end = e.Offset + e.Length
	}
	return n, total
}

// BenchmarkHBitmapExtents is the binding's share alone: the extents of an in-memory bitmap
// of 1,048,576 extents, through the binding's callback and through the iterator.
func BenchmarkHBitmapExtents(b *testing.B) {
	hb, err := hbitmap.NewHBitmap(benchSize, 16)
	if err != nil {
		b.Fatal(err)
	}
	defer hb.Close()
	for off := uint64(0); off < benchSize; off += benchStride {
		_ = hb.Set(off, 65536)
	}
	b.Run("callback", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			n := 0
			_ = hb.Extents(0, func(hbitmap.Extent) error { n++; return nil })
			if n != benchSize/benchStride {
				b.Fatal(n)
			}
		}
	})
	b.Run("iterator", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			n := 0
			for it := hb.Iter(0); it.Next(); {
				n++
			}
			if n != benchSize/benchStride {
				b.Fatal(n)
			}
		}
	})
}
