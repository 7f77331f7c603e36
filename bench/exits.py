"""VM exit cost, start-up latency and memory overhead: pyrovm and QEMU side by side, same test guest.

    python bench/exits.py [--count N] [--repeat R]

For each VMM: microseconds per port-I/O exit and per MMIO exit (the test guest at CPL3 does N writes
to an unclaimed port / address; the time of a run with N = 0 is subtracted, so process start and guest
boot drop out), time from process start to the guest's first UART byte, and the VMM's RSS with the
guest RAM mapping excluded.  Ratios are pyrovm / QEMU (lower is better for pyrovm).

The third column is the floor a Python VMM stands on: a bare loop in this process around
``fcntl.ioctl(KVM_RUN)`` on a VM pyrovm built, with no dispatch at all (an exit's reason and port are
read, an LSR read answered, nothing else), measured the same way in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import (
    QEMU,
    measure_rss,
    pyrovm_cmd,
    qemu_cmd,
    table,
    testguest,
    time_to_first_byte,
    timed_run,
)

MEMORY = "128M"


def bare_loop_us(guest, kind: str, count: int) -> float:  # type: ignore[no-untyped-def]
    """Per exit of the bare Python ``KVM_RUN`` loop (see the module's doc), in µs."""
    import fcntl
    import struct
    import time

    from pyrovm.builder import build
    from pyrovm.config import VmConfig
    from pyrovm.kvm import constants as c

    reason_at, io = struct.Struct("<I"), struct.Struct("<BBHII")
    mmio = struct.Struct("<Q8sIB")

    def run(n: int) -> float:
        m = build(
            VmConfig(kernel=guest, memory=128 << 20, cmdline=f"test={kind} count={n}", coalesced_io=False)
        )
        try:
            fd, mm = m.vcpu_threads.vcpus[0].fd, m.vcpu_threads.vcpus[0]._mm
            t0 = time.perf_counter()
            while True:
                fcntl.ioctl(fd, c.KVM_RUN, 0)
                reason = reason_at.unpack_from(mm, 8)[0]
                if reason == c.KVM_EXIT_IO:
                    direction, _size, port, _count, offset = io.unpack_from(mm, 32)
                    if direction == c.KVM_EXIT_IO_IN:
                        mm[offset] = 0x60  # LSR: transmitter empty
                    elif port == 0xF4:
                        return time.perf_counter() - t0
                elif reason == c.KVM_EXIT_MMIO:
                    if not mmio.unpack_from(mm, 32)[3]:
                        mm[40:48] = b"\xff" * 8
                else:
                    raise RuntimeError(f"bare loop: exit reason {reason}")
        finally:
            m.close()

    base = run(0)
    return (run(count) - base) / count * 1e6


def _run_s(make_cmd, guest, kind: str, n: int) -> float:  # type: ignore[no-untyped-def]
    t, code, out = timed_run(make_cmd(guest, f"test={kind} count={n}", MEMORY))
    if code != 1 or f"{kind} done {n}".encode() not in out:
        raise RuntimeError(f"{kind} run failed (exit {code}): {out[-200:]!r}")
    return t


def one_round(make, guest, count: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One measurement of each kind for one VMM."""
    r = {}
    for kind in ("pio", "mmio"):
        base = _run_s(make, guest, kind, 0)
        r[kind] = (_run_s(make, guest, kind, count) - base) / count * 1e6
    r["first_byte"] = time_to_first_byte(make(guest, "test=hello", MEMORY)) * 1e3
    r["rss"] = measure_rss(make(guest, "test=echo", MEMORY), 128 << 20, b"echo ready") / 2**20
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="exits per run (default 20000)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds, pyrovm and QEMU alternating (default 5)")
    args = ap.parse_args(argv)
    if QEMU is None:
        print("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (scripts/install-deps.sh)")
        return 1
    guest = testguest.build()
    vmms = {"pyrovm": pyrovm_cmd, "qemu": qemu_cmd}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in vmms}
    floor: dict[str, list[float]] = {"pio": [], "mmio": []}
    for _ in range(args.repeat):  # alternating, so that load on the machine hits both alike
        for name, make in vmms.items():
            rounds[name].append(one_round(make, guest, args.count))
        for kind in floor:
            floor[kind].append(bare_loop_us(guest, kind, args.count))
    rows = []
    for key, label, unit in (
        ("pio", "port I/O exit", "µs"),
        ("mmio", "MMIO exit", "µs"),
        ("first_byte", "start to first UART byte", "ms"),
        ("rss", "RSS without guest RAM", "MiB"),
    ):
        cells = []
        for name in vmms:
            values = [r[key] for r in rounds[name]]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        ratios = [p[key] / q[key] for p, q in zip(rounds["pyrovm"], rounds["qemu"], strict=True)]
        bare = floor.get(key)
        cells.append(f"{statistics.median(bare):.1f} ({min(bare):.1f}-{max(bare):.1f})" if bare else "")
        rows.append((f"{label} ({unit})", *cells, f"{statistics.median(ratios):.2f}x"))
    print(f"test guest at CPL3, {args.count} exits per run, {args.repeat} rounds alternating, 128 MiB guest")
    print("median (min-max); ratio: the median of the rounds' pyrovm/qemu")
    print(table(rows, ("measure", "pyrovm", "qemu", "bare Python loop", "pyrovm/qemu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
