"""The guest console as the host sees it: every byte kept in memory (a string, a stream, a pattern to
wait for), and copied to an optional sink (the terminal, a file)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
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
