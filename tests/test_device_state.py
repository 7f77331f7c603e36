"""Device state round trips: drive a device through its guest-facing registers, save, restore into a
fresh instance, and check the fresh one behaves the same (and saves the same state)."""

from __future__ import annotations

import struct
from pathlib import Path

from pyrovm.devices import serial as s
from pyrovm.devices.boot_timer import BootTimer
from pyrovm.devices.debug_exit import DebugExit
from pyrovm.devices.i8042 import I8042
from pyrovm.devices.rtc import REG_B, REG_B_SET, SECONDS, Rtc
from pyrovm.devices.virtio import mmio as R
from pyrovm.devices.virtio.block import REQ_HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from pyrovm.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from pyrovm.devices.virtio.mmio import VirtioMmioTransport
from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.rng import VirtioRng
from pyrovm.memory import GuestMemory

_U32 = struct.Struct("<I")


def test_serial_round_trip() -> None:
    levels: list[bool] = []
    a = s.Serial(irq=levels.append)
    a.write(s.LCR, bytes([0x80]))
    a.write(s.RBR_THR_DLL, b"\x01")
    a.write(s.LCR, bytes([0x03]))
    a.write(s.IER_DLM, bytes([s.IER_RDA]))
    a.write(s.SCR, b"\x5a")
    a.receive(b"hello")
    assert a.read(s.RBR_THR_DLL, 1) == b"h"
    saved = a.save_state()
    assert saved.rx == b"ello" and saved.irq_level
    a.receive(b"!")  # later changes do not reach the saved copy
    assert saved.rx == b"ello"
    out: list[bytes] = []
    b_levels: list[bool] = []
    b = s.Serial(out=out.append, irq=b_levels.append)
    b.restore_state(saved)
    assert b_levels == [True]
    assert b.save_state() == saved
    assert b.rx_pending == 4
    assert b.read(s.SCR, 1) == b"\x5a" and b.read(s.IIR_FCR, 1)[0] & 0x0F == s.IIR_RDA
    assert b"".join(b.read(s.RBR_THR_DLL, 1) for _ in range(4)) == b"ello"
    assert b_levels == [True, False]
    b.write(s.RBR_THR_DLL, b"x")
    assert out == [b"x"] and b.metrics() == {"tx_bytes": 1, "rx_overruns": 0}


def test_i8042_round_trip() -> None:
    a = I8042(on_reset=lambda: None)
    a.write(4, b"\x60")
    a.write(0, b"\x45")  # new CTR, keyboard interrupt on
    a.write(0, b"\xf2")  # identify: three bytes queued
    assert a.read(0, 1) == b"\xfa"
    saved = a.save_state()
    levels: list[bool] = []
    b = I8042(on_reset=lambda: None, irq=levels.append)
    b.restore_state(saved)
    assert levels == [True] and b.save_state() == saved
    assert b.read(0, 1) == b"\xab" and b.read(0, 1) == b"\x83"
    assert levels == [True, False, True, False]  # a new edge for the byte left, then low
    b.write(4, b"\x20")
    assert b.read(0, 1) == b"\x45"
    assert a.read(0, 1) == b"\xab"  # the original goes on by itself


def test_rtc_round_trip() -> None:
    now = [1_000_000.0]
    a = Rtc(clock=lambda: now[0])
    a.write(0, bytes([0x80 | 0x20]))  # NMI off, index 0x20 (CMOS memory)
    a.write(1, b"\x77")
    a.write(0, bytes([SECONDS]))
    a.write(1, b"\x30")  # seconds = 30 (BCD): moves the offset
    a.write(0, bytes([0x80 | REG_B]))  # NMI masked
    a.write(1, bytes([0x02 | REG_B_SET]))  # freeze while "setting"
    saved = a.save_state()
    b = Rtc(clock=lambda: now[0])
    b.restore_state(saved)
    assert b.save_state() == saved
    assert b.read(0, 1)[0] == 0x80 | REG_B
    for rtc in (a, b):
        rtc.write(0, bytes([SECONDS]))
        assert rtc.read(1, 1) == b"\x30"
        rtc.write(0, bytes([0x20]))
        assert rtc.read(1, 1) == b"\x77"


def test_boot_timer_and_debug_exit_round_trip() -> None:
    hits: list[float] = []
    t = BootTimer(hits.append)
    t.write(0, bytes([123]))
    t2 = BootTimer(hits.append)
    t2.restore_state(t.save_state())
    t2.write(0, bytes([123]))
    assert t2.hit_at == t.hit_at and len(hits) == 1 and t2.save_state() == t.save_state()
    d = DebugExit(lambda v: None)
    d.write(0, b"\x07")
    d2 = DebugExit(lambda v: None)
    d2.restore_state(d.save_state())
    assert d2.value == 7 and d2.save_state() == d.save_state()


# -- virtio: requests in flight across a save/restore -----------------------------------------------------
def _w(t: VirtioMmioTransport, off: int, value: int) -> None:
    t.write(off, _U32.pack(value & 0xFFFFFFFF))


def _r(t: VirtioMmioTransport, off: int) -> int:
    return int(_U32.unpack(t.read(off, 4))[0])


def _drive(t: VirtioMmioTransport, mq: MockSplitQueue) -> None:
    _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER)
    _w(t, R.DRIVER_FEATURES_SEL, 1)
    _w(t, R.DRIVER_FEATURES, (1 << VIRTIO_F_VERSION_1) >> 32)
    _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK)
    _w(t, R.QUEUE_SEL, 0)
    _w(t, R.QUEUE_NUM, mq.size)
    for lo, addr in ((R.QUEUE_DESC_LOW, mq.desc_addr), (R.QUEUE_DRIVER_LOW, mq.avail_addr)):
        _w(t, lo, addr)
        _w(t, lo + 4, addr >> 32)
    _w(t, R.QUEUE_DEVICE_LOW, mq.used_addr)
    _w(t, R.QUEUE_DEVICE_HIGH, mq.used_addr >> 32)
    _w(t, R.QUEUE_READY, 1)
    _w(t, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK | R.STATUS_DRIVER_OK)


def _move(
    old: VirtioMmioTransport, dev: VirtioDevice, mem: GuestMemory, irqs: list[int]
) -> VirtioMmioTransport:
    """Save *old* and its device, restore both into *dev* and a fresh transport over *mem*."""
    saved_dev = old.device.save_state()
    saved = old.save_state()
    dev.restore_state(saved_dev)
    t = VirtioMmioTransport(dev, mem, lambda: irqs.append(1))
    t.restore_state(saved)
    assert t.save_state() == saved and dev.save_state() == saved_dev
    return t


def test_virtio_block_requests_in_the_avail_ring_survive(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 32)  # 8 KiB
    mem = GuestMemory.anonymous(1 << 20)
    mq = MockSplitQueue(mem, size=16)
    old = VirtioMmioTransport(VirtioBlock(image), mem, lambda: None)
    _drive(old, mq)
    done = mq.add_chain([REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    old.queue_notify(0)
    assert mq.take_used() == [(done.head, 513)]
    read = mq.add_chain([REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 2)], [1024, 1])
    write = mq.add_chain([REQ_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 8), b"\xee" * 512], [1])
    old.device.close()  # type: ignore[attr-defined]  # the old VM is gone; its requests are still queued
    irqs: list[int] = []
    t = _move(old, VirtioBlock(image), mem, irqs)
    assert _r(t, R.STATUS) & R.STATUS_DRIVER_OK and _r(t, R.QUEUE_READY) == 1
    t.queue_notify(0)
    assert mq.take_used() == [(read.head, 1025), (write.head, 1)]  # served once, in order
    assert mq.read(read.writable[0][0], 1024) == (bytes(range(256)) * 4)
    assert mq.read(read.writable[1][0], 1) == b"\0" and mq.read(write.writable[0][0], 1) == b"\0"
    assert image.read_bytes()[4096 : 4096 + 512] == b"\xee" * 512
    t.queue_notify(0)
    assert mq.take_used() == [] and t.metrics()["requests"] == 2 and irqs == [1]
    t.device.close()  # type: ignore[attr-defined]


def test_virtio_rng_deferred_requests_survive() -> None:
    now = [100.0]
    timers: list[object] = []

    class Sched:
        def call_later(self, delay: float, fn: object) -> object:
            timers.append(fn)
            return None

    mem = GuestMemory.anonymous(1 << 20)
    mq = MockSplitQueue(mem, size=16)
    old_dev = VirtioRng(rate_bytes_per_s=64, scheduler=Sched(), clock=lambda: now[0])
    old = VirtioMmioTransport(old_dev, mem, lambda: None)
    _drive(old, mq)
    first = mq.add_chain([], [48])
    second = mq.add_chain([], [48])  # the bucket (64) has room for one: the second waits
    old.queue_notify(0)
    assert mq.take_used() == [(first.head, 48)] and len(timers) == 1
    now[0] += 0.25  # 16 more tokens: 32 in all, still not enough
    irqs: list[int] = []
    new_dev = VirtioRng(rate_bytes_per_s=64, scheduler=Sched(), clock=lambda: now[0])
    t = _move(old, new_dev, mem, irqs)
    assert new_dev.save_state().tokens == 32
    t.queue_notify(0)
    assert mq.take_used() == []  # still rate limited after the restore
    now[0] += 0.5
    t.queue_notify(0)
    assert mq.take_used() == [(second.head, 48)]
    assert mq.read(second.writable[0][0], 48) != bytes(48)
    t.queue_notify(0)
    assert mq.take_used() == [] and new_dev.stats.requests == 1


def test_save_state_is_a_copy() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    mq = MockSplitQueue(mem, size=16)
    t = VirtioMmioTransport(VirtioRng(), mem, lambda: None)
    _drive(t, mq)
    saved = t.save_state()
    mq.add_chain([], [8])
    t.queue_notify(0)
    assert saved.queues[0].next_avail == 0 and t.save_state().queues[0].next_avail == 1
