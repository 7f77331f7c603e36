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

MAGIC = 123


class BootTimer:
    def __init__(self, on_hit: Callable[[float], None] | None = None) -> None:
        self._on_hit = on_hit
        self.hit_at: float | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if self.hit_at is not None or not data or data[0] != MAGIC:
            return
        self.hit_at = time.monotonic()
        if self._on_hit is not None:
            self._on_hit(self.hit_at)
