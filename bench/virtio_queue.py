"""virtio-blk data path without a guest: requests/s through the MMIO transport on a MockSplitQueue.

    python bench/virtio_queue.py [--depth 32] [--rounds 2000] [--bs 4096] [--op read|write|both]
    python -m cProfile -s tottime bench/virtio_queue.py --op read

Lays out *depth* three-descriptor requests (header, data, status: what the test guest's blkbench sends)
on a 256-entry split queue in a :class:`~pyrovm.memory.GuestMemory`, negotiates VERSION_1 only and sets
``VIRTQ_AVAIL_F_NO_INTERRUPT`` (like the test guest), then per round republishes every head, kicks the
queue with :meth:`VirtioMmioTransport.queue_notify` and checks the used ring.  Only the kick is timed:
the driver side (publishing, checking) is not counted.  The image is a temp file in the page cache.
"syscalls/request" counts the device's ``preadv``/``pwritev`` calls over a few extra, untimed rounds
(adjacent requests share one call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pyrovm.devices.virtio import mmio as R  # noqa: E402
from pyrovm.devices.virtio.block import REQ_HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock  # noqa: E402
from pyrovm.devices.virtio.device import VIRTIO_F_VERSION_1  # noqa: E402
from pyrovm.devices.virtio.mmio import VirtioMmioTransport  # noqa: E402
from pyrovm.devices.virtio.mock import MockSplitQueue  # noqa: E402
from pyrovm.devices.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT  # noqa: E402
from pyrovm.memory import GuestMemory  # noqa: E402

_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
QUEUE_SIZE = 256


def _w(t: VirtioMmioTransport, off: int, value: int) -> None:
    t.write(off, _U32.pack(value & 0xFFFFFFFF))


class Bench:
    """One device, one transport, one queue of *depth* requests of *bs* bytes."""

    def __init__(self, image: Path, op: str, bs: int, depth: int) -> None:
        self.mem = GuestMemory.anonymous(8 << 20)
        self.dev = VirtioBlock(image)
        self.irqs = 0
        self.t = t = VirtioMmioTransport(self.dev, self.mem, self._irq)
        self.mq = mq = MockSplitQueue(self.mem, size=QUEUE_SIZE, data_size=(depth + 1) * (bs + 4096))
        _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE)
        _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER)
        _w(t, R.DRIVER_FEATURES_SEL, 1)
        _w(t, R.DRIVER_FEATURES, (1 << VIRTIO_F_VERSION_1) >> 32)
        _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK)
        _w(t, R.QUEUE_SEL, 0)
        _w(t, R.QUEUE_NUM, QUEUE_SIZE)
        for lo, addr in (
            (R.QUEUE_DESC_LOW, mq.desc_addr),
            (R.QUEUE_DRIVER_LOW, mq.avail_addr),
            (R.QUEUE_DEVICE_LOW, mq.used_addr),
        ):
            _w(t, lo, addr)
            _w(t, lo + 4, addr >> 32)
        _w(t, R.QUEUE_READY, 1)
        _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK)
        assert t.status & R.STATUS_DRIVER_OK, "driver setup failed"
        mq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
        rtype = VIRTIO_BLK_T_IN if op == "read" else VIRTIO_BLK_T_OUT
        self.sectors_per_req = bs // 512
        self.capacity = self.dev.capacity
        self.heads: list[int] = []
        self.header_addrs: list[int] = []
        self.status_addrs: list[int] = []
        for _ in range(depth):
            header = REQ_HEADER.pack(rtype, 0, 0)
            if op == "read":
                c = mq.add_chain([header], [bs, 1], publish=False)
            else:
                c = mq.add_chain([header, bytes(bs)], [1], publish=False)
            self.heads.append(c.head)
            self.header_addrs.append(c.readable[0][0])
            self.status_addrs.append(c.writable[-1][0])
        self.rtype = rtype
        self.sector = 0
        self.region = self.mem.regions[0]

    def _irq(self) -> None:
        self.irqs += 1

    def round(self) -> float:
        """Publish every request, kick, check: the seconds the kick took."""
        mq, mm = self.mq, self.region.mm
        spr, cap = self.sectors_per_req, self.capacity
        for head, hdr, st in zip(self.heads, self.header_addrs, self.status_addrs, strict=True):
            REQ_HEADER.pack_into(mm, hdr, self.rtype, 0, self.sector)
            mm[st] = 0xFF
            self.sector = 0 if self.sector + 2 * spr > cap else self.sector + spr
            mq.publish(head)
        want = (mq.used_idx() + len(self.heads)) & 0xFFFF
        t0 = time.perf_counter()
        self.t.queue_notify(0)
        dt = time.perf_counter() - t0
        if mq.used_idx() != want or self.t.needs_reset:
            raise RuntimeError(f"device completed {mq.used_idx()} of {want} (status {self.t.status:#x})")
        for st in self.status_addrs:
            if mm[st] != 0:
                raise RuntimeError(f"request failed with status {mm[st]}")
        return dt

    def close(self) -> None:
        self.t.reset()
        self.dev.close()


def run(image: Path, op: str, bs: int, depth: int, rounds: int, repeat: int) -> float:
    """Median over *repeat* runs of µs per request."""
    results = []
    for _ in range(repeat):
        b = Bench(image, op, bs, depth)
        try:
            for _ in range(20):  # warm up
                b.round()
            total = sum(b.round() for _ in range(rounds))
        finally:
            b.close()
        results.append(total / (rounds * depth) * 1e6)
    return statistics.median(results)


def syscalls_per_request(image: Path, op: str, bs: int, depth: int, rounds: int = 20) -> float:
    """``preadv``/``pwritev`` calls the device makes per request (counted in untimed rounds)."""
    name = "preadv" if op == "read" else "pwritev"
    real = getattr(os, name)
    count = 0

    def counting(*args: object) -> int:
        nonlocal count
        count += 1
        return real(*args)  # type: ignore[no-any-return]

    b = Bench(image, op, bs, depth)
    setattr(os, name, counting)
    try:
        for _ in range(rounds):
            b.round()
    finally:
        setattr(os, name, real)
        b.close()
    return count / (rounds * depth)


def syscall_floor(image: Path, op: str, bs: int, n: int = 20000) -> float:
    """µs per bare ``os.preadv``/``os.pwritev`` of *bs* bytes at sequential offsets (the kernel's share)."""
    mem = GuestMemory.anonymous(1 << 20)
    view = mem.view(0x10000, bs)
    fd = os.open(image, os.O_RDWR)
    try:
        call = os.preadv if op == "read" else os.pwritev
        limit = os.fstat(fd).st_size - bs
        t0 = time.perf_counter()
        for i in range(n):
            call(fd, [view], (i * bs) % limit)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        os.close(fd)
        view.release()


def bs_k(bs: int) -> str:
    return f"{bs // 1024}K" if bs % 1024 == 0 else f"{bs}B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=("read", "write", "both"), default="both")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1000, help="kicks per run (default 1000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs, median taken (default 5)")
    ap.add_argument("--image-size", type=int, default=64, help="image size in MiB (default 64)")
    args = ap.parse_args(argv)
    if args.bs % 512 or args.depth * 3 > QUEUE_SIZE:
        ap.error(f"bs must be a multiple of 512 and depth at most {QUEUE_SIZE // 3}")
    ops = ("read", "write") if args.op == "both" else (args.op,)
    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "bench.img"
        with open(image, "wb") as f:
            f.write(b"\xa5" * (args.image_size << 20))
        os.sync()
        for op in ops:
            us = run(image, op, args.bs, args.depth, args.rounds, args.repeat)
            floor = syscall_floor(image, op, args.bs)
            calls = syscalls_per_request(image, op, args.bs, args.depth)
            call = "preadv" if op == "read" else "pwritev"
            print(
                f"{op:5} {args.bs // 1024}K depth {args.depth}: {us:6.2f} µs/request "
                f"{1e6 / us:9.0f} requests/s, {calls:.3f} syscalls/request  (median of {args.repeat} x "
                f"{args.rounds} kicks; one bare {bs_k(args.bs)} {call} {floor:.2f} µs)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
