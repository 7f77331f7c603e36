"""A real Linux kernel on pyrovm's virtio-net (slow: a boot takes about a minute on a PVM host).

Guest user space cannot run on a PVM host, so these watch the kernel itself: its IP autoconfiguration
(``ip=``) and its network stack, kept alive by waiting for a root device that never comes
(``root=/dev/vdz rootwait``).  Two VMs boot at once, one per backend:

* user mode (passt): ``ip=dhcp`` gets the address passt hands out (the host's own, as passt does); the
  same VM has a vsock device, and a host ``CONNECT`` to a guest port nobody listens on is refused by the
  guest kernel (RST: the Unix connection is closed);
* a tap in a namespace the test makes, static ``ip=``: the host pings the guest kernel (100 pings, none
  lost) and a TCP SYN to a closed port is answered with an RST (the connection is refused).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyrovm.netback.vsock import VsockError, VsockHost

from conftest import needs_kvm, pyrovm_argv
from netns import NetNs, needs_netns
from test_net_guest import Guest

pytestmark = [pytest.mark.slow, needs_kvm, needs_netns]

BOOT_TIMEOUT = 400
KEEP_ALIVE = "console=ttyS0 reboot=k panic=-1 root=/dev/vdz rootwait"
IP_CONFIG = re.compile(
    r"IP-Config: Complete:\s.*?device=eth0, hwaddr=(\S+), ipaddr=(\S+), mask=(\S+), gw=(\S+)", re.S
)


@pytest.fixture(scope="module")
def kernel() -> Path:
    from pyrovm.kernel.build import build_kernel

    return build_kernel()


def default_route_ipv4() -> str:
    """The IPv4 address of the interface with the default route: what passt hands out by DHCP."""
    dev = subprocess.run(
        ["ip", "-4", "route", "show", "default"], capture_output=True, text=True
    ).stdout.split()
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", dev[dev.index("dev") + 1]], capture_output=True, text=True
    ).stdout
    return out.split("inet ")[1].split("/")[0]


@pytest.fixture(scope="module")
def vsock_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vsock") / "v.sock"


@pytest.fixture(scope="module")
def vms(kernel: Path, vsock_path: Path) -> Iterator[tuple[Guest, Guest, NetNs]]:
    ns = NetNs()
    ns.add_tap("tap0", "10.0.0.1/24")
    user = tap = None
    try:
        user = Guest(
            pyrovm_argv(
                "run", "--kernel", str(kernel), "--console", "stdio", "--timeout", str(BOOT_TIMEOUT),
                "--net", "user", "--cmdline", f"{KEEP_ALIVE} ip=dhcp", "--vsock", f"cid=5,uds={vsock_path}",
            )
        )  # fmt: skip
        tap = Guest(
            ns.argv(
                *pyrovm_argv(
                    "run", "--kernel", str(kernel), "--console", "stdio", "--timeout", str(BOOT_TIMEOUT),
                    "--net", "tap=tap0,mac=02:00:00:00:0a:02",
                    "--cmdline", f"{KEEP_ALIVE} ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
                )
            )
        )  # fmt: skip
        yield user, tap, ns
    finally:
        for vm in (user, tap):
            if vm is not None:
                vm.kill()
        ns.close()


def test_linux_dhcp_from_passt(vms: tuple[Guest, Guest, NetNs]) -> None:
    user, _, _ = vms
    m = user.wait_for(IP_CONFIG, BOOT_TIMEOUT)
    assert m.group(2) == default_route_ipv4(), user.text[-2000:]


def test_linux_vsock_refuses_a_closed_port(vms: tuple[Guest, Guest, NetNs], vsock_path: Path) -> None:
    user, _, _ = vms
    user.wait_for(IP_CONFIG, BOOT_TIMEOUT)  # the kernel is up, its drivers probed
    with pytest.raises(VsockError, match="refused"):  # the guest kernel's RST closes the Unix connection
        VsockHost(vsock_path, 5).connect(1234, timeout=30)


def test_linux_on_a_tap_answers_ping_and_refuses_tcp(vms: tuple[Guest, Guest, NetNs]) -> None:
    _, tap, ns = vms
    m = tap.wait_for(IP_CONFIG, BOOT_TIMEOUT)
    assert (m.group(1), m.group(2)) == ("02:00:00:00:0a:02", "10.0.0.2"), tap.text[-2000:]
    ping = subprocess.run(
        ns.argv("ping", "-c", "100", "-i", "0.02", "-W", "5", "-q", "10.0.0.2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "100 received" in ping.stdout and " 0% packet loss" in ping.stdout, ping.stdout + tap.text[-2000:]
    s = ns.socket(socket.SOCK_STREAM)
    s.settimeout(20)
    with pytest.raises(ConnectionRefusedError):  # the guest kernel's RST
        s.connect(("10.0.0.2", 4242))
    s.close()
