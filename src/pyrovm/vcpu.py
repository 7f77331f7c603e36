"""The vCPU threads: each runs ``KVM_RUN`` in a loop and hands every exit to :func:`handle_exit`.

:func:`handle_exit` is pure (no KVM): port I/O and MMIO go to the buses, a read's answer goes back through
the :class:`Completer` (the vCPU), an interrupted run says so, and every other exit becomes a
:class:`Stop` that says why the VM ends.  :class:`VcpuThreads` owns the threads:

- **kick**: ``immediate_exit`` in each vCPU's ``kvm_run`` plus a signal to its thread, so a vCPU leaves
  ``KVM_RUN`` at once wherever it is (a pending port or MMIO read is completed first);
- **pause**: after a kick each vCPU parks at its next interrupted exit, out of ``KVM_RUN`` with its
  state consistent; :meth:`VcpuThreads.pause` returns once every live vCPU is parked, and
  :meth:`VcpuThreads.resume` lets them re-enter the guest where it was;
- **halt detection**: with the in-kernel irqchip ``hlt`` does not exit, so a monitor thread asks each
  vCPU every :data:`HALT_POLL_INTERVAL` seconds (through a kick) whether it sits in ``hlt`` with
  interrupts off; when all do, the VM has halted for good;
- **coalesced writes**: after every exit, before serving it, the writes KVM queued in its coalesced ring
  (:mod:`pyrovm.kvm.coalesced`) are served in order; the monitor serves those of a guest that went quiet
  every :data:`DRAIN_INTERVAL` seconds.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from . import kvm as k
from . import seccomp
from .devices.bus import Bus
from .errors import StateError
from .kvm import exits as ex
from .kvm.coalesced import CoalescedRing
from .memory import GuestMemory
from .result import ExitLatch, ExitReason

log = logging.getLogger(__name__)

#: Signal used to kick a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN + 1
HALT_POLL_INTERVAL = 0.5
#: How often the monitor serves writes left in KVM's coalesced ring when no vCPU exits (the longest a
#: polled console byte waits when the guest stops touching the UART after it)
DRAIN_INTERVAL = 0.02
RFLAGS_IF = 1 << 9


def _noop_handler(signum: int, frame: object) -> None:
    pass


def install_kick_handler() -> None:
    """Install the (no-op) handler of :data:`KICK_SIGNAL`: needed once per process, from the main thread,
    before vCPUs run (a signal with no handler would kill the process)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, _noop_handler)


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


@dataclass(slots=True)
class VcpuStats:
    """Exits of one vCPU to user space, by kind."""

    exits: int = 0
    io: int = 0
    mmio: int = 0
    interrupted: int = 0


class Completer(Protocol):
    """Where the answer to a guest read goes (a :class:`pyrovm.kvm.Vcpu`)."""

    def complete_io_in(self, data: bytes) -> None: ...

    def complete_mmio_read(self, data: bytes) -> None: ...


class Next(enum.Enum):
    """What the vCPU loop does after an exit that does not end the VM."""

    CONTINUE = "continue"  # re-enter the guest
    INTERRUPTED = "interrupted"  # a kick: look at pause and halt requests, then re-enter


@dataclass(frozen=True)
class Stop:
    """The exit ends the VM: *reason*, *message*; *crash*: report the vCPU's registers."""

    reason: ExitReason
    message: str
    crash: bool = False


def handle_exit(e: ex.VcpuExit, pio: Bus, mmio: Bus, vcpu: Completer, stats: VcpuStats) -> Next | Stop:
    """Serve one exit of ``KVM_RUN``; never touches KVM beyond *vcpu*'s completions."""
    stats.exits += 1
    t = type(e)
    if t is ex.IoOut:
        stats.io += 1
        out: ex.IoOut = e  # type: ignore[assignment]
        if out.count == 1:
            pio.write(out.port, out.data)
        else:
            port, size, data = out.port, out.size, out.data
            for off in range(0, len(data), size):
                pio.write(port, data[off : off + size])
        return Next.CONTINUE
    if t is ex.MmioWrite:
        stats.mmio += 1
        mw: ex.MmioWrite = e  # type: ignore[assignment]
        mmio.write(mw.addr, mw.data)
        return Next.CONTINUE
    if t is ex.MmioRead:
        stats.mmio += 1
        mr: ex.MmioRead = e  # type: ignore[assignment]
        vcpu.complete_mmio_read(mmio.read(mr.addr, mr.length))
        return Next.CONTINUE
    if t is ex.IoIn:
        stats.io += 1
        inp: ex.IoIn = e  # type: ignore[assignment]
        port, size = inp.port, inp.size
        vcpu.complete_io_in(b"".join(pio.read(port, size) for _ in range(inp.count)))
        return Next.CONTINUE
    if t is ex.Interrupted:
        stats.interrupted += 1
        return Next.INTERRUPTED
    return fatal_exit(e)


def fatal_exit(e: ex.VcpuExit) -> Stop:
    """The :class:`Stop` for an exit after which the vCPU cannot go on."""
    if isinstance(e, ex.Shutdown):
        return Stop(ExitReason.TRIPLE_FAULT, "triple fault (the vCPU shut down)", crash=True)
    if isinstance(e, ex.InternalError):
        extra = f", data {' '.join(hex(d) for d in e.data)}" if e.data else ""
        return Stop(ExitReason.INTERNAL_ERROR, f"KVM internal error: {e.description}{extra}", crash=True)
    if isinstance(e, ex.FailEntry):
        reason = e.hardware_entry_failure_reason
        return Stop(
            ExitReason.FAIL_ENTRY, f"KVM could not enter the guest (hardware reason {reason:#x})", crash=True
        )
    if isinstance(e, ex.SystemEvent):
        if e.type == k.constants.KVM_SYSTEM_EVENT_RESET:
            return Stop(ExitReason.RESET, "the guest reset the machine")
        if e.type == k.constants.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Stop(ExitReason.POWEROFF, "the guest powered off")
        return Stop(ExitReason.INTERNAL_ERROR, f"guest crash event (type {e.type})", crash=True)
    if isinstance(e, ex.Hlt):
        return Stop(ExitReason.HALTED, "the vCPU halted")
    return Stop(ExitReason.INTERNAL_ERROR, f"unhandled KVM exit {e}", crash=True)


def crash_state(vcpu: k.Vcpu, memory: GuestMemory) -> tuple[dict[str, int] | None, bytes | None]:
    """The vCPU's registers and the 16 bytes at its RIP (None where they cannot be read)."""
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except k.KvmError:
        return None, None
    state = {n: int(getattr(r, n)) for n, *_ in r._fields_}
    state.update(cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, efer=s.efer)
    linear = s.cs.base + r.rip
    gpa = vcpu.translate(linear) if s.cr0 & (1 << 31) else linear
    code = memory.read(gpa, 16) if gpa is not None and memory.contains(gpa, 16) else None
    return state, code


def is_halted(vcpu: k.Vcpu) -> bool:
    """True when *vcpu* sits in ``hlt`` with interrupts disabled (it can never wake up)."""
    try:
        if vcpu.get_mp_state() != k.constants.KVM_MP_STATE_HALTED:
            return False
        return not vcpu.get_regs().rflags & RFLAGS_IF
    except k.KvmError:
        return False


class VcpuThreads:
    """One thread per vCPU, plus the halt monitor; stops, pauses and resumes them."""

    def __init__(
        self,
        vcpus: list[k.Vcpu],
        pio: Bus,
        mmio: Bus,
        memory: GuestMemory,
        latch: ExitLatch,
        ring: CoalescedRing | None = None,
    ) -> None:
        self.vcpus = vcpus
        #: KVM's coalesced-write ring, emptied after every exit before the exit is served
        self.ring = ring
        self._pio, self._mmio, self._memory, self._latch = pio, mmio, memory, latch
        self.stats = [VcpuStats() for _ in vcpus]
        self._threads: list[threading.Thread] = []
        self._halted = [False] * len(vcpus)
        self._poll_seq = 0
        self._stopping = False
        self._stopped = threading.Event()  # wakes the monitor at once
        self._cond = threading.Condition()
        self._pause_requested = False
        self._parked = 0
        self._finished = 0  # vCPU threads that returned

    # -- life cycle --------------------------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the threads; with *paused* each parks before it first enters the guest."""
        if self._threads:
            raise StateError("the vCPUs are already running")
        if not kick_handler_installed():
            if threading.current_thread() is not threading.main_thread():
                raise StateError(
                    "pyrovm needs a handler for its vCPU kick signal: call pyrovm.install_kick_handler() "
                    "from the main thread before starting VMs in other threads"
                )
            install_kick_handler()
        self._pause_requested = paused
        for i, vcpu in enumerate(self.vcpus):
            self._threads.append(
                threading.Thread(target=self._run, args=(i, vcpu), name=f"vcpu{i}", daemon=True)
            )
        monitor = threading.Thread(target=self._monitor, name="vcpu-halt-monitor", daemon=True)
        for t in [*self._threads, monitor]:
            t.start()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Make every vCPU leave the guest for good (from any thread; returns at once)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stopped.set()
        self.kick_all()

    def join(self, timeout: float = 5.0) -> bool:
        """Wait for the vCPU threads to end, kicking them meanwhile; True when they all did."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        while True:
            alive = [t for t in self._threads if t.is_alive() and t.ident != me]
            if not alive:
                return True
            if time.monotonic() > deadline:
                return False
            self.kick_all()
            for t in alive:
                t.join(0.05)

    def kick_all(self) -> None:
        me = threading.get_ident()
        for vcpu, t in zip(self.vcpus, self._threads, strict=False):
            vcpu.request_immediate_exit()
            if t.ident is not None and t.ident != me and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # -- pause -------------------------------------------------------------------------------------------
    def pause(self, timeout: float = 5.0) -> None:
        """Return once every running vCPU is parked out of ``KVM_RUN``."""
        with self._cond:
            self._pause_requested = True
        self.kick_all()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._stopping or self._parked + self._finished >= len(self._threads), timeout
            )
            if not ok:
                self._pause_requested = False
                self._cond.notify_all()
                raise StateError(f"the vCPUs did not stop within {timeout} s")

    def resume(self) -> None:
        """Let parked vCPUs re-enter the guest where each left it."""
        with self._cond:
            self._pause_requested = False
            self._halted = [False] * len(self.vcpus)
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._pause_requested

    def _park(self) -> None:
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._stopping)
            self._parked -= 1

    # -- the threads -------------------------------------------------------------------------------------
    def _run(self, index: int, vcpu: k.Vcpu) -> None:
        try:
            seccomp.thread_role("vcpu", f"pyrovm-vcpu{index}")
            self._loop(index, vcpu)
        except Exception as exc:  # a bug in a device or in pyrovm: end the VM, report it
            log.exception("vCPU %d: VMM error", index)
            self._latch.finish(ExitReason.VMM_ERROR, f"vCPU {index}: {type(exc).__name__}: {exc}")
        finally:
            with self._cond:
                self._finished += 1
                self._cond.notify_all()

    def _loop(self, index: int, vcpu: k.Vcpu) -> None:
        pio, mmio, stats, run, ring = self._pio, self._mmio, self.stats[index], vcpu.run, self.ring
        seen_poll = 0
        if self._pause_requested and not self._stopping:  # started paused (a restored snapshot)
            self._park()
        while not self._stopping:
            e = run()
            if ring is not None and ring.pending():  # the guest's earlier writes first, in order
                ring.drain(pio.write, mmio.write)
            outcome = handle_exit(e, pio, mmio, vcpu, stats)
            if outcome is Next.CONTINUE:
                continue
            if outcome is Next.INTERRUPTED:
                if self._pause_requested and not self._stopping:
                    self._park()
                elif self._poll_seq != seen_poll and not self._stopping:
                    seen_poll = self._poll_seq
                    self._halted[index] = is_halted(vcpu)
                continue
            assert isinstance(outcome, Stop)
            self._report(index, vcpu, outcome)
            return

    def _report(self, index: int, vcpu: k.Vcpu, stop: Stop) -> None:
        if not stop.crash:
            message = f"vCPU {index} halted" if stop.reason is ExitReason.HALTED else stop.message
            self._latch.finish(stop.reason, message)
            return
        registers, code = crash_state(vcpu, self._memory)
        self._latch.finish(stop.reason, stop.message, vcpu=index, registers=registers, code_bytes=code)

    def drain(self) -> None:
        """Serve the writes left in the coalesced ring (from the monitor, or when the vCPUs are parked or
        gone); a device's failure ends the VM as on a vCPU thread."""
        if self.ring is None or not self.ring.pending():
            return
        try:
            self.ring.drain(self._pio.write, self._mmio.write)
        except Exception as exc:
            log.exception("coalesced writes: VMM error")
            self._latch.finish(ExitReason.VMM_ERROR, f"coalesced writes: {type(exc).__name__}: {exc}")

    def _monitor(self) -> None:
        """Ask the vCPUs now and then whether they all sit in ``hlt`` with interrupts off."""
        interval = DRAIN_INTERVAL if self.ring is not None else HALT_POLL_INTERVAL
        ticks = 0
        while not self._stopped.wait(interval):
            self.drain()  # (the writes of a guest that went quiet after them)
            ticks += 1
            if ticks * interval < HALT_POLL_INTERVAL:
                continue
            ticks = 0
            if self._pause_requested:
                continue
            if all(self._halted):
                self._latch.finish(ExitReason.HALTED, "every vCPU halted with interrupts disabled")
                return
            self._poll_seq += 1
            self.kick_all()
