"""A minimal i8042 keyboard controller: enough for Linux to probe it and its AT keyboard, its reset line,
and keys typed by the host.

Command 0xFE on port 0x64 (pulse the reset line), or writing an output port value with bit 0 clear
(command 0xD1), asks the VMM to reset the machine: pyrovm ends the VM cleanly (``reboot=k``).
:meth:`I8042.ctrl_alt_del` types Ctrl-Alt-Del on the keyboard (Firecracker's ``SendCtrlAltDel``): scan
code set 2, or set 1 when the guest turned translation on; every byte waiting on port 0x60 raises IRQ 1
(an edge per byte, as the guest's handler reads one byte per interrupt).
State: :class:`I8042State` (:meth:`I8042.save_state` / :meth:`I8042.restore_state`); the reset count is
in :attr:`I8042.stats`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import IrqLevel

DATA = 0  # port 0x60
COMMAND = 4  # port 0x64

ST_OBF = 0x01
ST_SYS = 0x04
ST_CMD = 0x08
CTR_KBD_INT = 0x01
CTR_SYS = 0x04
CTR_XLATE = 0x40

#: Ctrl, Alt and Delete pressed, then released: scan code set 2 (what the keyboard sends) and set 1 (what
#: the controller passes on when translating).
CTRL_ALT_DEL_SET2 = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])
CTRL_ALT_DEL_SET1 = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])


@dataclass
class I8042State:
    """The controller's registers, its pending command and the bytes waiting on port 0x60."""

    ctr: int = CTR_KBD_INT | CTR_SYS
    status: int = ST_SYS
    pending_command: int = 0
    output: list[int] = field(default_factory=list)
    irq_level: bool = False


@dataclass
class I8042Metrics:
    """How many times the guest asked for a reset."""

    resets: int = 0
    keys_sent: int = 0


class I8042:
    """Ports 0x60 (data) and 0x64 (status/command); register with a length of 5 at 0x60."""

    def __init__(self, on_reset: Callable[[], None], irq: IrqLevel | None = None) -> None:
        self.state = I8042State()
        self.stats = I8042Metrics()
        self._on_reset = on_reset
        self._irq = irq or (lambda level: None)
        self._lock = threading.Lock()

    def save_state(self) -> I8042State:
        """A copy of the controller's state."""
        with self._lock:
            return copy.deepcopy(self.state)

    def restore_state(self, state: I8042State) -> None:
        """Load *state* (from :meth:`save_state`); the IRQ line is driven to the saved level."""
        with self._lock:
            self.state = copy.deepcopy(state)
            self._irq(state.irq_level)

    def ctrl_alt_del(self) -> None:
        """Type Ctrl-Alt-Del on the keyboard (the guest's keyboard driver decides what it does: Linux
        reboots)."""
        with self._lock:
            codes = CTRL_ALT_DEL_SET1 if self.state.ctr & CTR_XLATE else CTRL_ALT_DEL_SET2
            self.state.output += list(codes)
            self.stats.keys_sent += 3
            self._update_irq()

    def metrics(self) -> dict[str, int]:
        """``resets`` and ``keys_sent``."""
        return asdict(self.stats)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            st = self.state
            if offset == COMMAND:
                value = st.status | (ST_OBF if st.output else 0)
            elif offset == DATA:
                value = st.output.pop(0) if st.output else 0
                if st.output and st.irq_level:  # the next byte: a new edge
                    self._irq(False)
                    self._irq(True)
                self._update_irq()
            else:
                value = 0xFF
        return bytes((value,)) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        reset = False
        with self._lock:
            value = data[0]
            st = self.state
            if offset == COMMAND:
                st.status |= ST_CMD
                reset = self._command(value)
            elif offset == DATA:
                st.status &= ~ST_CMD
                cmd, st.pending_command = st.pending_command, 0
                if cmd == 0x60:
                    st.ctr = value
                elif cmd == 0xD1:
                    reset = not value & 1
                elif cmd in (0xD2, 0xD3):
                    self._reply(value)
                elif cmd == 0:
                    self._keyboard(value)
            self._update_irq()
        if reset:
            self.stats.resets += 1
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        st = self.state
        if cmd == 0x20:
            self._reply(st.ctr)
        elif cmd in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            st.pending_command = cmd
        elif cmd == 0xAA:
            self._reply(0x55)  # self-test passed
        elif cmd in (0xA9, 0xAB):
            self._reply(0x00)  # interface test passed
        elif cmd == 0xA7:
            st.ctr |= 0x20
        elif cmd == 0xA8:
            st.ctr &= ~0x20
        elif cmd == 0xAD:
            st.ctr |= 0x10
        elif cmd == 0xAE:
            st.ctr &= ~0x10
        elif cmd == 0xFE:
            return True
        return False

    def _keyboard(self, value: int) -> None:
        if value == 0xFF:  # reset: ACK + self-test passed
            self.state.output += [0xFA, 0xAA]
        elif value == 0xF2:  # identify: MF2 keyboard
            self.state.output += [0xFA, 0xAB, 0x83]
        else:
            self._reply(0xFA)

    def _reply(self, value: int) -> None:
        self.state.output.append(value)

    def _update_irq(self) -> None:
        level = bool(self.state.output) and bool(self.state.ctr & CTR_KBD_INT)
        if level != self.state.irq_level:
            self.state.irq_level = level
            self._irq(level)
