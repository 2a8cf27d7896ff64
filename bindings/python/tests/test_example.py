# SPDX-License-Identifier: GPL-2.0-or-later
"""examples/python/offline_incremental.py, run as a user would: a full backup, incremental ones
whose copied ranges are the checkpoint's extents as nbdinfo reads them through qemu-nbd, a
run after a QEMU killed with the disk open (repair, then a full backup), and a resumed run.
Every backup's data equals the disk's in every copied range."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import hbitmap
from conftest import TIMEOUT, Qsd, assert_qemu_clean, nbd_extents, qemu_bitmaps, qemu_img_create, qemu_io, read_raw

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "python" / "offline_incremental.py"
MiB = 1 << 20


def run_example(disk: Path, backups: Path) -> Dict:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(disk), str(backups)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_backup_matches(disk: Path, description: Dict, workdir: Path) -> bytes:
    guest = read_raw(disk, workdir / "guest.raw")
    data = Path(description["data"]).read_bytes()
    assert len(data) == len(guest) == description["virtual-size"]
    assert description["extents"], "nothing was copied"
    for offset, length in description["extents"]:
        assert data[offset:offset + length] == guest[offset:offset + length], (offset, length)
    assert description["bytes"] == sum(length for _, length in description["extents"])
    return guest


def names(disk: Path) -> List:
    return [(b["name"], b["flags"]) for b in qemu_bitmaps(disk)]


def test_offline_incremental_backups(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "vm.qcow2", 128 * MiB)
    backups = workdir / "backups"
    qemu_io(disk, "write -P 1 0 3M", "write -P 2 50M 1M", "write -P 3 127M 1M")

    full = run_example(disk, backups)
    assert full["type"] == "full" and full["checkpoint"] == "ckpt-0" and full["since"] == []
    guest = assert_backup_matches(disk, full, workdir)
    covered = sum(length for _, length in full["extents"])
    assert covered >= 5 * MiB
    # Everything outside the copied ranges is zero on the disk: a full backup lost nothing.
    data = Path(full["data"]).read_bytes()
    assert data == guest
    assert names(disk) == [("ckpt-0", ["auto"])]
    assert_qemu_clean(disk)

    # The guest writes (QEMU records them in the enabled checkpoint).
    qemu_io(disk, "write -P 4 1M 4k", "write -P 5 60M 130k", f"write -P 6 {128 * MiB - 512} 512")
    expected = nbd_extents(disk, "ckpt-0", workdir)
    assert expected
    inc = run_example(disk, backups)
    assert inc["type"] == "inc" and inc["since"] == ["ckpt-0"] and inc["checkpoint"] == "ckpt-1"
    assert [tuple(e) for e in inc["extents"]] == expected
    assert_backup_matches(disk, inc, workdir)
    assert names(disk) == [("ckpt-1", ["auto"])]
    assert_qemu_clean(disk)

    # Nothing written since: an incremental backup of nothing.
    empty = run_example(disk, backups)
    assert empty["type"] == "inc" and empty["extents"] == [] and empty["bytes"] == 0
    assert names(disk) == [("ckpt-2", ["auto"])]

    # A run interrupted after starting its checkpoint (step 2) leaves the older one behind,
    # disabled: the next run copies both checkpoints' extents.
    qemu_io(disk, "write -P 7 10M 64k")
    with hbitmap.Image(disk, writable=True) as image:
        image.add("ckpt-3")
        image.disable("ckpt-2")
    qemu_io(disk, "write -P 8 20M 64k")
    resumed = run_example(disk, backups)
    assert resumed["since"] == ["ckpt-2", "ckpt-3"]
    assert [tuple(e) for e in resumed["extents"]] == [(10 * MiB, 65536), (20 * MiB, 65536)]
    assert_backup_matches(disk, resumed, workdir)
    assert names(disk) == [("ckpt-4", ["auto"])]

    # QEMU killed with the disk open: the checkpoint is left in use; the next run repairs the
    # image and, with no trustworthy checkpoint left, makes a full backup.
    qemu_io(disk, "write -P 9 90M 1M")
    with Qsd(disk) as qsd:
        qsd.kill()
    assert names(disk) == [("ckpt-4", ["in-use", "auto"])]
    repaired = run_example(disk, backups)
    assert repaired["type"] == "full" and repaired["repaired"]
    assert any("ckpt-4" in change for change in repaired["repaired"])
    guest = assert_backup_matches(disk, repaired, workdir)
    assert Path(repaired["data"]).read_bytes() == guest
    assert names(disk) == [("ckpt-5", ["auto"])]
    assert_qemu_clean(disk)
    assert sorted(p.name for p in backups.iterdir()) == [
        "0000-full.data", "0000-full.json", "0001-inc.data", "0001-inc.json",
        "0002-inc.data", "0002-inc.json", "0004-inc.data", "0004-inc.json",
        "0005-full.data", "0005-full.json",
    ]


def test_refused_while_the_vm_runs(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "vm.qcow2", 16 * MiB)
    with Qsd(disk):
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), str(disk), str(workdir / "b")],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
    assert done.returncode == 1 and "is the VM running?" in done.stderr
    assert not (workdir / "b").exists() or not any((workdir / "b").iterdir())
