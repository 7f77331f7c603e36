"""Linux boot time: the same kernel (bzImage) and initramfs under pyrovm and under QEMU microvm.

    python bench/boot.py [--kernel BZIMAGE] [--initrd CPIO] [--cpus N] [--memory SIZE] [--repeat R]

Defaults: the project's kernel (``build_kernel()``) and busybox initramfs (``build_initramfs()``), 1 vCPU,
128 MiB.  Both VMMs get the same kernel command line (on a PVM host with the workarounds pyrovm would
add, and QEMU with ``vendor=GenuineIntel``).  Reported, from process start: the time to the console line
"Run /init as init process" and to the VMM's exit (on a PVM host init dies and the kernel panics, then
resets: panic=-1 reboot=k, QEMU -no-reboot).  Ratios are pyrovm / QEMU (lower is better for pyrovm).
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
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


def run_timed(cmd: list[str], timeout: float) -> tuple[float | None, float, int]:
    """(seconds to MARKER, seconds to exit, exit status), from just before the process starts."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env
    )
    marker_at: list[float] = []
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        tail = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            if not marker_at and MARKER in tail[-len(MARKER) :] + chunk:
                marker_at.append(time.monotonic() - t0)
            tail = (tail + chunk)[-4096:]
        code = proc.wait()
    finally:
        killer.cancel()
    return (marker_at[0] if marker_at else None), time.monotonic() - t0, code


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
    results: dict[str, tuple[float | None, float, int]] = {}
    for name, cmd in (("pyrovm", pyrovm_cmd), ("qemu", qemu_cmd)):
        if name == "qemu" and qemu is None:
            print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
            continue
        runs = [run_timed(cmd, args.timeout) for _ in range(args.repeat)]
        markers = [r[0] for r in runs if r[0] is not None]
        results[name] = (
            statistics.median(markers) if markers else None,
            statistics.median(r[1] for r in runs),
            runs[-1][2],
        )
        print(f"{name}: {runs}", file=sys.stderr)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'':28}{'pyrovm':>10}{'qemu':>10}{'ratio':>8}")
    p = results.get("pyrovm", (None, 0.0, 0))
    q = results.get("qemu", (None, 0.0, 0))
    for label, i in (("s to 'Run /init'", 0), ("s to VMM exit", 1)):
        a, b = p[i], q[i]
        ratio = f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else "-"
        print(f"{label:28}{fmt(a):>10}{fmt(b):>10}{ratio:>8}")  # type: ignore[arg-type]
    print(f"{'exit status':28}{p[2]:>10}{q[2]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
