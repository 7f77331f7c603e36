"""An exit port compatible with QEMU's ``isa-debug-exit``: a write of *v* ends the VM, and the VMM
process exits with status ``(v << 1) | 1``.  State: the value written (:class:`DebugExitState`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class DebugExitState:
    """The last value the guest wrote (None: none yet)."""

    value: int | None = None


@dataclass
class DebugExitMetrics:
    writes: int = 0


class DebugExit:
    """The exit port (BusDevice protocol)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.value: int | None = None
        self.stats = DebugExitMetrics()

    def save_state(self) -> DebugExitState:
        return DebugExitState(self.value)

    def restore_state(self, state: DebugExitState) -> None:
        """Load *state* (the exit callback is not called again)."""
        self.value = state.value

    def metrics(self) -> dict[str, int]:
        return asdict(self.stats)

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.stats.writes += 1
        self.value = int.from_bytes(data, "little")
        self._on_exit(self.value)
