"""``pyrovm run`` from a parsed command line to an exit status: the VM's life under signals, the
terminal, boot timing and metrics files.

Signals reach a worker thread through a pipe (no work is done in a signal handler), and the thread acts:
``SIGUSR1`` writes the metrics file (atomically, one write at a time), ``SIGTERM``/``SIGHUP``/``SIGINT``
stop the VM (the first one; more are harmless).  The handlers stay installed to the end of the process,
so a signal at any moment (start-up, shutdown, a burst) never kills pyrovm half-way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import stat
import sys
import threading
from typing import TYPE_CHECKING, Any

from .errors import PyrovmError
from .result import ExitReason, VmExit

if TYPE_CHECKING:
    from .vmm import VM

log = logging.getLogger("pyrovm.run")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def write_metrics(vm: VM, path: str) -> bool:
    """Write *vm*'s metrics to *path* atomically (a private temporary file renamed over it; a character
    device such as ``/dev/null`` is written in place); False, with one error line logged and nothing left
    behind, when it cannot be written."""
    text = json.dumps(vm.metrics(), indent=2) + "\n"
    in_place = _is_device(path)
    target = path if in_place else f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(target, "w") as f:
            f.write(text)
        if not in_place:
            os.replace(target, path)
        return True
    except OSError as exc:
        log.error("cannot write metrics to %s: %s", path, exc.strerror or exc)
        if not in_place:
            try:
                os.unlink(target)
            except OSError:
                pass
        return False


def _is_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _quiet_race_hook(previous: Any) -> Any:
    """An unraisable hook that drops CPython's "Signal N ignored due to race condition" (a signal that
    came while its handler became SIG_IGN, which is what was meant) and passes on everything else."""

    def hook(info: Any) -> None:
        exc = info.exc_value
        if not (isinstance(exc, OSError) and "ignored due to race condition" in str(exc)):
            previous(info)

    return hook


class SignalWorker:
    """Receives signals through a pipe (:func:`signal.set_wakeup_fd`: the C-level handler writes the
    signal's number there) and acts on them in a thread of its own.  The Python-level handlers do nothing:
    nothing runs in a handler that a second signal could interrupt half-way (a lock, a write)."""

    def __init__(self, metrics_path: str | None) -> None:
        self.metrics_path = metrics_path
        self.stop_signal: int | None = None  # the first stop signal
        self.stopped_vm = False  # the VM ended because of it
        self._vm: VM | None = None
        self._metrics_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._done = False  # the command ended: no more metrics snapshots (the process is exiting)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._thread = threading.Thread(target=self._work, name="pyrovm-signals", daemon=True)

    def install(self) -> None:
        """From the main thread: route the signals here (until the process ends)."""
        signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGUSR1, *STOP_SIGNALS):
            signal.signal(sig, _ignore)
        self._thread.start()

    def ignore(self) -> None:
        """Nothing more to do: ignore the signals from now on (set as ignored, they stay so while Python
        shuts down, which puts the default action back on signals that have a Python handler)."""
        sys.unraisablehook = _quiet_race_hook(sys.unraisablehook)
        for sig in (signal.SIGUSR1, *STOP_SIGNALS):
            signal.signal(sig, signal.SIG_IGN)
        with self._metrics_lock:  # a snapshot being written is finished, none starts after
            self._done = True

    def attach(self, vm: VM) -> None:
        """The VM exists: signals from now on (and a stop signal that came before) act on it."""
        self._vm = vm
        try:
            os.write(self._wfd, b"\0")  # wake the worker (0 is no signal)
        except BlockingIOError:
            pass

    def write_metrics(self) -> None:
        vm = self._vm
        if vm is not None and self.metrics_path:
            with self._metrics_lock:
                if not self._done:
                    write_metrics(vm, self.metrics_path)

    def _work(self) -> None:
        while True:
            try:
                received = os.read(self._rfd, 4096)
            except InterruptedError:
                continue
            try:
                for signum in received:
                    if signum:
                        self._act(signum)
                if self.stop_signal is not None and self._vm is not None and not self.stopped_vm:
                    self._stop_vm(self._vm, self.stop_signal)
            except Exception:  # the worker must outlive any failure, or later signals would be lost
                log.exception("handling a signal failed")

    def _act(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            self.write_metrics()
        elif signum in STOP_SIGNALS and self.stop_signal is None:
            self.stop_signal = signum
        # any other number: a signal that has a Python handler of someone else (pyrovm's vCPU kick)

    def _stop_vm(self, vm: VM, signum: int) -> None:
        with self._stop_lock:
            if self.stopped_vm or vm.state == "created":
                return  # not started yet: :meth:`started` stops it right after it starts
            message = f"terminated by signal {signal.Signals(signum).name}"
            result = vm.stop(ExitReason.STOPPED, message)
            self.stopped_vm = result.message == message

    def started(self, vm: VM) -> None:
        """The VM was just started: stop it now if a stop signal came before."""
        if self.stop_signal is not None:
            self._stop_vm(vm, self.stop_signal)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: the work is done by :class:`SignalWorker`'s thread."""


class BootTiming:
    """``--boot-timer`` / ``--boot-marker``: times from process start, reported on stderr as they happen."""

    def __init__(self, vm: VM, timer: bool, start: float) -> None:
        self.vm = vm
        self.timer = timer
        self.start = start
        vm.on_boot_marker.append(self._marker)
        if timer:
            vm.on_boot_timer.append(self._timer)

    def _marker(self, when: float, line: str) -> None:
        since = when - self.start
        print(f"pyrovm: boot marker after {since:.3f} s: {line.strip()}", file=sys.stderr, flush=True)

    def _timer(self, when: float) -> None:
        print(
            f"pyrovm: boot timer after {when - self.start:.3f} s (guest wrote 123 to the boot-timer device)",
            file=sys.stderr,
            flush=True,
        )

    def report_end(self) -> None:
        vm = self.vm
        if vm.boot_marker_at is None:
            print("pyrovm: boot marker: no console line matched", file=sys.stderr)
        if self.timer and vm.boot_timer_at is None:
            print("pyrovm: boot timer: the guest never wrote 123 to the boot-timer device", file=sys.stderr)
        if vm.ended_at is not None:
            print(f"pyrovm: VM ended after {vm.ended_at - self.start:.3f} s", file=sys.stderr)


def run_vm(vm: VM, args: argparse.Namespace, signals: SignalWorker, started: float) -> int:
    """Run the built *vm* to its end; returns the exit status of ``pyrovm run``."""
    timing = BootTiming(vm, bool(args.boot_timer), started) if args.boot_timer or args.boot_marker else None
    terminal = None
    server = None
    try:
        if signals.stop_signal is not None:  # a stop signal came while the VM was being built
            return 128 + signals.stop_signal
        if getattr(args, "api_sock", None):
            try:
                server = _api_server(vm, args.api_sock)
            except PyrovmError as exc:
                print(f"pyrovm: {exc}", file=sys.stderr)
                return 2
        if args.console == "stdio":
            from .terminal import Terminal

            terminal = Terminal(vm.send_input, lambda: vm.stop(ExitReason.STOPPED, "quit (Ctrl-A x)"))
            terminal.start()
        vm.start()
        from . import seccomp

        if seccomp.enabled():  # the main thread's filter, now that the VM's threads have theirs
            seccomp.thread_role("main")
        signals.started(vm)
        result = vm.wait(vm.config.timeout)
    finally:
        if server is not None:
            server.close()
        if terminal is not None:
            terminal.stop()
        signals.write_metrics()
        vm.close()
    if timing is not None:
        timing.report_end()
    if signals.stop_signal is not None and (signals.stopped_vm or result.reason is ExitReason.STOPPED):
        return 128 + signals.stop_signal  # 130 (ExitCode.INTERRUPTED) for SIGINT
    return _report(vm, result, args)


def _api_server(vm: VM, path: str) -> Any:
    """The Firecracker-compatible API for *vm* on *path* (ConfigError when the path exists)."""
    from .api.controller import Controller
    from .api.server import ApiServer

    controller = Controller(vm.config.name)
    controller.vm = vm  # (the VM is this process's: closing the server leaves it alone)
    server = ApiServer(path, controller)
    server.start()
    return server


def _report(vm: VM, result: VmExit, args: argparse.Namespace) -> int:
    if args.console == "stdio" and vm.console.data and not vm.console.data.endswith(b"\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    quiet = (ExitReason.EXIT_PORT, ExitReason.RESET, ExitReason.POWEROFF, ExitReason.STOPPED)
    if result.reason not in quiet or args.verbose:
        print(f"pyrovm: {result.describe()}", file=sys.stderr)
    return result.exit_code
