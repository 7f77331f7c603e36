"""virtio-vsock: throughput and latency through pyrovm's Firecracker-style vsock, beside the ceiling of a
bare Unix socket pair on the host (QEMU cannot do vsock here: there is no vhost-vsock).

    python bench/vsock.py [--mib N] [--pings N] [--repeat R]

The test guest (``test=vsock``) serves an echo on port 5000, a source on 5001 (sends N MiB and closes)
and a sink on 5002 (drops, and closes once the host shut down its side).  The host connects through the
VM's Unix socket with ``CONNECT <port>``.  The ceiling runs the same three patterns between two ends of
a ``socketpair`` in one process (a thread plays the guest).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import env, pyrovm_cmd, table, testguest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pyrovm.netback.vsock import VsockHost

CHUNK = 1 << 16


def sink_to_eof(s: socket.socket) -> int:
    n = 0
    while chunk := s.recv(CHUNK):
        n += len(chunk)
    return n


def host_to_guest(connect: Callable[[int], socket.socket], mib: int) -> float:
    data = b"h" * CHUNK
    s = connect(5002)
    t0 = time.perf_counter()
    for _ in range(mib * 16):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    sink_to_eof(s)  # the guest closes once it has everything
    secs = time.perf_counter() - t0
    s.close()
    return mib / secs * 1.048576


def guest_to_host(connect: Callable[[int], socket.socket], mib: int) -> float:
    s = connect(5001)
    t0 = time.perf_counter()
    n = sink_to_eof(s)
    secs = time.perf_counter() - t0
    s.close()
    assert n == mib << 20, n
    return mib / secs * 1.048576


def echo_rtts(connect: Callable[[int], socket.socket], count: int) -> list[float]:
    s = connect(5000)
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        rtts.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return rtts


def measure(connect: Callable[[int], socket.socket], args: argparse.Namespace) -> dict[str, float]:
    rtts = sorted(echo_rtts(connect, args.pings))
    return {
        "host -> guest MB/s": host_to_guest(connect, args.mib),
        "guest -> host MB/s": guest_to_host(connect, args.mib),
        "1-byte echo p50 µs": statistics.median(rtts),
        "1-byte echo p99 µs": rtts[int(0.99 * (len(rtts) - 1))],
    }


def run_pyrovm(guest: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.sock"
        cmd = pyrovm_cmd(guest, f"test=vsock port=5000 bytes={args.mib << 20}",
                         extra=["--console", "stdio", "--vsock", f"cid=3,uds={path}"])  # fmt: skip
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env())
        try:
            assert p.stdout is not None
            out = b""
            while not re.search(rb"vsock: ready", out):
                chunk = p.stdout.read1(4096)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError(f"the guest did not come up: {out[-300:]!r}")
                out += chunk
            host = VsockHost(path, 3)
            return measure(lambda port: host.connect(port), args)
        finally:
            p.kill()
            p.wait()


def run_ceiling(args: argparse.Namespace) -> dict[str, float]:
    """The same patterns over socketpairs, a thread playing the guest."""

    def connect(port: int) -> socket.socket:
        a, b = socket.socketpair()

        def guest() -> None:
            with b:
                if port == 5000:
                    while chunk := b.recv(CHUNK):
                        b.sendall(chunk)
                elif port == 5001:
                    data = b"s" * CHUNK
                    for _ in range(args.mib * 16):
                        b.sendall(data)
                else:
                    sink_to_eof(b)

        threading.Thread(target=guest, daemon=True).start()
        return a

    return measure(connect, args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="MiB per throughput run (default 64)")
    ap.add_argument("--pings", type=int, default=2000, help="echo round trips (default 2000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs each, alternating (median)")
    args = ap.parse_args(argv)
    guest = testguest.build()
    runs: dict[str, list[dict[str, float]]] = {"pyrovm": [], "ceiling": []}
    for i in range(args.repeat):
        for who in ("pyrovm", "ceiling") if i % 2 == 0 else ("ceiling", "pyrovm"):
            runs[who].append(run_pyrovm(guest, args) if who == "pyrovm" else run_ceiling(args))
            print(f"  run {i + 1} {who}: {runs[who][-1]}", file=sys.stderr, flush=True)
    rows = []
    for key in runs["pyrovm"][0]:
        p = statistics.median(r[key] for r in runs["pyrovm"])
        c = statistics.median(r[key] for r in runs["ceiling"])
        ratio = c / p if key.endswith("µs") else p / c
        rows.append((key, f"{p:.1f}", f"{c:.1f}", f"{ratio:.2f}x"))
    print(f"vsock, median of {args.repeat} runs, {args.mib} MiB a stream, {args.pings} round trips")
    print(table(rows, ("measure", "pyrovm", "unix socketpair", "pyrovm vs ceiling")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
