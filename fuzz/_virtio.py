"""A fuzzed guest driver for the virtio device harnesses: it drives a device through its
:class:`~pyrovm.devices.virtio.mmio.VirtioMmioTransport` only (register reads and writes, QueueNotify),
with chains laid out by :class:`~pyrovm.devices.virtio.mock.MockSplitQueue` in guest RAM, well formed or
hostile (raw descriptors, ring bytes rewritten behind the device's back), as the input says.

What counts as a crash:

* anything raised out of the transport's ``read``, ``write`` or ``queue_notify`` (a guest must never make
  them raise);
* a device failure the transport had to catch that is not a
  :class:`~pyrovm.devices.virtio.queue.VirtqueueError`: the devices promise to complete a bad request
  with an error and to let only a broken queue out of ``process`` (the transport then sets
  DEVICE_NEEDS_RESET, which hides the bug from the guest but not from the fuzzer);
* a register read that does not return as many bytes as asked.

Import this module after the pyrovm modules, under the harness's instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable

import atheris

from pyrovm.devices.ratelimit import BucketSpec, RateLimitSpec
from pyrovm.devices.virtio import mmio as R
from pyrovm.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from pyrovm.devices.virtio.mmio import VirtioMmioTransport
from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VirtqueueError
from pyrovm.memory import GuestMemory

MEM_SIZE = 2 << 20
#: each queue gets this much guest RAM: its rings, then its data area
QUEUE_AREA = 0x80000
RING_AREA = 0x2000
MEMORY = GuestMemory.anonymous(MEM_SIZE)
DRIVER_STATUS = R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER
REGISTERS = [
    R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID, R.VENDOR_ID_REG, R.DEVICE_FEATURES, R.DEVICE_FEATURES_SEL,
    R.DRIVER_FEATURES, R.DRIVER_FEATURES_SEL, R.QUEUE_SEL, R.QUEUE_NUM_MAX, R.QUEUE_NUM, R.QUEUE_READY,
    R.QUEUE_NOTIFY, R.INTERRUPT_STATUS, R.INTERRUPT_ACK, R.STATUS, R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH,
    R.QUEUE_DRIVER_LOW, R.QUEUE_DRIVER_HIGH, R.QUEUE_DEVICE_LOW, R.QUEUE_DEVICE_HIGH, R.SHM_SEL,
    R.SHM_LEN_LOW, R.SHM_LEN_HIGH, R.SHM_BASE_LOW, R.SHM_BASE_HIGH, R.QUEUE_RESET, R.CONFIG_GENERATION,
]  # fmt: skip

Request = tuple[list[bytes], list[int]]


class Timers:
    """The event loop's ``call_later`` (rate limiters, vsock timeouts), run when the input says."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        self.pending.append(fn)
        return None

    def run(self, limit: int = 16) -> None:
        for _ in range(limit):
            if not self.pending:
                return
            self.pending.pop(0)()


def rate_limiter(fdp: atheris.FuzzedDataProvider) -> RateLimitSpec | None:
    """None most of the time, else small buckets (so that requests get deferred)."""
    if fdp.ConsumeIntInRange(0, 3):
        return None

    def bucket() -> BucketSpec | None:
        if fdp.ConsumeBool():
            return None
        return BucketSpec(
            fdp.ConsumeIntInRange(0, 4096), fdp.ConsumeIntInRange(0, 100), fdp.ConsumeIntInRange(0, 64)
        )

    return RateLimitSpec(bucket(), bucket())


class FuzzDriver:
    """The guest side of one device (see the module doc)."""

    def __init__(self, device: VirtioDevice, fdp: atheris.FuzzedDataProvider) -> None:
        MEMORY.fill(0, MEM_SIZE)
        self.device = device
        self.fdp = fdp
        self.later: list[Callable[[], None]] = []
        self.irqs = 0
        self.t = VirtioMmioTransport(device, MEMORY, self._irq, self.later.append)
        self.failures: list[BaseException] = []
        fail = self.t._fail

        def record(error: BaseException) -> None:
            if not isinstance(error, VirtqueueError):
                self.failures.append(error)
            fail(error)

        self.t._fail = record  # type: ignore[method-assign]
        self.mqs: list[MockSplitQueue] = []
        self.features = 0

    # -- registers -------------------------------------------------------------------------------------
    def _irq(self) -> None:
        self.irqs += 1

    def r(self, off: int, size: int = 4) -> int:
        data = self.t.read(off, size)
        if len(data) != size:
            raise AssertionError(f"read of {size} bytes at {off:#x} returned {len(data)}")
        return int.from_bytes(data, "little")

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.t.write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def check(self) -> None:
        if self.failures:
            error = self.failures[0]
            raise AssertionError(f"{self.device.name}: the device failed: {error!r}") from error

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Negotiate features (the offered ones the input picks, VERSION_1 unless it says otherwise), lay
        out and register each queue (a size the input picks), set DRIVER_OK."""
        fdp = self.fdp
        self.w(R.STATUS, 0)
        self.w(R.STATUS, R.STATUS_ACKNOWLEDGE)
        self.w(R.STATUS, DRIVER_STATUS)
        offered = 0
        for sel in (0, 1):
            self.w(R.DEVICE_FEATURES_SEL, sel)
            offered |= self.r(R.DEVICE_FEATURES) << (32 * sel)
        features = (offered & fdp.ConsumeUInt(8)) | (1 << VIRTIO_F_VERSION_1)
        if not fdp.ConsumeIntInRange(0, 15):
            features ^= fdp.ConsumeUInt(8)  # a driver taking what was not offered, or legacy
        for sel in (0, 1):
            self.w(R.DRIVER_FEATURES_SEL, sel)
            self.w(R.DRIVER_FEATURES, features >> (32 * sel))
        self.w(R.STATUS, DRIVER_STATUS | R.STATUS_FEATURES_OK)
        self.features = features
        self.mqs = []
        for index, max_size in enumerate(self.device.queue_max_sizes):
            size = 1 << fdp.ConsumeIntInRange(0, max(max_size.bit_length() - 1, 0))
            size = min(size, max_size, 256)
            base = QUEUE_AREA * index + 0x1000
            mq = MockSplitQueue(
                MEMORY,
                size=size,
                base=base,
                data_base=base + RING_AREA,
                data_size=QUEUE_AREA - RING_AREA - 0x1000,
            )
            self.mqs.append(mq)
            if fdp.ConsumeIntInRange(0, 7) == 0:
                continue  # this queue is left not ready
            self.w(R.QUEUE_SEL, index)
            self.r(R.QUEUE_NUM_MAX)
            self.w(R.QUEUE_NUM, size)
            for lo, addr in (
                (R.QUEUE_DESC_LOW, mq.desc_addr),
                (R.QUEUE_DRIVER_LOW, mq.avail_addr),
                (R.QUEUE_DEVICE_LOW, mq.used_addr),
            ):
                self.w(lo, addr)
                self.w(lo + 4, addr >> 32)
            self.w(R.QUEUE_READY, 1)
        self.w(R.STATUS, DRIVER_STATUS | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK)
        self.r(R.STATUS)
        self.check()

    # -- chains ----------------------------------------------------------------------------------------
    def _queue(self) -> tuple[int, MockSplitQueue] | None:
        if not self.mqs:
            return None
        index = self.fdp.ConsumeIntInRange(0, len(self.mqs) - 1)
        return index, self.mqs[index]

    def generic_request(self) -> Request:
        fdp = self.fdp
        readable = [
            fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 96)) for _ in range(fdp.ConsumeIntInRange(0, 3))
        ]
        writable = [self.length() for _ in range(fdp.ConsumeIntInRange(0, 3))]
        return readable, writable

    def length(self) -> int:
        """A buffer length: mostly small, sometimes a sector multiple or large."""
        fdp = self.fdp
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            return fdp.ConsumeIntInRange(0, 16)
        if kind == 1:
            return 512 * fdp.ConsumeIntInRange(0, 8)
        if kind == 2:
            return fdp.ConsumeIntInRange(0, 2048)
        return fdp.ConsumeIntInRange(0, 0x11000)

    def add_chain(self, index: int, mq: MockSplitQueue, request: Request) -> None:
        readable, writable = request
        if not readable and not writable:
            return
        add = mq.add_indirect_chain if self.fdp.ConsumeIntInRange(0, 3) == 0 else mq.add_chain
        if add == mq.add_indirect_chain and len(readable) + len(writable) > mq.size * 4:
            add = mq.add_chain
        if add == mq.add_chain and len(readable) + len(writable) > mq.size:
            return
        for attempt in (0, 1):
            try:
                add(readable, writable, publish=self.fdp.ConsumeIntInRange(0, 15) != 0)
                return
            except MemoryError:  # the data area is full: start it again (the guest reuses its buffers)
                if attempt:
                    return
                mq._next_data = mq.data_base

    def hostile_descriptor(self, mq: MockSplitQueue) -> None:
        fdp = self.fdp
        index = fdp.ConsumeIntInRange(0, mq.size - 1)
        if fdp.ConsumeBool():
            addr = mq.data_base + fdp.ConsumeIntInRange(0, 0x10000)
        else:
            addr = fdp.ConsumeUInt(8)
        length = self.length() if fdp.ConsumeBool() else fdp.ConsumeUInt(4)
        flags = fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(2)
        if flags & VIRTQ_DESC_F_INDIRECT and fdp.ConsumeBool():
            length = 16 * fdp.ConsumeIntInRange(1, 8)
        mq.write_desc(index, addr, length, flags, fdp.ConsumeIntInRange(0, mq.size + 1))
        if fdp.ConsumeBool():
            mq.publish(index)

    def poke_ring(self, mq: MockSplitQueue) -> None:
        fdp = self.fdp
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        if data:
            MEMORY.write(mq.desc_addr + fdp.ConsumeIntInRange(0, RING_AREA - 8), data)

    # -- the program -----------------------------------------------------------------------------------
    def run(self, request: Callable[[int, MockSplitQueue], Request], extra: Callable[[], None] | None = None,
            max_ops: int = 96) -> None:  # fmt: skip
        """Set up, then up to *max_ops* operations as the input says; *request(queue_index, mq)* builds a
        device-specific request, *extra()* is the device's host side (a peer socket, host clients)."""
        fdp = self.fdp
        if fdp.ConsumeIntInRange(0, 15) == 0:  # the driver pokes registers before anything else
            for _ in range(fdp.ConsumeIntInRange(1, 8)):
                self.raw_register()
        self.setup()
        for _ in range(max_ops):
            if not fdp.remaining_bytes():
                break
            op = fdp.ConsumeIntInRange(0, 15)
            picked = self._queue()
            if picked is None:
                break
            index, mq = picked
            if op <= 4:
                req = request(index, mq) if fdp.ConsumeIntInRange(0, 3) else self.generic_request()
                self.add_chain(index, mq, req)
                if fdp.ConsumeIntInRange(0, 3):
                    self.w(R.QUEUE_NOTIFY, index)
            elif op <= 6:
                self.w(R.QUEUE_NOTIFY, index if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(2))
            elif op == 7:
                self.hostile_descriptor(mq)
            elif op == 8:
                self.poke_ring(mq)
            elif op == 9:
                self.raw_register()
            elif op == 10:
                self.config_access()
            elif op == 11:
                self.run_later()
            elif op == 12:
                mq.take_used()
                self.w(R.INTERRUPT_ACK, self.r(R.INTERRUPT_STATUS))
            elif op == 13:
                if fdp.ConsumeIntInRange(0, 3) == 0:
                    self.setup()  # a reset and a new negotiation
                else:
                    self.t.process_queue(index)
            elif extra is not None:
                extra()
            self.check()
        self.run_later()
        self.check()

    def run_later(self) -> None:
        """What the transport deferred to the I/O thread (a queue's rest after its work budget)."""
        for _ in range(8):
            if not self.later:
                return
            self.later.pop(0)()
            self.check()

    def raw_register(self) -> None:
        fdp = self.fdp
        off = (
            fdp.PickValueInList(REGISTERS) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFF)
        )
        size = 4 if fdp.ConsumeIntInRange(0, 7) else fdp.PickValueInList([1, 2, 3, 8])
        if fdp.ConsumeBool():
            self.r(off, size)
        else:
            value = fdp.ConsumeUInt(4)
            if off == R.STATUS and fdp.ConsumeBool():
                value = fdp.PickValueInList([0, 1, 3, 0xB, 0xF, 0x4F, 0x80, 0xFF])
            self.w(off, value, size)

    def config_access(self) -> None:
        fdp = self.fdp
        off = R.CONFIG + fdp.ConsumeIntInRange(0, 72)
        size = fdp.PickValueInList([1, 2, 4, 8])
        if fdp.ConsumeBool():
            self.r(off, size)
        else:
            self.t.write(off, fdp.ConsumeBytes(size))

    def close(self) -> None:
        self.t.reset()  # releases the queues' views of guest RAM
