"""How a VM ends: :class:`ExitReason`, the exit statuses of ``pyrovm run`` (:class:`ExitCode`), the
report (:class:`VmExit`) and :class:`ExitLatch`, which keeps the first reason given from any thread."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass


class ExitReason(enum.Enum):
    """Why a VM ended."""

    EXIT_PORT = "exit-port"  # the guest wrote its status to the exit port (0xf4)
    RESET = "reset"  # reset through the i8042 or a KVM reset event (Linux reboot=k)
    POWEROFF = "poweroff"  # KVM shutdown system event
    HALTED = "halted"  # every vCPU halted with interrupts disabled
    STOPPED = "stopped"  # the host called stop()
    TIMEOUT = "timeout"  # the host's time limit ran out
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN
    INTERNAL_ERROR = "internal-error"  # KVM could not go on (e.g. emulation failure)
    FAIL_ENTRY = "fail-entry"  # KVM could not enter the guest
    PANIC = "panic"  # the guest kernel panicked (seen on its console)
    VMM_ERROR = "vmm-error"  # a bug or I/O error in pyrovm itself


class ExitCode(enum.IntEnum):
    """Exit statuses of ``pyrovm run`` other than the exit port's ``(v << 1) | 1`` (always odd)."""

    OK = 0
    BAD_INPUT = 2
    CRASH = 4  # the guest crashed
    PANIC = 6
    INTERNAL_ERROR = 8  # pyrovm itself failed (a bug, an I/O error of the VMM)
    TIMEOUT = 124
    INTERRUPTED = 130  # SIGINT; other stop signals give 128 + their number


CODES = {
    ExitReason.RESET: ExitCode.OK,
    ExitReason.POWEROFF: ExitCode.OK,
    ExitReason.HALTED: ExitCode.OK,
    ExitReason.STOPPED: ExitCode.OK,
    ExitReason.TIMEOUT: ExitCode.TIMEOUT,
    ExitReason.PANIC: ExitCode.PANIC,
    ExitReason.TRIPLE_FAULT: ExitCode.CRASH,
    ExitReason.INTERNAL_ERROR: ExitCode.CRASH,
    ExitReason.FAIL_ENTRY: ExitCode.CRASH,
    ExitReason.VMM_ERROR: ExitCode.INTERNAL_ERROR,
}

#: Reasons that still win when the guest panicked before (the host's own decisions and pyrovm bugs).
_OVER_PANIC = (ExitReason.PANIC, ExitReason.STOPPED, ExitReason.TIMEOUT, ExitReason.VMM_ERROR)


@dataclass
class VmExit:
    """How the VM ended."""

    reason: ExitReason
    exit_code: int
    guest_status: int | None = None  # value written to the exit port
    message: str = ""
    vcpu: int | None = None
    registers: dict[str, int] | None = None
    code_bytes: bytes | None = None  # bytes at the faulting RIP, when they could be read

    @property
    def crashed(self) -> bool:
        return self.exit_code == ExitCode.CRASH

    def describe(self) -> str:
        """A human-readable report (several lines when registers are known)."""
        text = f"{self.reason.value}: {self.message}" if self.message else self.reason.value
        if self.registers:
            r = self.registers
            control = ("cr0", "cr2", "cr3", "cr4", "efer")
            names = [n for n in r if n not in control]
            rows = [" ".join(f"{n}={r[n]:#018x}" for n in names[i : i + 4]) for i in range(0, len(names), 4)]
            rows.append(" ".join(f"{n}={r[n]:#x}" for n in control if n in r))
            text += f"\n  vCPU {self.vcpu} registers:\n    " + "\n    ".join(rows)
        if self.code_bytes is not None:
            text += f"\n  code at rip: {self.code_bytes.hex(' ')}"
        elif self.registers:
            text += "\n  code at rip: not in guest RAM"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "reason": self.reason.value,
            "exit_code": self.exit_code,
            "guest_status": self.guest_status,
            "message": self.message,
        }


class ExitLatch:
    """Records the first reason the VM ends for, from any thread, and tells the listeners once.

    A panic seen on the console (:meth:`note_panic`) turns a later reset, halt or crash into
    :attr:`ExitReason.PANIC` (the guest panicked, then rebooted as ``panic=-1`` asks).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exit: VmExit | None = None
        self.panic_message: str | None = None
        self.listeners: list[Callable[[VmExit], None]] = []

    @property
    def exit(self) -> VmExit | None:
        return self._exit

    def note_panic(self, message: str) -> None:
        with self._lock:
            if self.panic_message is None:
                self.panic_message = message

    def finish(
        self,
        reason: ExitReason,
        message: str = "",
        *,
        guest_status: int | None = None,
        vcpu: int | None = None,
        registers: dict[str, int] | None = None,
        code_bytes: bytes | None = None,
    ) -> bool:
        """Record why the VM ends; True when this call was the first (the listeners were told)."""
        with self._lock:
            if self._exit is not None:
                return False
            if self.panic_message is not None and reason not in _OVER_PANIC:
                message = f"{self.panic_message} (then: {message or reason.value})"
                reason = ExitReason.PANIC
            if reason is ExitReason.EXIT_PORT and guest_status is not None:
                code = ((guest_status << 1) | 1) & 0xFF
            else:
                code = int(CODES[reason])
            result = VmExit(reason, code, guest_status, message, vcpu, registers, code_bytes)
            self._exit = result
        for listener in list(self.listeners):
            listener(result)
        return True
