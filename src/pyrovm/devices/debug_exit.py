"""An exit port compatible with QEMU's ``isa-debug-exit``: a write of *v* ends the VM, and the VMM
process exits with status ``(v << 1) | 1``."""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.value: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")
        self._on_exit(self.value)
