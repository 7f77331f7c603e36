"""A trace around one VM's life: what ``pyrovm trace`` and ``pyrovm run --trace`` do.

:meth:`TraceSession.start` opens the output (a bad path fails before anything runs), installs the
:class:`~pyrovm.trace.recorder.Recorder` and starts the kernel side (:mod:`~pyrovm.trace.tracefs`);
:meth:`TraceSession.attach` opens KVM's statistics of the built VM; :meth:`TraceSession.finish` (on every
exit path) removes the recorder, stops the kernel side, reads the statistics and writes the trace.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from ..kvm import system
from .kernel import KernelPaths
from .output import Trace
from .recorder import Recorder
from .tracefs import KernelTrace


class TraceSession:
    def __init__(self, out: IO[str], fmt: str, recorder: Recorder, kernel: KernelTrace | None) -> None:
        self.out, self.fmt, self.recorder, self.kernel = out, fmt, recorder, kernel
        self.kernel_reason: str | None = "not asked for (--no-kernel)" if kernel is None else None
        self._stats: list[tuple[str, Any]] = []
        self._done = False

    @classmethod
    def start(cls, output: str, fmt: str, max_exits: int, kernel: bool) -> TraceSession:
        """Begin recording (OSError when *output* cannot be written)."""
        out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
        session = cls(out, fmt, Recorder(max_exits), KernelTrace() if kernel else None)
        if session.kernel is not None:
            session.kernel_reason = session.kernel.start()
        system.set_tracer(session.recorder)
        return session

    def attach(self, vm: Any) -> None:
        """Open KVM's binary statistics of *vm* (a :class:`pyrovm.VM`) and its vCPUs, when the host has
        them (they stay readable after the VM is closed)."""
        try:
            from ..kvm.stats import StatsReader, open_stats_fd
        except ImportError:
            return
        kvm_vm = vm.machine.kvm_vm
        try:
            self._stats.append(("vm", StatsReader(open_stats_fd(kvm_vm.fd))))
            for vcpu in kvm_vm.vcpus:
                self._stats.append((f"vcpu{vcpu.id}", StatsReader(open_stats_fd(vcpu.fd))))
        except Exception:  # a host without binary stats: the trace says nothing of them
            self._close_stats()

    def _read_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for scope, reader in self._stats:
            try:
                values = reader.read()
            except Exception:
                continue
            out[scope] = {k: v for k, v in values.items() if isinstance(v, int)}
        return out

    def _close_stats(self) -> None:
        for _, reader in self._stats:
            reader.close()
        self._stats.clear()

    def finish(self) -> Trace:
        """Stop everything and write the trace (once; later calls return the same)."""
        system.set_tracer(None)
        events = []
        lost = 0
        if self.kernel is not None:
            events = self.kernel.stop()
            lost = self.kernel.lost
        trace = Trace(self.recorder, events, self.kernel_reason, lost, self._read_stats(), KernelPaths())
        self._close_stats()
        if not self._done:
            self._done = True
            try:
                trace.write(self.out, self.fmt)
                self.out.flush()
            finally:
                if self.out is not sys.stdout:
                    self.out.close()
        return trace
