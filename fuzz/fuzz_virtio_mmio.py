#!/usr/bin/env python3
"""Fuzz the virtio-mmio transport's registers (:class:`VirtioMmioTransport` with a virtio-rng device):
any sequence of reads and writes of any width at any offset of the slot (the registers, the config space,
the gaps), with values that walk the status state machine, the feature selectors, the queue registers
(QueueNum, the ring addresses, QueueReady) and QueueNotify, plus snapshot save/restore of the transport.

Nothing may raise out of ``read`` / ``write``; a read returns as many bytes as asked; the device may fail
only with a queue error (the transport then sets DEVICE_NEEDS_RESET).  Guest RAM is small, so addresses
from the input often land inside it.

    python fuzz/fuzz_virtio_mmio.py -max_total_time=600 fuzz/corpus/virtio_mmio
"""

from __future__ import annotations

import _common
import atheris

with _common.instrumented(__name__):
    import _virtio

    from pyrovm.devices.virtio import mmio as R
    from pyrovm.devices.virtio.mmio import VirtioMmioTransport
    from pyrovm.devices.virtio.queue import VirtqueueError
    from pyrovm.devices.virtio.rng import VirtioRng
    from pyrovm.memory import GuestMemory

MEM_SIZE = 0x10000
_MEMORY = GuestMemory.anonymous(MEM_SIZE)
#: the registers, most often picked; any offset of the 4 KiB slot otherwise
REGISTERS = [*_virtio.REGISTERS, R.CONFIG, R.CONFIG + 4]
STATUS_VALUES = [0, 1, 3, 0xB, 0xF, 0x4F, 0x80, 0xFF, 7, 0xD]


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    _MEMORY.fill(0, MEM_SIZE)
    _MEMORY.write(0, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)))  # what the rings hold, if they are here
    later: list[object] = []
    failures: list[BaseException] = []
    device = VirtioRng(queue_size=fdp.PickValueInList([1, 4, 256, 32768]))
    t = VirtioMmioTransport(device, _MEMORY, lambda: None, later.append if fdp.ConsumeBool() else None)
    fail = t._fail

    def record(error: BaseException) -> None:
        if not isinstance(error, VirtqueueError):
            failures.append(error)
        fail(error)

    t._fail = record  # type: ignore[method-assign]
    try:
        while fdp.remaining_bytes():
            kind = fdp.ConsumeIntInRange(0, 15)
            off = fdp.PickValueInList(REGISTERS) if kind < 12 else fdp.ConsumeIntInRange(0, 0xFFF)
            size = fdp.PickValueInList([4, 4, 4, 4, 1, 2, 3, 8, 0])
            if fdp.ConsumeBool():
                got = t.read(off, size)
                if len(got) != size:
                    raise AssertionError(f"read of {size} bytes at {off:#x} returned {len(got)}")
            elif kind == 13:  # a snapshot of the transport, restored into a fresh one
                saved = t.save_state()
                t.reset()
                t = VirtioMmioTransport(device, _MEMORY, lambda: None)
                t._fail = record  # type: ignore[method-assign]
                t.restore_state(saved)
            else:
                if off == R.STATUS and fdp.ConsumeBool():
                    value = fdp.PickValueInList(STATUS_VALUES)
                elif off in (R.QUEUE_DESC_LOW, R.QUEUE_DRIVER_LOW, R.QUEUE_DEVICE_LOW) and fdp.ConsumeBool():
                    value = fdp.ConsumeIntInRange(0, MEM_SIZE)
                elif off == R.QUEUE_NUM and fdp.ConsumeBool():
                    value = 1 << fdp.ConsumeIntInRange(0, 16)
                else:
                    value = fdp.ConsumeUInt(4)
                t.write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if size else b"")
            if failures:
                raise AssertionError(f"the device failed: {failures[0]!r}") from failures[0]
        for fn in later[:8]:
            fn()  # type: ignore[operator]
        if failures:
            raise AssertionError(f"the device failed: {failures[0]!r}") from failures[0]
    finally:
        t.reset()


if __name__ == "__main__":
    _common.run(fuzz_one)
