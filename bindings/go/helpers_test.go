// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"libhbitmap.org/go/hbitmap"
)

// need fails the test when a tool the tests rely on is missing: the test script installs
// them, so a missing one is an error, not a reason to skip.
func need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (qemu-utils, libnbd-bin): %v", tool, err)
		}
	}
}

// run runs a command and returns its standard output, failing the test on an error.
func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// qemuImage makes a qcow2 image with qemu-img.
func qemuImage(t testing.TB, dir, name string, size string, clusterSize int) string {
	t.Helper()
	path := filepath.Join(dir, name)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", clusterSize), path, size)
	return path
}

// qemuWrite writes a pattern with qemu-io: QEMU itself records the write in every enabled
// bitmap.
func qemuWrite(t testing.TB, path string, offset, length uint64) {
	t.Helper()
	run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x5a %d %d", offset, length), path)
}

type qemuBitmap struct {
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
	Flags       []string `json:"flags"`
}

// qemuBitmaps returns the bitmaps qemu-img info --output=json shows.
func qemuBitmaps(t testing.TB, path string) []qemuBitmap {
	t.Helper()
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []qemuBitmap `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	out := run(t, "qemu-img", "info", "-U", "--output=json", path)
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return info.FormatSpecific.Data.Bitmaps
}

// sameAsQemu checks that the binding lists the bitmaps qemu-img info lists, in order.
func sameAsQemu(t testing.TB, path string, bitmaps []hbitmap.Bitmap) {
	t.Helper()
	want := qemuBitmaps(t, path)
	if len(want) != len(bitmaps) {
		t.Fatalf("%s: %d bitmaps, qemu-img info lists %d: %+v", path, len(bitmaps), len(want), want)
	}
	for i, q := range want {
		b := bitmaps[i]
		// encoding/json turns each byte that is not UTF-8 into U+FFFD.
		name := replaceInvalid(b.Name)
		flags := []string{}
		if b.InUse {
			flags = append(flags, "in-use")
		}
		if b.Auto {
			flags = append(flags, "auto")
		}
		sort.Strings(flags)
		qflags := append([]string{}, q.Flags...)
		sort.Strings(qflags)
		if name != q.Name || b.Granularity != q.Granularity || strings.Join(flags, ",") != strings.Join(qflags, ",") {
			t.Errorf("%s: bitmap %d is %q %d %v, qemu-img info says %q %d %v", path, i, b.Name, b.Granularity, flags, q.Name, q.Granularity, qflags)
		}
		if string(b.NameBytes) != b.Name {
			t.Errorf("NameBytes %q differ from Name %q", b.NameBytes, b.Name)
		}
	}
}

func isValid(s string) bool { return strings.ToValidUTF8(s, "") == s }

// replaceInvalid replaces each byte that is not UTF-8 by U+FFFD, as encoding/json does.
func replaceInvalid(s string) string {
	var b strings.Builder
	for _, r := range s {
		b.WriteRune(r)
	}
	return b.String()
}

// qemuCheck runs qemu-img check and fails the test unless the image is clean; it returns the
// figures.
func qemuCheck(t testing.TB, path string) qemuCheckResult {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "-U", "--output=json", path)
	out, err := cmd.Output()
	var result qemuCheckResult
	if jerr := json.Unmarshal(out, &result); jerr != nil {
		t.Fatalf("qemu-img check %s: %v %v\n%s", path, err, jerr, out)
	}
	if err != nil || result.Corruptions != 0 || result.Leaks != 0 || result.CheckErrors != 0 {
		t.Fatalf("qemu-img check %s is not clean: %v\n%s", path, err, out)
	}
	return result
}

type qemuCheckResult struct {
	CheckErrors    uint64 `json:"check-errors"`
	Corruptions    uint64 `json:"corruptions"`
	Leaks          uint64 `json:"leaks"`
	ImageEndOffset uint64 `json:"image-end-offset"`
}

// nbdExtents returns the dirty extents QEMU reports for a bitmap: qemu-nbd -B exports it,
// nbdinfo --json --map=qemu:dirty-bitmap:NAME reads it. Adjacent extents are merged.
func nbdExtents(t testing.TB, dir, path, name string) []hbitmap.Extent {
	t.Helper()
	socket := filepath.Join(dir, fmt.Sprintf("nbd-%d.sock", time.Now().UnixNano()))
	server := exec.Command("qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", name, "-k", socket, path)
	var stderr bytes.Buffer
	server.Stderr = &stderr
	if err := server.Start(); err != nil {
		t.Fatalf("qemu-nbd: %v", err)
	}
	defer func() {
		_ = server.Process.Kill()
		_ = server.Wait()
		_ = os.Remove(socket)
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd did not start: %s", stderr.String())
		}
	}
	out := run(t, "nbdinfo", "--json", "--map=qemu:dirty-bitmap:"+name, "nbd+unix:///?socket="+socket)
	var entries []struct {
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
		Type   uint64 `json:"type"`
	}
	if err := json.Unmarshal(out, &entries); err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	var extents []hbitmap.Extent
	for _, e := range entries {
		if e.Type&1 == 0 || e.Length == 0 {
			continue
		}
		if n := len(extents); n > 0 && extents[n-1].End() == e.Offset {
			extents[n-1].Length += e.Length
			continue
		}
		extents = append(extents, hbitmap.Extent{Offset: e.Offset, Length: e.Length})
	}
	return extents
}

// extentsOf collects the extents the binding streams for a bitmap.
func extentsOf(t testing.TB, image *hbitmap.Image, name string) []hbitmap.Extent {
	t.Helper()
	var extents []hbitmap.Extent
	if err := image.Extents(name, func(e hbitmap.Extent) error {
		extents = append(extents, e)
		return nil
	}); err != nil {
		t.Fatalf("extents of %q: %v", name, err)
	}
	return extents
}

func sameExtents(a, b []hbitmap.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// agreeWithQemu checks the bitmaps and every bitmap's extents of a closed image against
// qemu-img info and qemu-nbd + nbdinfo, and that qemu-img check finds it clean.
func agreeWithQemu(t testing.TB, dir, path string) {
	t.Helper()
	qemuCheck(t, path)
	image, err := hbitmap.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer image.Close()
	bitmaps, err := image.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	sameAsQemu(t, path, bitmaps)
	for _, b := range bitmaps {
		if b.InUse || !isValid(b.Name) || strings.ContainsAny(b.Name, "\t\n") {
			continue // qemu-nbd -B takes the name as an argument: plain names only
		}
		got := extentsOf(t, image, b.Name)
		want := nbdExtents(t, dir, path, b.Name)
		if !sameExtents(got, want) {
			t.Errorf("%s: bitmap %q: extents %v, QEMU reports %v", path, b.Name, got, want)
		}
		var total uint64
		for _, e := range got {
			total += e.Length
		}
		if b.DirtyBytes != int64(total) {
			t.Errorf("%s: bitmap %q: DirtyBytes %d, extents sum to %d", path, b.Name, b.DirtyBytes, total)
		}
	}
}

// digest returns the SHA-256 of a file: "nothing written" is the same digest after.
func digest(t testing.TB, path string) [32]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// errno returns the errno of a binding error, failing the test for any other error.
func errno(t testing.TB, err error) *hbitmap.Error {
	t.Helper()
	var e *hbitmap.Error
	if !errors.As(err, &e) {
		t.Fatalf("not an *hbitmap.Error: %T %v", err, err)
	}
	return e
}
