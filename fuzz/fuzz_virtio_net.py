#!/usr/bin/env python3
"""Fuzz virtio-net's request handling through the virtio-mmio transport (see ``_virtio.py``): tx frames
(header and frame split any way, too short, too long), rx buffers (smaller than a header, spread over
chains with MRG_RXBUF), hostile chains; the backend is a socket pair, as passt's length-prefixed stream
or a tap-like packet socket (one frame a message, with the virtio-net header, offloads offered), and the
input also plays the other end: frames of any length (and garbage lengths) towards the guest, reads
that let the device's queued output drain, a peer that goes away.

    python fuzz/fuzz_virtio_net.py -max_total_time=600 fuzz/corpus/virtio_net
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import _common
import atheris

with _common.instrumented(__name__):
    import _virtio

    from pyrovm.devices.virtio.mock import MockSplitQueue
    from pyrovm.devices.virtio.net import NET_HDR_SIZE, RX, VirtioNet
    from pyrovm.netback.stream import StreamBackend
    from pyrovm.netback.tap import TapBackend

MAC = bytes.fromhex("020000000001")


class PacketBackend(TapBackend):
    """A tap's semantics (one read, one frame, header included) over a SOCK_SEQPACKET socket."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "seqpacket", created=False)

    def set_offload(self, guest_features: int) -> None:  # (no TUNSETOFFLOAD on a socket)
        pass


class Poller:
    """The event loop's ``watch``: the input decides when the watched socket is "ready"."""

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.read = self.write = False

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None:
        self.callback, self.read, self.write = callback, read, write


def _frame(fdp: atheris.FuzzedDataProvider, driver: _virtio.FuzzDriver) -> bytes:
    n = fdp.PickValueInList([0, 13, 14, 60, 1514]) if fdp.ConsumeBool() else driver.length()
    return MAC + bytes(6) + b"\x08\x00" + fdp.ConsumeBytes(max(n - 14, 0))


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    stream = fdp.ConsumeBool()
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer.setblocking(False)
    backend = StreamBackend(ours) if stream else PacketBackend(ours.detach())
    poller = Poller()
    timers = _virtio.Timers()
    device = VirtioNet(
        backend,
        mac=MAC,
        mtu=fdp.PickValueInList([68, 1500, 9000, 65535]),
        poller=poller,
        rx_rate_limiter=_virtio.rate_limiter(fdp),
        tx_rate_limiter=_virtio.rate_limiter(fdp),
        scheduler=timers,
    )
    driver = _virtio.FuzzDriver(device, fdp)

    def request(index: int, mq: MockSplitQueue) -> _virtio.Request:
        if index == RX:
            return [], [
                fdp.PickValueInList([NET_HDR_SIZE - 1, NET_HDR_SIZE, 1526, 65562]) if fdp.ConsumeBool()
                else driver.length()
                for _ in range(fdp.ConsumeIntInRange(1, 3))
            ]  # fmt: skip
        packet = bytes(NET_HDR_SIZE) + _frame(fdp, driver)
        cuts = sorted(fdp.ConsumeIntInRange(0, len(packet)) for _ in range(fdp.ConsumeIntInRange(0, 3)))
        return [packet[a:b] for a, b in zip([0, *cuts], [*cuts, len(packet)], strict=True) if b > a], []

    def host() -> None:
        op = fdp.ConsumeIntInRange(0, 5)
        try:
            if op == 0:  # a frame for the guest
                frame = _frame(fdp, driver)
                peer.send((len(frame).to_bytes(4, "big") + frame) if stream else bytes(NET_HDR_SIZE) + frame)
            elif op == 1:  # raw bytes: a garbage length, half a frame
                peer.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))
            elif op == 2:  # read what the device sent
                peer.recv(1 << 20)
            elif op == 3:  # the backend's readiness callback
                if poller.callback is not None:
                    poller.callback()
            elif op == 4:
                timers.run()
            elif fdp.ConsumeIntInRange(0, 7) == 0:  # passt goes away
                peer.close()
        except (BlockingIOError, OSError):
            pass

    try:
        driver.run(request, host)
        timers.run()
        driver.run_later()
        driver.check()
    finally:
        driver.close()
        device.close()
        peer.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
