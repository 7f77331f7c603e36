"""virtio-net (VIRTIO 1.2 §5.1): one rx and one tx queue between the guest and a frame backend.

The device moves Ethernet frames between guest buffers and a :class:`FrameBackend` (a tap device, or
passt's length-prefixed stream: :mod:`pyrovm.netback`) on the I/O thread, with no per-byte Python work:
the backend reads a frame straight into the guest's rx buffers (``os.readv`` on a tap; one block copy out
of a large receive buffer on a stream) and writes a frame straight from the guest's tx buffers
(``os.writev`` / ``sendmsg``).

Every frame in guest memory starts with the 12-byte ``virtio_net_hdr`` (flags, gso_type, hdr_len,
gso_size, csum_start, csum_offset, num_buffers).  Features offered: ``MAC``, ``MTU``, ``STATUS`` (link
up), ``MRG_RXBUF`` (a large frame spread over several rx chains), and, when the backend takes the header
itself (a tap with ``IFF_VNET_HDR``), the checksum and segmentation offloads; what the guest accepts of
``GUEST_*`` is handed to the backend (``TUNSETOFFLOAD``).  ``EVENT_IDX`` and indirect descriptors come
from the queue layer.

Backpressure, both ways, without unbounded buffering:

* rx: a frame is read from the backend only into a chain the guest posted.  With no rx buffer the device
  stops watching the backend (frames wait in the tap's queue or passt's socket) and waits for the
  guest's rx notification.  A frame larger than the buffers can take is dropped and counted.
* tx: a backend that cannot take a frame now gives it back to the avail ring and the device waits for the
  backend to become writable (no spinning).

Malformed guest requests (chains outside RAM, rx buffers smaller than the header, tx frames over 64 KiB,
garbage headers) drop the one frame, are counted and logged once; the device goes on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from pyrovm.devices.ratelimit import RateLimitSpec, Scheduler, Throttle
from pyrovm.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice, VirtioDeviceState, VirtioMetrics
from pyrovm.devices.virtio.queue import ChainError, DescriptorChain, SplitQueue, scatter
from pyrovm.errors import ConfigError, DeviceError, GuestError
from pyrovm.memory import GuestMemory

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1

#: The offload features, offered only on a backend that takes the virtio-net header (a tap).
OFFLOAD_FEATURES = sum(
    1 << b
    for b in (
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
    )
)
BASE_FEATURES = sum(
    1 << b for b in (VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS)
)

#: ``struct virtio_net_hdr`` with ``num_buffers`` (VERSION_1 always has it).
NET_HDR_SIZE = 12
NUM_BUFFERS_OFFSET = 10
#: Largest frame (Ethernet header included) a guest may send or receive: a 64 KiB GSO frame.
MAX_FRAME = 65550
MAX_PACKET = NET_HDR_SIZE + MAX_FRAME
#: Ethernet header + the smallest MTU a NIC may have (RFC 791's 68).
MIN_MTU, MAX_MTU = 68, 65535
ETH_HLEN = 14
#: Frames delivered to the guest per rx pass before other devices get the I/O thread.
RX_BUDGET = 256
#: Most buffers given to one readv/writev/sendmsg (Linux's IOV_MAX is 1024; one is the spill buffer).
IOV_LIMIT = 1023

RX, TX = 0, 1
_SENT, _FULL, _DROPPED = 1, 0, -1
QUEUE_SIZE = 256

_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
_U16 = struct.Struct("<H")


class BackendClosedError(DeviceError):
    """The backend went away (passt exited, the tap was deleted): the NIC's link is down."""


class FrameRejectedError(GuestError, ValueError):
    """The backend refused one frame (e.g. a tap rejecting a header with impossible GSO fields)."""


class FrameBackend(Protocol):
    """Where a NIC's frames go.  Every call is non-blocking.

    Frames cross this interface with the 12-byte virtio-net header in front: a backend that has no use
    for it (a stream to passt) writes zeroes on receive and skips it on send.
    """

    #: True when the backend takes and gives the header's checksum/GSO fields (offloads can be offered).
    vnet_hdr: bool

    def fileno(self) -> int: ...

    def recv_frame(self, bufs: list[memoryview]) -> int | None:
        """Read one packet (header + frame) into *bufs* in order; its full length (which may be more
        than *bufs* hold: the rest is lost), or None when none is waiting.  BackendClosedError at EOF."""
        ...

    def send_frame(self, bufs: list[memoryview]) -> bool:
        """Send one packet (header + frame); False, with nothing sent, when the backend is full.
        FrameRejectedError when it refused this frame, BackendClosedError when it went away."""
        ...

    @property
    def wants_write(self) -> bool:
        """True while the backend holds output it could not send yet (watch for writability)."""
        ...

    def flush(self) -> bool:
        """Try to send held output; True when none is left."""
        ...

    def end_batch(self) -> None:
        """The device sent a batch of frames (a backend that queues them sends them now)."""
        ...

    def set_offload(self, guest_features: int) -> None:
        """The guest negotiated *guest_features* (virtio-net feature bits): enable matching offloads."""
        ...

    def close(self) -> None: ...


class Poller(Protocol):
    """What the device needs of the event loop: follow a file descriptor's readiness (never blocks)."""

    def watch(self, fd: int, callback: Callable[[], None], *, read: bool, write: bool) -> None: ...


@dataclass
class NetStats(VirtioMetrics):
    """Counters of one NIC (besides the generic ones): frames and bytes each way (bytes of the Ethernet
    frames, headers excluded), frames dropped each way, backend failures."""

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    backend_errors: int = 0


@dataclass
class VirtioNetState(VirtioDeviceState):
    """The NIC's own state: its MAC (frames in flight are not kept; TCP retransmits what was lost)."""

    mac: bytes = b""


def parse_mac(text: str) -> bytes:
    """``"02:12:34:56:78:9a"`` → 6 bytes; ConfigError for anything else, a multicast address included."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(f"MAC address {text!r}: six two-digit hex bytes separated by ':'")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"MAC address {text!r}: six two-digit hex bytes separated by ':'") from None
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text!r} is a multicast address (the first byte must be even)")
    if mac == bytes(6):
        raise ConfigError(f"MAC address {text!r} is all zeroes")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _total(views: list[memoryview]) -> int:
    n = 0
    for v in views:
        n += v.nbytes
    return n


class VirtioNet(VirtioDevice):
    """A NIC on *backend*: MAC *mac*, MTU *mtu* (announced to the guest)."""

    device_id = VIRTIO_ID_NET

    def __init__(
        self,
        backend: FrameBackend,
        *,
        mac: bytes,
        mtu: int = 1500,
        poller: Poller,
        name: str = "virtio-net",
        rx_rate_limiter: RateLimitSpec | None = None,
        tx_rate_limiter: RateLimitSpec | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE])
        if len(mac) != 6:
            raise ConfigError(f"{name}: a MAC address has 6 bytes, not {len(mac)}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ConfigError(f"{name}: MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self.backend = backend
        #: rate limits of frames to the guest and from it (Firecracker's rx/tx_rate_limiter)
        self.rx_throttle = Throttle(rx_rate_limiter, scheduler)
        self.tx_throttle = Throttle(tx_rate_limiter, scheduler)
        self.mac = bytes(mac)
        self.mtu = mtu
        self.poller = poller
        self.stats: NetStats = NetStats()
        self.link_up = True
        self._fd = backend.fileno()
        self._spill = memoryview(bytearray(MAX_PACKET))
        self._watch_read = self._watch_write = False
        self._tx_blocked = False
        self._mrg = False
        #: the backend's readiness callback, run under the transport's lock like the queue work
        self._ready_callback = lambda: self.locked(self._backend_ready)

    # -- description ---------------------------------------------------------------------------------
    def device_features(self) -> int:
        return BASE_FEATURES | (OFFLOAD_FEATURES if self.backend.vnet_hdr else 0)

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return _CONFIG.pack(self.mac, status, 1, self.mtu)

    def metrics(self) -> dict[str, int]:
        return {
            **asdict(self.stats),
            "rx_throttled": self.rx_throttle.throttled,
            "tx_throttled": self.tx_throttle.throttled,
        }

    # -- life cycle ------------------------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: list[SplitQueue | None]) -> None:
        super().activate(memory, queues)
        if self._kick is not None:
            kick = self._kick
            self.rx_throttle.resume = lambda: kick(RX)
            self.tx_throttle.resume = lambda: kick(TX)
        self._mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self._tx_blocked = False
        if self.backend.vnet_hdr:
            try:
                self.backend.set_offload(self.acked_features)
            except OSError as e:
                self.stats.backend_errors += 1
                self.log_once("offload", "%s: setting the backend's offloads failed: %s", self.name, e)
        self._watch(read=self.link_up, write=self.backend.wants_write)

    def reset(self) -> None:
        self._watch(read=False, write=False)
        self._tx_blocked = False
        super().reset()

    def close(self) -> None:
        """Stop watching the backend and close it (the VM is gone)."""
        self._watch(read=False, write=False)
        self.backend.close()

    def save_state(self) -> VirtioNetState:
        return VirtioNetState(self.acked_features, self.mac)

    def _watch(self, *, read: bool, write: bool) -> None:
        if (read, write) != (self._watch_read, self._watch_write):
            self._watch_read, self._watch_write = read, write
            self.poller.watch(self._fd, self._ready_callback, read=read, write=write)

    def _backend_ready(self) -> None:
        """The backend is readable or writable (I/O thread): move what can move now."""
        if not self.active:
            self._watch(read=False, write=False)
            return
        if self._watch_write:
            try:
                done = self.backend.flush()
            except BackendClosedError as e:
                self._link_down(e)
                return
            if done:
                self._tx_blocked = False
                self._watch(read=self._watch_read, write=False)
                if self._kick is not None:
                    self._kick(TX)
        if self._watch_read and self._kick is not None:
            self._kick(RX)

    def _link_down(self, error: BaseException) -> None:
        self.stats.backend_errors += 1
        self.link_up = False
        self.log_once("backend-closed", "%s: the backend went away (%s): link down", self.name, error)
        self._watch(read=False, write=False)

    # -- queues ------------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        queue = self.live_queue(queue_index)
        if queue is None:
            return
        if queue_index == RX:
            self._process_rx(queue)
        elif not self._tx_blocked:  # (when blocked, the backend's writability brings the device back)
            queue.drain(self._serve_tx)

    # -- guest -> backend ----------------------------------------------------------------------------
    def _serve_tx(self, queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
        stats = self.stats
        send = self.backend.send_frame
        add_used = queue.add_used
        allow = self.tx_throttle.allow
        frames = nbytes = 0
        try:
            for i, chain in enumerate(batch):
                if type(chain) is not DescriptorChain:
                    self.chain_failed(queue, chain)  # type: ignore[arg-type]
                    stats.tx_dropped += 1
                    continue
                readable = chain.readable
                if len(readable) == 1:  # the usual case: header and frame in one buffer
                    length = readable[0][1]
                    views = [chain.view(readable[0][0], length)]
                else:
                    views = chain.readable_views()
                    length = _total(views)
                if length < NET_HDR_SIZE + ETH_HLEN or length > MAX_PACKET or not self.link_up:
                    self._drop_tx(length)
                elif not allow(length - NET_HDR_SIZE):  # over the tx rate: this and the rest wait
                    queue.undo_pop(len(batch) - i)
                    return False
                else:
                    sent = self._send(send, views)
                    if sent == _FULL:  # this chain and the rest wait for the backend to drain
                        queue.undo_pop(len(batch) - i)
                        self._tx_blocked = True
                        self._watch(read=self._watch_read, write=True)
                        return False
                    if sent == _SENT:
                        frames += 1
                        nbytes += length
                add_used(chain.head, 0)
            return True
        finally:
            self.backend.end_batch()
            if self.backend.wants_write and not self._watch_write:  # the rest when the socket drains
                self._tx_blocked = True
                self._watch(read=self._watch_read, write=True)
            stats.requests += frames
            stats.tx_frames += frames
            stats.tx_bytes += nbytes - frames * NET_HDR_SIZE

    def _send(self, send: Callable[[list[memoryview]], bool], views: list[memoryview]) -> int:
        """One frame to the backend: _SENT, _FULL, or _DROPPED (refused, or the backend is gone: counted)."""
        if len(views) > IOV_LIMIT:
            views = [memoryview(b"".join(views))]
        try:
            return _SENT if send(views) else _FULL
        except BackendClosedError as e:
            self._link_down(e)
        except FrameRejectedError as e:
            self.stats.errors += 1
            self.log_once("tx-rejected", "%s: the backend refused a tx frame: %s", self.name, e)
        self.stats.tx_dropped += 1
        return _DROPPED

    def _drop_tx(self, length: int) -> None:
        self.stats.tx_dropped += 1
        if not self.link_up:
            return
        self.stats.errors += 1
        if length > MAX_PACKET:
            self.log_once(
                "tx-long", "%s: tx frame of %d bytes (over %d): dropped", self.name, length, MAX_PACKET
            )
        else:
            self.log_once(
                "tx-short", "%s: tx frame of %d bytes (no room for a header): dropped", self.name, length
            )

    # -- backend -> guest ----------------------------------------------------------------------------
    def _process_rx(self, queue: SplitQueue) -> None:
        """Deliver waiting frames into posted rx chains, at most :data:`RX_BUDGET` in one pass."""
        if not self.link_up:
            return
        queue.deferred = False
        queue.disable_notification()
        for _ in range(RX_BUDGET):
            try:
                chain = queue.pop()
            except ChainError as e:
                self.chain_failed(queue, e)
                self.stats.rx_dropped += 1
                continue
            if chain is None:
                if queue.enable_notification():  # the guest posted more meanwhile
                    continue
                self._watch(read=False, write=self._watch_write)  # frames wait in the backend
                return
            if not self.rx_throttle.allow(1):  # over the rx rate: frames wait in the backend for the timer
                queue.undo_pop()
                self._watch(read=False, write=self._watch_write)
                return
            if not self._receive(queue, chain):
                queue.undo_pop()
                self._watch(read=self.link_up, write=self._watch_write)
                return
        queue.deferred = True  # more may be waiting: the transport comes back after other devices

    def _receive(self, queue: SplitQueue, chain: DescriptorChain) -> bool:
        """Read one frame into *chain* (and more chains with MRG_RXBUF); False when none was waiting."""
        views = chain.writable_views()
        cap = _total(views)
        if cap < NET_HDR_SIZE:
            self.stats.requests += 1
            self.stats.errors += 1
            self.stats.rx_dropped += 1
            self.log_once("rx-small", "%s: rx buffer of %d bytes, smaller than the header", self.name, cap)
            queue.add_used(chain.head, 0)
            return True
        if len(views) > IOV_LIMIT:
            views = views[:IOV_LIMIT]
            cap = _total(views)
        views.append(self._spill)
        try:
            n = self.backend.recv_frame(views)
        except BackendClosedError as e:
            self._link_down(e)
            return False
        if n is None:
            return False
        self.stats.requests += 1
        if n <= cap:
            first = views[0]
            if first.nbytes >= NET_HDR_SIZE:
                first[NUM_BUFFERS_OFFSET:NET_HDR_SIZE] = b"\x01\x00"
            else:
                scatter(views, b"\x01\x00", NUM_BUFFERS_OFFSET)
            queue.add_used(chain.head, n)
        elif not self._spread(queue, chain, views, n, cap):
            return True
        self.stats.rx_frames += 1
        self.stats.rx_bytes += n - NET_HDR_SIZE
        self.rx_throttle.charge(n - NET_HDR_SIZE - 1)
        return True

    def _spread(
        self, queue: SplitQueue, chain: DescriptorChain, views: list[memoryview], n: int, cap: int
    ) -> bool:
        """A frame larger than its first chain: with MRG_RXBUF the rest goes into further chains; if they
        are too few (or without MRG_RXBUF) the frame is dropped and the chains are given back."""
        if n > MAX_PACKET:
            n = MAX_PACKET  # (the backend truncated it to the spill buffer)
        rest = self._spill[: n - cap]
        used = [(chain.head, cap)]
        broken = False
        while self._mrg and rest.nbytes:
            try:
                more = queue.pop()
            except ChainError as e:  # consumed and completed: the chains before it cannot be given back
                self.chain_failed(queue, e)
                broken = True
                break
            if more is None:
                break
            k = scatter(more.writable_views(), rest)
            used.append((more.head, k))
            rest = rest[k:]
        if rest.nbytes or broken:
            if broken:
                for head, _ in used:
                    queue.add_used(head, 0)
            else:
                queue.undo_pop(len(used))
            self.stats.rx_dropped += 1
            self.log_once("rx-big", "%s: %d-byte frame does not fit the rx buffers: dropped", self.name, n)
            return False
        scatter(views, _U16.pack(len(used)), NUM_BUFFERS_OFFSET)
        for head, k in used:
            queue.add_used(head, k)
        return True


__all__ = [
    "MAX_FRAME",
    "NET_HDR_SIZE",
    "BackendClosedError",
    "FrameBackend",
    "FrameRejectedError",
    "NetStats",
    "VirtioNet",
    "VirtioNetState",
    "format_mac",
    "parse_mac",
]
