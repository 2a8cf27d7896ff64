// SPDX-License-Identifier: GPL-2.0-or-later

// Command offline-backup is the checkpoint flow of an incremental backup (KubeVirt's, for a
// stopped VM) over the qcow2 disks of a VM, through the hbitmap package:
//
//	offline-backup -checkpoint NEW [-previous OLD] DISK...
//
// It runs three steps over every disk, each idempotent so that running the command again
// after a crash (or a kill) at any point converges to the same end state:
//
//  1. checkpoint: add the bitmap NEW to every disk (ExistOK: a disk that has it already is
//     left as it is). From now on QEMU records the VM's writes in it when the VM runs.
//  2. changes: print the extents that changed since the previous checkpoint OLD (its dirty
//     extents), one JSON object per line: {"disk": ..., "offset": ..., "length": ...}, for the
//     backup to copy. Without -previous this is the first (full) backup and nothing is listed.
//  3. rotate: merge OLD into NEW and remove OLD (MissingOK: a disk already rotated is left as
//     it is). NEW then covers everything OLD covered, so that what a lost backup would have
//     carried is listed again by the next run.
//
// The disks are opened for writing one at a time: a disk a running QEMU holds is refused
// (EAGAIN) with a message naming it. The environment variable OFFLINE_BACKUP_CRASH=STEP:N
// (STEP checkpoint, changes or rotate) kills the process with SIGKILL after N disks of that
// step, to test the recovery.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"libhbitmap.org/go/hbitmap"
)

func main() {
	checkpoint := flag.String("checkpoint", "", "name of the new checkpoint bitmap (required)")
	previous := flag.String("previous", "", "name of the previous checkpoint bitmap (none: first backup)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s -checkpoint NEW [-previous OLD] DISK...\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if *checkpoint == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*checkpoint, *previous, flag.Args()); err != nil {
		fmt.Fprintf(os.Stderr, "offline-backup: %v\n", err)
		os.Exit(1)
	}
}

// crashAfter returns after how many disks of step the process kills itself (0: never).
func crashAfter(step string) int {
	spec, ok := os.LookupEnv("OFFLINE_BACKUP_CRASH")
	if !ok {
		return 0
	}
	name, count, _ := strings.Cut(spec, ":")
	n, err := strconv.Atoi(count)
	if name != step || err != nil {
		return 0
	}
	return n
}

// forEachDisk opens each disk for writing, runs step on it and closes it; with
// OFFLINE_BACKUP_CRASH it kills the process after the given number of disks.
func forEachDisk(step string, disks []string, do func(disk string, image *hbitmap.Image) error) error {
	crash := crashAfter(step)
	for i, disk := range disks {
		image, err := hbitmap.Open(disk, hbitmap.ReadWrite())
		if err != nil {
			return err
		}
		err = do(disk, image)
		if closeErr := image.Close(); err == nil {
			err = closeErr
		}
		if err != nil {
			return fmt.Errorf("%s: %w", step, err)
		}
		if crash > 0 && i+1 == crash {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
	return nil
}

type change struct {
	Disk   string `json:"disk"`
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
}

func run(checkpoint, previous string, disks []string) error {
	// 1. The new checkpoint on every disk; a retry finds it on the disks done before.
	err := forEachDisk("checkpoint", disks, func(_ string, image *hbitmap.Image) error {
		return image.Add(checkpoint, hbitmap.ExistOK())
	})
	if err != nil {
		return err
	}
	if previous == "" {
		return nil
	}
	// 2. What changed since the previous checkpoint. After a crash in step 3 a disk may have
	// been rotated already: its changes are in the new checkpoint then.
	out := json.NewEncoder(os.Stdout)
	err = forEachDisk("changes", disks, func(disk string, image *hbitmap.Image) error {
		name := previous
		if _, err := image.Lookup(previous); errors.Is(err, fs.ErrNotExist) {
			name = checkpoint
		} else if err != nil {
			return err
		}
		return image.Extents(name, func(e hbitmap.Extent) error {
			return out.Encode(change{Disk: disk, Offset: e.Offset, Length: e.Length})
		})
	})
	if err != nil {
		return err
	}
	// 3. Rotate: the new checkpoint takes over the old one's changes, then the old one goes.
	return forEachDisk("rotate", disks, func(_ string, image *hbitmap.Image) error {
		if _, err := image.Lookup(previous); errors.Is(err, fs.ErrNotExist) {
			return nil // rotated before a crash
		} else if err != nil {
			return err
		}
		if err := image.Merge(previous, checkpoint); err != nil {
			return err
		}
		return image.Remove(previous, hbitmap.MissingOK())
	})
}
