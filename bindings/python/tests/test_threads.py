# SPDX-License-Identifier: GPL-2.0-or-later
"""Threads: an Image or an HBitmap shared by several threads is never corrupted (each call holds
the object's lock), merges in opposite directions do not deadlock, and bulk work and image I/O
run with the GIL released (another Python thread runs meanwhile)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import hbitmap
from conftest import assert_qemu_clean, nbd_extents, qemu_img_create, run

MiB = 1 << 20


def run_threads(target, count: int) -> None:
    errors = []

    def wrapper(index: int) -> None:
        try:
            target(index)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


def test_one_image_shared_by_threads(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 256 * MiB)
    threads, rounds = 4, 12
    with hbitmap.Image(disk, writable=True) as image:
        for t in range(threads):
            image.add(f"t{t}")

        def work(t: int) -> None:
            for r in range(rounds):
                offset = (t * rounds + r) * MiB
                image.set(f"t{t}", offset, 4096)  # its own bitmap
                image.set("t0", offset + 128 * MiB, 65536)  # one shared by all
                assert any(o <= offset < o + n for o, n in image.extents(f"t{t}"))
                image.bitmaps()

        run_threads(work, threads)
        assert image.check()["clean"]
        for t in range(threads):
            expected = [((t * rounds + r) * MiB, 65536) for r in range(rounds)]
            got = [e for e in image.extents(f"t{t}") if e[0] < 128 * MiB]
            assert got == expected
        shared = [e for e in image.extents("t0") if e[0] >= 128 * MiB]
        assert shared == [(128 * MiB + i * MiB, 65536) for i in range(threads * rounds)]
    assert_qemu_clean(disk)
    assert len(nbd_extents(disk, "t0", workdir)) == rounds + threads * rounds


def test_close_while_other_threads_work(workdir: Path) -> None:
    disk = qemu_img_create(workdir / "disk.qcow2", 64 * MiB)
    image = hbitmap.Image(disk, writable=True)
    image.add("b")
    outcomes = []

    def work(t: int) -> None:
        for r in range(50):
            try:
                image.set("b", (t * 50 + r) * 65536, 1)
                outcomes.append("ok")
            except ValueError as error:  # closed: refused, never a crash
                assert "closed" in str(error)
                outcomes.append("closed")
        if t == 0:
            image.close()

    run_threads(work, 3)
    assert image.closed and "ok" in outcomes
    assert_qemu_clean(disk)
    with hbitmap.Image(disk) as reopened:
        assert reopened.bitmaps()[0].dirty_bytes == outcomes.count("ok") * 65536


def test_hbitmap_shared_by_threads() -> None:
    bitmap = hbitmap.HBitmap(1 << 24, 0)

    def work(t: int) -> None:
        for i in range(2000):
            bitmap.set((i * 8 + t) * 100, 50)
            assert bitmap.get((i * 8 + t) * 100)
            if i % 500 == 0:
                bitmap.serialize()
                list(bitmap)

    run_threads(work, 8)
    assert bitmap.count() == 8 * 2000 * 50
    assert len(bitmap) == 8 * 2000


def test_opposite_merges_do_not_deadlock() -> None:
    a, b = hbitmap.HBitmap(1 << 28, 0), hbitmap.HBitmap(1 << 28, 0)
    a.set(0, 1 << 27)
    b.set(1 << 27, 1 << 27)

    def work(t: int) -> None:
        for _ in range(20):
            (a.merge(b) if t % 2 else b.merge(a))
            assert (a == b) in (True, False)

    run_threads(work, 4)
    assert a == b and a.count() == 1 << 28


def test_opposite_image_merges_do_not_deadlock(workdir: Path) -> None:
    paths = [qemu_img_create(workdir / f"d{i}.qcow2", 64 * MiB) for i in range(2)]
    images = [hbitmap.Image(p, writable=True) for p in paths]
    for i, image in enumerate(images):
        image.add("m")
        image.set("m", i * MiB, 4096)

    def work(t: int) -> None:
        for _ in range(10):
            images[t % 2].merge("m", "m", source_image=images[1 - t % 2])

    run_threads(work, 4)
    for image in images:
        assert list(image.extents("m")) == [(0, 65536), (MiB, 65536)]
        image.close()
    for path in paths:
        assert_qemu_clean(path)


MARGIN = 0.006  # above the interpreter's switch interval (5 ms)


def ticks_inside(call, rounds: int) -> int:
    """Runs `call` (one call into the extension) `rounds` times while another Python thread
    records the time every 0.5 ms; returns how many of its ticks fall inside a call, away from
    its ends by more than the switch interval. A call holding the GIL lets the other thread run
    only at its ends (the interpreter switches threads between bytecodes): none then."""
    ticks: list = []
    stop = threading.Event()
    started = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            started.set()
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    started.wait(10)
    windows = []
    try:
        for _ in range(rounds):
            start = time.monotonic()
            call()
            windows.append((start, time.monotonic()))
    finally:
        stop.set()
        thread.join()
    return sum(1 for t in ticks for s, e in windows if s + MARGIN < t < e - MARGIN)


def test_the_ticks_tell_a_call_holding_the_gil() -> None:
    """The measure itself: a long call that holds the GIL (bytes.count) gets no tick."""
    data = b"\x01" * (1 << 28)
    assert ticks_inside(lambda: data.count(b"\x02"), 3) == 0


def test_the_gil_is_released_during_bulk_work() -> None:
    """A Python thread keeps running while another serializes a 128 MiB bitmap."""
    bitmap = hbitmap.HBitmap(1 << 30, 0)
    bitmap.set(0, 1 << 30)
    assert ticks_inside(bitmap.serialize, 5) > 0
    other = bitmap.copy()
    assert ticks_inside(lambda: bitmap == other, 5) > 0


def test_image_io_releases_the_gil(workdir: Path) -> None:
    """... and while another checks a 64 GiB image with preallocated metadata."""
    disk = workdir / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(disk), "64G")
    with hbitmap.Image(disk, writable=True) as image:
        image.import_extents("big", [(i * 3 * 65536, 65536) for i in range(100000)])
        assert ticks_inside(image.check, 5) > 0
    assert_qemu_clean(disk)


@pytest.mark.parametrize("n", [2])
def test_one_iterator_two_threads(n: int) -> None:
    bitmap = hbitmap.HBitmap(1 << 26, 0)
    for i in range(0, 1 << 26, 4096):
        bitmap.set(i, 1)
    it = iter(bitmap)
    seen = []
    lock = threading.Lock()

    def work(t: int) -> None:
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except ValueError as error:  # the other thread is computing a batch
                assert "already executing" in str(error)
                continue
            with lock:
                seen.append(item)

    run_threads(work, n)
    assert sorted(seen) == list(bitmap)
