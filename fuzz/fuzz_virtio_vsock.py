#!/usr/bin/env python3
"""Fuzz virtio-vsock's request handling through the virtio-mmio transport (see ``_virtio.py``), with
Firecracker's hybrid vsock muxer behind it on real Unix sockets: the guest sends packets of every op
(connect, response, data beyond its credit, shutdown, credit updates, resets, unknown ops and types,
wrong CIDs, short headers, lengths past the buffers) and posts rx and event buffers; the input also plays
the host: clients with good and bad ``CONNECT`` lines, a service listening at ``PATH_1234`` for the
guest's connections, data both ways, half-closes, timeouts, a transport reset.

    python fuzz/fuzz_virtio_vsock.py -max_total_time=600 fuzz/corpus/virtio_vsock
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
from collections.abc import Callable

import _common
import atheris

with _common.instrumented(__name__):
    import _virtio

    from pyrovm.devices.virtio.mock import MockSplitQueue
    from pyrovm.devices.virtio.vsock import EVENT, HDR_SIZE, HEADER, RX, VirtioVsock
    from pyrovm.netback.vsock import FIRST_HOST_PORT, VsockMuxer

CID = 3
SERVICE_PORT = 1234
GUEST_PORTS = [1000, 1001]
HOST_PORTS = [SERVICE_PORT, SERVICE_PORT + 1, FIRST_HOST_PORT, FIRST_HOST_PORT + 1]
#: short: a Unix socket path has at most 107 bytes
_TMP = tempfile.TemporaryDirectory(prefix="pvf-", dir="/tmp")
_DIR = _TMP.name
UDS = os.path.join(_DIR, "v.sock")


class Loop:
    """The event loop's ``watch`` and ``call_later``, run when the input says."""

    def __init__(self) -> None:
        self.watched: dict[int, tuple[Callable[[], None], bool, bool]] = {}
        self.timers = _virtio.Timers()

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None:
        if read or write:
            self.watched[fd] = (callback, read, write)
        else:
            self.watched.pop(fd, None)

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        return self.timers.call_later(delay, fn)

    def pump(self, rounds: int) -> None:
        for _ in range(rounds):
            entries = list(self.watched.items())
            rd = [fd for fd, (_, r, _) in entries if r]
            wr = [fd for fd, (_, _, w) in entries if w]
            try:
                ready_r, ready_w, _ = select.select(rd, wr, [], 0)
            except (OSError, ValueError):  # a closed fd still watched: the muxer's bug, not ours
                raise AssertionError(f"a closed file descriptor is still watched: {self.watched}") from None
            ready = set(ready_r) | set(ready_w)
            if not ready:
                return
            for fd in ready:
                entry = self.watched.get(fd)
                if entry is not None:
                    entry[0]()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    for name in os.listdir(_DIR):
        _unlink(os.path.join(_DIR, name))
    loop = Loop()
    mux = VsockMuxer(UDS, loop)
    service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    service.bind(f"{UDS}_{SERVICE_PORT}")
    service.listen(8)
    service.setblocking(False)
    host_socks: list[socket.socket] = []
    device = VirtioVsock(CID, mux)
    driver = _virtio.FuzzDriver(device, fdp)

    def request(index: int, mq: MockSplitQueue) -> _virtio.Request:
        if index == RX:
            return [], [
                HDR_SIZE + fdp.ConsumeIntInRange(0, 4096) if fdp.ConsumeIntInRange(0, 7) else driver.length()
            ]
        if index == EVENT:
            return [], [fdp.PickValueInList([4, 8, 2])]
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
        odd = fdp.ConsumeIntInRange(0, 7) == 0
        if mux.conns and fdp.ConsumeIntInRange(0, 3):  # mostly to a connection there is
            host_port, guest_port = sorted(mux.conns)[fdp.ConsumeIntInRange(0, len(mux.conns) - 1)]
        else:
            usual = fdp.ConsumeIntInRange(0, 7) != 0
            guest_port = fdp.PickValueInList(GUEST_PORTS) if usual else fdp.ConsumeUInt(4)
            host_port = fdp.PickValueInList(HOST_PORTS) if usual else fdp.ConsumeUInt(4)
        header = HEADER.pack(
            fdp.ConsumeUInt(8) if odd and fdp.ConsumeBool() else CID,
            fdp.ConsumeUInt(8) if odd and fdp.ConsumeBool() else 2,
            guest_port,
            host_port,
            fdp.ConsumeUInt(4) if odd and fdp.ConsumeBool() else len(payload),
            1 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(2),
            fdp.ConsumeIntInRange(1, 7) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(2),
            fdp.ConsumeIntInRange(0, 3),
            fdp.PickValueInList([0, 4096, 1 << 18, 0xFFFFFFFF]) if fdp.ConsumeBool() else fdp.ConsumeUInt(4),
            fdp.ConsumeUInt(4),
        )
        packet = header + payload
        if fdp.ConsumeIntInRange(0, 7) == 0:
            cut = fdp.ConsumeIntInRange(0, len(packet))
            return [packet[:cut], packet[cut:]], []
        return [packet], []

    def host() -> None:
        op = fdp.ConsumeIntInRange(0, 6)
        try:
            if op == 0 and len(host_socks) < 16:  # a host client and its CONNECT line
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                host_socks.append(client)
                client.connect(UDS)
                if fdp.ConsumeIntInRange(0, 3):
                    line = f"CONNECT {fdp.PickValueInList([1000, 1001, 0, 4294967295])}\n".encode()
                else:
                    line = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
                client.send(line + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))
                loop.pump(2)  # the muxer reads the line (and asks the guest)
            elif op == 1:
                loop.pump(fdp.ConsumeIntInRange(1, 8))
            elif op == 2:
                loop.timers.run()
            elif op == 3 and len(host_socks) < 16:  # the service takes the guest's connection
                conn, _ = service.accept()
                conn.setblocking(False)
                host_socks.append(conn)
            elif op == 4 and host_socks:  # a host socket sends, reads, half-closes or closes
                sock = host_socks[fdp.ConsumeIntInRange(0, len(host_socks) - 1)]
                what = fdp.ConsumeIntInRange(0, 3)
                if what == 0:
                    sock.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))
                elif what == 1:
                    sock.recv(1 << 20)
                elif what == 2:
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.close()
            elif op == 5:
                device.transport_reset()
            elif op == 6:
                device.metrics()
                device.connections()
        except (BlockingIOError, OSError):
            pass

    try:
        driver.run(request, host)
        loop.pump(8)
        driver.run_later()
        driver.check()
    finally:
        driver.close()
        device.close()
        service.close()
        for sock in host_socks:
            sock.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
