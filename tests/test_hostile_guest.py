"""The test guest turned hostile (``test=hostile``): from inside the VM it writes every register of every
virtio device with odd sizes and random values, feeds the block and entropy devices malformed chains
(buffers outside RAM, huge lengths, loops, heads out of range, an avail index jumping past the queue),
rewrites rings under them and storms them with notifications.  The VMM survives, the entropy device still
serves a request afterwards, the console still answers, and the VMM's memory and CPU stay bounded."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = needs_kvm


def _argv(guest: Path, cmdline: str, disk: Path, timeout: str, console: str) -> list[str]:
    return pyrovm_argv(
        "run",
        "--kernel",
        str(guest),
        "--memory",
        "64M",
        "--cmdline",
        cmdline,
        "--disk",
        str(disk),
        "--rng",
        "--timeout",
        timeout,
        "--console",
        console,
    )


def _run(guest: Path, cmdline: str, disk: Path) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """The run, its wall time and the CPU time it used (user + system, of the child waited for here)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    p = subprocess.run(
        _argv(guest, cmdline, disk, "60", "stdio"),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return p, wall, cpu


def test_the_vmm_survives_a_hostile_guest(guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    p, wall, cpu = _run(guest, "test=hostile rounds=400", disk)
    assert p.returncode == 1, p.stdout + p.stderr[-2000:]  # the guest's own clean exit: (0 << 1) | 1
    assert "hostile: 2 devices attacked" in p.stdout and "hostile: rng still serves" in p.stdout
    assert "outside guest RAM" in p.stderr and "it loops" in p.stderr  # the devices saw the attacks
    assert "Traceback" not in p.stderr
    lines = p.stderr.count("\n")
    assert lines < 600, lines  # every kind of complaint is logged once: bounded, whatever the guest does
    assert wall < 60 and cpu < 30, (wall, cpu)
    assert disk.read_bytes() == bytes(1 << 20)  # no malformed request wrote the disk


def test_the_vmm_memory_stays_bounded(guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    peak = []
    for cmdline in ("test=hello", "test=hostile rounds=2000"):
        proc = subprocess.Popen(
            _argv(guest, cmdline, disk, "120", "none"),
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 1, cmdline
        peak.append(usage.ru_maxrss / 1024)
    assert peak[1] < peak[0] + 16, peak  # MiB: the attack costs the VMM no more than a little extra memory
