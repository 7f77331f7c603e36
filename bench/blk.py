"""virtio-blk throughput and latency: pyrovm and QEMU side by side, same test guest, same raw image.

    python bench/blk.py [--count N] [--repeat R] [--image-size 256M]

The test guest (``test=blkbench``) issues sequential requests of 4 KiB and 64 KiB at queue depth 1
and 32 against the first virtio disk, polling the used ring at CPL3.  The host times each run from the
guest's ``blkbench start`` line to its ``blkbench done`` line on the console, so boot and process start
are not counted.  Both VMMs get the same raw image (in the host page cache: this measures the VMM's
data path, not the disk).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QEMU, env, pyrovm_cmd, qemu_cmd, table, testguest

CASES = [
    ("read", 4096, 1),
    ("write", 4096, 1),
    ("read", 4096, 32),
    ("write", 4096, 32),
    ("read", 65536, 1),
    ("write", 65536, 1),
    ("read", 65536, 32),
    ("write", 65536, 32),
]


def timed_bench(cmd: list[str], count: int) -> float:
    """Seconds between the guest's start and done lines."""
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env()
    )
    assert p.stdout is not None
    buf = b""
    t_start = t_done = None
    while True:
        chunk = p.stdout.read1(65536)  # type: ignore[attr-defined]
        now = time.perf_counter()
        if not chunk:
            break
        buf += chunk
        if t_start is None and b"blkbench start" in buf:
            t_start = now
        if t_done is None and f"blkbench done {count}".encode() in buf:
            t_done = now
            break
    p.wait(60)
    if t_start is None or t_done is None:
        err = p.stderr.read() if p.stderr else b""
        raise RuntimeError(f"blkbench failed: {buf[-300:]!r} {err[-300:]!r}")
    return t_done - t_start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=4000, help="requests per run (default 4000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case, median taken (default 3)")
    ap.add_argument("--image-size", type=int, default=256, help="image size in MiB (default 256)")
    args = ap.parse_args(argv)
    if QEMU is None:
        print("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (scripts/install-deps.sh)")
        return 1
    guest = testguest.build()
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "bench.img"
        with open(img, "wb") as f:
            f.write(b"\xa5" * (args.image_size << 20))  # allocated, in the page cache
        vmms = {
            "pyrovm": lambda cmdline: pyrovm_cmd(guest, cmdline, extra=["--disk", str(img)]),
            "qemu": lambda cmdline: qemu_cmd(
                guest,
                cmdline,
                extra=[
                    "-device",
                    "virtio-blk-device,drive=d0",
                    "-drive",
                    f"id=d0,file={img},format=raw,if=none,cache=writeback,aio=threads",
                ],
            ),
        }
        rows = []
        for op, bs, depth in CASES:
            cmdline = f"test=blkbench op={op} bs={bs} depth={depth} count={args.count}"
            secs = {
                name: statistics.median(timed_bench(make(cmdline), args.count) for _ in range(args.repeat))
                for name, make in vmms.items()
            }
            p, q = secs["pyrovm"], secs["qemu"]
            mbs = {n: args.count * bs / s / 1e6 for n, s in secs.items()}
            iops = {n: args.count / s for n, s in secs.items()}
            us = {n: s / args.count * 1e6 for n, s in secs.items()}
            label = f"{op} {bs // 1024}K qd{depth}"
            rows.append(
                (
                    label,
                    f"{mbs['pyrovm']:.0f} MB/s {iops['pyrovm']:.0f} IOPS {us['pyrovm']:.1f} µs",
                    f"{mbs['qemu']:.0f} MB/s {iops['qemu']:.0f} IOPS {us['qemu']:.1f} µs",
                    f"{q / p:.2f}x",
                )
            )
            print(f"  {label}: pyrovm {p:.3f}s qemu {q:.3f}s", file=sys.stderr, flush=True)
    print(f"sequential I/O, {args.count} requests a run, median of {args.repeat}, {args.image_size} MiB")
    print("µs = wall time per request (requests overlap at depth 32); ratio = pyrovm / QEMU throughput")
    print(table(rows, ("case", "pyrovm", "qemu", "pyrovm/qemu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
