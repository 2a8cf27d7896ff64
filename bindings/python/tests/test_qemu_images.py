# SPDX-License-Identifier: GPL-2.0-or-later
"""The package against QEMU's own tools, both ways: images qemu-img and qemu-io make, read by the
package; images the package writes, read by QEMU. Bitmap lists are compared with `qemu-img
info`, extents with `nbdinfo --map` through `qemu-nbd -B`, and `qemu-img check` must find every
image clean after every change."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import hbitmap
from conftest import (
    Qsd,
    assert_qemu_clean,
    nbd_extents,
    normalize_qemu,
    ours_as_qemu,
    qemu_bitmap,
    qemu_bitmaps,
    qemu_check,
    qemu_img_create,
    qemu_io,
)

MiB = 1 << 20


def covered(extents, offset: int, length: int) -> bool:
    """Whether one of the extents covers offset .. offset + length."""
    return any(o <= offset and offset + length <= o + n for o, n in extents)


def assert_same_as_qemu(path: Path, workdir: Path) -> None:
    """Bitmap list equal to qemu-img info's; every consistent bitmap's extents equal to
    nbdinfo's; dirty_bytes the sum of the extents."""
    with hbitmap.Image(path) as image:
        infos = image.bitmaps()
        assert ours_as_qemu(infos) == normalize_qemu(qemu_bitmaps(path))
        for info in infos:
            if info.in_use:
                continue
            ours = list(image.extents(info.name))
            assert ours == nbd_extents(path, info.name, workdir), info.name
            assert info.dirty_bytes == sum(length for _, length in ours)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_images_qemu_makes(workdir: Path, cluster_size: int) -> None:
    size = 64 * MiB + 3 * 512  # not a multiple of any granularity: a partial last granule
    disk = qemu_img_create(workdir / "disk.qcow2", size, cluster_size)
    qemu_bitmap(disk, "--add", "default")
    qemu_bitmap(disk, "--add", "-g", "512", "fine")
    qemu_bitmap(disk, "--add", "-g", "1M", "coarse")
    qemu_bitmap(disk, "--add", "--disable", "off")
    rng = random.Random(cluster_size)
    writes = [f"write -P {rng.randrange(1, 255)} {rng.randrange(0, size // 512 - 200) * 512} "
              f"{rng.randrange(1, 200) * 512}" for _ in range(40)]
    writes.append(f"write -P 7 {size - 512} 512")  # the last sector: the partial granule
    qemu_io(disk, *writes)
    qemu_bitmap(disk, "--disable", "coarse")
    assert_qemu_clean(disk)
    assert_same_as_qemu(disk, workdir)
    with hbitmap.Image(disk) as image:
        by_name = {info.name: info for info in image.bitmaps()}
        assert by_name["default"].granularity == min(max(cluster_size, 4096), 65536)
        assert by_name["fine"].dirty_bytes > 0 and by_name["off"].dirty_bytes == 0
        assert not by_name["coarse"].auto and by_name["default"].auto
        # The last extent reaches the end of the disk, clipped to it.
        assert list(image.extents("fine"))[-1][0] + list(image.extents("fine"))[-1][1] == size
        # read_bitmap gives the same extents as an HBitmap over the disk's bytes.
        bitmap = image.read_bitmap("coarse")
        assert (bitmap.size, bitmap.granularity) == (size, 20)
        assert list(bitmap) == list(image.extents("coarse"))


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_images_the_package_writes(workdir: Path, cluster_size: int) -> None:
    size = 1 << 30
    disk = workdir / "made.qcow2"
    with hbitmap.create(disk, size, cluster_size=cluster_size) as image:
        assert (image.virtual_size, image.cluster_size, image.writable) == (size, cluster_size, True)
    assert_qemu_clean(disk)
    rng = random.Random(1)
    expected = hbitmap.HBitmap(size, 16)
    with hbitmap.Image(disk, writable=True) as image:
        image.add("a", granularity=65536)
        image.add(b"b", granularity=4096, disabled=True)
        image.add("a", granularity=65536, exist_ok=True)
        for _ in range(30):
            offset, length = rng.randrange(size), rng.randrange(1, 4 * MiB)
            length = min(length, size - offset)
            image.set("a", offset, length)
            expected.set(offset, length)
        image.reset("a", 64 * MiB, 128 * MiB)
        expected.reset(64 * MiB, 128 * MiB)
        image.import_extents("b", [(0, 4096), (10 * MiB, 12345), (size - 1, 1)])
        image.merge("b", "a")
        expected.set(0, 4096)
        expected.set(10 * MiB, 12345)
        expected.set(size - 1, 1)
        image.add("c", granularity=1 << 20)
        image.merge("a", "c")
        image.enable("b")
        image.disable("a")
        image.add("gone")
        image.remove("gone")
        image.remove("gone", missing_ok=True)
        image.add("emptied")
        image.set("emptied", 0, size)
        image.clear("emptied")
        stored = hbitmap.HBitmap(size, 12)
        stored.set(5 * MiB, 3 * 4096)
        image.write_bitmap("stored", stored, enabled=False)
        assert list(image.extents("a")) == list(expected)
        assert image.check()["clean"]
    assert_qemu_clean(disk)
    assert_same_as_qemu(disk, workdir)
    assert [(b["name"], b["flags"]) for b in qemu_bitmaps(disk)] == [
        ("a", []), ("b", ["auto"]), ("c", ["auto"]), ("emptied", ["auto"]), ("stored", []),
    ]
    # QEMU uses what the package wrote: qemu-img merges it into a bitmap of its own, and
    # qemu-io's writes land in the enabled ones.
    qemu_bitmap(disk, "--add", "-g", "64K", "qemu-made")
    qemu_bitmap(disk, "--merge", "a", "qemu-made")
    # A 1 MiB stretch that none of the bitmaps has dirty.
    probe = next(o for o in range(0, size, MiB) if not any(expected.get(o + k) for k in range(0, MiB, 4096)))
    qemu_io(disk, f"write -P 1 {probe} 4096")
    assert_qemu_clean(disk)
    with hbitmap.Image(disk) as image:
        assert not covered(image.extents("stored"), probe, 4096)  # disabled
        assert not covered(image.extents("a"), probe, 4096)  # disabled
        assert covered(image.extents("c"), probe, 4096)
        after = expected.copy()
        after.set(probe, 4096)
        assert list(image.extents("qemu-made")) == list(after) != list(expected)
    assert_same_as_qemu(disk, workdir)


def test_check_after_every_edit(workdir: Path) -> None:
    """qemu-img check is clean after each single change (not only at the end)."""
    disk = qemu_img_create(workdir / "disk.qcow2", 256 * MiB, 4096)
    qemu_io(disk, "write -P 3 0 1M", "write -P 4 100M 3M")
    edits = [
        lambda i: i.add("x", granularity=512),
        lambda i: i.set("x", 1000, 70000),
        lambda i: i.add("y"),
        lambda i: i.merge("x", "y"),
        lambda i: i.reset("y", 0, 65536),
        lambda i: i.disable("y"),
        lambda i: i.enable("y"),
        lambda i: i.clear("x"),
        lambda i: i.import_extents("z", [(4096, 8192)]),
        lambda i: i.remove("x"),
    ]
    for edit in edits:
        with hbitmap.Image(disk, writable=True) as image:
            edit(image)
        assert_qemu_clean(disk)
    assert_same_as_qemu(disk, workdir)


def test_names_are_bytes(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 16 * MiB)
    run_names = ["tab\there", "caf\u00e9"]
    for name in run_names:
        qemu_bitmap(disk, "--add", name)
    # A name that is not UTF-8, written by qemu-img itself.
    import subprocess
    from conftest import tool

    subprocess.run([tool("qemu-img"), "bitmap", "--add", str(disk), b"\xff\xfe"], check=True)
    qemu_io(disk, "write 0 64k")
    with hbitmap.Image(disk, writable=True) as image:
        names = [info.name for info in image.bitmaps()]
        assert names == ["tab\there", "caf\u00e9", b"\xff\xfe"]
        assert b"\xff\xfe" in image and "caf\u00e9".encode() in image
        assert list(image.extents(b"\xff\xfe")) == [(0, 65536)]
        assert list(image.extents("caf\u00e9".encode())) == [(0, 65536)]
        image.set(b"\xff\xfe", 1 << 20, 1)
        image.remove(bytearray(b"\xff\xfe"))
    assert_qemu_clean(disk)
    assert [b["name"] for b in qemu_bitmaps(disk)] == run_names


def test_check_figures_match_qemu_img(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 512 * MiB, 65536)
    qemu_bitmap(disk, "--add", "b")
    qemu_io(disk, "write -P 1 0 10M", "write -P 2 300M 1M", "write -P 3 64k 64k")
    status, theirs = qemu_check(disk)
    assert status == 0
    for ours in (hbitmap.check(disk), hbitmap.Image(disk).check()):
        for key, value in theirs.items():
            if key == "filename":
                assert ours[key] == str(disk)
            elif key == "format":
                assert ours[key] == "qcow2"
            else:
                assert ours[key] == value, key
        assert ours["corruptions"] == 0 and ours["leaks"] == 0 and ours["bitmaps"] == 1
        assert ours["clean"] and ours["errors"] == [] and ours["in-use-bitmaps"] == []


def test_repair_of_a_bitmap_left_in_use_by_a_killed_qemu(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 128 * MiB)
    qemu_bitmap(disk, "--add", "tracked")
    qemu_io(disk, "write -P 9 0 4M")
    with Qsd(disk) as qsd:
        qsd.kill()  # SIGKILL: QEMU never stores the bitmap, which stays in use
    assert qemu_bitmaps(disk)[0]["flags"] == ["in-use", "auto"]
    with hbitmap.Image(disk) as image:
        (info,) = image.bitmaps()
        assert info.in_use and info.dirty_bytes is None
        with pytest.raises(hbitmap.Error) as refused:
            list(image.extents("tracked"))
        assert refused.value.kind == "in-use" and refused.value.errno == 16  # EBUSY
        found = image.check()
    assert found["in-use-bitmaps"] == ["tracked"] and found["corruptions"] == 0
    # The same, typed: a warning about that bitmap, of kind InUse, with the text of "warnings".
    in_use = [f for f in found["findings"] if f["kind"] == "InUse"]
    assert in_use == [
        {
            "severity": "warning",
            "subject": {"type": "bitmap", "name": "tracked"},
            "kind": "InUse",
            "text": in_use[0]["text"],
        }
    ]
    assert in_use[0]["text"] in found["warnings"]
    assert [f["text"] for f in found["findings"] if f["severity"] == "warning"] == found["warnings"]
    with hbitmap.Image(disk, writable=True) as image:
        image.add("fresh")
        repaired = image.check(repair="all")
        assert [info.name for info in image.bitmaps()] == ["fresh"]
    assert repaired["changes"] and any("tracked" in c for c in repaired["changes"])
    assert repaired["in-use-bitmaps"] == [] and repaired["clean"]
    assert "leaks-fixed" in repaired and "corruptions-fixed" in repaired
    status, theirs = qemu_check(disk)
    assert status == 0
    for key in ("image-end-offset", "allocated-clusters", "total-clusters"):
        assert repaired[key] == theirs[key], key
    assert_same_as_qemu(disk, workdir)


def test_repair_by_path(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 64 * MiB)
    qemu_bitmap(disk, "--add", "a")
    qemu_bitmap(disk, "--add", "b")
    with Qsd(disk) as qsd:
        qsd.kill()
    before = hbitmap.check(disk)
    assert sorted(before["in-use-bitmaps"]) == ["a", "b"]
    with pytest.raises(hbitmap.Error) as refused:
        # A read-only handle cannot repair.
        hbitmap.Image(disk).check(repair="all")
    assert refused.value.errno == 30  # EROFS
    leaks = hbitmap.check(disk, repair="leaks")
    assert leaks["in-use-bitmaps"] == ["a", "b"]
    after = hbitmap.check(disk, repair="all")
    assert after["bitmaps"] == 0 and after["clean"]
    assert_qemu_clean(disk)


def test_merge_from_another_image(workdir: Path) -> None:
    """A bitmap of another image (by path, or an open Image) merged into this one's, at another
    granularity; QEMU reads the result."""
    size = 256 * MiB
    source = qemu_img_create(workdir / "source.qcow2", size)
    target = qemu_img_create(workdir / "target.qcow2", size, 4096)
    qemu_bitmap(source, "--add", "-g", "512", "s")
    qemu_io(source, "write 1000k 3k", f"write {size - 512} 512")
    qemu_bitmap(target, "--add", "-g", "64K", "t")
    qemu_io(target, "write 100M 4k")
    with hbitmap.Image(target, writable=True) as image:
        image.merge("s", "t", source_image=source)
        first = list(image.extents("t"))
        with hbitmap.Image(source) as other:
            image.add("u", granularity=4096)
            image.merge("s", "u", source_image=other)
        assert list(image.extents("u")) == [(1000 * 1024, 4096), (size - 4096, 4096)]
    assert first == [(960 * 1024, 64 * 1024), (100 * MiB, 65536), (size - 65536, 65536)]
    assert_qemu_clean(target)
    assert_qemu_clean(source)
    assert nbd_extents(target, "t", workdir) == first
