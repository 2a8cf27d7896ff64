// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"

	"libhbitmap.org/go/hbitmap"
)

type change struct {
	Disk   string `json:"disk"`
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
}

// buildExample builds examples/offline-backup into dir.
func buildExample(t *testing.T, dir string) string {
	t.Helper()
	exe := filepath.Join(dir, "offline-backup")
	gotool := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command(gotool, "build", "-o", exe, "./examples/offline-backup")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return exe
}

// runExample runs the example; crash is OFFLINE_BACKUP_CRASH ("" for none). It returns the
// changes printed and whether the process was killed.
func runExample(t *testing.T, exe, crash string, args ...string) ([]change, bool) {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Env = os.Environ()
	if crash != "" {
		cmd.Env = append(cmd.Env, "OFFLINE_BACKUP_CRASH="+crash)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	killed := false
	if exit, ok := err.(*exec.ExitError); ok {
		status := exit.Sys().(syscall.WaitStatus)
		killed = status.Signaled() && status.Signal() == syscall.SIGKILL
		if !killed {
			t.Fatalf("offline-backup %v: %v\n%s", args, err, stderr.String())
		}
	} else if err != nil {
		t.Fatal(err)
	}
	var changes []change
	dec := json.NewDecoder(&stdout)
	for dec.More() {
		var c change
		if err := dec.Decode(&c); err != nil {
			t.Fatalf("output: %v", err)
		}
		changes = append(changes, c)
	}
	return changes, killed
}

// state is each disk's bitmaps and their extents, as text, to compare end states.
func state(t *testing.T, disks []string) string {
	t.Helper()
	var b strings.Builder
	for _, disk := range disks {
		image, err := hbitmap.Open(disk)
		if err != nil {
			t.Fatal(err)
		}
		bitmaps, err := image.Bitmaps()
		if err != nil {
			t.Fatal(err)
		}
		sort.Slice(bitmaps, func(i, j int) bool { return bitmaps[i].Name < bitmaps[j].Name })
		for _, bm := range bitmaps {
			fmt.Fprintf(&b, "%s %s %d %v %v %v\n", filepath.Base(disk), bm.Name, bm.Granularity, bm.Auto, bm.InUse, extentsOf(t, image, bm.Name))
		}
		image.Close()
		qemuCheck(t, disk)
	}
	return b.String()
}

// The example's flow on a VM of three disks, with QEMU writing to them between backups, and
// a kill between two disks at each step: the retry converges to the state of a run without
// a kill, and lists the same changes.
func TestOfflineBackupExample(t *testing.T) {
	need(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	dir := t.TempDir()
	exe := buildExample(t, dir)

	// Two identical VMs: one backed up without a crash, one with a crash at every step.
	setup := func(vm string) []string {
		var disks []string
		for i, cluster := range []int{65536, 512, 2 << 20} {
			disks = append(disks, qemuImage(t, dir, fmt.Sprintf("%s-disk%d.qcow2", vm, i), "1G", cluster))
		}
		return disks
	}
	guestWrites := func(disks []string, round int) {
		for i, disk := range disks {
			qemuWrite(t, disk, uint64(round*100+i*10)<<20, 1<<20)
			qemuWrite(t, disk, uint64(900+round)<<20+4096, 4096)
		}
	}
	calm, crashy := setup("calm"), setup("crashy")

	backup := func(disks []string, crash, checkpoint, previous string) []change {
		args := []string{"-checkpoint", checkpoint}
		if previous != "" {
			args = append(args, "-previous", previous)
		}
		args = append(args, disks...)
		if crash != "" {
			_, killed := runExample(t, exe, crash, args...)
			if !killed {
				t.Fatalf("OFFLINE_BACKUP_CRASH=%s: not killed", crash)
			}
		}
		changes, killed := runExample(t, exe, "", args...)
		if killed {
			t.Fatal("killed without OFFLINE_BACKUP_CRASH")
		}
		return changes
	}
	base := func(changes []change) []change {
		for i := range changes {
			changes[i].Disk = strings.TrimPrefix(strings.TrimPrefix(filepath.Base(changes[i].Disk), "calm-"), "crashy-")
		}
		return changes
	}

	// Full backup: the first checkpoint.
	backup(calm, "", "cp1", "")
	backup(crashy, "checkpoint:1", "cp1", "")
	if a, b := state(t, calm), state(t, crashy); a != strings.ReplaceAll(b, "crashy-", "calm-") {
		t.Fatalf("after cp1:\n%s\nwith a crash:\n%s", a, b)
	}

	for round, crash := range []string{"checkpoint:2", "changes:1", "rotate:1", "rotate:2"} {
		guestWrites(calm, round+1)
		guestWrites(crashy, round+1)
		prev, next := fmt.Sprintf("cp%d", round+1), fmt.Sprintf("cp%d", round+2)
		want := base(backup(calm, "", next, prev))
		got := base(backup(crashy, crash, next, prev))
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("round %d: changes %v, with a crash at %s %v", round+1, want, crash, got)
		}
		// Every write of the round is among the changes listed.
		for i := range calm {
			disk := fmt.Sprintf("disk%d.qcow2", i)
			start := uint64((round+1)*100+i*10) << 20
			covered := false
			for _, c := range want {
				covered = covered || (c.Disk == disk && c.Offset <= start && c.Offset+c.Length >= start+1<<20)
			}
			if !covered {
				t.Fatalf("round %d: the write at %d to %s is not listed: %v", round+1, start, disk, want)
			}
		}
		if a, b := state(t, calm), state(t, crashy); a != strings.ReplaceAll(b, "crashy-", "calm-") {
			t.Fatalf("round %d, crash at %s:\n%s\nwith a crash:\n%s", round+1, crash, a, b)
		}
		// Rotated: only the new checkpoint is left, and QEMU agrees with the binding.
		for _, disk := range calm {
			if bitmaps := qemuBitmaps(t, disk); len(bitmaps) != 1 || bitmaps[0].Name != next {
				t.Fatalf("%s: %+v", disk, bitmaps)
			}
			agreeWithQemu(t, dir, disk)
		}
	}
}
