"""A boot-timer pseudo-device, as Firecracker's: the guest writes the byte 123 to it when it has booted.

pyrovm puts it at the MMIO address :data:`pyrovm.arch.x86.layout.BOOT_TIMER_MMIO_ADDR` (0xc0001000), not
on the debug port 0x80: Linux's ``io_delay`` writes whatever is in AL to port 0x80, so a byte there would
not be a reliable marker.  A Linux init writes it with ``devmem 0xc0001000 8 123`` (busybox; the kernel
needs ``CONFIG_DEVMEM``).  Only the first write of 123 counts; its time (``time.monotonic()``) is kept in
:attr:`BootTimer.hit_at` and passed to the callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

MAGIC = 123


@dataclass
class BootTimerState:
    """When the guest wrote the marker (``time.monotonic()`` of this process), None before it did."""

    hit_at: float | None = None


@dataclass
class BootTimerMetrics:
    """Every write the guest made to the device (the marker or not)."""

    writes: int = 0


class BootTimer:
    """The boot-timer MMIO byte (BusDevice protocol)."""

    def __init__(self, on_hit: Callable[[float], None] | None = None) -> None:
        self._on_hit = on_hit
        self.hit_at: float | None = None
        self.stats = BootTimerMetrics()

    def save_state(self) -> BootTimerState:
        return BootTimerState(self.hit_at)

    def restore_state(self, state: BootTimerState) -> None:
        """Load *state*: a restored timer that was hit ignores later markers (no callback)."""
        self.hit_at = state.hit_at

    def metrics(self) -> dict[str, int]:
        return asdict(self.stats)

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.stats.writes += 1
        if self.hit_at is not None or not data or data[0] != MAGIC:
            return
        self.hit_at = time.monotonic()
        if self._on_hit is not None:
            self._on_hit(self.hit_at)
