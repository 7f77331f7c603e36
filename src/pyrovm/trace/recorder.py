"""The user-space side of a trace: every KVM ioctl pyrovm issues, and the ``KVM_RUN`` exits.

A :class:`Recorder` is installed with :func:`pyrovm.kvm.system.set_tracer`: from then on each ioctl is
recorded as a :class:`Call` (monotonic time, thread, which fd: ``kvm``, ``vm`` or ``vcpuN``, the
ioctl's name, its arguments decoded by :mod:`pyrovm.trace.decode`, the result or the error, the
duration), and each vCPU created gets its ``KVM_RUN`` wrapped: the first ``max_exits`` exits are kept one
by one as :class:`Exit` records (time entered, time spent in the guest and the kernel, what the exit was),
and every exit is counted by kind.  When no recorder is installed nothing of this runs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..kvm import exits as e
from .decode import decode_args, decode_exit

#: ioctls made on the ``/dev/kvm`` fd (the fd is labelled ``kvm`` when it is first seen with one)
SYSTEM_IOCTLS = {
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_MSR_INDEX_LIST",
}

#: ioctls that, on an fd not labelled yet, show it is /dev/kvm's (KVM_CHECK_EXTENSION works on VM fds too,
#: but pyrovm checks on /dev/kvm before it has a VM)
_KVM_FD_IOCTLS = SYSTEM_IOCTLS | {"KVM_CHECK_EXTENSION"}


@dataclass
class Call:
    """One ioctl (or the open of the KVM device, ``name`` ``open``)."""

    t: int  # time.monotonic_ns() when it was made
    dur: int  # ns
    thread: str
    tid: int
    fd: str  # kvm, vm, vcpuN, or the fd number when not known
    name: str
    args: dict[str, Any]
    result: int | None
    error: str | None = None


@dataclass
class Exit:
    """One return from ``KVM_RUN``."""

    t: int  # when KVM_RUN was entered
    dur: int  # ns in KVM_RUN (the guest ran, then the kernel handled what it could)
    thread: str
    tid: int
    vcpu: int
    kind: str  # io_out, io_in, mmio_write, mmio_read, hlt, shutdown, intr, ...
    details: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Collects :class:`Call` and :class:`Exit` records (thread-safe: appends only)."""

    def __init__(self, max_exits: int = 50) -> None:
        self.max_exits = max_exits
        self.calls: list[Call] = []
        self.exits: list[Exit] = []
        self.exit_counts: Counter[tuple[int, str]] = Counter()
        #: exits by (kind, port or address) for port I/O and MMIO
        self.port_counts: Counter[tuple[str, str]] = Counter()
        self.labels: dict[int, str] = {}
        #: thread native id -> name, of every thread alive at the first exit (the I/O thread's kernel
        #: events then have a name too)
        self.threads: dict[int, str] = {}
        self.started = time.monotonic_ns()
        self._lock = threading.Lock()

    # -- hooks of pyrovm.kvm.system ----------------------------------------------------------------------
    def wrap_ioctl(self, ioctl: Callable[[int, int, object, str], int]) -> Callable[..., int]:
        def traced(fd: int, request: int, arg: object = 0, what: str = "") -> int:
            t0 = time.monotonic_ns()
            try:
                result = ioctl(fd, request, arg, what)
            except Exception as exc:
                self._call(t0, fd, what or hex(request), arg, None, str(exc))
                raise
            self._call(t0, fd, what or hex(request), arg, result, None)
            return result

        return traced

    def opened(self, fd: int, path: str) -> None:
        self.labels[fd] = "kvm"
        self._append(Call(time.monotonic_ns(), 0, *_thread(), "kvm", "open", {"path": path}, fd))

    def vcpu_created(self, vcpu: Any) -> None:
        """Wrap *vcpu*'s ``run`` (the instance attribute shadows the method) to record its exits."""
        plain = vcpu.run
        index = vcpu.id

        def run() -> e.VcpuExit:
            t0 = time.monotonic_ns()
            ex = plain()
            t1 = time.monotonic_ns()
            kind, details = decode_exit(ex)
            self.exit_counts[(index, kind)] += 1
            where = details.get("port") or details.get("addr")
            if where is not None:
                self.port_counts[(kind, where)] += 1
            if len(self.exits) < self.max_exits:
                self._append_exit(Exit(t0, t1 - t0, *_thread(), index, kind, details))
            return ex

        vcpu.run = run

    # -- records ---------------------------------------------------------------------------------------
    def _call(self, t0: int, fd: int, name: str, arg: object, result: int | None, error: str | None) -> None:
        dur = time.monotonic_ns() - t0
        label = self.labels.get(fd)
        if label is None and name in _KVM_FD_IOCTLS:
            label = self.labels[fd] = "kvm"
        if result is not None and name == "KVM_CREATE_VM":
            self.labels[result] = "vm"
        elif result is not None and name == "KVM_CREATE_VCPU":
            self.labels[result] = f"vcpu{arg}"
        args = decode_args(name, arg)
        self._append(Call(t0, dur, *_thread(), label or f"fd{fd}", name, args, result, error))

    def _append(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _append_exit(self, ex: Exit) -> None:
        if not self.threads:
            self.threads = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        with self._lock:
            if len(self.exits) < self.max_exits:
                self.exits.append(ex)

    def counts_by_kind(self) -> dict[str, int]:
        """Exits of every vCPU, by kind."""
        out: Counter[str] = Counter()
        for (_, kind), n in self.exit_counts.items():
            out[kind] += n
        return dict(out)


def _thread() -> tuple[str, int]:
    t = threading.current_thread()
    return t.name, t.native_id or 0
