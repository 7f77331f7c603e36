"""Helpers shared by the benchmarks: running pyrovm and QEMU side by side on the same guest."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pyrovm import testguest  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")


def pyrovm_cmd(
    kernel: Path, cmdline: str, memory: str = "128M", cpus: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "run",
        "--kernel",
        str(kernel),
        "--memory",
        memory,
        "--cpus",
        str(cpus),
        "--cmdline",
        cmdline,
        *extra,
    ]


def qemu_cmd(
    kernel: Path, cmdline: str, memory: str = "128M", cpus: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    cmd = testguest.qemu_command(kernel, cmdline, smp=cpus)
    i = cmd.index("-m")
    cmd[i + 1] = memory
    return [*cmd, *extra]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def timed_run(cmd: list[str], timeout: float = 300) -> tuple[float, int, bytes]:
    """Wall time of a whole process run, its exit code and stdout."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env(), stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0, p.returncode, p.stdout


def time_to_first_byte(cmd: list[str], timeout: float = 60) -> float:
    """Seconds from process start to the first byte on its stdout (the guest's first UART byte)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env()
    )
    assert p.stdout is not None
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    p.kill()
    p.wait()
    if not first:
        raise RuntimeError(f"no output from {cmd[0]}")
    return t


def rss_excluding_guest_ram(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(RSS of the process without the guest RAM mapping, RSS of the guest RAM mapping), in bytes."""
    total = guest = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":
            start, end = line.split()[0].split("-")
            size = int(end, 16) - int(start, 16)
        elif line.startswith("Rss:"):
            kb = int(line.split()[1]) * 1024
            if size == guest_bytes:
                guest += kb
            else:
                total += kb
    return total, guest


def measure_rss(cmd: list[str], guest_bytes: int, ready: bytes, timeout: float = 60) -> int:
    """Start *cmd*, wait until its stdout shows *ready*, then read its RSS without guest RAM."""
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env()
    )
    assert p.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while ready not in buf and time.monotonic() < deadline:
        chunk = p.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        buf += chunk
    time.sleep(0.3)
    try:
        rss, _ = rss_excluding_guest_ram(p.pid, guest_bytes)
    finally:
        p.kill()
        p.wait()
    return rss


def median_of(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(n))


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
