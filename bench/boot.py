"""Linux boot time: the same kernel (bzImage) and initramfs under pyrovm and under QEMU microvm.

    python bench/boot.py [--kernel BZIMAGE] [--initrd CPIO] [--cpus N] [--memory SIZE] [--repeat R]

Defaults: the project's kernel (``build_kernel()``) and busybox initramfs (``build_initramfs()``), 1 vCPU,
128 MiB.  Both VMMs get the same kernel command line (on a PVM host with the workarounds pyrovm would
add, and QEMU with ``vendor=GenuineIntel``).  Reported, from process start: the time to the console line
"Run /init as init process", to the kernel's panic line (on a PVM host init dies at its first system
call and the kernel panics) and to the VMM's exit (panic=-1 reboot=k: pyrovm ends on the i8042 reset).
QEMU microvm has no i8042, so its reset falls back to a triple fault through int3, which PVM cannot
emulate: QEMU then stops the guest and never exits by itself.  The bench kills QEMU at its panic line and
reports no exit time for it.  Ratios are pyrovm / QEMU (lower is better for pyrovm).
"""

from __future__ import annotations

import argparse
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
    results: dict[str, tuple[float | None, ...]] = {}
    for name, cmd in (("pyrovm", pyrovm_cmd), ("qemu", qemu_cmd)):
        if name == "qemu" and qemu is None:
            print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
            continue
        kill = name == "qemu" and pvm
        runs = [run_timed(cmd, args.timeout, kill_on_panic=kill) for _ in range(args.repeat)]

        def med(i: int, runs: list[Run] = runs) -> float | None:
            values = [r[i] for r in runs if r[i] is not None]
            return statistics.median(values) if values else None  # type: ignore[type-var]

        results[name] = (med(0), med(1), med(2), runs[-1][3])
        print(f"{name}: {runs}", file=sys.stderr)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'':28}{'pyrovm':>10}{'qemu':>10}{'ratio':>8}")
    p = results.get("pyrovm", (None, None, None, 0))
    q = results.get("qemu", (None, None, None, 0))
    for label, i in (("s to 'Run /init'", 0), ("s to kernel panic line", 1), ("s to VMM exit", 2)):
        a, b = p[i], q[i]
        ratio = f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else "-"
        print(f"{label:28}{fmt(a):>10}{fmt(b):>10}{ratio:>8}")  # type: ignore[arg-type]
    print(f"{'exit status':28}{p[3]:>10}{q[3] if q[2] is not None else 'killed':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
