"""Typed results of ``KVM_RUN``.

The exit objects for the frequent exits (port I/O and MMIO) are allocated once per vCPU and refilled on
every exit: an exit object is valid until the next :meth:`pyrovm.kvm.Vcpu.run` of the same vCPU.
"""

from __future__ import annotations


class _Exit:
    """Plain slotted classes (not dataclasses: 11 of them cost start-up ~5 ms to make): positional or
    keyword fields in ``__slots__`` order, equality and repr by field."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, n) for n in self.__slots__)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class IoOut(_Exit):
    """The guest wrote *data* (``size * count`` bytes, ``count > 1`` for ``rep outs``) to *port*."""

    __slots__ = ("count", "data", "port", "size")

    def __init__(self, port: int = 0, size: int = 0, count: int = 1, data: bytes = b"") -> None:
        self.port, self.size, self.count, self.data = port, size, count, data


class IoIn(_Exit):
    """The guest reads ``size * count`` bytes from *port*: answer with :meth:`Vcpu.complete_io_in`."""

    __slots__ = ("count", "port", "size")

    def __init__(self, port: int = 0, size: int = 0, count: int = 1) -> None:
        self.port, self.size, self.count = port, size, count


class MmioWrite(_Exit):
    """The guest wrote *data* to guest physical address *addr* that no memory slot backs."""

    __slots__ = ("addr", "data")

    def __init__(self, addr: int = 0, data: bytes = b"") -> None:
        self.addr, self.data = addr, data


class MmioRead(_Exit):
    """The guest reads *length* bytes at *addr*: answer with :meth:`Vcpu.complete_mmio_read`."""

    __slots__ = ("addr", "length")

    def __init__(self, addr: int = 0, length: int = 0) -> None:
        self.addr, self.length = addr, length


class Hlt(_Exit):
    """The vCPU executed ``hlt`` (only seen without an in-kernel local APIC)."""

    __slots__ = ()


class Shutdown(_Exit):
    """The vCPU shut down: a triple fault, or a reset requested through the keyboard controller."""

    __slots__ = ()


class FailEntry(_Exit):
    """KVM could not enter the guest (invalid vCPU state)."""

    __slots__ = ("cpu", "hardware_entry_failure_reason")

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason, self.cpu = hardware_entry_failure_reason, cpu


class InternalError(_Exit):
    """KVM hit an internal error; suberror 1 is an instruction it could not emulate."""

    __slots__ = ("data", "suberror")

    def __init__(self, suberror: int, data: tuple[int, ...] = ()) -> None:
        self.suberror, self.data = suberror, data

    @property
    def description(self) -> str:
        return {
            1: "emulation failure",
            2: "exception while delivering an exception",
            3: "error while delivering an event",
            4: "unexpected exit reason",
        }.get(self.suberror, f"suberror {self.suberror}")


class SystemEvent(_Exit):
    """A guest-requested system event (1 shutdown, 2 reset, 3 crash)."""

    __slots__ = ("data", "type")

    def __init__(self, type: int, data: tuple[int, ...] = ()) -> None:
        self.type, self.data = type, data


class Interrupted(_Exit):
    """``KVM_RUN`` returned early: a signal (a kick) or ``immediate_exit``."""

    __slots__ = ()


class UnhandledExit(_Exit):
    """Any other exit reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


VcpuExit = (
    IoOut
    | IoIn
    | MmioWrite
    | MmioRead
    | Hlt
    | Shutdown
    | FailEntry
    | InternalError
    | SystemEvent
    | Interrupted
    | UnhandledExit
)

INTERRUPTED = Interrupted()
HLT = Hlt()
SHUTDOWN = Shutdown()
