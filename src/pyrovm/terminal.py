"""The interactive serial console of ``pyrovm run --console stdio``: host keystrokes to the guest's UART.

When stdin is a terminal it is put in raw mode (no echo, no line editing, Ctrl-C goes to the guest) and
every byte is forwarded; **Ctrl-A x** ends the VM (as in QEMU) and **Ctrl-A Ctrl-A** sends one Ctrl-A.  The
terminal's attributes are restored on every way out: the ``with`` block ending normally or by an exception,
SIGTERM/SIGHUP (the CLI turns them into a VM stop), and, as a last resort, at interpreter exit.

When stdin is not a terminal (a pipe, a file), its bytes are forwarded as they come, unchanged, with no
escape key; at its end forwarding stops and the VM runs on.
"""

from __future__ import annotations

import atexit
import os
import select
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

CTRL_A = 0x01
QUIT_KEY = ord("x")
HELP_KEY = ord("h")
HELP_TEXT = b"\r\n[pyrovm] Ctrl-A x: quit, Ctrl-A Ctrl-A: send Ctrl-A, Ctrl-A h: this help\r\n"


class EscapeDecoder:
    """Splits terminal input into bytes for the guest and the Ctrl-A commands (a pure state machine)."""

    def __init__(self) -> None:
        self.pending = False  # the last byte was an unpaired Ctrl-A

    def feed(self, data: bytes) -> tuple[bytes, list[int]]:
        """Returns the bytes to forward and the command keys seen (e.g. ``[ord('x')]``)."""
        out = bytearray()
        commands: list[int] = []
        for b in data:
            if self.pending:
                self.pending = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (QUIT_KEY, ord("X"), HELP_KEY):
                    commands.append(b | 0x20)
                else:  # not a command: pass both through
                    out += bytes((CTRL_A, b))
            elif b == CTRL_A:
                self.pending = True
            else:
                out.append(b)
        return bytes(out), commands


class Terminal:
    """Forward *fd* (stdin) to *send* from a thread; *on_quit* is called on Ctrl-A x (terminal only).

    Use as a context manager: raw mode (on a TTY) starts on entry, and the terminal is restored on exit.
    """

    def __init__(
        self,
        send: Callable[[bytes], object],
        on_quit: Callable[[], object],
        fd: int = 0,
        out: Callable[[bytes], object] | None = None,
    ) -> None:
        self._send = send
        self._on_quit = on_quit
        self.fd = fd
        self._out = out
        self.is_tty = os.isatty(fd)
        self._saved: list[Any] | None = None
        self._decoder = EscapeDecoder()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.eof = False

    # -- terminal mode ---------------------------------------------------------------------------------
    def _enter_raw(self) -> None:
        if not self.is_tty:
            return
        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent, safe from any thread or signal handler)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass
            atexit.unregister(self.restore)

    # -- forwarding ------------------------------------------------------------------------------------
    def start(self) -> Terminal:
        self._enter_raw()
        self._thread = threading.Thread(target=self._loop, name="console-input", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        fd = self.fd
        while not self._stopped:
            try:
                ready, _, _ = select.select([fd, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready or self._stopped:
                return
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            if not self.is_tty:
                self._send(data)
                continue
            forward, commands = self._decoder.feed(data)
            if forward:
                self._send(forward)
            for cmd in commands:
                if cmd == QUIT_KEY:
                    self._stopped = True
                    self._on_quit()
                    return
                if cmd == HELP_KEY and self._out is not None:
                    self._out(HELP_TEXT)

    def stop(self) -> None:
        """Stop forwarding and restore the terminal."""
        self._stopped = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(1)
        self.restore()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Terminal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
