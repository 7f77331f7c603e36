"""virtio-net: pyrovm and QEMU microvm side by side, same test guest, same backend, alternating runs.

    sudo python bench/net.py [--backend tap|user|both] [--count N] [--repeat R]

The test guest (``test=net``) answers ping and UDP echo and, on command, sends a stream of UDP datagrams
or counts the ones it receives (``src/pyrovm/testguest/net.c``).  For each VMM and backend:

* tap: the VMM runs in a network namespace made for the run, on a tap there (QEMU: ``-netdev tap``);
* user: passt (QEMU: ``-netdev stream`` to a passt of its own; pyrovm starts its own), port forwards on
  the host's loopback.

Measured (host side): round trip of an ICMP ping (tap only: passt does not forward ICMP to the guest)
and of a 1-byte UDP echo, median and p99 in µs; UDP guest → host (the guest sends COUNT datagrams as fast
as its tx queue takes them; first to last arrival) and host → guest (the host sends COUNT datagrams as
fast as Python can; datagrams the guest counted over the sending time), at 64- and 1472-byte payloads, in
packets/s and Mbit/s of payload.  Ratios are pyrovm / QEMU (above 1: pyrovm faster, or for latency,
QEMU / pyrovm).  Needs root for the tap backend (namespaces).
"""

from __future__ import annotations

import argparse
import os
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

from common import QEMU, ROOT, env, pyrovm_cmd, qemu_cmd, table, testguest

sys.path.insert(0, str(ROOT / "tests"))
from netns import NetNs

GUEST_IP, HOST_IP = "10.0.0.2", "10.0.0.1"
MAC = "02:00:00:00:00:02"
READY = re.compile(rb"net: ready mac \S+ ip (\S+)")
SIZES = (64, 1472)


class Vm:
    """A VMM process running the test guest, its console read in the background."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env()
        )
        self.out = b""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            self.out += chunk

    def ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY.search(self.out)
            if m:
                return m.group(1).decode()
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"the guest did not come up: {self.out[-500:]!r}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Target:
    """Where the host side talks to the guest: addresses of its echo, discard and control ports, and the
    factory of host sockets (inside the namespace for a tap)."""

    def __init__(self, sock: Callable[[], socket.socket], echo: tuple[str, int], discard: tuple[str, int],
                 control: tuple[str, int], sink_addr: str, ns: NetNs | None) -> None:  # fmt: skip
        self.sock, self.echo, self.discard, self.control = sock, echo, discard, control
        self.sink_addr, self.ns = sink_addr, ns


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ping_rtts(ns: NetNs, count: int) -> list[float]:
    out = subprocess.run(
        ns.argv("ping", "-c", str(count), "-i", "0.002", "-W", "1", GUEST_IP), capture_output=True, text=True
    ).stdout
    return [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", out)]


def udp_rtts(t: Target, count: int) -> list[float]:
    s = t.sock()
    s.settimeout(1)
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendto(b"x", t.echo)
        try:
            s.recv(64)
        except TimeoutError:
            continue
        rtts.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return rtts


def guest_to_host(t: Target, count: int, size: int) -> tuple[float, int]:
    """(packets/s, packets received) of a stream the guest sends."""
    ctl, sink = t.sock(), t.sock()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sink.bind((t.sink_addr, 0))
    sink.settimeout(1.0)
    ctl.sendto(f"send {count} {size} {sink.getsockname()[1]}".encode(), t.control)
    got = 0
    first = last = 0.0
    try:
        while got < count:
            sink.recv(4096)
            last = time.perf_counter()
            if not got:
                first = last
            got += 1
    except TimeoutError:
        pass
    ctl.close()
    sink.close()
    return ((got - 1) / (last - first) if got > 1 and last > first else 0.0), got


def host_to_guest(t: Target, count: int, size: int) -> tuple[float, int]:
    """(packets/s the guest counted over the sending time, packets counted)."""
    s = t.sock()
    s.settimeout(1)

    def stats() -> int:
        for _ in range(5):
            s.sendto(b"stats", t.control)
            try:
                return int(s.recv(100).split()[1])
            except (TimeoutError, IndexError, ValueError):
                continue
        raise RuntimeError("no stats from the guest")

    before = stats()
    data = b"y" * size
    send, dst = s.sendto, t.discard
    t0 = time.perf_counter()
    for _ in range(count):
        try:
            send(data, dst)
        except BlockingIOError:
            pass
    secs = time.perf_counter() - t0
    time.sleep(0.3)
    got = stats() - before
    s.close()
    return got / secs, got


def measure(t: Target, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    if t.ns is not None:
        rtt = ping_rtts(t.ns, args.pings)
        out["ping p50 µs"], out["ping p99 µs"] = statistics.median(rtt), percentile(rtt, 99)
    rtt = udp_rtts(t, args.pings)
    out["udp echo p50 µs"], out["udp echo p99 µs"] = statistics.median(rtt), percentile(rtt, 99)
    for size in SIZES:
        out[f"g->h {size}B pps"] = guest_to_host(t, args.count, size)[0]
        out[f"h->g {size}B pps"] = host_to_guest(t, args.count, size)[0]
    return out


# -- one run per VMM and backend --------------------------------------------------------------------------
def run_tap(vmm: str, guest: Path, args: argparse.Namespace) -> dict[str, float]:
    ns = NetNs()
    try:
        ns.add_tap("tap0", f"{HOST_IP}/24")
        cmdline = f"test=net ip={GUEST_IP}/24"
        if vmm == "pyrovm":
            argv = pyrovm_cmd(guest, cmdline, extra=["--console", "stdio", "--net", f"tap=tap0,mac={MAC}"])
        else:
            argv = qemu_cmd(guest, cmdline, extra=[
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
            ])  # fmt: skip
        vm = Vm(ns.argv(*argv))
        try:
            vm.ready()

            def sock() -> socket.socket:
                return ns.socket()

            target = Target(sock, (GUEST_IP, 7), (GUEST_IP, 9), (GUEST_IP, 10), HOST_IP, ns)
            return measure(target, args)
        finally:
            vm.stop()
    finally:
        ns.close()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_user(vmm: str, guest: Path, args: argparse.Namespace) -> dict[str, float]:
    echo, discard, control = free_ports(3)
    fwd = {7: echo, 9: discard, 10: control}
    cmdline = "test=net ip=dhcp"
    passt = None
    with tempfile.TemporaryDirectory() as d:
        if vmm == "pyrovm":
            spec = "user," + ",".join(f"hostfwd=udp::{h}-:{g}" for g, h in fwd.items()) + f",mac={MAC}"
            argv = pyrovm_cmd(guest, cmdline, extra=["--console", "stdio", "--net", spec])
        else:
            os.chmod(d, 0o1777)  # passt started as root runs as nobody: it must create its socket here
            sock_path = Path(d) / "passt.sock"
            passt_argv = ["passt", "-f", "-q", "-1", "-s", str(sock_path), "--mtu", "1500"]
            for g, h in fwd.items():
                passt_argv += ["-u", f"127.0.0.1/{h}:{g}"]
            passt = subprocess.Popen(passt_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not sock_path.exists():
                if passt.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"passt did not start: {passt_argv}")
                time.sleep(0.01)
            argv = qemu_cmd(guest, cmdline, extra=[
                "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock_path}",
                "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
            ])  # fmt: skip
        vm = Vm(argv)
        try:
            vm.ready()

            def sock() -> socket.socket:
                return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

            lo = "127.0.0.1"
            target = Target(sock, (lo, echo), (lo, discard), (lo, control), lo, None)
            return measure(target, args)
        finally:
            vm.stop()
            if passt is not None:
                passt.kill()
                passt.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("tap", "user", "both"), default="both")
    ap.add_argument("--count", type=int, default=20000, help="datagrams per throughput run (default 20000)")
    ap.add_argument("--pings", type=int, default=300, help="round trips per latency run (default 300)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per VMM, alternating (median)")
    args = ap.parse_args(argv)
    if QEMU is None:
        print("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (scripts/install-deps.sh)")
        return 1
    backends = ["tap", "user"] if args.backend == "both" else [args.backend]
    if "tap" in backends and os.geteuid() != 0:
        print("the tap backend needs root (network namespaces); use --backend user", file=sys.stderr)
        return 1
    guest = testguest.build()
    runners = {"tap": run_tap, "user": run_user}
    for backend in backends:
        runs: dict[str, list[dict[str, float]]] = {"pyrovm": [], "qemu": []}
        for i in range(args.repeat):
            for vmm in ("pyrovm", "qemu") if i % 2 == 0 else ("qemu", "pyrovm"):
                runs[vmm].append(runners[backend](vmm, guest, args))
                print(f"  {backend} run {i + 1} {vmm}: {runs[vmm][-1]}", file=sys.stderr, flush=True)
        rows = []
        for key in runs["pyrovm"][0]:
            p = statistics.median(r[key] for r in runs["pyrovm"])
            q = statistics.median(r[key] for r in runs["qemu"])
            if key.endswith("µs"):
                rows.append((key, f"{p:.0f}", f"{q:.0f}", f"{q / p:.2f}x"))
            else:
                size = int(key.split()[1][:-1])
                mbit = {n: v * size * 8 / 1e6 for n, v in (("p", p), ("q", q))}
                rows.append(
                    (key, f"{p:,.0f} ({mbit['p']:.0f} Mbit/s)", f"{q:,.0f} ({mbit['q']:.0f} Mbit/s)",
                     f"{p / q:.2f}x" if q else "-")
                )  # fmt: skip
        print(f"\nbackend {backend}: median of {args.repeat} runs each, {args.count} datagrams per stream")
        print(table(rows, ("measure", "pyrovm", "qemu", "pyrovm vs qemu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
