"""Rootless user-mode networking through passt (Debian package ``passt``), run as a child process.

pyrovm makes a connected Unix socket pair, hands one end to ``passt --fd`` and keeps the other as the
NIC's :class:`~pyrovm.netback.stream.StreamBackend`.  passt answers the guest's ARP, DHCP, NDP and
DHCPv6 (the guest gets the host's address, gateway and DNS servers), carries its TCP, UDP and ICMP
through ordinary host sockets, and binds the port forwards on the host.

passt is started with ``--one-off``: it exits as soon as its end of the socket pair closes, which the
kernel does when pyrovm ends in any way, SIGKILL included, so no passt outlives its VM.  pyrovm also
sends it SIGTERM when the VM closes.  Before the guest starts, pyrovm sends passt an ARP request and waits
for the answer: passt is then past its set-up (ports bound) and running.
"""

from __future__ import annotations

import errno
import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from pyrovm.errors import ConfigError, HostError

from .stream import StreamBackend

PASST = "passt"
READY_TIMEOUT = 10.0
ETH_P_ARP = 0x0806


@dataclass(frozen=True)
class PortForward:
    """``hostfwd=PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`` (QEMU's syntax)."""

    proto: str  # tcp | udp
    host_addr: str
    host_port: int
    guest_port: int

    def passt_args(self) -> list[str]:
        flag = "-t" if self.proto == "tcp" else "-u"
        return [flag, f"{self.host_addr}/{self.host_port}:{self.guest_port}"]

    def __str__(self) -> str:
        return f"{self.proto}:{self.host_addr}:{self.host_port}-:{self.guest_port}"

    def check_free(self) -> None:
        """ConfigError when the host port is taken (passt would fail on it)."""
        family = socket.AF_INET6 if ":" in self.host_addr else socket.AF_INET
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as passt does
            try:
                s.bind((self.host_addr, self.host_port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port forward {self}: host port {self.host_port}/{self.proto} on "
                        f"{self.host_addr} is already in use"
                    ) from None
                raise ConfigError(
                    f"port forward {self}: cannot bind {self.host_addr}: {e.strerror}"
                ) from None


def find_passt() -> str:
    """passt's path; ConfigError naming the Debian package when it is not installed."""
    path = shutil.which(PASST)
    if path is None:
        raise ConfigError(
            "--net user needs passt, which is not installed (Debian/Ubuntu: apt-get install passt)"
        )
    return path


class PasstNetwork:
    """A running passt and the NIC's end of its socket."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        backend: StreamBackend,
        log: IO[bytes],
    ):
        self.proc = proc
        self.backend = backend
        self._log = log

    def stop(self, timeout: float = 2.0) -> None:
        """End passt (its socket closes first, so it would end by itself) and reap it."""
        self.backend.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def output(self) -> str:
        """What passt wrote to its standard error (its error messages)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def _passt_failure(net: PasstNetwork, what: str) -> str:
    lines = [ln for ln in net.output().splitlines() if ln.strip() and "syslog" not in ln]
    detail = f": {lines[-1]}" if lines else ""
    return f"passt {what}{detail}"


def start_passt(
    *, mac: bytes, mtu: int, forwards: tuple[PortForward, ...], name: str = "passt"
) -> PasstNetwork:
    """Start passt for one NIC with MAC *mac*, and wait until it answers.  ConfigError for bad input
    (passt missing, a host port in use), HostError when passt fails for another reason."""
    exe = find_passt()
    for fwd in forwards:
        fwd.check_free()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log = tempfile.TemporaryFile(prefix="pyrovm-passt-")
    args = [exe, "--foreground", "--quiet", "--one-off", "--fd", str(theirs.fileno()), "--mtu", str(mtu)]
    for fwd in forwards:
        args += fwd.passt_args()
    try:
        proc = subprocess.Popen(
            args, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    except OSError as e:
        ours.close()
        theirs.close()
        log.close()
        raise HostError(f"cannot start passt: {e.strerror}") from None
    finally:
        theirs.close()
    net = PasstNetwork(proc, StreamBackend(ours, name), log)
    try:
        _wait_ready(net, mac)
    except BaseException:
        net.stop()
        raise
    return net


def _arp_probe(mac: bytes) -> bytes:
    """An ARP request from *mac* (sender 0.0.0.0, an RFC 5227 probe) for 192.0.0.8 (IANA's dummy)."""
    target = ipaddress.IPv4Address("192.0.0.8").packed
    arp = bytes.fromhex("0001080006040001") + mac + bytes(4) + bytes(6) + target
    return b"\xff" * 6 + mac + ETH_P_ARP.to_bytes(2, "big") + arp


def _wait_ready(net: PasstNetwork, mac: bytes) -> None:
    """Send passt an ARP probe and wait for its answer (frames before it are dropped)."""
    sock = net.backend.sock
    frame = _arp_probe(mac)
    sock.setblocking(True)
    try:
        sock.sendall(len(frame).to_bytes(4, "big") + frame)
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(_passt_failure(net, f"did not answer within {READY_TIMEOUT:.0f} s"))
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise HostError(_passt_failure(net, f"failed ({e.strerror})")) from None
            if not chunk:
                net.proc.wait(READY_TIMEOUT)
                raise _exit_error(net)
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                got, buf = buf[4 : 4 + n], buf[4 + n :]
                if got[12:14] == ETH_P_ARP.to_bytes(2, "big") and got[:6] == mac:
                    if buf:
                        raise HostError("passt sent frames before the guest started")
                    return
    finally:
        sock.setblocking(False)


def _exit_error(net: PasstNetwork) -> Exception:
    out = net.output()
    if "Failed to bind" in out:
        return ConfigError(_passt_failure(net, "could not bind a forwarded port"))
    return HostError(_passt_failure(net, f"exited with status {net.proc.returncode}"))


def parse_forward(text: str) -> PortForward:
    """``tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`` → PortForward; an empty host address is
    127.0.0.1 (loopback only; give 0.0.0.0 to accept connections from other machines)."""
    proto, sep, rest = text.partition(":")
    if not sep or proto not in ("tcp", "udp"):
        raise ConfigError(f"hostfwd={text}: starts with tcp: or udp:")
    host, sep, guest = rest.partition("-")
    if not sep:
        raise ConfigError(f"hostfwd={text}: use tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")
    haddr, hsep, hport = host.rpartition(":")
    gaddr, gsep, gport = guest.rpartition(":")
    if not hsep or not gsep:
        raise ConfigError(f"hostfwd={text}: use tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")
    if gaddr:
        raise ConfigError(f"hostfwd={text}: a guest address is not supported (the guest has one address)")
    haddr = haddr.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(haddr)
    except ValueError:
        raise ConfigError(f"hostfwd={text}: host address {haddr!r} is not an IP address") from None
    ports = []
    for what, p in (("host", hport), ("guest", gport)):
        if not p.isdecimal() or not 1 <= int(p) <= 65535:
            raise ConfigError(f"hostfwd={text}: {what} port {p!r} is not a number from 1 to 65535")
        ports.append(int(p))
    return PortForward(proto, haddr, ports[0], ports[1])


__all__ = ["PasstNetwork", "PortForward", "find_passt", "parse_forward", "start_passt"]
