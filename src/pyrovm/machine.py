"""A built VM: :class:`Machine` runs it (:meth:`~Machine.start`, :meth:`~Machine.pause`,
:meth:`~Machine.resume`, :meth:`~Machine.stop`, :meth:`~Machine.wait`), says how it ended
(:attr:`~Machine.result`) and counts what happened (:meth:`~Machine.metrics`).

Machines come from :func:`pyrovm.builder.build`; everything they hold (KVM fds, guest memory, devices,
disk images and their locks, the console file) is released by :meth:`Machine.close`, in the reverse order
it was acquired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from typing import Any

from . import kvm as k
from .arch.x86.boot import BootSetup
from .config import VmConfig
from .console import ConsoleLog, ConsoleWatcher
from .device_manager import DeviceManager, PlatformHooks
from .errors import StateError
from .kvm.coalesced import CoalescedRing
from .memory import GuestMemory
from .result import ExitLatch, ExitReason, VmExit
from .vcpu import VcpuThreads

log = logging.getLogger(__name__)

#: How long :meth:`Machine.pause` waits for the vCPUs and the I/O thread to park.
PAUSE_TIMEOUT = 5.0


class MachineEvents:
    """What devices and the console report, gathered before the machine exists: the exit latch, the
    console watcher (boot marker, panic) and the boot-timer device's time."""

    def __init__(self, console: ConsoleLog, boot_marker: str | None = None) -> None:
        self.latch = ExitLatch()
        self.watcher = ConsoleWatcher(
            console, boot_marker, on_panic=self.latch.note_panic, on_panic_final=self._panic_deadline
        )
        self.boot_timer_at: float | None = None
        #: callables (time,), called from a vCPU thread at the first write of 123 to the boot timer
        self.on_boot_timer: list[Any] = []

    def hooks(self) -> PlatformHooks:
        return PlatformHooks(self.watcher.write, self._reset, self._exit_port, self._boot_timer)

    def _reset(self) -> None:
        self.latch.finish(ExitReason.RESET, "the guest reset the machine")

    def _exit_port(self, value: int) -> None:
        message = f"the guest wrote {value} to the exit port"
        self.latch.finish(ExitReason.EXIT_PORT, message, guest_status=value)

    def _panic_deadline(self, message: str) -> None:
        self.latch.finish(ExitReason.PANIC, message)

    def _boot_timer(self, when: float) -> None:
        self.boot_timer_at = when
        for cb in self.on_boot_timer:
            cb(when)


@dataclasses.dataclass
class MachineParts:
    """What the builder made (the machine takes ownership of *resources*, an ExitStack)."""

    config: VmConfig
    kvm: k.Kvm
    kvm_vm: k.Vm
    memory: GuestMemory
    devices: DeviceManager
    vcpus: list[k.Vcpu]
    boot: BootSetup
    console: ConsoleLog
    events: MachineEvents
    resources: contextlib.ExitStack
    host_workarounds_applied: bool = False
    restored: bool = False
    kvm_stats: list[Any] = dataclasses.field(default_factory=list)  # pyrovm.kvm.stats.StatsReader
    coalesced: CoalescedRing | None = None  # KVM's ring of queued writes, when the VM uses it


class Machine:
    """A VM that has been built: start it, pause and resume it, stop it, wait for it, close it."""

    def __init__(self, parts: MachineParts) -> None:
        self.config = parts.config
        self.kvm = parts.kvm
        self.kvm_vm = parts.kvm_vm
        self.memory = parts.memory
        self.devices = parts.devices
        self.boot = parts.boot
        self.console = parts.console
        self.events = parts.events
        self.host_workarounds_applied = parts.host_workarounds_applied
        #: True when built from a snapshot (:func:`pyrovm.builder.restore`)
        self.restored = parts.restored
        #: KVM's binary statistics of the VM and its vCPUs (``StatsReader``; empty on old kernels)
        self.kvm_stats = parts.kvm_stats
        #: True once the guest memory has a base file a diff snapshot can apply to (a snapshot was taken,
        #: or the machine was restored from one)
        self.has_snapshot_base = parts.restored
        self.vcpu_threads = VcpuThreads(
            parts.vcpus,
            parts.devices.pio_bus,
            parts.devices.mmio_bus,
            parts.memory,
            parts.events.latch,
            parts.coalesced,
        )
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._done = threading.Event()
        self._lock = threading.RLock()
        self._paused = False
        # released by close(), or when the machine is garbage; not at interpreter exit, where vCPU threads
        # of a VM nobody closed may still be in KVM_RUN (the process's end releases everything anyway)
        self._release = weakref.finalize(self, parts.resources.close)
        self._release.atexit = False
        parts.events.latch.listeners.append(self._on_exit)

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def result(self) -> VmExit | None:
        """How the VM ended, or None while it runs."""
        return self.events.latch.exit if self._done.is_set() else None

    @property
    def state(self) -> str:
        """``created``, ``running``, ``paused`` or ``stopped``."""
        if self.events.latch.exit is not None:
            return "stopped"
        if not self.vcpu_threads.started:
            return "created"
        return "paused" if self._paused else "running"

    @property
    def running(self) -> bool:
        return self.vcpu_threads.started and not self._done.is_set()

    @property
    def paused(self) -> bool:
        return self._paused and not self._done.is_set()

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, paused: bool = False) -> Machine:
        """Start the I/O thread and the vCPU threads (returns at once); with *paused* nothing runs until
        :meth:`resume`.  A machine restored from a snapshot continues where the snapshot was taken."""
        with self._lock:
            if self.vcpu_threads.started or self._done.is_set():
                raise StateError("the VM was already started")
            if not self._release.alive:
                raise StateError("the VM was closed")
            self.started_at = time.monotonic()
            self.devices.start()
            if paused:
                self.devices.pause()
            if self.restored:
                self.devices.after_restore()
            self.vcpu_threads.start(paused=paused)
            self._paused = paused
        return self

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Return once every vCPU is out of ``KVM_RUN`` and parked and the I/O thread no longer touches
        guest memory or queues.  Pausing a paused VM does nothing."""
        with self._lock:
            self._require_running("pause")
            if self._paused:
                return
            self.vcpu_threads.pause(timeout)
            self.vcpu_threads.drain()  # (the devices' state is then complete: a snapshot sees it)
            self.devices.pause()
            self._paused = True
            log.info("VM paused")

    def resume(self) -> None:
        """Let a paused VM continue exactly where it was.  Resuming a running VM does nothing."""
        with self._lock:
            self._require_running("resume")
            if not self._paused:
                return
            self.devices.resume()
            self.vcpu_threads.resume()
            self._paused = False
            log.info("VM resumed")

    def snapshot(
        self,
        state_path: str | os.PathLike[str],
        mem_path: str | os.PathLike[str],
        diff: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """Save the paused VM to a state file and a memory file (see :mod:`pyrovm.snapshot`); returns a
        :class:`pyrovm.snapshot.SnapshotInfo`.  *diff*: only the pages written since the last snapshot
        (needs ``track_dirty_pages``)."""
        from .snapshot import take_snapshot

        with self._lock:
            self._require_running("snapshot")
            if not self._paused:
                raise StateError("pause the VM before taking a snapshot")
            return take_snapshot(self, state_path, mem_path, diff=diff, extra=extra)

    def _require_running(self, what: str) -> None:
        if not self.vcpu_threads.started:
            raise StateError(f"cannot {what} a VM that was not started")
        if self.events.latch.exit is not None:
            raise StateError(f"cannot {what} a VM that has ended ({self.events.latch.exit.reason.value})")

    def stop(self, reason: ExitReason = ExitReason.STOPPED, message: str = "stopped by the host") -> VmExit:
        """End the VM from any thread; returns how it ended (another reason may have come first)."""
        self.events.latch.finish(reason, message)
        self._done.wait(10)
        result = self.events.latch.exit
        assert result is not None
        return result

    def wait(self, timeout: float | None = None) -> VmExit:
        """Block until the VM ends; on *timeout* stop it and return a ``timeout`` result."""
        if not self.vcpu_threads.started:
            raise StateError("the VM was not started")
        if timeout is not None and timeout > threading.TIMEOUT_MAX:
            timeout = None  # longer than any wait can be: no limit
        if not self._done.wait(timeout):
            self.events.latch.finish(ExitReason.TIMEOUT, f"no exit within {timeout} s")
            self._done.wait(10)
        result = self.events.latch.exit
        assert result is not None
        return result

    def _on_exit(self, result: VmExit) -> None:
        """The VM ends (called once, from the thread that decided it): stop every thread."""
        self.ended_at = time.monotonic()
        self.events.watcher.cancel()
        self.vcpu_threads.stop()
        threading.Thread(target=self._reap, name="vm-reaper", daemon=True).start()

    def _reap(self) -> None:
        if not self.vcpu_threads.join(5.0):
            log.error("vCPU threads did not stop within 5 s")
        else:
            self.vcpu_threads.drain()  # the guest's last queued output
        self.console.close()
        self._done.set()

    def close(self) -> None:
        """Stop if running, then release everything the VM holds (safe to call twice)."""
        if self.vcpu_threads.started and not self._done.is_set():
            self.stop()
        if self.vcpu_threads.alive():
            log.error("vCPU threads still running: leaving the VM's file descriptors open")
            return
        self.events.watcher.cancel()
        self._release()

    @property
    def closed(self) -> bool:
        return not self._release.alive

    # -- input and counters ----------------------------------------------------------------------------
    def send_input(self, data: bytes) -> None:
        """Type *data* on the serial console."""
        self.devices.send_input(data)

    def exit_counts(self) -> dict[str, int]:
        """vCPU exits to user space, summed over vCPUs, by kind, and the guest writes served from KVM's
        coalesced ring (``coalesced``: each would have been an exit without it)."""
        stats = self.vcpu_threads.stats
        counts = {
            name: sum(getattr(s, name) for s in stats) for name in ("exits", "io", "mmio", "interrupted")
        }
        ring = self.vcpu_threads.ring
        counts["coalesced"] = 0 if ring is None else ring.drained
        return counts

    def metrics(self) -> dict[str, object]:
        """Counters: how it ended, vCPU exits, per-device requests/bytes/errors/interrupts."""
        result = self.result
        end = self.ended_at or time.monotonic()
        return {
            "state": self.state,
            "exit": None if result is None else result.to_json(),
            "uptime_s": None if self.started_at is None else end - self.started_at,
            "vcpus": [dataclasses.asdict(s) for s in self.vcpu_threads.stats],
            "vcpu_exits": self.exit_counts(),
            "devices": self.devices.metrics(),
            **self.devices.platform_metrics(),
            **self._kvm_stats(),
        }

    def _kvm_stats(self) -> dict[str, object]:
        if not self.kvm_stats or self.closed:
            return {}
        from .kvm.stats import StatsError, stats_snapshot

        try:
            return {"kvm_stats": stats_snapshot(self.kvm_stats)}
        except (OSError, StatsError):
            return {}
