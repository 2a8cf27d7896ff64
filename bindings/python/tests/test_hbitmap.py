# SPDX-License-Identifier: GPL-2.0-or-later
"""hbitmap.HBitmap: against a plain model, and its serialization against the C ABI's
(`target/release/libhbitmap.so` through ctypes: hbitmap_alloc, hbitmap_set, hbitmap_reset,
hbitmap_serialize_part...), byte for byte."""

from __future__ import annotations

import array
import copy
import ctypes
import mmap
import os
import random
from pathlib import Path
from typing import List, Tuple

import pytest

import hbitmap


def clib() -> ctypes.CDLL:
    """The C library: $HBITMAP_CLIB, else the cargo build beside this checkout."""
    path = os.environ.get("HBITMAP_CLIB") or str(
        Path(__file__).resolve().parents[3] / "target" / "release" / "libhbitmap.so"
    )
    if not Path(path).exists():
        pytest.fail(f"{path} is missing: build it with `cargo build --release --lib`")
    lib = ctypes.CDLL(path)
    u64, p = ctypes.c_uint64, ctypes.c_void_p
    lib.hbitmap_alloc.argtypes, lib.hbitmap_alloc.restype = [u64, ctypes.c_int], p
    lib.hbitmap_free.argtypes, lib.hbitmap_free.restype = [p], None
    for name in ("hbitmap_set", "hbitmap_reset"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [p, u64, u64], None
    lib.hbitmap_count.argtypes, lib.hbitmap_count.restype = [p], u64
    lib.hbitmap_serialization_size.argtypes = [p, u64, u64]
    lib.hbitmap_serialization_size.restype = u64
    lib.hbitmap_serialize_part.argtypes = [p, ctypes.c_char_p, u64, u64]
    lib.hbitmap_serialize_part.restype = None
    lib.hbitmap_deserialize_part.argtypes = [p, ctypes.c_char_p, u64, u64, ctypes.c_bool]
    lib.hbitmap_deserialize_part.restype = None
    lib.hbitmap_sha256.argtypes, lib.hbitmap_sha256.restype = [p, p], ctypes.c_void_p
    return lib


@pytest.fixture(scope="module")
def c() -> ctypes.CDLL:
    return clib()


class CBitmap:
    def __init__(self, lib: ctypes.CDLL, size: int, granularity: int):
        self.lib = lib
        self.ptr = lib.hbitmap_alloc(size, granularity)
        assert self.ptr

    def serialize(self, start: int, count: int) -> bytes:
        n = self.lib.hbitmap_serialization_size(self.ptr, start, count)
        buf = ctypes.create_string_buffer(n)
        self.lib.hbitmap_serialize_part(self.ptr, buf, start, count)
        return buf.raw

    def sha256(self) -> str:
        raw = self.lib.hbitmap_sha256(self.ptr, None)
        text = ctypes.string_at(raw).decode()
        ctypes.CDLL(None).free(ctypes.c_void_p(raw))
        return text

    def __del__(self) -> None:
        self.lib.hbitmap_free(self.ptr)


def model_extents(bits: List[bool], granularity: int, size: int) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for group, dirty in enumerate(bits):
        if not dirty:
            continue
        start, end = group << granularity, min((group + 1) << granularity, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


@pytest.mark.parametrize("size,granularity", [(1, 0), (1000, 0), (4099, 3), (70000, 5), (300, 9)])
def test_against_a_model(size: int, granularity: int) -> None:
    rng = random.Random(size * 64 + granularity)
    groups = (size + (1 << granularity) - 1) >> granularity
    bits = [False] * groups
    bitmap = hbitmap.HBitmap(size, granularity)
    assert (bitmap.size, bitmap.granularity, bitmap.groups, len(bitmap)) == (
        size, granularity, groups, 0)
    assert not bitmap
    for _ in range(300):
        start = rng.randrange(size)
        count = rng.randrange(0, size - start + 1)
        dirty = rng.random() < 0.6
        (bitmap.set if dirty else bitmap.reset)(start, count)
        if count:
            for group in range(start >> granularity, ((start + count - 1) >> granularity) + 1):
                bits[group] = dirty
        assert bitmap.count() == sum(bits) << granularity
    assert [bitmap.get(i) for i in range(size)] == [bits[i >> granularity] for i in range(size)]
    assert list(bitmap) == list(bitmap.extents()) == model_extents(bits, granularity, size)
    assert len(bitmap) == len(model_extents(bits, granularity, size))
    assert bool(bitmap) == any(bits)
    assert bitmap.is_empty() == (not any(bits))
    bitmap.clear()
    assert bitmap.is_empty() and list(bitmap) == [] and bitmap.count() == 0


@pytest.mark.parametrize("size,granularity", [(1 << 16, 0), (123457, 2), (1 << 20, 9), (5000, 13)])
def test_serialization_equals_the_c_abi(c: ctypes.CDLL, size: int, granularity: int) -> None:
    rng = random.Random(size + granularity)
    ours = hbitmap.HBitmap(size, granularity)
    theirs = CBitmap(c, size, granularity)
    for _ in range(200):
        start = rng.randrange(size)
        count = rng.randrange(1, min(size - start, 5000) + 1)
        if rng.random() < 0.7:
            ours.set(start, count)
            c.hbitmap_set(theirs.ptr, start, count)
        else:
            ours.reset(start, count)
            c.hbitmap_reset(theirs.ptr, start, count)
    assert ours.count() == c.hbitmap_count(theirs.ptr) > 0
    whole = ours.serialize()
    assert whole == theirs.serialize(0, size)
    assert len(whole) == ours.serialization_size() == c.hbitmap_serialization_size(theirs.ptr, 0, size)
    assert ours.sha256() == theirs.sha256()
    # Chunk by chunk, as a migration sends it.
    align = ours.serialization_align
    assert align == 64 << granularity
    chunk = align * 3
    pieces = []
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        piece = ours.serialize(start, count)
        assert piece == theirs.serialize(start, count)
        assert ours.serialization_size(start, count) == len(piece)
        pieces.append((start, count, piece))
    assert b"".join(p for _, _, p in pieces) == whole
    # Deserialized chunk by chunk (summary rebuilt once at the end) into a fresh bitmap: equal.
    copy_ = hbitmap.HBitmap(size, granularity)
    for start, count, piece in pieces:
        copy_.deserialize(memoryview(piece), start, count, finish=False)
    copy_.deserialize_finish()
    assert copy_ == ours and list(copy_) == list(ours)
    # The C ABI reads what Python wrote.
    back = CBitmap(c, size, granularity)
    c.hbitmap_deserialize_part(back.ptr, whole, 0, size, True)
    assert back.serialize(0, size) == whole


def test_serialize_into_any_writable_buffer() -> None:
    bitmap = hbitmap.HBitmap(1 << 16, 0)
    bitmap.set(100, 5000)
    bitmap.set(60000, 1)
    expected = bitmap.serialize()
    n = len(expected)
    assert bitmap.serialize_into(bytearray(n)) == n
    for make in (
        lambda: bytearray(n + 10),
        lambda: array.array("Q", [0] * (n // 8)),
        lambda: memoryview(bytearray(n * 2))[n // 2:],
        lambda: mmap.mmap(-1, n),
    ):
        buffer = make()
        assert bitmap.serialize_into(buffer) == n
        assert bytes(memoryview(buffer).cast("B")[:n]) == expected
    # A chunk into a buffer.
    buffer = bytearray(8)
    assert bitmap.serialize_into(buffer, 64 * 15, 64) == 8
    assert bytes(buffer) == expected[15 * 8:16 * 8]


def test_merge_equality_copy_repr() -> None:
    coarse = hbitmap.HBitmap(1 << 20, 16)
    fine = hbitmap.HBitmap(1 << 20, 9)
    fine.set(70000, 1)  # the 512-item group 69632..70144
    coarse.merge(fine)
    assert list(coarse) == [(65536, 65536)]
    same = hbitmap.HBitmap(1 << 20, 16)
    same.set(65536, 1)
    assert same == coarse and not (same != coarse)
    assert same != fine and same != "x"
    twin = copy.copy(same)
    twin.set(0, 1)
    assert twin != same and copy.deepcopy(twin) == twin
    same.merge(same)  # with itself: nothing changes, no deadlock
    assert same == coarse
    with pytest.raises(TypeError):
        hash(same)
    assert repr(same) == "<hbitmap.HBitmap size=1048576 granularity=16 count=65536 extents=[(65536, 65536)]>"
    many = hbitmap.HBitmap(1000, 0)
    for i in range(0, 20, 2):
        many.set(i, 1)
    assert repr(many).endswith("extents=[(0, 1), (2, 1), (4, 1), (6, 1), ...]>")


def test_items_past_2_63() -> None:
    bitmap = hbitmap.HBitmap(3 << 62, 62)
    bitmap.set((3 << 62) - 1, 1)
    assert bitmap.get(2 << 62) and not bitmap.get(0)
    assert list(bitmap) == [(2 << 62, 1 << 62)]
    assert bitmap.count() == 1 << 62


def test_iterator_streams_and_sees_changes() -> None:
    bitmap = hbitmap.HBitmap(1 << 30, 0)
    for i in range(0, 20000):
        bitmap.set(i * 1000, 10)
    it = iter(bitmap)
    assert iter(it) is it
    assert next(it) == (0, 10)
    bitmap.set((1 << 30) - 5, 5)  # ahead of the iterator: seen when reached
    rest = list(it)
    assert len(rest) == 19999 + 1 and rest[-1] == ((1 << 30) - 5, 5)
    assert list(it) == []


def test_everything_public_has_a_docstring() -> None:
    import inspect

    missing = []
    for name in hbitmap.__all__:
        obj = getattr(hbitmap, name)
        if name in ("Name", "StrPath", "CheckReport"):  # type aliases
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__ == "hbitmap" and not issubclass(obj, OSError):
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr not in (
                    "__iter__", "__next__", "__enter__", "__exit__", "__len__", "__bool__",
                    "__eq__", "__repr__", "__contains__", "__copy__", "__deepcopy__",
                ):
                    continue
                if not inspect.getdoc(value):
                    missing.append(f"{name}.{attr}")
    assert missing == []
