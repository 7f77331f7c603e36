"""virtio-net end to end with the test guest's driver (test=net, test=netbench): a tap in a network
namespace the test makes, and passt's rootless user mode with port forwards on the host's loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyrovm.devices.virtio.net import FrameRejectedError
from pyrovm.errors import ConfigError
from pyrovm.netback import tap as tapmod
from pyrovm.netback.tap import open_tap

from conftest import cli_env, needs_kvm, pyrovm_argv
from netns import NetNs, needs_netns, netns

pytestmark = [needs_kvm]

GUEST_IP = "10.0.0.2"
HOST_IP = "10.0.0.1"
READY = re.compile(r"net: ready mac (\S+) ip (\S+) gw (\S+) mtu (\d+)")


class Guest:
    """``pyrovm run`` of the test guest, its console read line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env())
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search("".join(self.lines))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {pattern.pattern!r} on the console:\n{''.join(self.lines)[-3000:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def cli_failure(argv: list[str]) -> tuple[int, list[str]]:
    """The exit status and stderr lines of a ``pyrovm`` command expected to fail at once."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=60)
    return proc.returncode, proc.stderr.strip().splitlines()


def run_args(guest: Path, cmdline: str, *extra: str) -> list[str]:
    return pyrovm_argv("run", "--kernel", str(guest), "--cmdline", cmdline, "--console", "stdio", *extra)


def udp_exchange(sock: socket.socket, addr: tuple[str, int], data: bytes, tries: int = 3) -> bytes:
    sock.settimeout(2)
    for _ in range(tries):
        sock.sendto(data, addr)
        try:
            return sock.recv(65536)
        except TimeoutError:
            continue
    raise AssertionError(f"no answer from {addr}")


# -- tap ------------------------------------------------------------------------------------------------
@pytest.fixture
def ns() -> Iterator[NetNs]:
    with netns() as n:
        yield n


@needs_netns
def test_tap_ping_udp_echo_and_guest_stream(guest: Path, ns: NetNs, tmp_path: Path) -> None:
    ns.add_tap("tap0", f"{HOST_IP}/24", mtu=9000)
    metrics = tmp_path / "metrics.json"
    vm = Guest(
        ns.argv(
            *run_args(
                guest,
                f"test=net ip={GUEST_IP}/24",
                "--net",
                "tap=tap0,mtu=9000",
                "--metrics",
                str(metrics),
                "--timeout",
                "120",
            )
        )
    )
    try:
        ready = vm.wait_for(READY)
        assert ready.group(2) == GUEST_IP and ready.group(4) == "9000"
        ping = subprocess.run(
            ns.argv("ping", "-c", "100", "-i", "0.005", "-W", "2", "-q", GUEST_IP),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
        assert "100 received" in ping.stdout
        sock = ns.socket()
        for size in (1, 100, 1472, 1500, 9000 - 28):  # up to an MTU-sized datagram
            data = os.urandom(size)
            assert udp_exchange(sock, (GUEST_IP, 7), data) == data, size
        # the guest sends a stream: every datagram arrives, in order
        sink = ns.socket()
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sink.bind((HOST_IP, 5001))
        sink.settimeout(5)
        sock.sendto(b"send 3000 1400 5001", (GUEST_IP, 10))
        seqs = [int.from_bytes(sink.recv(2048)[:8], "little") for _ in range(3000)]
        assert seqs == list(range(3000))
        assert sock.recv(100) == b"sent 3000"
        sock.sendto(b"quit", (GUEST_IP, 10))
        assert vm.finish() == 1, vm.text  # the guest's status 0
    finally:
        vm.kill()
    nic = json.loads(metrics.read_text())["devices"]["virtio-net:eth0"]
    assert nic["rx_frames"] >= 105 and nic["tx_frames"] >= 3105, nic
    assert nic["tx_bytes"] >= 3000 * (1400 + 42) and nic["errors"] == 0, nic


@needs_netns
def test_tap_offloads_and_a_refused_header(ns: NetNs) -> None:
    ns.add_tap("tap0", f"{HOST_IP}/24")
    with ns.entered():
        tap = open_tap("tap0")
    try:
        assert not tap.created
        tap.set_offload((1 << 1) | (1 << 7) | (1 << 8))  # GUEST_CSUM, GUEST_TSO4, GUEST_TSO6
        assert tap.offloads == tapmod.TUN_F_CSUM | tapmod.TUN_F_TSO4 | tapmod.TUN_F_TSO6
        # gso_type TCPV4 with a gso_size of 0 and hdr_len past the frame: the kernel refuses it
        garbage = bytes([1, 1]) + (500).to_bytes(2, "little") + bytes(8)
        frame = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x00" + bytes(46)
        with pytest.raises(FrameRejectedError):
            tap.send_frame([memoryview(garbage), memoryview(frame)])
        assert tap.send_frame([memoryview(bytes(12)), memoryview(frame)])  # a plain frame goes
    finally:
        tap.close()


@needs_netns
def test_tap_errors(ns: NetNs, guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns.add_tap("tap0", f"{HOST_IP}/24")
    with ns.entered():
        with pytest.raises(ConfigError, match="lo is not a tap device"):
            open_tap("lo")
        first = open_tap("tap0")
        try:
            with pytest.raises(ConfigError, match="tap tap0 is in use by another process"):
                open_tap("tap0")
        finally:
            first.close()
        made = open_tap("pvt-new0")  # root may create one: it goes away with the VM
        assert made.created and socket.if_nametoindex("pvt-new0")
        made.close()
        with pytest.raises(OSError):
            socket.if_nametoindex("pvt-new0")
    monkeypatch.setattr(tapmod, "TUN_DEVICE", "/nonexistent/tun")
    with pytest.raises(
        ConfigError, match=r"/nonexistent/tun is missing \(load the tun module: modprobe tun\)"
    ):
        open_tap("tap0")
    assert cli_failure(ns.argv(*run_args(guest, "test=net ip=10.0.0.2", "--net", "tap=lo"))) == (
        2,
        ["pyrovm: lo is not a tap device (a tun device or another kind of interface?)"],
    )


# -- user mode (passt) ---------------------------------------------------------------------------------
def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def passt_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "passt"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_user_mode_dhcp_and_udp_port_forward(guest: Path) -> None:
    echo, control = free_port(), free_port()
    vm = Guest(
        run_args(
            guest,
            "test=net ip=dhcp",
            "--net",
            f"user,hostfwd=udp::{echo}-:7,hostfwd=udp:127.0.0.1:{control}-:10",
            "--timeout",
            "120",
        )
    )
    try:
        ready = vm.wait_for(READY)
        assert ready.group(2) != "0.0.0.0" and ready.group(3) != "0.0.0.0"  # address and gateway by DHCP
        [passt] = passt_children(vm.proc.pid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for size in (1, 1000, 1472):
            data = os.urandom(size)
            assert udp_exchange(sock, ("127.0.0.1", echo), data) == data, size
        sock.sendto(b"quit", ("127.0.0.1", control))
        assert vm.finish() == 1, vm.text
        deadline = time.monotonic() + 5
        while alive(passt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(passt)  # passt ended with the VM
    finally:
        vm.kill()


def test_user_mode_no_orphan_passt_after_sigkill(guest: Path) -> None:
    vm = Guest(run_args(guest, "test=net ip=dhcp", "--net", "user", "--timeout", "120"))
    try:
        vm.wait_for(READY)
        [passt] = passt_children(vm.proc.pid)
        os.kill(vm.proc.pid, signal.SIGKILL)
        vm.proc.wait()
        deadline = time.monotonic() + 5
        while alive(passt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(passt)  # its socket closed with pyrovm: passt --one-off ended
    finally:
        vm.kill()


def test_user_mode_host_port_in_use(guest: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        failure = cli_failure(run_args(guest, "test=net ip=dhcp", "--net", f"user,hostfwd=tcp::{port}-:22"))
    assert failure == (
        2,
        [
            f"pyrovm: port forward tcp:127.0.0.1:{port}-:22: "
            f"host port {port}/tcp on 127.0.0.1 is already in use"
        ],
    )
    assert not subprocess.run(["pgrep", "-f", f"passt.*{port}"], capture_output=True).stdout


@needs_netns
def test_tap_tx_rate_limit_holds(guest: Path, ns: NetNs, tmp_path: Path) -> None:
    """1 MB/s in 100 kB buckets: 2000 datagrams of 1400 bytes (1442 on the wire) arrive at that rate."""
    from pyrovm.api.controller import Controller

    ns.add_tap("tap0", f"{HOST_IP}/24")
    with ns.entered():  # the VM's tap lives in the namespace; the VM runs in this process
        c = Controller()
        limit = {"bandwidth": {"size": 100_000, "refill_time": 100}}
        assert (
            c.handle(
                "PUT",
                "/boot-source",
                {"kernel_image_path": str(guest), "boot_args": f"test=net ip={GUEST_IP}/24"},
            )[0]
            == 204
        )
        assert (
            c.handle(
                "PUT",
                "/network-interfaces/n",
                {"iface_id": "n", "host_dev_name": "tap0", "tx_rate_limiter": limit},
            )[0]
            == 204
        )
        assert c.handle("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    try:
        assert c.vm.console.wait_for(re.compile(READY.pattern.encode()), 30), c.vm.console.text
        sock, sink = ns.socket(), ns.socket()
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sink.bind((HOST_IP, 5002))
        sink.settimeout(5)
        sock.sendto(b"send 2000 1400 5002", (GUEST_IP, 10))
        sink.recv(2048)
        t0 = time.monotonic()
        for _ in range(1999):
            sink.recv(2048)
        secs = time.monotonic() - t0
        expected = 1999 * 1442 / 1_000_000  # (the bucket was spent by the first ones)
        assert abs(secs - expected) / expected < 0.10, (secs, expected)
        assert c.vm.metrics()["devices"]["virtio-net:eth0"]["tx_throttled"] > 0
    finally:
        c.close()
