"""A guest that makes one notification cost a lot: the work is bounded per chain and per slice, other
devices are served in between, and the device that was abused ends in DEVICE_NEEDS_RESET.  Requests held
for merging are completed before a fatal queue error takes the device down."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pyrovm.devices.virtio import mmio as R
from pyrovm.devices.virtio.block import REQ_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlock
from pyrovm.devices.virtio.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyrovm.devices.virtio.mmio import VirtioMmioTransport
from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.queue import (
    DRAIN_BUDGET,
    MAX_INDIRECT_ENTRIES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyrovm.devices.virtio.rng import VirtioRng
from pyrovm.memory import GuestMemory

from test_virtio_mmio import Driver

QUEUE = 256
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC)


class Slot:
    """A device on a transport whose deferred work goes to a list (the event loop, by hand)."""

    def __init__(self, mem: GuestMemory, device: object, base: int, later: list[Callable[[], None]]) -> None:
        self.t = VirtioMmioTransport(device, mem, lambda: None, later.append)  # type: ignore[arg-type]
        self.mq = MockSplitQueue(mem, size=QUEUE, base=base, data_size=0x40000)
        d = Driver(self.t, mem)
        assert d.negotiate(FEATURES)
        d.setup_queue(0, self.mq)
        d.driver_ok()


def _zero_length_table(mq: MockSplitQueue, entries: int) -> int:
    """An indirect table whose *entries* descriptors are chained, device-writable and zero bytes long."""
    last = entries - 1
    table = [
        (0x100000, 0, VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i < last else 0), i + 1)
        for i in range(entries)
    ]
    return mq.write_indirect_table(table)


def _every_entry_names(mq: MockSplitQueue, table: int, entries: int) -> None:
    for head in range(QUEUE):
        mq.write_desc(head, table, 16 * entries, VIRTQ_DESC_F_INDIRECT)
        mq.publish(head)


def test_huge_indirect_table_breaks_the_device_at_once() -> None:
    mem = GuestMemory.anonymous(16 << 20)
    later: list[Callable[[], None]] = []
    rng = Slot(mem, VirtioRng(), 0x1000, later)
    table = _zero_length_table(rng.mq, 4096)
    _every_entry_names(rng.mq, table, 65536)  # each chain claims 65536 descriptors
    t0 = time.monotonic()
    rng.t.queue_notify(0)
    assert time.monotonic() - t0 < 0.5
    assert rng.t.needs_reset
    assert later == []


def test_work_per_notification_is_bounded_and_the_rest_comes_later() -> None:
    mem = GuestMemory.anonymous(16 << 20)
    later: list[Callable[[], None]] = []
    abused = Slot(mem, VirtioRng(), 0x1000, later)
    other = Slot(mem, VirtioRng(), 0x200000, later)
    table = _zero_length_table(abused.mq, MAX_INDIRECT_ENTRIES)
    _every_entry_names(abused.mq, table, MAX_INDIRECT_ENTRIES)  # 256 legal chains of 1024 buffers
    t0 = time.monotonic()
    abused.t.queue_notify(0)
    first = time.monotonic() - t0
    done_first = abused.mq.used_idx()
    assert first < 0.5
    assert 0 < done_first <= DRAIN_BUDGET // MAX_INDIRECT_ENTRIES + 1
    assert len(later) == 1  # the rest is deferred to the I/O thread, not done now
    # another device's request is served between two slices
    buf = other.mq.add_chain([], [32])
    other.t.queue_notify(0)
    assert other.mq.take_used() == [(buf.head, 32)]
    slices = 1
    while later:
        later.pop(0)()
        slices += 1
        assert slices < 200
    assert abused.mq.used_idx() == QUEUE
    assert slices > 10 and not abused.t.needs_reset


def test_held_requests_are_completed_before_a_fatal_queue_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 16 * 64)  # 256 KiB with a pattern
    mem = GuestMemory.anonymous(16 << 20)
    later: list[Callable[[], None]] = []
    blk = Slot(mem, VirtioBlock(image), 0x1000, later)
    mq = blk.mq
    chains = [
        mq.add_chain([REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [512, 1], publish=False)
        for sector in (0, 1)  # adjacent reads: held to be merged into one preadv
    ]
    for c in chains:
        mq.publish(c.head)
    mq.publish(QUEUE + 7)  # then a head index outside the table: the queue is broken
    blk.t.queue_notify(0)
    assert blk.t.needs_reset
    assert mq.used_idx() == 2
    for i, c in enumerate(chains):
        data_gpa, status_gpa = c.writable[0][0], c.writable[1][0]
        assert mq.read(status_gpa, 1)[0] == VIRTIO_BLK_S_OK
        assert mq.read(data_gpa, 512) == image.read_bytes()[512 * i : 512 * (i + 1)]
    assert blk.t.read(R.STATUS, 4)[0] & R.STATUS_DEVICE_NEEDS_RESET
