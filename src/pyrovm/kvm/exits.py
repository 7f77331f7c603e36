"""Typed results of ``KVM_RUN``.

The exit objects for the frequent exits (port I/O and MMIO) are allocated once per vCPU and refilled on
every exit: an exit object is valid until the next :meth:`pyrovm.kvm.Vcpu.run` of the same vCPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class IoOut:
    """The guest wrote *data* (``size * count`` bytes, ``count > 1`` for ``rep outs``) to *port*."""

    port: int = 0
    size: int = 0
    count: int = 1
    data: bytes = b""


@dataclass(slots=True)
class IoIn:
    """The guest reads ``size * count`` bytes from *port*: answer with :meth:`Vcpu.complete_io_in`."""

    port: int = 0
    size: int = 0
    count: int = 1


@dataclass(slots=True)
class MmioWrite:
    """The guest wrote *data* to guest physical address *addr* that no memory slot backs."""

    addr: int = 0
    data: bytes = b""


@dataclass(slots=True)
class MmioRead:
    """The guest reads *length* bytes at *addr*: answer with :meth:`Vcpu.complete_mmio_read`."""

    addr: int = 0
    length: int = 0


@dataclass(slots=True, frozen=True)
class Hlt:
    """The vCPU executed ``hlt`` (only seen without an in-kernel local APIC)."""


@dataclass(slots=True, frozen=True)
class Shutdown:
    """The vCPU shut down: a triple fault, or a reset requested through the keyboard controller."""


@dataclass(slots=True, frozen=True)
class FailEntry:
    """KVM could not enter the guest (invalid vCPU state)."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True, frozen=True)
class InternalError:
    """KVM hit an internal error; suberror 1 is an instruction it could not emulate."""

    suberror: int
    data: tuple[int, ...] = field(default=())

    @property
    def description(self) -> str:
        return {
            1: "emulation failure",
            2: "exception while delivering an exception",
            3: "error while delivering an event",
            4: "unexpected exit reason",
        }.get(self.suberror, f"suberror {self.suberror}")


@dataclass(slots=True, frozen=True)
class SystemEvent:
    """A guest-requested system event (1 shutdown, 2 reset, 3 crash)."""

    type: int
    data: tuple[int, ...] = field(default=())


@dataclass(slots=True, frozen=True)
class Interrupted:
    """``KVM_RUN`` returned early: a signal (a kick) or ``immediate_exit``."""


@dataclass(slots=True, frozen=True)
class UnhandledExit:
    """Any other exit reason."""

    reason: int


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
