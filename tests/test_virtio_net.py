"""virtio-net through mock queues, on real sockets: frames both ways, MRG_RXBUF, backpressure, the
length-prefixed stream of passt, and what a hostile driver may do (no KVM needed)."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.net import (
    MAX_PACKET,
    NET_HDR_SIZE,
    OFFLOAD_FEATURES,
    RX,
    TX,
    VIRTIO_NET_F_MRG_RXBUF,
    VirtioNet,
)
from pyrovm.devices.virtio.queue import VIRTQ_USED_F_NO_NOTIFY
from pyrovm.memory import GuestMemory
from pyrovm.netback.stream import StreamBackend
from pyrovm.netback.tap import TapBackend

MAC = bytes.fromhex("020000000001")


class Poller:
    """Records what the device watches (the event loop's ``watch``)."""

    def __init__(self) -> None:
        self.read = self.write = False
        self.callback: Callable[[], None] | None = None

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None:
        self.read, self.write, self.callback = read, write, callback


class PacketBackend(TapBackend):
    """A tap's semantics (one read, one frame, header included) over a SOCK_SEQPACKET socket."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "seqpacket", created=False)
        self.offload_calls: list[int] = []

    def set_offload(self, guest_features: int) -> None:
        self.offload_calls.append(guest_features)


class Rig:
    def __init__(self, dev: VirtioNet, poller: Poller, features: int = 0, size: int = 16) -> None:
        self.dev = dev
        self.poller = poller
        self.mem = GuestMemory.anonymous(4 << 20)
        self.rxq = MockSplitQueue(self.mem, size=size, base=0x1000, data_base=0x10000, data_size=0xF0000)
        self.txq = MockSplitQueue(self.mem, size=size, base=0x100000, data_base=0x110000, data_size=0x2F0000)
        dev.acked_features = features
        dev.activate(self.mem, [self.rxq.queue(), self.txq.queue()])
        self.kicks: list[int] = []
        dev.bind(lambda i: (self.kicks.append(i), dev.process(i))[1])

    def received(self, chain_bufs: list[tuple[int, int]], length: int) -> bytes:
        out = b""
        for gpa, n in chain_bufs:
            out += self.mem.read(gpa, n)
        return out[:length]


def frame(n: int, fill: int = 0xAB) -> bytes:
    return MAC + bytes.fromhex("02aabbccddee") + b"\x08\x00" + bytes([fill]) * (n - 14)


@pytest.fixture
def packet_rig() -> Iterator[tuple[Rig, socket.socket]]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    poller = Poller()
    dev = VirtioNet(PacketBackend(ours.detach()), mac=MAC, poller=poller)
    yield Rig(dev, poller, features=1 << VIRTIO_NET_F_MRG_RXBUF), peer
    dev.close()
    peer.close()


@pytest.fixture
def stream_rig() -> Iterator[tuple[Rig, socket.socket]]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    poller = Poller()
    dev = VirtioNet(StreamBackend(ours), mac=MAC, poller=poller)
    yield Rig(dev, poller, features=1 << VIRTIO_NET_F_MRG_RXBUF, size=64), peer
    dev.close()
    peer.close()


def test_config_space_and_features() -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev = VirtioNet(PacketBackend(ours.detach()), mac=MAC, mtu=9000, poller=Poller())
    assert dev.read_config(0, 12) == MAC + struct.pack("<HHH", 1, 1, 9000)  # link up, 1 pair, MTU
    assert dev.features & OFFLOAD_FEATURES == OFFLOAD_FEATURES  # a tap takes the header: offloads offered
    dev.close()
    peer.close()
    a, b = socket.socketpair()
    stream = VirtioNet(StreamBackend(a), mac=MAC, poller=Poller())
    assert stream.features & OFFLOAD_FEATURES == 0  # passt's stream carries no header: none
    stream.close()
    b.close()


def test_tap_like_rx_and_tx(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = packet_rig
    dev = rig.dev
    assert dev.backend.offload_calls == [1 << VIRTIO_NET_F_MRG_RXBUF]  # type: ignore[attr-defined]
    # host -> guest: header (from the "tap") + frame, num_buffers set by the device
    f = frame(100)
    peer.send(bytes(NET_HDR_SIZE) + f)
    chain = rig.rxq.add_chain([], [2048])
    dev.process(RX)
    [(head, n)] = rig.rxq.take_used()
    assert (head, n) == (chain.head, NET_HDR_SIZE + 100)
    data = rig.received(chain.writable, n)
    assert data[10:12] == b"\x01\x00" and data[NET_HDR_SIZE:] == f
    # guest -> host: header and frame in two buffers, out in one write
    hdr = bytes(NET_HDR_SIZE)
    tx = rig.txq.add_chain([hdr, frame(60, 0x11)])
    dev.process(TX)
    assert rig.txq.take_used() == [(tx.head, 0)]
    assert peer.recv(4096) == hdr + frame(60, 0x11)
    m = dev.metrics()
    assert (m["rx_frames"], m["rx_bytes"], m["tx_frames"], m["tx_bytes"]) == (1, 100, 1, 60)


def test_no_rx_buffers_stops_watching_until_the_guest_posts(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = packet_rig
    peer.send(bytes(NET_HDR_SIZE) + frame(80))
    rig.dev.process(RX)
    assert not rig.poller.read  # nothing to put the frame in: it waits in the backend
    assert rig.rxq.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0  # and the guest's next rx kick is wanted
    chain = rig.rxq.add_chain([], [1600])
    rig.rxq.add_chain([], [1600])
    rig.dev.process(RX)  # the guest's kick
    assert rig.rxq.take_used() == [(chain.head, NET_HDR_SIZE + 80)]
    assert rig.poller.read  # a buffer left: waiting for the backend again


def test_mergeable_frame_spread_over_chains(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = packet_rig
    big = frame(4000, 0x5A)
    peer.send(bytes(NET_HDR_SIZE) + big)
    chains = [rig.rxq.add_chain([], [1536]) for _ in range(4)]
    rig.dev.process(RX)
    used = rig.rxq.take_used()
    assert used == [(chains[0].head, 1536), (chains[1].head, 1536), (chains[2].head, 4012 - 3072)]
    data = b"".join(rig.received(c.writable, n) for c, (_, n) in zip(chains, used, strict=False))
    assert data[10:12] == b"\x03\x00"  # num_buffers
    assert data[NET_HDR_SIZE:] == big


def test_frame_too_big_without_mrg_rxbuf_is_dropped_and_buffers_reused() -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev = VirtioNet(PacketBackend(ours.detach()), mac=MAC, poller=Poller())
    rig = Rig(dev, dev.poller)  # type: ignore[arg-type]
    peer.send(bytes(NET_HDR_SIZE) + frame(3000))
    peer.send(bytes(NET_HDR_SIZE) + frame(500))
    chain = rig.rxq.add_chain([], [1536])
    dev.process(RX)
    assert rig.rxq.take_used() == [(chain.head, NET_HDR_SIZE + 500)]  # the small one, in the same chain
    assert dev.metrics()["rx_dropped"] == 1
    dev.close()
    peer.close()


def test_tx_backpressure_waits_for_writable() -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    poller = Poller()
    dev = VirtioNet(PacketBackend(ours.detach()), mac=MAC, poller=poller)
    rig = Rig(dev, poller, size=64)
    for i in range(60):
        rig.txq.add_chain([bytes(NET_HDR_SIZE) + frame(1400, i)])
    dev.process(TX)
    sent = len(rig.txq.take_used())
    assert 0 < sent < 60 and poller.write  # the socket filled: the device waits for writability
    assert dev.process(TX) is None and rig.txq.take_used() == []  # no spinning while blocked
    got = [peer.recv(4096) for _ in range(sent)]
    assert [g[NET_HDR_SIZE + 14] for g in got] == list(range(sent))
    assert poller.callback is not None
    while len(got) < 60:
        poller.callback()  # writable again
        got += [peer.recv(4096) for _ in rig.txq.take_used()]
    assert [g[NET_HDR_SIZE + 14] for g in got] == list(range(60))  # in order, none lost
    assert dev.metrics()["tx_frames"] == 60 and dev.metrics()["tx_dropped"] == 0
    dev.close()
    peer.close()


def test_stream_many_small_frames_and_partial_ones(stream_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = stream_rig
    frames = [frame(60 + i) for i in range(10)]
    wire = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    peer.sendall(wire[:-30])  # the last frame arrives in two parts
    chains = [rig.rxq.add_chain([], [256]) for _ in range(12)]
    rig.dev.process(RX)
    used = rig.rxq.take_used()
    assert len(used) == 9 and rig.poller.read
    peer.sendall(wire[-30:])
    assert rig.poller.callback is not None
    rig.poller.callback()  # readable
    used += rig.rxq.take_used()
    assert [n for _, n in used] == [NET_HDR_SIZE + len(f) for f in frames]
    for c, f in zip(chains, frames, strict=False):
        data = rig.received(c.writable, NET_HDR_SIZE + len(f))
        assert data[:NET_HDR_SIZE] == b"\0" * 10 + b"\x01\x00" and data[NET_HDR_SIZE:] == f
    # guest -> stream: the header is not on the wire, the length is
    rig.txq.add_chain([bytes(NET_HDR_SIZE), frame(70, 7)])
    rig.dev.process(TX)
    assert peer.recv(4096) == (70).to_bytes(4, "big") + frame(70, 7)


def test_stream_partial_send_is_finished_later(stream_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = stream_rig
    rig.dev.backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[attr-defined]
    for i in range(40):
        rig.txq.add_chain([bytes(NET_HDR_SIZE) + frame(1500, i)])
    rig.dev.process(TX)
    assert rig.poller.write
    wire = b""
    peer.setblocking(False)
    while len(wire) < 40 * 1504:
        try:
            wire += peer.recv(65536)
        except BlockingIOError:
            assert rig.poller.callback is not None
            rig.poller.callback()
    assert wire == b"".join((1500).to_bytes(4, "big") + frame(1500, i) for i in range(40))


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x00", (70000).to_bytes(4, "big")])
def test_stream_garbage_length_downs_the_link(stream_rig: tuple[Rig, socket.socket], bad: bytes) -> None:
    rig, peer = stream_rig
    peer.sendall(bad + bytes(100))
    rig.rxq.add_chain([], [2048])
    rig.dev.process(RX)
    assert not rig.dev.link_up and not rig.poller.read and rig.dev.metrics()["backend_errors"] == 1
    assert rig.dev.read_config(6, 2) == b"\0\0"  # the guest sees the link down
    rig.txq.add_chain([bytes(NET_HDR_SIZE) + frame(60)])
    rig.dev.process(TX)  # tx is dropped and completed, not stuck
    assert len(rig.txq.take_used()) == 1 and rig.dev.metrics()["tx_dropped"] == 1


def test_backend_eof_downs_the_link(stream_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = stream_rig
    peer.close()
    rig.rxq.add_chain([], [2048])
    rig.dev.process(RX)
    assert not rig.dev.link_up and rig.dev.metrics()["backend_errors"] == 1


# -- a hostile driver ----------------------------------------------------------------------------------
def test_hostile_rx_chains(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = packet_rig
    dev = rig.dev
    for _ in range(3):
        peer.send(bytes(NET_HDR_SIZE) + frame(64))
    small = rig.rxq.add_chain([], [8])  # smaller than the header
    (outside,) = rig.rxq._take_descs(1)
    rig.rxq.write_desc(outside, 0x7FFF_0000, 2048, 2)  # outside guest RAM
    rig.rxq.publish(outside)
    readonly = rig.rxq.add_chain([b"x" * 64])  # no writable buffer at all
    good = rig.rxq.add_chain([], [2048])
    dev.process(RX)
    used = dict(rig.rxq.take_used())
    assert used[small.head] == 0 and used[outside] == 0 and used[readonly.head] == 0
    assert used[good.head] == NET_HDR_SIZE + 64
    m = dev.metrics()
    assert m["rx_dropped"] == 3 and m["errors"] == 3 and m["rx_frames"] == 1


def test_hostile_tx_chains(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, peer = packet_rig
    dev = rig.dev
    too_long = rig.txq.add_chain([bytes(NET_HDR_SIZE), bytes(MAX_PACKET)])  # over 64 KiB of frame
    short = rig.txq.add_chain([bytes(6)])  # not even a header
    (outside,) = rig.txq._take_descs(1)
    rig.txq.write_desc(outside, 0x7FFF_0000, 100, 0)
    rig.txq.publish(outside)
    ok = rig.txq.add_chain([bytes(NET_HDR_SIZE) + frame(60)])
    dev.process(TX)
    assert {h for h, _ in rig.txq.take_used()} == {too_long.head, short.head, outside, ok.head}
    assert peer.recv(70000) == bytes(NET_HDR_SIZE) + frame(60)  # only the good one went out
    m = dev.metrics()
    assert m["tx_dropped"] == 3 and m["tx_frames"] == 1


def test_tap_refusing_a_frame_drops_it_only() -> None:
    class Refusing(PacketBackend):
        def send_frame(self, bufs: list[memoryview]) -> bool:
            if bytes(bufs[0][:1]) == b"\xff":
                try:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                except OSError as e:
                    from pyrovm.devices.virtio.net import FrameRejectedError

                    raise FrameRejectedError(str(e)) from e
            return super().send_frame(bufs)

    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    dev = VirtioNet(Refusing(ours.detach()), mac=MAC, poller=Poller())
    rig = Rig(dev, dev.poller)  # type: ignore[arg-type]
    rig.txq.add_chain([b"\xff" + bytes(NET_HDR_SIZE - 1) + frame(60)])
    rig.txq.add_chain([bytes(NET_HDR_SIZE) + frame(60)])
    dev.process(TX)
    assert len(rig.txq.take_used()) == 2
    assert peer.recv(4096) == bytes(NET_HDR_SIZE) + frame(60)
    assert dev.metrics()["tx_dropped"] == 1 and dev.metrics()["tx_frames"] == 1
    dev.close()
    peer.close()


def test_reset_stops_watching(packet_rig: tuple[Rig, socket.socket]) -> None:
    rig, _ = packet_rig
    assert rig.poller.read
    rig.dev.reset()
    assert not rig.poller.read and not rig.poller.write
    assert rig.dev.save_state().mac == MAC


def test_rx_rate_limit_leaves_frames_in_the_backend() -> None:
    from pyrovm.devices.ratelimit import BucketSpec, RateLimitSpec

    class Timers:
        def __init__(self) -> None:
            self.armed: list[float] = []

        def call_later(self, delay: float, fn: Callable[[], None]) -> object:
            self.armed.append(delay)
            return None

    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    poller, timers = Poller(), Timers()
    one_a_minute = RateLimitSpec(ops=BucketSpec(1, 60_000))
    dev = VirtioNet(
        PacketBackend(ours.detach()), mac=MAC, poller=poller, rx_rate_limiter=one_a_minute, scheduler=timers
    )
    rig = Rig(dev, poller)
    for _ in range(3):
        peer.send(bytes(NET_HDR_SIZE) + frame(60))
    for _ in range(3):
        rig.rxq.add_chain([], [2048])
    dev.process(RX)
    assert len(rig.rxq.take_used()) == 1  # one frame, then the bucket is empty
    assert not poller.read and len(timers.armed) == 1 and 50 < timers.armed[0] <= 60  # waits, no spinning
    assert dev.metrics()["rx_throttled"] == 1
    dev.close()
    peer.close()
