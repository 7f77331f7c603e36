"""The kernel's own view of a VM: KVM's trace events, recorded for this process's threads only.

:class:`KernelTrace` works in a tracefs *instance* of its own (``instances/pyrovm-PID``: a separate
buffer, so other users of tracefs are not disturbed), mounting tracefs first when nothing has.  It sets
the instance's clock to ``mono`` (the clock of ``time.monotonic_ns()``, so kernel and pyrovm records merge
on one timeline), follows this process and every thread it creates (``set_event_pid`` with the
``event-fork`` option) and enables KVM's events.  :meth:`KernelTrace.stop` reads the buffer and removes the
instance, which turns the events off and frees the buffer.  A helper process holds a pipe to this one
and removes the instance when the pipe breaks, so a crash or a SIGKILL leaves nothing enabled either (and
a later trace removes instances of dead pyrovm processes).  Without root or tracefs, :meth:`start`
returns the reason in one line and the trace goes on without the kernel side.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EVENTS = (
    "kvm_entry",
    "kvm_exit",
    "kvm_userspace_exit",
    "kvm_pio",
    "kvm_mmio",
    "kvm_set_irq",
    "kvm_pic_set_irq",
    "kvm_ioapic_set_irq",
    "kvm_msi_set_irq",
    "kvm_apic_accept_irq",
    "kvm_inj_virq",
    "kvm_msr",
    "kvm_cpuid",
    "kvm_emulate_insn",
)
MOUNT_POINTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BUFFER_KB = 16384
_LINE = re.compile(
    r"^\s*(?P<comm>.*)-(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<details>.*)$"
)

# The watchdog: waits for EOF on stdin (this process ended, however), then removes the instance.
_WATCHDOG = """
import os, sys, time
sys.stdin.buffer.read()
inst, mounted = sys.argv[1], sys.argv[2]
if not os.path.isdir(inst):
    sys.exit(0)  # the trace ended normally and cleaned up itself
for _ in range(50):
    try:
        os.rmdir(inst)
        break
    except FileNotFoundError:
        break
    except OSError:
        time.sleep(0.1)
"""


@dataclass
class KernelEvent:
    """One line of the kernel's trace buffer."""

    t: int  # ns, CLOCK_MONOTONIC
    tid: int
    cpu: int
    event: str
    details: str


def _tracefs_mount() -> Path | None:
    try:
        with open("/proc/mounts", "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == b"tracefs":
                    return Path(parts[1].decode("latin-1"))
    except OSError:
        return None
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def parse_trace(text: str) -> list[KernelEvent]:
    """The events of a tracefs ``trace`` file's text (comment lines skipped)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            sec, _, frac = m.group("ts").partition(".")
            t = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
            out.append(
                KernelEvent(t, int(m.group("tid")), int(m.group("cpu")), m.group("event"), m.group("details"))
            )
    return out


class KernelTrace:
    """KVM's trace events of this process, in a tracefs instance of its own."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.instance: Path | None = None
        self.mounted: Path | None = None  # a mount this trace made (left mounted, as distributions do)
        self.lost = 0
        self._watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> str | None:
        """Start recording; None when it does, else the reason it cannot (one line)."""
        if os.geteuid() != 0:
            return "not root: the kernel's KVM trace events need root (tracefs)"
        root = _tracefs_mount() or self._mount()
        if root is None:
            return "tracefs is not mounted and could not be mounted here"
        if not (root / "events" / "kvm").is_dir():
            return f"{root} has no KVM trace events (a kernel without CONFIG_KVM tracepoints?)"
        remove_stale_instances(root)
        inst = root / "instances" / f"pyrovm-{self.pid}"
        try:
            inst.mkdir()
        except OSError as exc:
            return f"cannot make the tracefs instance {inst}: {exc.strerror}"
        self.instance = inst
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(inst), str(self.mounted or "")],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # (a Ctrl-C to pyrovm's group must not end it first)
        )
        try:
            self._configure(inst)
        except OSError as exc:
            self.stop()
            return f"cannot set up the tracefs instance: {exc.strerror}"
        return None

    def _mount(self) -> Path | None:
        for point in MOUNT_POINTS:
            if point.is_dir():
                r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(point)], capture_output=True)
                if r.returncode == 0:
                    self.mounted = point
                    return point
        return None

    def _configure(self, inst: Path) -> None:
        _write(inst / "tracing_on", "0")
        _write(inst / "trace_clock", "mono")
        _write(inst / "buffer_size_kb", str(BUFFER_KB))
        _write(inst / "options" / "event-fork", "1")
        _write(inst / "set_event_pid", str(self.pid))
        for event in EVENTS:
            enable = inst / "events" / "kvm" / event / "enable"
            if enable.exists():
                _write(enable, "1")
        _write(inst / "tracing_on", "1")

    def stop(self) -> list[KernelEvent]:
        """Stop, read what was recorded, remove the instance (events off, buffer freed).  Safe to call
        twice, and after a failed start."""
        events: list[KernelEvent] = []
        inst, self.instance = self.instance, None
        if inst is not None:
            try:
                _write(inst / "tracing_on", "0")
                text = (inst / "trace").read_text(errors="replace")
                events = parse_trace(text)
                self.lost = _lost_events(inst)
            except OSError:
                pass
            _remove(inst)
        if self._watchdog is not None:
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()  # EOF: the watchdog checks once more and ends
            self._watchdog.wait(10)
            self._watchdog = None
        return events


def _lost_events(inst: Path) -> int:
    lost = 0
    for stats in (inst / "per_cpu").glob("cpu*/stats"):
        for line in stats.read_text().splitlines():
            if line.startswith("overrun:"):
                lost += int(line.split()[1])
    return lost


def _remove(inst: Path) -> None:
    try:
        inst.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        _write(inst / "tracing_on", "0")


def remove_stale_instances(root: Path) -> list[str]:
    """Remove the instances of pyrovm processes that no longer run; returns their names."""
    removed = []
    for inst in (root / "instances").glob("pyrovm-*"):
        pid = inst.name.removeprefix("pyrovm-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove(inst)
            removed.append(inst.name)
    return removed
