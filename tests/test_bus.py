from __future__ import annotations

import logging

import pytest

from pyrovm.devices.bus import Bus, BusError
from pyrovm.errors import PyrovmError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_dispatch_by_offset() -> None:
    bus = Bus("pio")
    a, b = Recorder(), Recorder()
    bus.register(0x3F8, 8, a, "uart")
    bus.register(0x60, 5, b, "i8042")
    assert bus.write(0x3FA, b"\x01")
    assert bus.write(0x64, b"\xfe")
    assert a.writes == [(2, b"\x01")]
    assert b.writes == [(4, b"\xfe")]
    assert bus.read(0x3FD, 1) == b"\x05"
    assert bus.read(0x3F8, 2) == b"\x00\x00"
    assert bus.stats.writes == 2


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x100)])
def test_overlap_rejected(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "uart")
    with pytest.raises(BusError, match="overlaps uart"):
        bus.register(base, length, Recorder(), "other")


def test_adjacent_ranges_are_fine_and_empty_rejected() -> None:
    bus = Bus("mmio")
    bus.register(0x1000, 0x1000, Recorder())
    bus.register(0x2000, 0x1000, Recorder())
    bus.register(0x0, 0x1000, Recorder())
    assert [r.base for r in bus.ranges] == [0, 0x1000, 0x2000]
    with pytest.raises(BusError):
        bus.register(0x5000, 0, Recorder())


def test_unclaimed_counted_logged_once_all_ones(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder())
    with caplog.at_level(logging.INFO, logger="pyrovm.devices.bus"):
        for _ in range(3):
            assert bus.read(0x500, 2) == b"\xff\xff"
            assert bus.write(0x500, b"\x00") is False
    assert bus.stats.unclaimed_reads == 3
    assert bus.stats.unclaimed_writes == 3
    assert len([r for r in caplog.records if "unclaimed" in r.message]) == 1


def test_unregister() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.register(0xD0000000, 0x1000, dev)
    assert bus.lookup(0xD0000010) == (dev, 0x10)
    bus.unregister(0xD0000000)
    assert bus.lookup(0xD0000010) is None
    with pytest.raises(BusError):
        bus.unregister(0xD0000000)


def test_bus_error_is_rooted() -> None:
    assert issubclass(BusError, PyrovmError) and issubclass(BusError, ValueError)
