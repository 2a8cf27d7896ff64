# SPDX-License-Identifier: GPL-2.0-or-later
"""Bad input: each case raises its documented exception, and nothing is written (the file's
bytes and mtime are compared before and after)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

import hbitmap
from conftest import FileState, Qsd, qemu_bitmap, qemu_img_create, qemu_io

MiB = 1 << 20


@pytest.fixture
def disk(workdir: Path) -> Path:
    """A 64 MiB image with a consistent bitmap 'b' (some extents) and a disabled one 'off'."""
    path = qemu_img_create(workdir / "disk.qcow2", 64 * MiB)
    qemu_bitmap(path, "--add", "b")
    qemu_bitmap(path, "--add", "-g", "1M", "off")
    qemu_io(path, "write -P 5 1M 200k", "write -P 6 40M 64k")
    qemu_bitmap(path, "--disable", "off")
    return path


def test_missing_file(workdir: Path) -> None:
    missing = workdir / "missing.qcow2"
    for call in (
        lambda: hbitmap.Image(missing),
        lambda: hbitmap.Image(missing, writable=True),
        lambda: hbitmap.check(missing),
    ):
        with pytest.raises(FileNotFoundError) as raised:
            call()
        error = raised.value
        assert isinstance(error, hbitmap.NotFoundError) and isinstance(error, hbitmap.Error)
        assert error.errno == errno.ENOENT and error.filename == str(missing)
        assert "No such file" in error.strerror
    assert not missing.exists()


def test_raw_image(workdir: Path) -> None:
    raw = qemu_img_create(workdir / "disk.raw", 16 * MiB, fmt="raw")
    qemu_io(raw, "write -P 1 0 64k", fmt="raw")
    state = FileState(raw)
    for writable in (False, True):
        with pytest.raises(hbitmap.Error) as raised:
            hbitmap.Image(raw, writable=writable)
        assert raised.value.errno == errno.EINVAL and raised.value.kind == "corrupt"
        assert "qcow2" in str(raised.value) and str(raw) in str(raised.value)
    report = hbitmap.check(raw)
    assert report["check-errors"] == 1 and not report["clean"]
    state.assert_unchanged()


def test_truncated_image(disk: Path, workdir: Path) -> None:
    truncated = workdir / "truncated.qcow2"
    shutil.copy(disk, truncated)
    with hbitmap.Image(disk) as image:
        assert image.bitmaps()  # the original opens
    # Cut the file in the middle of its metadata: the bitmap directory, tables and refcount
    # blocks now lie past its end.
    with open(truncated, "r+b") as f:
        f.truncate(3 * 65536 + 100)
    state = FileState(truncated)
    for writable in (False, True):
        with pytest.raises(OSError) as raised:
            hbitmap.Image(truncated, writable=writable)
        assert isinstance(raised.value, hbitmap.Error)
        assert raised.value.errno in (errno.EINVAL, errno.EIO)
        assert str(truncated) in str(raised.value)
    report = hbitmap.check(truncated)
    assert not report["clean"] and (report["corruptions"] or report["check-errors"])
    with pytest.raises(hbitmap.Error):
        hbitmap.check(truncated, repair="all")
    state.assert_unchanged()


def test_image_locked_by_qemu(disk: Path) -> None:
    state = FileState(disk)
    with Qsd(disk):
        for writable in (False, True):
            with pytest.raises(BlockingIOError) as raised:
                hbitmap.Image(disk, writable=writable)
            error = raised.value
            assert isinstance(error, hbitmap.LockedError) and error.errno == errno.EAGAIN
            assert error.kind == "locked" and error.filename == str(disk)
        with pytest.raises(hbitmap.LockedError):
            hbitmap.check(disk, repair="all")
        with pytest.raises(hbitmap.LockedError):
            hbitmap.check(disk)
        # Reading without the locks works (qemu-img -U), and shows QEMU's in-use marks.
        with hbitmap.Image(disk, force_share=True) as image:
            assert [info.in_use for info in image.bitmaps()] == [True, True]
        state_while_held = FileState(disk)
    # QEMU itself marked the bitmaps in use when it opened the image; the package wrote nothing.
    assert state_while_held.digest != state.digest


def test_locked_image_is_not_written(disk: Path) -> None:
    with Qsd(disk):
        state = FileState(disk)
        with pytest.raises(hbitmap.LockedError):
            hbitmap.Image(disk, writable=True)
        with pytest.raises(hbitmap.LockedError):
            hbitmap.check(disk, repair="leaks")
        state.assert_unchanged()


def test_missing_bitmap(disk: Path) -> None:
    state = FileState(disk)
    with hbitmap.Image(disk, writable=True) as image:
        calls = [
            lambda: image.extents("nope"),
            lambda: image.read_bitmap("nope"),
            lambda: image.set("nope", 0, 1),
            lambda: image.reset("nope", 0, 65536),
            lambda: image.clear("nope"),
            lambda: image.enable("nope"),
            lambda: image.disable("nope"),
            lambda: image.remove("nope"),
            lambda: image.merge("nope", "b"),
            lambda: image.merge("b", "nope"),
        ]
        for call in calls:
            with pytest.raises(FileNotFoundError) as raised:
                call()
            error = raised.value
            assert isinstance(error, hbitmap.NotFoundError) and error.errno == errno.ENOENT
            assert "'nope'" in error.strerror and error.filename == str(disk)
            assert error.kind == "not-found"
        image.remove("nope", missing_ok=True)
        assert "nope" not in image
    state.assert_unchanged()


def test_wrong_types_and_out_of_range_numbers(disk: Path) -> None:
    state = FileState(disk)
    size = 64 * MiB
    with hbitmap.Image(disk, writable=True) as image:
        type_errors = [
            lambda: image.set(1, 0, 1),
            lambda: image.set(None, 0, 1),
            lambda: image.set("b", "0", 1),
            lambda: image.set("b", 0.5, 1),
            lambda: image.add("x", granularity="64k"),
            lambda: image.import_extents("b", [(0, "1")]),
            lambda: image.import_extents("b", 5),
            lambda: image.merge("b", "off", source_image=3.5),
        ]
        for call in type_errors:
            with pytest.raises(TypeError):
                call()
        overflow = [
            lambda: image.set("b", -1, 1),
            lambda: image.set("b", 0, -1),
            lambda: image.set("b", 2**64, 1),
            lambda: image.reset("b", 0, 2**70),
            lambda: image.add("x", granularity=-4096),
            lambda: image.import_extents("b", [(-1, 1)]),
        ]
        for call in overflow:
            with pytest.raises(OverflowError):
                call()
        invalid = [
            lambda: image.set("b", size, 1),
            lambda: image.set("b", size - 1, 2),
            lambda: image.set("b", 2**63, 2**63),
            lambda: image.set("b", 2**64 - 1, 1),
            lambda: image.reset("b", 100, 65536),  # not whole granules
            lambda: image.add("x", granularity=3000),
            lambda: image.add("x", granularity=256),
            lambda: image.add("x", granularity=1 << 32),
            lambda: image.add(""),
            lambda: image.add("a\0b"),
            lambda: image.import_extents("b", [(0, 4096), (size - 10, 11)]),
            lambda: image.import_extents("b", [(0, 4096)], granularity=1000),
        ]
        for call in invalid:
            with pytest.raises(ValueError) as raised:
                call()
            error = raised.value
            assert isinstance(error, hbitmap.InvalidArgumentError), error
            assert error.errno == errno.EINVAL and error.filename == str(disk)
        with pytest.raises(ValueError):
            image.check(repair="everything")
        with pytest.raises(hbitmap.ExistsError) as exists:
            image.add("b")
        assert isinstance(exists.value, FileExistsError)
        with pytest.raises(hbitmap.ExistsError) as differs:
            image.add("off", granularity=65536, exist_ok=True)  # its granularity is 1 MiB
        assert isinstance(differs.value, FileExistsError) and "'off'" in str(differs.value)
        with pytest.raises(FileExistsError):
            image.add("off", granularity=1 << 20, exist_ok=True)  # it is disabled
        image.add("off", granularity=1 << 20, disabled=True, exist_ok=True)  # the same: fine
        assert [(o, n) for o, n in image.extents("b")] == [(1 * MiB, 256 * 1024), (40 * MiB, 65536)]
    with pytest.raises(ValueError):
        hbitmap.Image(disk, writable=True, force_share=True)
    state.assert_unchanged()


def test_refusals_of_the_library(disk: Path, workdir: Path) -> None:
    state = FileState(disk)
    with hbitmap.Image(disk) as image:
        with pytest.raises(hbitmap.Error) as read_only:
            image.add("x")
        assert read_only.value.errno == errno.EROFS and read_only.value.kind == "read-only"
        other = qemu_img_create(workdir / "other.qcow2", 32 * MiB)
        qemu_bitmap(other, "--add", "o")
        with hbitmap.Image(other) as small:
            with pytest.raises(hbitmap.Error):
                hbitmap.Image(other, writable=True).merge("o", "o", source_image=image)
            del small
    state.assert_unchanged()
    with hbitmap.Image(disk, writable=True) as image:
        with pytest.raises(hbitmap.InvalidArgumentError) as sizes:
            image.merge("o", "b", source_image=other)
        assert "virtual sizes differ" in str(sizes.value)
    state.assert_unchanged()
    image = hbitmap.Image(disk)
    image.close()
    image.close()
    assert image.closed
    with pytest.raises(ValueError, match="closed"):
        image.bitmaps()


def test_in_use_bitmaps_are_refused(disk: Path) -> None:
    with Qsd(disk) as qsd:
        qsd.kill()
    state = FileState(disk)
    with hbitmap.Image(disk, writable=True) as image:
        for call in (
            lambda: image.extents("b"),
            lambda: image.set("b", 0, 1),
            lambda: image.enable("b"),
            lambda: image.clear("b"),
            lambda: image.merge("b", "off"),
        ):
            with pytest.raises(hbitmap.Error) as raised:
                call()
            assert raised.value.errno == errno.EBUSY and raised.value.kind == "in-use"
            assert "'b'" in str(raised.value)
        assert list(image.extents("b", force=True))  # explicit inspection reads it
    state.assert_unchanged()


def test_hbitmap_preconditions() -> None:
    bitmap = hbitmap.HBitmap(1000, 3)  # 125 groups of 8 items
    cases = [
        (ValueError, lambda: hbitmap.HBitmap(1 << 20, 64)),
        (ValueError, lambda: hbitmap.HBitmap(2**64 - 1, 0)),  # more than 2**41 groups
        (ValueError, lambda: hbitmap.HBitmap(1 << 42, 0)),
        (OverflowError, lambda: hbitmap.HBitmap(-1, 0)),
        (OverflowError, lambda: hbitmap.HBitmap(2**64, 0)),
        (OverflowError, lambda: hbitmap.HBitmap(10, -1)),
        (TypeError, lambda: hbitmap.HBitmap("10", 0)),
        (ValueError, lambda: bitmap.get(1000 + 4)),
        (ValueError, lambda: bitmap.set(999, 6)),
        (ValueError, lambda: bitmap.set(2**64 - 1, 2)),
        (ValueError, lambda: bitmap.reset(1004, 1)),
        (OverflowError, lambda: bitmap.set(-5, 1)),
        (TypeError, lambda: bitmap.set(0, None)),
        (ValueError, lambda: bitmap.serialize(8, 512)),  # start not a multiple of 512
        (ValueError, lambda: bitmap.serialize(0, 8)),  # count misaligned, not the last chunk
        (ValueError, lambda: bitmap.serialize(2048)),  # past the end
        (ValueError, lambda: bitmap.serialization_size(0, 2000)),
        (ValueError, lambda: bitmap.deserialize(b"\0" * 16, 0, 512)),  # 8 bytes needed
        (ValueError, lambda: bitmap.deserialize(b"\0" * 8)),  # 16 bytes needed
        (TypeError, lambda: bitmap.deserialize(12, 0)),
        (TypeError, lambda: bitmap.serialize_into(b"read-only" * 8)),
        (ValueError, lambda: bitmap.serialize_into(bytearray(8))),  # 16 needed
        (ValueError, lambda: hbitmap.HBitmap(1 << 20, 58).serialize()),
        (ValueError, lambda: hbitmap.HBitmap(1 << 20, 60).serialization_align),
        (ValueError, lambda: bitmap.merge(hbitmap.HBitmap(999, 3))),
        (TypeError, lambda: bitmap.merge("x")),
    ]
    for expected, call in cases:
        with pytest.raises(expected):
            call()
    assert bitmap.count() == 0  # nothing refused changed it
    size = 2**63 + 2**40 + 5  # more items than sys.maxsize: len() is not the size
    huge = hbitmap.HBitmap(size, 30)
    assert len(huge) == 0 and not huge and huge.size == size
    huge.set(size - 2, 1)
    assert len(huge) == 1 and huge and list(huge) == [(size - 5, 5)]
