"""virtio-mmio register semantics, status machine, reset, interrupts, and hostile drivers."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from pyrovm.device_manager import queue_eventfds
from pyrovm.devices.virtio import mmio as R
from pyrovm.devices.virtio.block import VirtioBlock
from pyrovm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from pyrovm.devices.virtio.mmio import VirtioMmioTransport, cmdline_fragment
from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.rng import VirtioRng
from pyrovm.eventloop import EventLoop
from pyrovm.memory import GuestMemory

DRIVER_STATUS = R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER


class Driver:
    """Plays the guest driver against a transport."""

    def __init__(self, transport: VirtioMmioTransport, mem: GuestMemory) -> None:
        self.t = transport
        self.mem = mem
        self.irqs = 0

    def r(self, off: int) -> int:
        return struct.unpack("<I", self.t.read(off, 4))[0]

    def w(self, off: int, value: int) -> None:
        self.t.write(off, struct.pack("<I", value & 0xFFFFFFFF))

    def device_features(self) -> int:
        self.w(R.DEVICE_FEATURES_SEL, 0)
        lo = self.r(R.DEVICE_FEATURES)
        self.w(R.DEVICE_FEATURES_SEL, 1)
        return lo | self.r(R.DEVICE_FEATURES) << 32

    def negotiate(self, features: int) -> bool:
        self.w(R.STATUS, R.STATUS_ACKNOWLEDGE)
        self.w(R.STATUS, DRIVER_STATUS)
        self.w(R.DRIVER_FEATURES_SEL, 0)
        self.w(R.DRIVER_FEATURES, features)
        self.w(R.DRIVER_FEATURES_SEL, 1)
        self.w(R.DRIVER_FEATURES, features >> 32)
        self.w(R.STATUS, DRIVER_STATUS | R.STATUS_FEATURES_OK)
        return bool(self.r(R.STATUS) & R.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, mq: MockSplitQueue, size: int | None = None) -> None:
        self.w(R.QUEUE_SEL, index)
        assert self.r(R.QUEUE_READY) == 0
        self.w(R.QUEUE_NUM, size if size is not None else mq.size)
        for lo, addr in (
            (R.QUEUE_DESC_LOW, mq.desc_addr),
            (R.QUEUE_DRIVER_LOW, mq.avail_addr),
            (R.QUEUE_DEVICE_LOW, mq.used_addr),
        ):
            self.w(lo, addr)
            self.w(lo + 4, addr >> 32)
        self.w(R.QUEUE_READY, 1)

    def driver_ok(self) -> None:
        self.w(R.STATUS, DRIVER_STATUS | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK)


class Rig:
    def __init__(self, device: object, features: int | None = None, queue_size: int = 16) -> None:
        self.mem = GuestMemory.anonymous(1 << 20)
        self.irqs = 0
        self.t = VirtioMmioTransport(device, self.mem, self._irq)  # type: ignore[arg-type]
        self.d = Driver(self.t, self.mem)
        self.mq = MockSplitQueue(self.mem, size=queue_size)
        feats = features if features is not None else 1 << VIRTIO_F_VERSION_1
        assert self.d.negotiate(feats)
        self.d.setup_queue(0, self.mq)
        self.d.driver_ok()

    def _irq(self) -> None:
        self.irqs += 1


def test_identity_registers() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    assert d.r(R.MAGIC_VALUE) == 0x74726976
    assert t.read(0, 4) == b"virt"
    assert d.r(R.VERSION) == 2
    assert d.r(R.DEVICE_ID) == 4
    assert d.r(R.VENDOR_ID_REG) == R.VENDOR_ID
    feats = d.device_features()
    assert feats >> VIRTIO_F_VERSION_1 & 1
    assert feats >> VIRTIO_F_INDIRECT_DESC & 1 and feats >> VIRTIO_F_EVENT_IDX & 1
    d.w(R.DEVICE_FEATURES_SEL, 7)
    assert d.r(R.DEVICE_FEATURES) == 0
    d.w(R.QUEUE_SEL, 0)
    assert d.r(R.QUEUE_NUM_MAX) == 256
    d.w(R.QUEUE_SEL, 1)
    assert d.r(R.QUEUE_NUM_MAX) == 0  # no such queue
    assert d.r(R.SHM_LEN_LOW) == 0xFFFFFFFF
    assert d.r(R.STATUS) == 0
    assert d.r(R.CONFIG_GENERATION) == 0


def test_cmdline_fragment() -> None:
    assert cmdline_fragment(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"


def test_wrong_width_access_ignored(caplog: pytest.LogCaptureFixture) -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    assert t.read(R.MAGIC_VALUE, 2) == b"\0\0"
    assert t.read(R.MAGIC_VALUE + 1, 4) == bytes(4)
    t.write(R.STATUS, b"\x01")
    t.write(R.STATUS, b"\x01\0\0\0\0\0\0\0")
    assert d.r(R.STATUS) == 0
    assert sum("ignored" in r.message for r in caplog.records) == 1  # logged once


def test_features_ok_requires_version_1() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    assert not d.negotiate(0)  # legacy driver refused
    assert d.r(R.STATUS) == DRIVER_STATUS
    d.w(R.STATUS, 0)
    assert not d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 40)  # a feature not offered
    d.w(R.STATUS, 0)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    assert t.device.acked_features == 1 << VIRTIO_F_VERSION_1


def test_driver_features_frozen_after_features_ok() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    d.w(R.DRIVER_FEATURES_SEL, 0)
    d.w(R.DRIVER_FEATURES, 1 << VIRTIO_F_EVENT_IDX)
    assert t.state.driver_features == 1 << VIRTIO_F_VERSION_1


def test_driver_ok_before_features_ok_ignored() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    d.w(R.STATUS, DRIVER_STATUS)
    d.w(R.STATUS, DRIVER_STATUS | R.STATUS_DRIVER_OK)
    assert d.r(R.STATUS) == DRIVER_STATUS
    assert not t.device.active


def test_queue_registers_and_reset() -> None:
    rig = Rig(VirtioRng())
    d, t = rig.d, rig.t
    d.w(R.QUEUE_SEL, 0)
    assert d.r(R.QUEUE_READY) == 1
    assert d.r(R.QUEUE_NUM) == 16
    assert d.r(R.QUEUE_DESC_LOW) == rig.mq.desc_addr
    assert t.device.active
    # queue registers are frozen after DRIVER_OK
    d.w(R.QUEUE_NUM, 8)
    assert d.r(R.QUEUE_NUM) == 16
    # reset drops everything
    rig.mq.add_chain([], [16])
    d.w(R.STATUS, 0)
    assert d.r(R.STATUS) == 0
    assert d.r(R.QUEUE_READY) == 0
    assert d.r(R.QUEUE_DESC_LOW) == 0
    assert d.r(R.INTERRUPT_STATUS) == 0
    assert not t.device.active
    t.queue_notify(0)  # ignored after reset
    assert rig.mq.used_idx() == 0
    # and the device can be brought up again
    mq2 = MockSplitQueue(rig.mem, size=8, base=0x40000)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    d.setup_queue(0, mq2)
    d.driver_ok()
    mq2.add_chain([], [16])
    t.queue_notify(0)
    assert mq2.take_used()[0][1] == 16


def test_notify_interrupt_and_ack() -> None:
    rig = Rig(VirtioRng())
    d = rig.d
    placed = rig.mq.add_chain([], [32])
    d.w(R.QUEUE_NOTIFY, 0)  # plain MMIO write to QueueNotify
    assert rig.mq.take_used() == [(placed.head, 32)]
    assert rig.mem.read(placed.writable[0][0], 32) != bytes(32)
    assert rig.irqs == 1
    assert d.r(R.INTERRUPT_STATUS) == R.INT_USED_BUFFER
    d.w(R.INTERRUPT_ACK, R.INT_USED_BUFFER)
    assert d.r(R.INTERRUPT_STATUS) == 0
    m = rig.t.metrics()
    assert m == {
        "requests": 1,
        "bytes_read": 32,
        "bytes_written": 0,
        "errors": 0,
        "notifications": 1,
        "interrupts": 1,
    }
    rig.t.queue_notify(0)  # spurious kick: no used buffers, no interrupt
    assert rig.irqs == 1


def test_notify_unknown_queue_is_harmless() -> None:
    rig = Rig(VirtioRng())
    rig.t.queue_notify(5)
    rig.d.w(R.QUEUE_NOTIFY, 0xFFFF)
    assert rig.d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET == 0


def test_no_interrupt_flag_suppresses_irq() -> None:
    rig = Rig(VirtioRng())
    rig.mq.set_avail_flags(1)
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    assert rig.mq.used_idx() == 1
    assert rig.irqs == 0


def test_event_idx_suppresses_irq() -> None:
    rig = Rig(VirtioRng(), features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX)
    rig.mq.set_used_event(2)
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    assert rig.irqs == 1  # first completion always interrupts
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    assert rig.irqs == 1  # used idx 2, used_event 2: not yet
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    assert rig.irqs == 2  # used idx 3 crossed used_event
    assert rig.mq.avail_event() == 3  # the device asks to be kicked for the next one


def test_bad_descriptor_fails_request_not_device() -> None:
    rig = Rig(VirtioRng())
    rig.mq.write_desc(0, 1 << 40, 64, 2)
    rig.mq.publish(0)
    rig.mq._next_desc = 1
    good = rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    assert rig.mq.take_used() == [(0, 0), (good.head, 8)]
    assert rig.d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET == 0
    assert rig.t.metrics()["errors"] == 1


def test_avail_jump_sets_needs_reset(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(VirtioRng())
    rig.mq.set_avail_idx(100)
    rig.t.queue_notify(0)
    d = rig.d
    assert d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET
    assert d.r(R.INTERRUPT_STATUS) & R.INT_CONFIG_CHANGE
    assert rig.irqs == 1
    rig.t.queue_notify(0)  # ignored until reset, no second interrupt or log
    assert rig.irqs == 1
    assert sum("needs reset" in r.message for r in caplog.records) == 1
    # the driver cannot clear NEEDS_RESET by writing the status
    d.w(R.STATUS, d.r(R.STATUS) & ~R.STATUS_DEVICE_NEEDS_RESET)
    assert d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET
    d.w(R.STATUS, 0)
    assert d.r(R.STATUS) == 0


@pytest.mark.parametrize("size", [3, 512, 0])
def test_bad_queue_size_needs_reset(size: int) -> None:
    mem = GuestMemory.anonymous(1 << 20)
    irqs: list[int] = []
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: irqs.append(1))
    d = Driver(t, mem)
    mq = MockSplitQueue(mem, size=16)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    d.setup_queue(0, mq, size=size)
    d.driver_ok()
    assert d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET
    assert d.r(R.INTERRUPT_STATUS) == R.INT_CONFIG_CHANGE
    assert irqs == [1]
    assert not t.device.active
    t.queue_notify(0)


def test_ring_outside_memory_needs_reset() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    d.w(R.QUEUE_SEL, 0)
    d.w(R.QUEUE_NUM, 16)
    d.w(R.QUEUE_DESC_HIGH, 0x10)
    d.w(R.QUEUE_READY, 1)
    d.driver_ok()
    assert d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET


def test_device_crash_is_contained() -> None:
    class Crashing(VirtioRng):
        def handle_chain(self, *a: object) -> int:
            raise RuntimeError("boom")

    rig = Rig(Crashing())
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)  # never raises out of the transport
    assert rig.d.r(R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET


def test_interrupt_callback_failure_is_contained() -> None:
    mem = GuestMemory.anonymous(1 << 20)

    def bad_irq() -> None:
        raise OSError("irqfd closed")

    t = VirtioMmioTransport(VirtioRng(), mem, bad_irq)
    d = Driver(t, mem)
    mq = MockSplitQueue(mem, size=16)
    assert d.negotiate(1 << VIRTIO_F_VERSION_1)
    d.setup_queue(0, mq)
    d.driver_ok()
    mq.add_chain([], [8])
    t.queue_notify(0)
    assert mq.used_idx() == 1


def test_block_config_space(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 1024))
    with VirtioBlock(img) as blk:
        mem = GuestMemory.anonymous(1 << 20)
        t = VirtioMmioTransport(blk, mem, lambda: None)
        assert struct.unpack("<Q", t.read(0x100, 8))[0] == 128
        assert struct.unpack("<I", t.read(0x100, 4))[0] == 128
        assert t.read(0x100 + 20, 4) == struct.pack("<I", 512)
        assert t.read(0x102, 1) == b"\0"
        t.write(0x100, b"\xff")  # read-only config: ignored
        assert struct.unpack("<Q", t.read(0x100, 8))[0] == 128


def test_config_changed_bumps_generation() -> None:
    rig = Rig(VirtioRng())
    rig.t.config_changed()
    assert rig.d.r(R.CONFIG_GENERATION) == 1
    assert rig.d.r(R.INTERRUPT_STATUS) & R.INT_CONFIG_CHANGE
    assert rig.irqs == 1


def test_save_and_restore_state() -> None:
    rig = Rig(VirtioRng())
    rig.mq.add_chain([], [8])
    rig.t.queue_notify(0)
    saved = rig.t.save_state()
    assert saved.queues[0].next_avail == 1 and saved.queues[0].next_used == 1
    t2 = VirtioMmioTransport(VirtioRng(), rig.mem, lambda: None)
    t2.restore_state(saved)
    assert t2.device.active
    placed = rig.mq.add_chain([], [8])
    t2.queue_notify(0)
    assert rig.mq.take_used() == [(0, 8), (placed.head, 8)]


def test_notify_eventfds_with_event_loop() -> None:
    loop = EventLoop()
    loop.start()
    try:
        rig = Rig(VirtioRng())
        fds = queue_eventfds(rig.t, loop)
        assert [i for i, _ in fds] == [0]
        placed = rig.mq.add_chain([], [16])
        fds[0][1].write()  # what KVM does on a guest write to QueueNotify with ioeventfd
        deadline = time.monotonic() + 5
        while rig.mq.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.mq.take_used() == [(placed.head, 16)]
        assert rig.irqs == 1
        for _, efd in fds:
            loop.remove_reader(efd.fd)
            efd.close()
    finally:
        loop.close()
