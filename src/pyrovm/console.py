"""The guest console as the host sees it: every byte kept in memory (a string, a stream, a pattern to
wait for), and copied to an optional sink (the terminal, a file)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

DEFAULT_LIMIT = 64 << 20


class ConsoleLog:
    """Console output of one VM.  Written by vCPU threads, read from any thread."""

    def __init__(self, sink: BinaryIO | None = None, limit: int = DEFAULT_LIMIT) -> None:
        self._buf = bytearray()
        self._dropped = 0
        self._limit = limit
        self._sink = sink
        self._cond = threading.Condition()
        self._closed = False
        self.first_byte_at: float | None = None

    def write(self, data: bytes) -> None:
        with self._cond:
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
            self._buf += data
            if len(self._buf) > self._limit:
                cut = len(self._buf) - self._limit // 2
                del self._buf[:cut]
                self._dropped += cut
            self._cond.notify_all()
        sink = self._sink
        if sink is not None:
            try:
                sink.write(data)
                sink.flush()
            except (OSError, ValueError):
                self._sink = None  # the terminal or file went away: keep the in-memory log

    def close(self) -> None:
        """No more output will come (the VM ended)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def data(self) -> bytes:
        """Everything kept so far (the oldest half is dropped past the limit)."""
        with self._cond:
            return bytes(self._buf)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def __str__(self) -> str:
        return self.text

    def wait_for(
        self, pattern: str | bytes | re.Pattern[bytes], timeout: float | None = None
    ) -> re.Match[bytes] | None:
        """Block until *pattern* appears in the output; None on timeout or when the VM ended without it."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf)
                if m is not None:
                    return m
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def stream(self, timeout: float | None = None) -> Iterator[bytes]:
        """Yield output as it arrives, from the beginning, until the VM ends (or *timeout* passes)."""
        pos = self._dropped
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while pos - self._dropped >= len(self._buf) and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(remaining)
                start = max(pos - self._dropped, 0)
                chunk = bytes(self._buf[start:])
                pos = self._dropped + len(self._buf)
                done = self._closed
            if chunk:
                yield chunk
            if done:
                return


#: A Linux panic line on the console; the VM ends with ExitReason.PANIC when the guest then resets or
#: stops, or PANIC_GRACE seconds later (the rest of the panic report is kept in the console log).
PANIC_RE = re.compile(rb"Kernel panic - not syncing")
PANIC_GRACE = 10.0
#: Console lines longer than this are scanned in pieces.
LINE_LIMIT = 4096


class ConsoleWatcher:
    """Feeds UART output to a :class:`ConsoleLog` and scans it line by line: the first line matching the
    boot marker sets :attr:`boot_marker_at`; a Linux panic line is reported to *on_panic* at once (the
    message) and to *on_panic_final* after :data:`PANIC_GRACE` seconds unless :meth:`cancel` came first."""

    def __init__(
        self,
        log: ConsoleLog,
        boot_marker: str | None = None,
        on_panic: Callable[[str], object] | None = None,
        on_panic_final: Callable[[str], object] | None = None,
    ) -> None:
        self.log = log
        self._marker = re.compile(boot_marker.encode()) if boot_marker else None
        self._on_panic = on_panic
        self._on_panic_final = on_panic_final
        self._line = bytearray()
        self._timer: threading.Timer | None = None
        self.boot_marker_at: float | None = None
        #: callables (time, line), called from a vCPU thread when the boot marker is seen
        self.on_boot_marker: list[Callable[[float, str], object]] = []
        self.panic_message: str | None = None

    def write(self, data: bytes) -> None:
        """UART output: into the log; whole lines also to the scanners."""
        self.log.write(data)
        line = self._line
        line += data
        if b"\n" in data or len(line) > LINE_LIMIT:
            self._line = bytearray()
            self._scan(bytes(line))

    def _scan(self, line: bytes) -> None:
        rx = self._marker
        if rx is not None and self.boot_marker_at is None and rx.search(line):
            self.boot_marker_at = now = time.monotonic()
            for cb in self.on_boot_marker:
                cb(now, line.decode("utf-8", "replace").rstrip())
        if self.panic_message is None and PANIC_RE.search(line):
            self.panic_message = message = line.decode("utf-8", "replace").strip()
            if self._on_panic is not None:
                self._on_panic(message)
            if self._on_panic_final is not None:
                timer = threading.Timer(PANIC_GRACE, self._on_panic_final, (message,))
                timer.daemon = True
                self._timer = timer
                timer.start()

    def cancel(self) -> None:
        """No more panic deadline (the VM ended)."""
        if self._timer is not None:
            self._timer.cancel()
