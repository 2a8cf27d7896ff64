#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Incremental backup of a stopped VM's qcow2 disk, as virtnbdbackup does it, with the hbitmap
package instead of `qemu-img bitmap` and `nbdinfo --map`.

    offline_incremental.py DISK BACKUP_DIR [--prefix ckpt-]

Checkpoints are persistent bitmaps named PREFIX0, PREFIX1, ...: the newest one records the
guest's writes since the last backup. Each run:

1. repairs the image when a bitmap was left in use by a QEMU that did not shut down cleanly
   (`check(repair="all")` removes the bitmaps that cannot be trusted); without a trustworthy
   checkpoint left, the backup is a full one;
2. starts the next checkpoint (enabled) and disables the older ones, in one writable session:
   from then on the guest's writes go to the new checkpoint;
3. copies the disk's data in the extents of the older checkpoints (all of them: a run that
   failed before step 4 left its checkpoint behind, and its changes are still to be copied),
   or all allocated data for a full backup, reading the guest data through `qemu-nbd -r` on a
   unix socket, into BACKUP_DIR/NNNN-full.data or NNNN-inc.data: a sparse raw file of the
   disk's virtual size holding the copied ranges at their offsets, described by NNNN-*.json;
4. removes the older checkpoints.

The VM must be stopped: the image's locks make step 2 fail while a QEMU has the disk open.
Prints the backup's description (JSON) on standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import hbitmap

CHUNK = 4 << 20  # bytes per NBD read (qemu-nbd serves up to 32 MiB)


class NbdReader:
    """A minimal NBD client for reading: fixed newstyle handshake with NBD_OPT_EXPORT_NAME, then
    NBD_CMD_READ with simple replies (no structured replies were negotiated)."""

    NBDMAGIC = 0x4E42444D41474943
    IHAVEOPT = 0x49484156454F5054
    REQUEST_MAGIC = 0x25609513
    REPLY_MAGIC = 0x67446698
    FLAG_FIXED_NEWSTYLE = 1
    FLAG_NO_ZEROES = 2
    OPT_EXPORT_NAME = 1
    CMD_READ = 0
    CMD_DISC = 2

    def __init__(self, path: str, timeout: float = 30):
        # The socket file appears when qemu-nbd binds it, a moment before it listens: retry.
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != self.NBDMAGIC or opt != self.IHAVEOPT or not flags & self.FLAG_FIXED_NEWSTYLE:
            raise OSError("not a fixed newstyle NBD server")
        client = self.FLAG_FIXED_NEWSTYLE | (flags & self.FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", client))
        self.sock.sendall(struct.pack(">QII", self.IHAVEOPT, self.OPT_EXPORT_NAME, 0))
        self.size: int
        self.size, _transmission = struct.unpack(">QH", self._recv(10))
        if not client & self.FLAG_NO_ZEROES:
            self._recv(124)
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise OSError("NBD server closed the connection")
            data += part
        return bytes(data)

    def pread(self, offset: int, length: int) -> bytes:
        self.handle += 1
        self.sock.sendall(
            struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, self.CMD_READ, self.handle, offset, length)
        )
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != self.REPLY_MAGIC or handle != self.handle:
            raise OSError("unexpected NBD reply")
        if error:
            raise OSError(error, f"NBD read of {length} bytes at {offset} failed")
        return self._recv(length)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, self.CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()


class QemuNbd:
    """qemu-nbd serving the disk read-only on a unix socket in a private directory."""

    def __init__(self, disk: Path):
        self.dir = tempfile.mkdtemp(prefix="backup-nbd-")
        self.path = os.path.join(self.dir, "nbd.sock")
        self.process = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "qcow2", "-k", self.path, str(disk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise OSError(f"qemu-nbd failed: {err.decode().strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise OSError("qemu-nbd did not start")
            time.sleep(0.01)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # A SIGTERM that arrives while qemu-nbd starts can be lost: make sure.
                self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def checkpoints(image: hbitmap.Image, prefix: str) -> List[Tuple[int, hbitmap.BitmapInfo]]:
    """The checkpoint bitmaps (PREFIX + number), oldest first."""
    found = []
    for info in image.bitmaps():
        name = info.name
        if isinstance(name, str) and name.startswith(prefix) and name[len(prefix):].isdigit():
            found.append((int(name[len(prefix):]), info))
    return sorted(found, key=lambda pair: pair[0])


def allocated_extents(disk: Path) -> Iterator[Tuple[int, int]]:
    """The disk's ranges holding data (`qemu-img map`), for a full backup."""
    out = subprocess.run(
        ["qemu-img", "map", "-f", "qcow2", "--output=json", str(disk)],
        check=True, capture_output=True, text=True,
    ).stdout
    for entry in json.loads(out):
        if entry.get("data"):
            yield entry["start"], entry["length"]


def copy_extents(disk: Path, extents: Iterable[Tuple[int, int]], data_path: Path,
                 virtual_size: int) -> Tuple[List[List[int]], int]:
    """Copies the disk's bytes in `extents` into a sparse raw file at the same offsets."""
    server = QemuNbd(disk)
    copied: List[List[int]] = []
    total = 0
    try:
        reader = NbdReader(server.path)
        try:
            if reader.size != virtual_size:
                raise OSError(f"qemu-nbd serves {reader.size} bytes, the image has {virtual_size}")
            with open(data_path, "wb") as out:
                out.truncate(virtual_size)
                for offset, length in extents:
                    copied.append([offset, length])
                    total += length
                    end = offset + length
                    while offset < end:
                        n = min(CHUNK, end - offset)
                        os.pwrite(out.fileno(), reader.pread(offset, n), offset)
                        offset += n
                out.flush()
                os.fsync(out.fileno())
        finally:
            reader.close()
    finally:
        server.close()
    return copied, total


def backup(disk: Path, backup_dir: Path, prefix: str) -> Dict[str, Any]:
    backup_dir.mkdir(parents=True, exist_ok=True)
    repaired: List[str] = []

    # 1 and 2: repair if needed, start the next checkpoint, freeze the older ones.
    with hbitmap.Image(disk, writable=True) as image:
        virtual_size = image.virtual_size
        found = checkpoints(image, prefix)
        # Numbered after every checkpoint seen, the ones a repair removes included.
        number = found[-1][0] + 1 if found else 0
        if any(info.in_use for _, info in found):
            report = image.check(repair="all")
            repaired = report.get("changes", [])
        older = checkpoints(image, prefix)
        new = f"{prefix}{number}"
        image.add(new, exist_ok=True)
        for _, info in older:
            if info.auto:
                image.disable(info.name)
        since = [info.name for _, info in older]

    # 3: copy, reading the older checkpoints with a read-only handle (qemu-nbd reads too).
    full = not since
    kind = "full" if full else "inc"
    stem = backup_dir / f"{number:04d}-{kind}"
    data_path = stem.with_suffix(".data")
    if full:
        extents: Iterable[Tuple[int, int]] = allocated_extents(disk)
        copied, total = copy_extents(disk, extents, data_path, virtual_size)
    else:
        with hbitmap.Image(disk) as image:
            changed = image.read_bitmap(since[0])
            for name in since[1:]:
                changed.merge(image.read_bitmap(name))
        copied, total = copy_extents(disk, changed.extents(), data_path, virtual_size)
    description: Dict[str, Any] = {
        "disk": str(disk),
        "virtual-size": virtual_size,
        "type": kind,
        "checkpoint": new,
        "since": since,
        "repaired": repaired,
        "data": str(data_path),
        "extents": copied,
        "bytes": total,
    }
    index = stem.with_suffix(".json")
    index.write_text(json.dumps(description, indent=2) + "\n")

    # 4: the older checkpoints are backed up.
    with hbitmap.Image(disk, writable=True) as image:
        for name in since:
            image.remove(name, missing_ok=True)
    return description


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("disk", type=Path, help="the stopped VM's qcow2 disk")
    parser.add_argument("backup_dir", type=Path, help="where the backups go")
    parser.add_argument("--prefix", default="ckpt-", help="checkpoint bitmap names' prefix")
    args = parser.parse_args(argv)
    try:
        description = backup(args.disk, args.backup_dir, args.prefix)
    except hbitmap.LockedError as error:
        print(f"offline_incremental: {error}: is the VM running?", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"offline_incremental: {error}", file=sys.stderr)
        return 1
    json.dump(description, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
