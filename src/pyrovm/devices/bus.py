"""Address-range buses for port I/O and MMIO.

A :class:`Bus` maps non-overlapping ranges ``[base, base + length)`` to devices.  A device sees only
offsets into its own range: ``read(offset, size) -> bytes`` and ``write(offset, data)``.  Accesses that
no device claims are counted; the first one at each address is logged, and reads of them return all
ones, as on real hardware.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Protocol

from pyrovm.errors import PyrovmError

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a bus needs of a device."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(PyrovmError, ValueError):
    """A registration that overlaps another or is empty."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass
class BusStats:
    reads: int = 0
    writes: int = 0
    unclaimed_reads: int = 0
    unclaimed_writes: int = 0
    unclaimed_seen: set[int] = field(default_factory=set)


class Bus:
    """A set of device ranges on one address space (``pio`` or ``mmio``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._cache: dict[int, tuple[BusDevice, int]] = {}
        self.stats = BusStats()

    def register(self, base: int, length: int, device: BusDevice, name: str | None = None) -> BusRange:
        """Claim ``[base, base + length)`` for *device*; overlapping an existing range is an error."""
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        label = name or type(device).__name__
        new = BusRange(base, length, device, label)
        i = bisect_right(self._bases, base)
        for other in self._ranges[max(i - 1, 0) : i + 1]:
            if base < other.end and other.base < new.end:
                raise BusError(
                    f"{self.name}: {label} at {base:#x}-{new.end - 1:#x} overlaps "
                    f"{other.name} at {other.base:#x}-{other.end - 1:#x}"
                )
        self._ranges.insert(i, new)
        self._bases.insert(i, base)
        self._cache.clear()
        return new

    def unregister(self, base: int) -> None:
        """Remove the range that starts at *base*."""
        i = bisect_right(self._bases, base) - 1
        if i < 0 or self._bases[i] != base:
            raise BusError(f"{self.name}: nothing registered at {base:#x}")
        del self._ranges[i], self._bases[i]
        self._cache.clear()

    @property
    def ranges(self) -> list[BusRange]:
        return list(self._ranges)

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device at *addr* and the offset of *addr* in its range, or None."""
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        i = bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr >= r.end:
            return None
        hit = (r.device, addr - r.base)
        if len(self._cache) < 4096:
            self._cache[addr] = hit
        return hit

    def _unclaimed(self, kind: str, addr: int, size: int) -> None:
        if addr not in self.stats.unclaimed_seen:
            self.stats.unclaimed_seen.add(addr)
            log.info("%s: unclaimed %s of %d byte(s) at %#x", self.name, kind, size, addr)

    def read(self, addr: int, size: int) -> bytes:
        """Read *size* bytes at *addr*; all ones where no device answers."""
        hit = self.lookup(addr)
        if hit is None:
            self.stats.unclaimed_reads += 1
            self._unclaimed("read", addr, size)
            return b"\xff" * size
        self.stats.reads += 1
        return hit[0].read(hit[1], size)

    def write(self, addr: int, data: bytes) -> bool:
        """Write *data* at *addr*; False where no device claims it."""
        hit = self.lookup(addr)
        if hit is None:
            self.stats.unclaimed_writes += 1
            self._unclaimed("write", addr, len(data))
            return False
        self.stats.writes += 1
        hit[0].write(hit[1], data)
        return True
