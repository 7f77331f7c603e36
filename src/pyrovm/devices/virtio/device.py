"""The device side of virtio, independent of the transport.

A :class:`VirtioDevice` says what it is (``device_id``, offered features, config space, number of queues
and their maximum sizes) and serves requests: the transport calls :meth:`VirtioDevice.activate` once the
driver sets DRIVER_OK, :meth:`VirtioDevice.process` when the driver kicks a queue and
:meth:`VirtioDevice.reset` when it writes 0 to the status register.  Devices never raise for a bad
request: they complete it with an error and count it.  Only a broken queue (:class:`QueueBrokenError`)
leaves :meth:`process`, for the transport to set DEVICE_NEEDS_RESET.

:meth:`VirtioDevice.save_state` / :meth:`VirtioDevice.restore_state` carry the negotiated features
(:class:`VirtioDeviceState`; subclasses extend it); queue progress is the transport's
(``MmioTransportState``).  Restore the device first, then its transport, which re-activates it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import ClassVar

from pyrovm.devices.virtio.queue import ChainError, DescriptorChain, SplitQueue
from pyrovm.memory import GuestMemory

log = logging.getLogger("pyrovm.devices.virtio")

# Device-independent feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

#: Features every device gets from the split-queue implementation.
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

# Device IDs (§5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4


@dataclass
class VirtioDeviceState:
    """What every virtio device keeps across a snapshot: the features the driver accepted."""

    acked_features: int = 0


@dataclass
class VirtioMetrics:
    """Counters of one device.

    ``bytes_read``: bytes the device delivered into guest buffers from its backend (disk reads, entropy);
    ``bytes_written``: bytes it took from guest buffers into its backend (disk writes).
    """

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    notifications: int = 0
    interrupts: int = 0


class VirtioDevice:
    """Base class of virtio devices (subclasses set ``device_id`` and implement :meth:`handle_chain`)."""

    device_id: ClassVar[int] = 0

    def __init__(self, name: str, queue_max_sizes: Sequence[int]) -> None:
        self.name = name
        self.queue_max_sizes = tuple(queue_max_sizes)
        self.stats = VirtioMetrics()
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: list[SplitQueue | None] = []
        self._logged: set[str] = set()
        self._kick: Callable[[int], None] | None = None
        self._lock: AbstractContextManager[object] = contextlib.nullcontext()

    # -- description ---------------------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    def device_features(self) -> int:
        """Device-type feature bits offered (the transport adds :data:`TRANSPORT_FEATURES`)."""
        return 0

    @property
    def features(self) -> int:
        """All feature bits offered to the driver."""
        return self.device_features() | TRANSPORT_FEATURES

    def has_feature(self, bit: int) -> bool:
        """True when feature *bit* was negotiated."""
        return bool(self.acked_features >> bit & 1)

    def config_bytes(self) -> bytes:
        """The device configuration space as it reads now."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the config space; zeroes past its end."""
        data = self.config_bytes()[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space (read-only by default: ignored and logged once)."""
        self.log_once("config-write", "%s: driver wrote read-only config space at %#x", self.name, offset)

    # -- life cycle ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.memory is not None

    def bind(self, kick: Callable[[int], None], lock: AbstractContextManager[object] | None = None) -> None:
        """The transport's way to (re)process a queue later, e.g. from a timer (takes its lock, signals),
        and the transport's lock, which :meth:`locked` takes (for a backend's own callbacks)."""
        self._kick = kick
        if lock is not None:
            self._lock = lock

    def locked(self, fn: Callable[[], object]) -> None:
        """Run *fn* serialised with the device's queue processing (under the transport's lock once bound)."""
        with self._lock:
            fn()

    def activate(self, memory: GuestMemory, queues: list[SplitQueue | None]) -> None:
        """The driver set DRIVER_OK: *queues* has one entry per queue, None where it was not made ready."""
        self.memory = memory
        self.queues = list(queues)

    def reset(self) -> None:
        """The driver reset the device: forget the queues and every request in flight."""
        self.memory = None
        self.queues = []
        self.acked_features = 0

    # -- snapshots -------------------------------------------------------------------------------------
    def save_state(self) -> VirtioDeviceState:
        """A copy of the device's state."""
        return VirtioDeviceState(self.acked_features)

    def restore_state(self, state: VirtioDeviceState) -> None:
        """Load *state* (from :meth:`save_state` of a device of the same kind and configuration)."""
        self.acked_features = state.acked_features

    def live_queue(self, index: int) -> SplitQueue | None:
        """Queue *index* when it exists and the driver made it ready, else None."""
        return self.queues[index] if 0 <= index < len(self.queues) else None

    # -- requests --------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        """Serve every available chain of queue *queue_index*.  Raises only :class:`QueueBrokenError`."""
        queue = self.live_queue(queue_index)
        if queue is None:
            return
        add_used = queue.add_used
        handle = self.handle_chain

        def serve(queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
            for i, chain in enumerate(batch):
                if type(chain) is not DescriptorChain:
                    self.chain_failed(queue, chain)  # type: ignore[arg-type]
                    continue
                written = handle(queue_index, queue, chain)
                if written is None:  # deferred: the device gave this chain back; the rest of the batch too
                    queue.undo_pop(len(batch) - i - 1)
                    return False
                add_used(chain.head, written)
            return True

        queue.drain(serve)

    def handle_chain(self, queue_index: int, queue: SplitQueue, chain: DescriptorChain) -> int | None:
        """Serve one request; return the bytes written into its writable buffers, or None to defer it
        (after :meth:`SplitQueue.undo_pop`)."""
        raise NotImplementedError

    def chain_failed(self, queue: SplitQueue, error: ChainError) -> None:
        """A malformed chain: count it, log it once, give it back to the driver with nothing written."""
        self.stats.requests += 1
        self.stats.errors += 1
        self.log_once(type(error).__name__, "%s: %s", self.name, error)
        queue.add_used(error.head, 0)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def log_once(self, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        """Log *msg* at warning level the first time *key* happens on this device."""
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg + " (further occurrences not logged)", *args, exc_info=exc_info)

    def metrics(self) -> dict[str, int]:
        """Flat dict: requests, bytes_read, bytes_written, errors, notifications, interrupts."""
        return asdict(self.stats)
