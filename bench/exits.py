"""VM exit cost, start-up latency and memory overhead: pyrovm and QEMU side by side, same test guest.

    python bench/exits.py [--count N] [--repeat R]

For each VMM: microseconds per port-I/O exit and per MMIO exit (the test guest at CPL3 does N writes
to an unclaimed port / address; the time of a run with N = 0 is subtracted, so process start and guest
boot drop out), time from process start to the guest's first UART byte, and the VMM's RSS with the
guest RAM mapping excluded.  Ratios are pyrovm / QEMU (lower is better for pyrovm).
"""

from __future__ import annotations

import argparse
import sys

from common import (
    QEMU,
    measure_rss,
    median_of,
    pyrovm_cmd,
    qemu_cmd,
    table,
    testguest,
    time_to_first_byte,
    timed_run,
)

MEMORY = "128M"


def per_exit_us(make_cmd, guest, kind: str, count: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    def run(n: int) -> float:
        t, code, out = timed_run(make_cmd(guest, f"test={kind} count={n}", MEMORY))
        if code != 1 or f"{kind} done {n}".encode() not in out:
            raise RuntimeError(f"{kind} run failed (exit {code}): {out[-200:]!r}")
        return t

    base = median_of(repeat, lambda: run(0))
    full = median_of(repeat, lambda: run(count))
    return (full - base) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="exits per run (default 20000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement, median taken (default 3)")
    args = ap.parse_args(argv)
    if QEMU is None:
        print("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (scripts/install-deps.sh)")
        return 1
    guest = testguest.build()
    vmms = {"pyrovm": pyrovm_cmd, "qemu": qemu_cmd}
    res: dict[str, dict[str, float]] = {name: {} for name in vmms}
    for name, make in vmms.items():
        r = res[name]
        r["pio"] = per_exit_us(make, guest, "pio", args.count, args.repeat)
        r["mmio"] = per_exit_us(make, guest, "mmio", args.count, args.repeat)
        r["first_byte"] = (
            median_of(args.repeat, lambda make=make: time_to_first_byte(make(guest, "test=hello", MEMORY)))
            * 1e3
        )
        r["rss"] = measure_rss(make(guest, "test=echo", MEMORY), 128 << 20, b"echo ready") / 2**20
    rows = []
    for key, label, unit in (
        ("pio", "port I/O exit", "µs"),
        ("mmio", "MMIO exit", "µs"),
        ("first_byte", "start to first UART byte", "ms"),
        ("rss", "RSS without guest RAM", "MiB"),
    ):
        p, q = res["pyrovm"][key], res["qemu"][key]
        rows.append((f"{label} ({unit})", f"{p:.1f}", f"{q:.1f}", f"{p / q:.2f}x"))
    print(f"test guest at CPL3, {args.count} exits per run, median of {args.repeat}, 128 MiB guest")
    print(table(rows, ("measure", "pyrovm", "qemu", "pyrovm/qemu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
