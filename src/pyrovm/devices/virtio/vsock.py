"""virtio-vsock (VIRTIO 1.2 §5.10, device id 19): stream sockets between the guest and the host.

The device owns the three queues (rx 0, tx 1, event 2) and the 44-byte packet header; connections and
the host side live in a :class:`VsockBackend` (:class:`pyrovm.netback.vsock.VsockMuxer`: Firecracker's
hybrid vsock over Unix sockets).  The device checks every packet the guest sends before the backend sees
it: a packet shorter than its header, whose ``len`` exceeds the buffers or 64 KiB, whose source CID is
not the guest's or whose destination is not the host (CID 2) is dropped, counted and logged once; a
packet of an unknown type or op is answered with RST by the backend.

The event queue carries ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` (:meth:`VirtioVsock.transport_reset`),
which tells the guest that every connection is gone (after a snapshot is restored).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

from pyrovm.devices.virtio.device import VirtioDevice, VirtioDeviceState, VirtioMetrics
from pyrovm.devices.virtio.queue import ChainError, DescriptorChain, QueueBrokenError, SplitQueue, split_views
from pyrovm.errors import ConfigError

VIRTIO_ID_VSOCK = 19
VIRTIO_VSOCK_F_STREAM = 0
HOST_CID = 2
#: CIDs a guest may not have (0 hypervisor, 1 local, 2 host, -1 any).
RESERVED_CIDS = (0, 1, 2, 0xFFFFFFFF)
MAX_CID = 0xFFFFFFFE

TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

#: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt (little-endian, packed)
HEADER = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HEADER.size  # 44
#: Largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 * 1024
RX, TX, EVENT = 0, 1, 2
#: Packets delivered to the guest per rx pass before other devices get the I/O thread.
RX_BUDGET = 256


class Packet(NamedTuple):
    """A packet header (``len`` is the payload length)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


class VsockBackend(Protocol):
    """The host side of the device: connections, their data and credit."""

    def attach(
        self, guest_cid: int, wake_rx: Callable[[], None], locked: Callable[[Callable[[], None]], None]
    ) -> None:
        """The guest driver is live: call ``wake_rx()`` whenever a packet for the guest is waiting (not from
        within :meth:`send_pkt` or :meth:`recv_pkt`), and run event-loop callbacks through ``locked(fn)``."""
        ...

    def send_pkt(self, pkt: Packet, payload: list[memoryview]) -> None:
        """A checked packet from the guest (payload views are valid only during the call)."""
        ...

    def recv_pkt(self, bufs: list[memoryview]) -> int | None:
        """Write the next packet for the guest (header + payload) into *bufs*; its length, or None."""
        ...

    def reset(self) -> None:
        """Every connection is gone (driver reset or transport reset): close them."""
        ...

    def close(self) -> None: ...

    def metrics(self) -> dict[str, int]: ...

    def connections(self) -> list[dict[str, int]]: ...


@dataclass
class VsockStats(VirtioMetrics):
    """Device counters: packets each way and packets dropped as malformed."""

    rx_packets: int = 0
    tx_packets: int = 0
    dropped: int = 0


@dataclass
class VirtioVsockState(VirtioDeviceState):
    """The guest's CID (connections are not kept: a restored guest gets a TRANSPORT_RESET)."""

    guest_cid: int = 0


def check_cid(cid: int) -> None:
    if isinstance(cid, bool) or not isinstance(cid, int) or cid in RESERVED_CIDS or not 3 <= cid <= MAX_CID:
        raise ConfigError(f"vsock guest CID {cid!r}: from 3 to {MAX_CID} (0, 1 and 2 are reserved)")


class VirtioVsock(VirtioDevice):
    """A vsock device for guest CID *cid* on *backend*."""

    device_id = VIRTIO_ID_VSOCK

    def __init__(self, cid: int, backend: VsockBackend, *, name: str = "vsock") -> None:
        super().__init__(name, [256, 256, 16])
        check_cid(cid)
        self.cid = cid
        self.backend = backend
        self.stats: VsockStats = VsockStats()

    def device_features(self) -> int:
        return 1 << VIRTIO_VSOCK_F_STREAM

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def metrics(self) -> dict[str, int]:
        return {**asdict(self.stats), **self.backend.metrics()}

    def connections(self) -> list[dict[str, int]]:
        """Counters of each open connection (``--metrics`` lists them under ``connections``)."""
        return self.backend.connections()

    def save_state(self) -> VirtioVsockState:
        return VirtioVsockState(self.acked_features, self.cid)

    # -- life cycle ------------------------------------------------------------------------------------
    def activate(self, memory: object, queues: list[SplitQueue | None]) -> None:  # type: ignore[override]
        super().activate(memory, queues)  # type: ignore[arg-type]
        self.backend.attach(self.cid, self._wake_rx, self.locked)

    def reset(self) -> None:
        self.backend.reset()
        super().reset()

    def close(self) -> None:
        self.backend.close()

    def _wake_rx(self) -> None:
        if self._kick is not None and self.active:
            self._kick(RX)

    def transport_reset(self) -> bool:
        """Tell the guest every connection is gone (event TRANSPORT_RESET); False without an event buffer."""
        self.backend.reset()
        q = self.live_queue(EVENT)
        if q is None:
            return False
        while True:
            try:
                chain = q.pop()
            except ChainError as e:
                self.chain_failed(q, e)
                continue
            except QueueBrokenError as e:  # (called from the event loop, not through the transport)
                self.log_once("event-queue", "%s: event queue broken, no TRANSPORT_RESET: %s", self.name, e)
                return False
            if chain is None:
                return False
            written = chain.write_to_writable(struct.pack("<I", EVENT_TRANSPORT_RESET))
            q.add_used(chain.head, written)
            return written == 4

    # -- queues ----------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        queue = self.live_queue(queue_index)
        if queue is None:
            return
        if queue_index == TX:
            queue.drain(self._serve_tx)
            self._wake_rx()  # replies (RESPONSE, RST, credit) go out at once, with their interrupt
        elif queue_index == RX:
            self._process_rx(queue)
        # EVENT: the driver's buffers wait for transport_reset()

    def _serve_tx(self, queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
        for chain in batch:
            if type(chain) is not DescriptorChain:
                self.chain_failed(queue, chain)  # type: ignore[arg-type]
                continue
            self.stats.requests += 1
            pkt, payload = self._parse(chain)
            if pkt is not None:
                self.stats.tx_packets += 1
                self.backend.send_pkt(pkt, payload)
            queue.add_used(chain.head, 0)
        return True

    def _parse(self, chain: DescriptorChain) -> tuple[Packet | None, list[memoryview]]:
        """The packet in *chain*, checked; (None, []) when it must be dropped."""
        views = chain.readable_views()
        total = sum(v.nbytes for v in views)
        if total < HDR_SIZE:
            return self._drop("short", f"a packet of {total} bytes, shorter than the header"), []
        pkt = Packet._make(HEADER.unpack(bytes(chain.read_prefix(HDR_SIZE))))
        if pkt.len > total - HDR_SIZE or pkt.len > MAX_PAYLOAD:
            return self._drop(
                "len", f"len {pkt.len} but {total - HDR_SIZE} payload bytes (at most 64 KiB)"
            ), []
        if pkt.src_cid != self.cid:
            return self._drop("src", f"source CID {pkt.src_cid} is not the guest's ({self.cid})"), []
        if pkt.dst_cid != HOST_CID:
            return self._drop("dst", f"destination CID {pkt.dst_cid} is not the host (2)"), []
        payload = split_views(split_views(views, HDR_SIZE)[1], pkt.len)[0] if pkt.len else []
        return pkt, payload

    def _drop(self, key: str, why: str) -> Packet | None:
        self.stats.dropped += 1
        self.stats.errors += 1
        self.log_once(f"drop-{key}", "%s: %s: dropped", self.name, why)
        return None

    def _process_rx(self, queue: SplitQueue | None) -> None:
        if queue is None:
            return
        queue.deferred = False
        for _ in range(RX_BUDGET):
            try:
                chain = queue.pop()
            except ChainError as e:
                self.chain_failed(queue, e)
                continue
            if chain is None:
                return
            views = chain.writable_views()
            if sum(v.nbytes for v in views) < HDR_SIZE:
                self.chain_failed(queue, ChainError(chain.head, "rx buffer smaller than a packet header"))
                continue
            n = self.backend.recv_pkt(views)
            if n is None:
                queue.undo_pop()
                return
            self.stats.rx_packets += 1
            queue.add_used(chain.head, n)
        queue.deferred = True
