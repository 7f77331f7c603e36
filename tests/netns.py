"""Network namespaces for tests that need root: each test makes its own, with its own taps, and removes
them.  Traffic stays inside the namespace (or on the host's loopback for passt's port forwards)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def net_tests_possible() -> str | None:
    """None when this host can run the namespace tests, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and taps)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


needs_netns = pytest.mark.skipif(net_tests_possible() is not None, reason=net_tests_possible() or "")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNs:
    """A network namespace ``pyrovm-test-<random>`` with loopback up."""

    def __init__(self) -> None:
        self.name = f"pvt-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def add_tap(self, name: str, address: str, mtu: int = 1500) -> None:
        """A persistent tap in the namespace with *address* (CIDR), up."""
        self.ip("tuntap", "add", name, "mode", "tap")
        self.ip("link", "set", name, "mtu", str(mtu))
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")

    def argv(self, *cmd: str) -> list[str]:
        """*cmd* run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace (sockets and taps opened meanwhile stay there)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        theirs = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(theirs)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(theirs)
            os.close(own)

    def socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        with self.entered():
            return socket.socket(socket.AF_INET, kind)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@contextlib.contextmanager
def netns() -> Iterator[NetNs]:
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()
