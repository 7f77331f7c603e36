"""KVM's coalesced ring as pyrovm serves it: in order, a ringful at most per call, a failing write taken."""

from __future__ import annotations

import mmap
import struct
import threading

import pytest

from pyrovm.kvm.coalesced import CoalescedRing

ENTRY = struct.Struct("<QII8s")


def _ring() -> CoalescedRing:
    ring = CoalescedRing.__new__(CoalescedRing)  # (the page KVM would share, as an anonymous one)
    ring._mm = mmap.mmap(-1, mmap.PAGESIZE)
    ring.size = (mmap.PAGESIZE - 8) // ENTRY.size
    ring._lock = threading.Lock()
    ring.drained = 0
    return ring


def _queue(ring: CoalescedRing, *writes: tuple[int, bytes, bool]) -> None:
    """Append as KVM does: the entry at `last`, then `last` moves on."""
    for addr, data, pio in writes:
        first, last = struct.unpack_from("<II", ring._mm, 0)
        assert (last + 1) % ring.size != first, "full"
        ENTRY.pack_into(ring._mm, 8 + last * ENTRY.size, addr, len(data), int(pio), data.ljust(8, b"\0"))
        struct.pack_into("<I", ring._mm, 4, (last + 1) % ring.size)


def test_served_in_order_to_the_right_bus() -> None:
    ring = _ring()
    pio: list[tuple[int, bytes]] = []
    mmio: list[tuple[int, bytes]] = []
    assert not ring.pending()
    _queue(ring, (0x3F8, b"h", True), (0xD0000070, b"\x01\0\0\0", False), (0x70, b"\x0b", True))
    assert ring.pending()
    assert ring.drain(lambda a, d: pio.append((a, d)), lambda a, d: mmio.append((a, d))) == 3
    assert pio == [(0x3F8, b"h"), (0x70, b"\x0b")] and mmio == [(0xD0000070, b"\x01\0\0\0")]
    assert not ring.pending() and ring.drained == 3


def test_wraps_around_and_serves_at_most_a_ringful_per_call() -> None:
    ring = _ring()
    seen: list[int] = []
    for round_ in range(3):  # more entries in all than the ring holds: the indexes wrap
        _queue(ring, *[(i, bytes([round_]), True) for i in range(ring.size - 1)])
        assert ring.drain(lambda a, d: seen.append(a), lambda a, d: None) == ring.size - 1
    assert seen == list(range(ring.size - 1)) * 3

    def refill(addr: int, data: bytes) -> None:  # another vCPU that keeps writing while this one serves
        _queue(ring, (addr, data, True))

    _queue(ring, (1, b"x", True))
    assert ring.drain(refill, refill) == ring.size  # returns: the caller's own writes are all served
    assert ring.pending()


def test_a_failing_write_is_taken_and_the_error_goes_up() -> None:
    ring = _ring()
    _queue(ring, (1, b"a", True), (2, b"b", True))

    def broken(addr: int, data: bytes) -> None:
        raise RuntimeError("device bug")

    with pytest.raises(RuntimeError):
        ring.drain(broken, broken)
    got: list[int] = []
    assert ring.drain(lambda a, d: got.append(a), broken) == 1 and got == [2]  # not the failed one again
