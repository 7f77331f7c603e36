"""The API's start-up: pyrovm-firecracker beside QEMU's QMP, one run each, alternating.

    python bench/api.py [--repeat R]

pyrovm: time from process start to the API socket answering ``GET /``, the CPU time the process spent
until then (user + system, from /proc), and from ``InstanceStart`` to the test guest's first console
byte.  QEMU: time from process start to its QMP socket answering ``query-status`` (``-S``, no guest
started), and its CPU time until then.  Firecracker's own target is 8 CPU ms to a ready API socket.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QEMU, env, qemu_cmd, table, testguest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pyrovm.api import Client
from pyrovm.api.server import socket_answers

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def pyrovm_run(guest: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        sock = Path(d) / "api.sock"
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-m", "pyrovm.api.firecracker", "--api-sock", str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env(),
        )
        try:
            while not socket_answers(sock, 0.5):
                time.sleep(0.001)
            ready = time.perf_counter() - t0
            cpu = cpu_ms(p.pid)
            with Client(str(sock)) as c:
                c.put("/boot-source", kernel_image_path=str(guest), boot_args="test=hello")
                t1 = time.perf_counter()
                c.put("/actions", action_type="InstanceStart")
                assert p.stdout is not None
                p.stdout.read(1)
                first = time.perf_counter() - t1
            return {
                "ms to API ready": ready * 1000,
                "CPU ms to API ready": cpu,
                "ms InstanceStart -> UART": first * 1000,
            }
        finally:
            p.kill()
            p.wait()


def qmp_answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": "query-status"}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                reply = json.loads(f.readline())
            return "return" in reply
    except (OSError, ValueError):
        return False


def qemu_run(guest: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        qmp = Path(d) / "qmp.sock"
        cmd = qemu_cmd(guest, "test=hello", extra=["-S", "-qmp", f"unix:{qmp},server=on,wait=off"])
        t0 = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        try:
            while not qmp_answers(qmp):
                time.sleep(0.001)
            return {
                "ms to API ready": (time.perf_counter() - t0) * 1000,
                "CPU ms to API ready": cpu_ms(p.pid),
            }
        finally:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs each, alternating (median)")
    args = ap.parse_args(argv)
    guest = testguest.build()
    runs: dict[str, list[dict[str, float]]] = {"pyrovm": [], "qemu": []}
    for i in range(args.repeat):
        runs["pyrovm"].append(pyrovm_run(guest))
        if QEMU is not None:
            runs["qemu"].append(qemu_run(guest))
        print(f"  run {i + 1}: {runs['pyrovm'][-1]} {runs['qemu'][-1:]}", file=sys.stderr, flush=True)
    rows = []
    for key in runs["pyrovm"][0]:
        p = statistics.median(r[key] for r in runs["pyrovm"])
        q = (
            statistics.median(r[key] for r in runs["qemu"])
            if runs["qemu"] and key in runs["qemu"][0]
            else None
        )
        rows.append(
            (key, f"{p:.1f}", "-" if q is None else f"{q:.1f}", "-" if q is None else f"{q / p:.2f}x")
        )
    print(f"API start-up, median of {args.repeat} runs (QEMU: QMP answering query-status, -S)")
    print(table(rows, ("measure", "pyrovm", "qemu", "qemu/pyrovm")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
