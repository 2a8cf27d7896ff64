# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared helpers of the tests: QEMU's tools (qemu-img, qemu-io, qemu-nbd + nbdinfo,
qemu-storage-daemon) driven as a user would, and ways to tell that a file was not written.

Every tool is required: a missing one fails the test (the CI installs them)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket as sock
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

#: Seconds any command may take before the test fails (instead of hanging the suite).
TIMEOUT = 300

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required by the tests (install QEMU's tools and libnbd-bin)")
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command, failing the test with its output when it fails (if `check`)."""
    done = subprocess.run(
        [tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=TIMEOUT
    )
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def qemu_img_create(path: Path, size: int, cluster_size: int = 65536, fmt: str = "qcow2") -> Path:
    options = ["-o", f"cluster_size={cluster_size}"] if fmt == "qcow2" else []
    run("qemu-img", "create", "-q", "-f", fmt, *options, str(path), str(size))
    return path


def qemu_bitmap(path: Path, *args: str) -> None:
    """qemu-img bitmap ARGS... on a qcow2 image."""
    run("qemu-img", "bitmap", "-f", "qcow2", *args[:-1], str(path), args[-1])


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    """qemu-io with each command (writes go through QEMU's block layer: its enabled persistent
    bitmaps record them and are stored back on exit)."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, str(path))


def qemu_info(path: Path) -> Dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)


def qemu_bitmaps(path: Path) -> List[Dict]:
    """The bitmaps `qemu-img info` lists: name, granularity, flags."""
    data = qemu_info(path).get("format-specific", {}).get("data", {})
    return data.get("bitmaps", [])


def qemu_check(path: Path) -> Tuple[int, Dict]:
    """`qemu-img check --output=json`: its exit status and document."""
    done = run("qemu-img", "check", "--output=json", str(path), check=False)
    return done.returncode, json.loads(done.stdout)


def assert_qemu_clean(path: Path) -> Dict:
    status, report = qemu_check(path)
    assert status == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def ours_as_qemu(infos) -> List[Dict]:
    """The package's bitmap list in `qemu-img info`'s form."""
    out = []
    for info in infos:
        flags = (["in-use"] if info.in_use else []) + (["auto"] if info.auto else [])
        name = info.name if isinstance(info.name, str) else info.name.decode("utf-8", "replace")
        out.append({"name": name, "granularity": info.granularity, "flags": flags})
    return out


def normalize_qemu(bitmaps: List[Dict]) -> List[Dict]:
    return [{"name": b["name"], "granularity": b["granularity"], "flags": b["flags"]} for b in bitmaps]


class NbdServer:
    """qemu-nbd serving an image read-only on a unix socket, with one bitmap exported."""

    def __init__(self, image: Path, socket: Path, bitmap: Optional[str] = None):
        args = [tool("qemu-nbd"), "-r", "-f", "qcow2", "-t", "-k", str(socket)]
        if bitmap is not None:
            args += ["-B", bitmap]
        self.socket = socket
        self.process = subprocess.Popen(
            [*args, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # The socket file appears when qemu-nbd binds it, a moment before it listens: ready
        # when a connection is accepted (the server is persistent, -t, so the probe is harmless).
        deadline = time.monotonic() + 30
        while not self._accepts():
            if self.process.poll() is not None:
                pytest.fail(f"qemu-nbd exited: {self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.close()
                pytest.fail("qemu-nbd did not start")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        probe = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()  # a SIGTERM arriving while qemu-nbd starts can be lost
        self.process.wait(timeout=30)

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def nbd_extents(image: Path, name: str, socket_dir: Path) -> List[Tuple[int, int]]:
    """The dirty extents `nbdinfo --json --map=qemu:dirty-bitmap:NAME` reads from `qemu-nbd -r
    -B NAME` on a unix socket: the type-1 entries, adjacent ones joined."""
    socket = socket_dir / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    with NbdServer(image, socket, bitmap=name) as server:
        out = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", server.uri).stdout
    extents: List[Tuple[int, int]] = []
    for entry in json.loads(out):
        if entry["type"] & 1 == 0:
            continue
        if extents and extents[-1][0] + extents[-1][1] == entry["offset"]:
            extents[-1] = (extents[-1][0], extents[-1][1] + entry["length"])
        else:
            extents.append((entry["offset"], entry["length"]))
    return extents


class Qsd:
    """A qemu-storage-daemon with the image open read-write (its bitmaps loaded: QEMU marks them
    in use on disk and holds the image's locks). `kill()` ends it with SIGKILL, as a crash."""

    def __init__(self, image: Path):
        self.image = image
        socket = image.parent / f"qsd-{time.monotonic_ns()}.sock"
        # The NBD server's socket is made after the block devices are open (locks taken,
        # bitmaps loaded and marked in use): its existence says the daemon is ready.
        self.process = subprocess.Popen(
            [
                tool("qemu-storage-daemon"),
                "--blockdev",
                f"driver=file,filename={image},node-name=file0",
                "--blockdev",
                "driver=qcow2,file=file0,node-name=fmt0",
                "--nbd-server",
                f"addr.type=unix,addr.path={socket}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not socket.exists():
            if self.process.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited: {self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("qemu-storage-daemon did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> "Qsd":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class FileState:
    """A file's bytes and mtime, to prove that a refused call wrote nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.digest, self.mtime_ns, self.size = self._read()

    def _read(self):
        data = self.path.read_bytes()
        stat = self.path.stat()
        return hashlib.sha256(data).hexdigest(), stat.st_mtime_ns, len(data)

    def assert_unchanged(self) -> None:
        digest, mtime_ns, size = self._read()
        assert (digest, mtime_ns, size) == (self.digest, self.mtime_ns, self.size), (
            f"{self.path} was written"
        )


def read_raw(image: Path, dest: Path) -> bytes:
    """The guest data of an image, through `qemu-img convert -O raw`."""
    run("qemu-img", "convert", "-U", "-O", "raw", str(image), str(dest))
    return dest.read_bytes()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep the directory short.
    yield tmp_path


@pytest.fixture(scope="session", autouse=True)
def tools_present() -> None:
    for name in TOOLS:
        tool(name)


def pairs(values: Sequence[int]) -> List[Tuple[int, int]]:
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
