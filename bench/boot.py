"""Linux boot time: the same kernel (bzImage) and initramfs under pyrovm and under QEMU microvm.

    python bench/boot.py [--kernel BZIMAGE] [--initrd CPIO] [--cpus N] [--memory SIZE] [--repeat R]

Defaults: the project's kernel (``build_kernel()``) and busybox initramfs (``build_initramfs()``), 1 vCPU,
128 MiB.  Both VMMs get the same kernel command line (on a PVM host with the workarounds pyrovm would
add, and QEMU with ``vendor=GenuineIntel``).  pyrovm runs twice, with KVM's coalesced I/O (the default)
and with ``--no-coalesced-io``, for the exits to user space per boot (from ``--metrics``); the three
alternate run by run.  Reported, from process start: the time to the console line
"Run /init as init process", to the kernel's panic line (on a PVM host init dies at its first system
call and the kernel panics) and to the VMM's exit (panic=-1 reboot=k: pyrovm ends on the i8042 reset).
QEMU microvm has no i8042, so its reset falls back to a triple fault through int3, which PVM cannot
emulate: QEMU then stops the guest and never exits by itself.  The bench kills QEMU at its panic line and
reports no exit time for it.  Ratios are pyrovm / QEMU (lower is better for pyrovm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pyrovm.host import pvm_cmdline  # noqa: E402
from pyrovm.kvm import is_pvm_host  # noqa: E402

MARKER = b"Run /init as init process"
PANIC = b"Kernel panic - not syncing"
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


Run = tuple[float | None, float | None, float | None, int]


def run_timed(cmd: list[str], timeout: float, kill_on_panic: bool = False) -> Run:
    """(seconds to MARKER, to the panic line, to exit (None when killed), exit status), from process start."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env
    )
    marker_at: list[float] = []
    panic_at: list[float] = []
    killed = False
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        tail = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            if not marker_at and MARKER in tail[-len(MARKER) :] + chunk:
                marker_at.append(time.monotonic() - t0)
            if not panic_at and PANIC in tail[-len(PANIC) :] + chunk:
                panic_at.append(time.monotonic() - t0)
                if kill_on_panic:
                    killed = True
                    proc.kill()
            tail = (tail + chunk)[-4096:]
        code = proc.wait()
    finally:
        killer.cancel()
    end = None if killed else time.monotonic() - t0
    return (marker_at[0] if marker_at else None), (panic_at[0] if panic_at else None), end, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--initrd", type=Path, default=None)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", default="128M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=400)
    args = ap.parse_args()

    kernel = args.kernel
    if kernel is None:
        from pyrovm.kernel.build import build_kernel

        kernel = build_kernel().parent / "bzImage"
    initrd = args.initrd
    if initrd is None:
        from pyrovm.initramfs import build_initramfs

        initrd = build_initramfs(Path(os.environ.get("TMPDIR", "/tmp")) / "pyrovm-bench-initramfs.cpio")
    pvm = is_pvm_host()
    cmdline = pvm_cmdline(BASE_CMDLINE) if pvm else BASE_CMDLINE
    qemu = shutil.which("qemu-system-x86_64")

    pyrovm_cmd = [
        sys.executable,
        "-m",
        "pyrovm.cli",
        "run",
        "--kernel",
        str(kernel),
        "--initrd",
        str(initrd),
        "--memory",
        args.memory,
        "--cpus",
        str(args.cpus),
        "--cmdline",
        cmdline,
    ]
    cpu = "qemu64,-cx16,-xsave,vendor=GenuineIntel" if pvm else "host"
    qemu_cmd = [
        qemu or "qemu-system-x86_64",
        "-M",
        "microvm,acpi=off",
        "-cpu",
        cpu,
        "-enable-kvm",
        "-m",
        args.memory,
        "-smp",
        str(args.cpus),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
    ]

    print(
        f"kernel {kernel}\ninitrd {initrd}\ncmdline {cmdline}\n{args.cpus} vCPU(s), {args.memory}, "
        f"{'PVM host' if pvm else 'KVM host'}, {args.repeat} run(s) each, medians",
        file=sys.stderr,
    )
    metrics = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyrovm-bench-boot-{os.getpid()}.json"
    variants = {
        "pyrovm": [*pyrovm_cmd, "--metrics", str(metrics)],
        "pyrovm-no-coalescing": [*pyrovm_cmd, "--metrics", str(metrics), "--no-coalesced-io"],
        "qemu": qemu_cmd,
    }
    if qemu is None:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
        del variants["qemu"]
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    exits: dict[str, list[dict[str, int]]] = {name: [] for name in variants}
    for _ in range(args.repeat):  # alternating, so that load on the machine hits all alike
        for name, cmd in variants.items():
            metrics.unlink(missing_ok=True)
            runs[name].append(run_timed(cmd, args.timeout, kill_on_panic=name == "qemu" and pvm))
            if metrics.exists():
                exits[name].append(json.loads(metrics.read_text())["vcpu_exits"])
            print(f"{name}: {runs[name][-1]} {exits[name][-1:] if exits[name] else ''}", file=sys.stderr)
    metrics.unlink(missing_ok=True)
    report(runs, exits)
    return 0


def report(runs: dict[str, list[Run]], exits: dict[str, list[dict[str, int]]]) -> None:
    def med(name: str, i: int) -> float | None:
        values = [r[i] for r in runs.get(name, []) if r[i] is not None]
        return statistics.median(values) if values else None  # type: ignore[type-var]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    names = list(runs)
    print(f"{'':28}" + "".join(f"{n:>22}" for n in names) + f"{'pyrovm/qemu':>13}")
    for label, i in (("s to 'Run /init'", 0), ("s to kernel panic line", 1), ("s to VMM exit", 2)):
        a, b = med("pyrovm", i), med("qemu", i)
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{label:28}" + "".join(f"{fmt(med(n, i)):>22}" for n in names) + f"{ratio:>13}")
    for key in ("exits", "io", "mmio", "coalesced"):
        cells = []
        for n in names:
            values = [e.get(key, 0) for e in exits[n]]
            cells.append(f"{int(statistics.median(values)):>22}" if values else f"{'-':>22}")
        print(f"{'vCPU ' + key:28}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
