#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU itself on libhbitmap against QEMU on its own util/hbitmap.c, end to end.

The same QEMU build (tests/qemu10/build-qemu.sh: QEMU linked to libhbitmap.so.1) runs every
workload twice per round, alternating: once as built (libhbitmap), once with QEMU's own
util/hbitmap.c swapped in as libhbitmap.so.1 through LD_LIBRARY_PATH
(tests/qemu10/build-own-hbitmap.sh, compiled -O2 as QEMU compiles it). Everything else, the
binaries included, is the same, so a difference is the bitmap code's.

Workloads, on images whose bitmaps have a million scattered dirty extents:
  nbd-map       qemu-nbd exports a bitmap of a 16 TiB image, nbdinfo --map reads it whole
  img-merge     qemu-img bitmap --merge of two such bitmaps into a third
  img-convert   qemu-img convert --bitmaps of the image (two bitmaps)
  qsd-open      qemu-storage-daemon opens the image and quits (bitmaps loaded and stored)
  qmp-merge     QMP block-dirty-bitmap-merge of the two bitmaps into a third
  qmp-clear     QMP block-dirty-bitmap-clear of that bitmap
  qmp-query     QMP query-named-block-nodes (each bitmap's count, which walks it)
  qmp-backup    an incremental backup job (sync=bitmap) of a 1 TiB sparse disk whose bitmap
                has 100,000 scattered extents, to a new qcow2 image

For each: the median wall time and the median CPU time of the QEMU process (user + system, all
threads) on each side, and the ratios (above 1.0: libhbitmap is faster). --debian adds a third
side, Debian's own qemu-utils binaries of the same version: stock QEMU as a distribution ships
it (its build options differ, so not only the bitmap code does).

  benches/qemu_end_to_end.py --build QEMU_BUILD_DIR --own OWN_HBITMAP_DIR [--rounds N]

tests/qemu10/bench-end-to-end.sh builds both and runs this.
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TIB = 1 << 40
GRANULARITY = 64 << 10


def extents(count, disk, seed):
    """`count` scattered extents of 1 to 4 granules, sorted, disjoint and not touching."""
    rng = random.Random(seed)
    granules = disk // GRANULARITY
    starts = sorted(rng.sample(range(0, granules, 8), count))
    return [
        {"offset": s * GRANULARITY, "length": rng.randint(1, 4) * GRANULARITY} for s in starts
    ]


def run_timed(argv, env):
    """Runs argv to completion: (wall seconds, child CPU seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return wall, usage.ru_utime + usage.ru_stime


def process_cpu(pid):
    """CPU time of every thread of a running process, in seconds (schedstat: nanoseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total / 1e9


class Qmp:
    """A QMP client over a UNIX socket: one command at a time."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(500):
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
        else:
            raise SystemExit(f"no QMP socket at {path}")
        self.file = self.sock.makefile("rwb")
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.file.readline()
        if not line:
            raise SystemExit("QMP connection closed")
        return json.loads(line)

    def cmd(self, command, **args):
        self.file.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self.read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise SystemExit(f"QMP {command}: {msg['error']}")
            self.last_event = msg  # events are read and dropped, the last kept

    def wait_event(self, name):
        while True:
            msg = self.read()
            if msg.get("event") == name:
                return msg


class Bench:
    def __init__(self, args, work):
        self.work = work
        built = {
            "qemu-img": f"{args.build}/qemu-img",
            "qemu-nbd": f"{args.build}/qemu-nbd",
            "qsd": f"{args.build}/storage-daemon/qemu-storage-daemon",
        }
        base = dict(os.environ)
        base.pop("LD_LIBRARY_PATH", None)
        own = dict(base, LD_LIBRARY_PATH=args.own)
        # Each side: the binaries and their environment.
        self.sides = {"libhbitmap": (built, base), "own": (built, own)}
        if args.debian:
            debian = {"qemu-img": "/usr/bin/qemu-img", "qemu-nbd": "/usr/bin/qemu-nbd",
                      "qsd": "/usr/bin/qemu-storage-daemon"}
            self.sides["debian"] = (debian, base)
        self.tool = built
        self.results = {}  # workload -> side -> [(wall, cpu)]
        self.qbitmap = args.qbitmap

    def record(self, workload, side, wall, cpu):
        self.results.setdefault(workload, {}).setdefault(side, []).append((wall, cpu))

    def path(self, name):
        return os.path.join(self.work, name)

    def prepare(self):
        img = self.tool["qemu-img"]
        big = self.path("big.qcow2")
        subprocess.run([img, "create", "-q", "-f", "qcow2", big, "16T"], check=True)
        for name, seed in (("a", 1), ("b", 2)):
            doc = {"granularity": GRANULARITY, "extents": extents(1_000_000, 16 * TIB, seed)}
            with open(self.path(f"{name}.json"), "w") as f:
                json.dump(doc, f)
            subprocess.run([self.qbitmap, "import", big, name, self.path(f"{name}.json")],
                           check=True)
        subprocess.run([img, "bitmap", "--add", "-g", str(GRANULARITY), big, "c"],
                       check=True)
        small = self.path("sparse.qcow2")
        subprocess.run([img, "create", "-q", "-f", "qcow2", small, "1T"], check=True)
        doc = {"granularity": GRANULARITY, "extents": extents(100_000, TIB, 3)}
        self.backup_bytes = sum(e["length"] for e in doc["extents"])
        with open(self.path("sparse.json"), "w") as f:
            json.dump(doc, f)
        subprocess.run([self.qbitmap, "import", small, "inc", self.path("sparse.json")],
                       check=True)

    def fresh(self, name):
        """A copy of a prepared image, for a workload that changes it."""
        copy = self.path(f"run-{name}")
        subprocess.run(["cp", "--sparse=always", self.path(name), copy], check=True)
        return copy

    def nbd_map(self, side, env):
        sock = self.path("nbd.sock")
        start = time.perf_counter()
        nbd = subprocess.Popen([self.tool["qemu-nbd"], "-r", "-f", "qcow2", "-B", "a",
                                "-k", sock, "-t", self.path("big.qcow2")], env=env)
        for _ in range(1000):
            if os.path.exists(sock):
                break
            time.sleep(0.005)
        out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:a", f"nbd+unix:///?socket={sock}"],
                             check=True, capture_output=True).stdout
        wall = time.perf_counter() - start
        nbd.terminate()
        _, _, usage = os.wait4(nbd.pid, 0)
        nbd.returncode = 0
        dirty = sum(1 for line in out.splitlines() if line.rstrip().endswith(b"dirty"))
        if dirty != 1_000_000:
            raise SystemExit(f"nbdinfo reported {dirty} dirty extents, not 1,000,000")
        self.record("nbd-map", side, wall, usage.ru_utime + usage.ru_stime)

    def img_merge(self, side, env):
        copy = self.fresh("big.qcow2")
        wall, cpu = run_timed([self.tool["qemu-img"], "bitmap", "--merge", "a", copy, "c"], env)
        self.record("img-merge", side, wall, cpu)
        wall, cpu = run_timed([self.tool["qemu-img"], "bitmap", "--merge", "b", copy, "c"], env)
        self.results["img-merge"][side][-1] = tuple(
            x + y for x, y in zip(self.results["img-merge"][side][-1], (wall, cpu)))

    def img_convert(self, side, env):
        out = self.path("converted.qcow2")
        if os.path.exists(out):
            os.unlink(out)
        wall, cpu = run_timed([self.tool["qemu-img"], "convert", "--bitmaps", "-O", "qcow2",
                               self.path("big.qcow2"), out], env)
        self.record("img-convert", side, wall, cpu)

    def qsd(self, env, image):
        sock = self.path("qmp.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        proc = subprocess.Popen([
            self.tool["qsd"],
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=qcow2,node-name=disk,file=file0",
            "--chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
            "--monitor", "chardev=qmp",
        ], env=env)
        return proc, Qmp(sock)

    def qsd_open(self, side, env):
        copy = self.fresh("big.qcow2")
        start = time.perf_counter()
        proc, qmp = self.qsd(env, copy)
        qmp.cmd("quit")
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        self.record("qsd-open", side, time.perf_counter() - start,
                    usage.ru_utime + usage.ru_stime)

    def qmp_ops(self, side, env):
        copy = self.fresh("big.qcow2")
        proc, qmp = self.qsd(env, copy)

        def timed(workload, command, **args):
            cpu0, t0 = process_cpu(proc.pid), time.perf_counter()
            result = qmp.cmd(command, **args)
            self.record(workload, side, time.perf_counter() - t0, process_cpu(proc.pid) - cpu0)
            return result

        timed("qmp-merge", "block-dirty-bitmap-merge", node="disk", target="c",
              bitmaps=["a", "b"])
        timed("qmp-clear", "block-dirty-bitmap-clear", node="disk", name="c")
        nodes = timed("qmp-query", "query-named-block-nodes", flat=True)
        counts = {b["name"]: b["count"] for n in nodes for b in n.get("dirty-bitmaps", [])}
        if counts.get("c") != 0 or not counts.get("a"):
            raise SystemExit(f"unexpected bitmap counts {counts}")
        qmp.cmd("quit")
        proc.wait()

    def qmp_backup(self, side, env):
        copy = self.fresh("sparse.qcow2")
        target = self.path("backup.qcow2")
        subprocess.run([self.tool["qemu-img"], "create", "-q", "-f", "qcow2", target, "1T"],
                       check=True)
        proc, qmp = self.qsd(env, copy)
        qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "target"},
                file={"driver": "file", "filename": target})
        cpu0, t0 = process_cpu(proc.pid), time.perf_counter()
        qmp.cmd("blockdev-backup", **{"job-id": "inc"}, device="disk", target="target",
                sync="bitmap", bitmap="inc", **{"bitmap-mode": "on-success"})
        event = qmp.wait_event("BLOCK_JOB_COMPLETED")
        self.record("qmp-backup", side, time.perf_counter() - t0, process_cpu(proc.pid) - cpu0)
        data = event["data"]
        if "error" in data or data["offset"] != data["len"] or data["len"] != self.backup_bytes:
            raise SystemExit(f"backup job: {event}, {self.backup_bytes} bytes dirty")
        qmp.cmd("quit")
        proc.wait()

    def round(self):
        for side, (tools, env) in self.sides.items():
            self.tool = tools
            for workload in (self.nbd_map, self.img_merge, self.img_convert, self.qsd_open,
                             self.qmp_ops, self.qmp_backup):
                print(f"  {side}: {workload.__name__}", file=sys.stderr, flush=True)
                workload(side, env)
        # The other order next time: neither side always runs first.
        self.sides = dict(reversed(list(self.sides.items())))

    def report(self):
        """Medians, as a Markdown table: each side's wall and CPU time, and the ratio of QEMU's
        own hbitmap.c (and of Debian's binaries) to libhbitmap (above 1.0: libhbitmap faster)."""
        others = [side for side in self.sides if side != "libhbitmap"]
        head = ["workload", "libhbitmap wall", "libhbitmap CPU"]
        for side in others:
            head += [f"{side} wall", f"{side} CPU", f"{side}/lib wall", f"{side}/lib CPU"]
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for workload, sides in self.results.items():
            lib = [statistics.median(x) for x in zip(*sides["libhbitmap"])]
            row = [workload, fmt(lib[0]), fmt(lib[1])]
            for side in others:
                other = [statistics.median(x) for x in zip(*sides[side])]
                row += [fmt(other[0]), fmt(other[1]), ratio(other[0], lib[0]),
                        ratio(other[1], lib[1])]
            print("| " + " | ".join(row) + " |")


def fmt(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def ratio(own, lib):
    return f"{own / lib:.2f}" if lib > 0 else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", required=True, help="QEMU's build folder (linked to libhbitmap)")
    parser.add_argument("--own", required=True, help="folder of QEMU's own hbitmap.c as libhbitmap.so.1")
    parser.add_argument("--qbitmap", default="qbitmap", help="the qbitmap binary (makes the images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--debian", action="store_true",
                        help="also Debian's qemu-utils binaries (/usr/bin), stock QEMU as shipped")
    parser.add_argument("--workdir", help="where the images go (default: a temporary folder)")
    args = parser.parse_args()
    for tool in ("nbdinfo", args.qbitmap):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        bench = Bench(args, work)
        t0 = time.perf_counter()
        bench.prepare()
        print(f"images prepared in {time.perf_counter() - t0:.1f} s; {args.rounds} rounds",
              file=sys.stderr)
        for n in range(args.rounds):
            bench.round()
            print(f"round {n + 1} done", file=sys.stderr)
        bench.report()


if __name__ == "__main__":
    main()
