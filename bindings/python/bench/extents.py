#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""How long reading the dirty extents of a fragmented bitmap of a 1 TiB disk takes:

- the package: `Image(path).extents(name)`, consumed in Python;
- what virtnbdbackup does today: `qemu-nbd -r -B NAME` on a unix socket, then `nbdinfo --json
  --map=qemu:dirty-bitmap:NAME`, its JSON parsed and the dirty entries kept;
- `qbitmap dump IMAGE NAME --output=json`, its JSON parsed (the package's overhead over the
  command-line tool the same library drives).

    python3 bench/extents.py [--extents N] [--rounds R] [--qbitmap PATH] [--dir DIR]

Each figure is the median of R rounds (wall time, page cache warm). Every method must return
the same extents. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import hbitmap

TiB = 1 << 40
GRANULE = 65536


def make_image(path: Path, extents: int) -> List[Tuple[int, int]]:
    """A 1 TiB image whose bitmap 'frag' (64 KiB granularity) has `extents` dirty extents of
    1 to 3 granules, spread over the whole disk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(TiB)], check=True)
    stride = TiB // extents // GRANULE * GRANULE
    wanted = [(i * stride, GRANULE * (1 + i % 3)) for i in range(extents)]
    with hbitmap.Image(path, writable=True) as image:
        image.import_extents("frag", wanted, granularity=GRANULE)
    return wanted


def timed(rounds: int, run: Callable[[], List[Tuple[int, int]]]) -> Tuple[float, List[Tuple[int, int]]]:
    times = []
    result: List[Tuple[int, int]] = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def with_package(path: Path) -> List[Tuple[int, int]]:
    with hbitmap.Image(path) as image:
        return list(image.extents("frag"))


def with_package_streamed(path: Path) -> List[Tuple[int, int]]:
    """Consumed without keeping a list: what a copy loop does."""
    n = 0
    with hbitmap.Image(path) as image:
        for _offset, _length in image.extents("frag"):
            n += 1
    return [(n, 0)]


def with_nbdinfo(path: Path, workdir: Path) -> List[Tuple[int, int]]:
    sock = workdir / "bench.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", "frag", "-k", str(sock), str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # The socket file appears a moment before qemu-nbd listens: retry a refused connection
        # (the server, not persistent, exits after the first client that got through).
        for attempt in range(1000):
            if server.poll() is not None:
                raise RuntimeError("qemu-nbd failed")
            if not sock.exists():
                time.sleep(0.001)
                continue
            done = subprocess.run(
                ["nbdinfo", "--json", "--map=qemu:dirty-bitmap:frag", f"nbd+unix:///?socket={sock}"],
                capture_output=True, text=True,
            )
            if done.returncode == 0:
                out = done.stdout
                break
            time.sleep(0.001)
        else:
            raise RuntimeError(f"nbdinfo failed: {done.stderr}")
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    extents: List[Tuple[int, int]] = []
    for entry in json.loads(out):
        if entry["type"] & 1:
            if extents and extents[-1][0] + extents[-1][1] == entry["offset"]:
                extents[-1] = (extents[-1][0], extents[-1][1] + entry["length"])
            else:
                extents.append((entry["offset"], entry["length"]))
    return extents


def with_qbitmap(path: Path, qbitmap: str) -> List[Tuple[int, int]]:
    out = subprocess.run(
        [qbitmap, "dump", str(path), "frag", "--output=json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out)["extents"]]


def with_qbitmap_process(path: Path, qbitmap: str) -> List[Tuple[int, int]]:
    """The command alone, its output discarded unparsed."""
    subprocess.run([qbitmap, "dump", str(path), "frag", "--output=json"], check=True,
                   stdout=subprocess.DEVNULL)
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extents", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    default_qbitmap = Path(__file__).resolve().parents[3] / "target" / "release" / "qbitmap"
    parser.add_argument("--qbitmap", default=str(default_qbitmap))
    parser.add_argument("--dir", default=None, help="where the image goes (default: a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        path = workdir / "disk.qcow2"
        wanted = make_image(path, args.extents)
        print(f"1 TiB image, bitmap 'frag' at 64 KiB granularity with {len(wanted):,} extents "
              f"({os.path.getsize(path) / (1 << 20):.1f} MiB file), median of {args.rounds} rounds")
        rows = []
        t_pkg, got = timed(args.rounds, lambda: with_package(path))
        assert got == wanted, "the package's extents differ"
        rows.append(("hbitmap: list(Image(p).extents(name))", t_pkg))
        t_stream, got = timed(args.rounds, lambda: with_package_streamed(path))
        assert got == [(len(wanted), 0)]
        rows.append(("hbitmap: for offset, length in Image(p).extents(name)", t_stream))
        t_nbd, got = timed(args.rounds, lambda: with_nbdinfo(path, workdir))
        assert got == wanted, "nbdinfo's extents differ"
        rows.append(("qemu-nbd -B + nbdinfo --json --map, parsed", t_nbd))
        t_qb, got = timed(args.rounds, lambda: with_qbitmap(path, args.qbitmap))
        assert got == wanted, "qbitmap's extents differ"
        rows.append(("qbitmap dump --output=json, parsed", t_qb))
        t_qbp, _ = timed(args.rounds, lambda: with_qbitmap_process(path, args.qbitmap))
        rows.append(("qbitmap dump --output=json, unparsed", t_qbp))
        width = max(len(name) for name, _ in rows)
        for name, seconds in rows:
            per = seconds / len(wanted) * 1e9
            print(f"{name:<{width}}  {seconds * 1000:9.1f} ms  {per:7.1f} ns/extent")
        print(f"qemu-nbd + nbdinfo / hbitmap list: {t_nbd / t_pkg:.1f}x")
        print(f"hbitmap list / qbitmap dump parsed: {t_pkg / t_qb:.2f}x; "
              f"/ qbitmap dump unparsed: {t_pkg / t_qbp:.2f}x")


if __name__ == "__main__":
    main()
