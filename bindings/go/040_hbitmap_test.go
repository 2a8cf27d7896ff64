// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"errors"
	"math/rand"
	"sync"
	"syscall"
	"testing"

	"libhbitmap.org/go/hbitmap"
)

// What the C library aborts on is an error here.
func TestHBitmapPreconditions(t *testing.T) {
	if _, err := hbitmap.NewHBitmap(1<<20, 64); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("granularity 64: %v", err)
	}
	if _, err := hbitmap.NewHBitmap(1<<42, 0); !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("2^42 groups: %v", err)
	}
	if hb, err := hbitmap.NewHBitmap(1<<41, 0); err != nil {
		t.Fatalf("2^41 groups: %v", err)
	} else {
		hb.Close()
	}
	hb, err := hbitmap.NewHBitmap(1000, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	for _, r := range [][2]uint64{{1000, 1}, {999, 2}, {1 << 63, 1 << 63}, {^uint64(0), 2}} {
		if err := hb.Set(r[0], r[1]); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("set %v: %v", r, err)
		}
		if err := hb.Reset(r[0], r[1]); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("reset %v: %v", r, err)
		}
	}
	if _, err := hb.Get(1000); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("get 1000: %v", err)
	}
	if err := hb.Set(1000, 0); err != nil {
		t.Errorf("an empty range at the end: %v", err)
	}
	// Serialization chunks: aligned to 64 << 4 = 1024 items, except the last.
	if a, err := hb.SerializationAlign(); err != nil || a != 1024 {
		t.Fatalf("align %d %v", a, err)
	}
	buf := make([]byte, 8)
	for _, c := range [][2]uint64{{1, 999}, {0, 1009}, {512, 488}} {
		if _, err := hb.SerializePart(buf, c[0], c[1]); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("serialize chunk %v: %v", c, err)
		}
		if err := hb.DeserializePart(buf, c[0], c[1], true); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("deserialize chunk %v: %v", c, err)
		}
	}
	if _, err := hb.SerializePart(nil, 0, 1000); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("a short buffer: %v", err)
	}
	big, _ := hbitmap.NewHBitmap(1<<20, 58)
	defer big.Close()
	if _, err := big.SerializationAlign(); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("granularity 58: %v", err)
	}
	if _, err := big.SerializationSize(0, 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("granularity 58: %v", err)
	}
	// A size whose group count wraps: the items past the last group are refused.
	wrapped, err := hbitmap.NewHBitmap(^uint64(0), 8)
	if err != nil {
		t.Fatal(err)
	}
	defer wrapped.Close()
	if err := wrapped.Set(1<<63, 1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("set past the wrapped groups: %v", err)
	}
	hb.Close()
	if err := hb.Set(0, 1); !errors.Is(err, syscall.EBADF) {
		t.Errorf("set on a closed bitmap: %v", err)
	}
}

// Set, reset, get, count, extents (callback and iterator) against a plain model, and a round
// trip through QEMU's serialization format in chunks.
func TestHBitmapModel(t *testing.T) {
	const size, granularity = 1<<20 + 100, 3
	hb, err := hbitmap.NewHBitmap(size, granularity)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	model := make([]bool, (size+7)/8) // one per group
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 20000; i++ {
		start := uint64(rng.Int63n(size))
		count := uint64(rng.Int63n(64))
		if start+count > size {
			count = size - start
		}
		set := rng.Intn(2) != 0
		if set {
			err = hb.Set(start, count)
		} else {
			err = hb.Reset(start, count)
		}
		if err != nil {
			t.Fatal(err)
		}
		for g := start >> granularity; count > 0 && g <= (start+count-1)>>granularity; g++ {
			model[g] = set
		}
	}
	var want []hbitmap.Extent
	var dirty uint64
	for g, bit := range model {
		if !bit {
			continue
		}
		dirty += 8
		start := uint64(g) << granularity
		end := start + 8
		if end > size {
			end = size
		}
		if n := len(want); n > 0 && want[n-1].End() == start {
			want[n-1].Length = end - want[n-1].Offset
		} else {
			want = append(want, hbitmap.Extent{Offset: start, Length: end - start})
		}
	}
	if count, err := hb.Count(); err != nil || count != dirty {
		t.Fatalf("count %d, want %d (%v)", count, dirty, err)
	}
	for i := 0; i < 1000; i++ {
		item := uint64(rng.Int63n(size))
		if got, err := hb.Get(item); err != nil || got != model[item>>granularity] {
			t.Fatalf("get %d: %v %v", item, got, err)
		}
	}
	var got []hbitmap.Extent
	if err := hb.Extents(0, func(e hbitmap.Extent) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	if !sameExtents(got, want) {
		t.Fatalf("extents: %d, want %d", len(got), len(want))
	}
	if len(want) < 2048 {
		t.Fatalf("only %d extents: the batches are not exercised", len(want))
	}
	got = got[:0]
	for it := hb.Iter(0); it.Next(); {
		got = append(got, it.Extent())
	}
	if !sameExtents(got, want) {
		t.Fatalf("iterator: %d extents, want %d", len(got), len(want))
	}
	// From the middle of an extent.
	mid := want[len(want)/2]
	it := hb.Iter(mid.Offset + 1)
	if !it.Next() || it.Extent() != (hbitmap.Extent{Offset: mid.Offset + 1, Length: mid.Length - 1}) {
		t.Fatalf("from inside %v: %v", mid, it.Extent())
	}
	stop := errors.New("stop")
	n := 0
	if err := hb.Extents(0, func(hbitmap.Extent) error { n++; return stop }); err != stop || n != 1 {
		t.Fatalf("stopping: %d %v", n, err)
	}

	// Serialize in chunks of 64 KiB of items, deserialize into a fresh bitmap.
	copy, err := hbitmap.NewHBitmap(size, granularity)
	if err != nil {
		t.Fatal(err)
	}
	defer copy.Close()
	align, _ := hb.SerializationAlign()
	chunk := 64 * align
	for start := uint64(0); start < size; start += chunk {
		count := chunk
		if start+count > size {
			count = size - start
		}
		n, err := hb.SerializationSize(start, count)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, n)
		if w, err := hb.SerializePart(buf, start, count); err != nil || uint64(w) != n {
			t.Fatalf("serialize %d: %d %v", start, w, err)
		}
		if err := copy.DeserializePart(buf, start, count, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := copy.DeserializeFinish(); err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	if err := copy.Extents(0, func(e hbitmap.Extent) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	if !sameExtents(got, want) {
		t.Fatal("the deserialized bitmap differs")
	}
	if err := copy.DeserializeOnes(0, 1024, true); err != nil {
		t.Fatal(err)
	}
	if err := copy.DeserializeZeroes(0, 1024, true); err != nil {
		t.Fatal(err)
	}
	if d, _ := copy.Get(5); d {
		t.Fatal("deserialize zeroes left a bit")
	}
	if err := copy.ResetAll(); err != nil {
		t.Fatal(err)
	}
	if c, _ := copy.Count(); c != 0 {
		t.Fatal("reset all")
	}
}

// Several goroutines on one bitmap and one image: the mutexes serialize them (run with -race).
func TestConcurrentUse(t *testing.T) {
	hb, err := hbitmap.NewHBitmap(1<<30, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	dir := t.TempDir()
	image, err := hbitmap.Create(dir+"/c.qcow2", 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer image.Close()
	if err := image.Add("a"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				off := uint64(g*50+i) << 21
				if err := hb.Set(off, 1); err != nil {
					t.Error(err)
				}
				if err := image.Set("a", off, 1); err != nil {
					t.Error(err)
				}
				if _, err := image.Bitmaps(); err != nil {
					t.Error(err)
				}
			}
		}(g)
	}
	// An image's callback copying into a bitmap while that bitmap is stored into the image:
	// one lock order (images before bitmaps), no deadlock.
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				var err error
				if g%2 == 0 {
					err = image.Extents("a", func(e hbitmap.Extent) error { return hb.Set(e.Offset, e.Length) })
				} else {
					err = image.Store("copy", hb, true)
				}
				if err != nil {
					t.Error(err)
				}
			}
		}(g)
	}
	wg.Wait()
	if c, _ := hb.Count(); c != 400*65536 {
		t.Fatalf("count %d", c)
	}
	if b, err := image.Lookup("a"); err != nil || b.DirtyBytes != 400*65536 {
		t.Fatalf("%+v %v", b, err)
	}
}
