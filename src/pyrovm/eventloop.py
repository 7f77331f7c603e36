"""The I/O thread: one ``selectors`` (epoll) loop for eventfds, timers and cross-thread calls.

The VMM registers eventfds with KVM (KVM_IOEVENTFD for virtqueue kicks, KVM_IRQFD for interrupts) and
adds the kick eventfds here with :meth:`EventLoop.add_reader`.  Callbacks run on the loop thread, one at
a time; an exception in a callback is logged and counted and the loop goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

from . import seccomp
from .errors import StateError

log = logging.getLogger(__name__)

Callback = Callable[[], None]

#: Exceptions after this many are counted but no longer logged.
MAX_LOGGED_ERRORS = 20


class EventFd:
    """A non-blocking, close-on-exec Linux eventfd."""

    def __init__(self, initval: int = 0) -> None:
        self.fd = os.eventfd(initval, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def write(self, n: int = 1) -> None:
        """Add *n* to the counter (wakes readers); an overflowing counter is left as it is."""
        try:
            os.eventfd_write(self.fd, n)
        except BlockingIOError:
            pass

    def read(self) -> int:
        """Take the counter (0 when nothing was written since the last read)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TimerHandle:
    """A pending :meth:`EventLoop.call_later`; :meth:`cancel` stops it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """An epoll loop on its own thread."""

    def __init__(self, name: str = "pyrovm-io") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wakeup = EventFd()
        self._selector.register(self._wakeup.fd, selectors.EVENT_READ, self._drain_wakeup)
        self._ready: deque[Callback] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._unpark = threading.Event()
        self._unpark.set()
        #: Exceptions raised by callbacks (logged, never fatal to the loop).
        self.errors = 0
        self.callbacks_run = 0

    # -- registration ----------------------------------------------------------------------------------
    def _in_loop(self) -> bool:
        return (
            self._thread is None or threading.current_thread() is self._thread or not self._thread.is_alive()
        )

    def _run_in_loop(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the loop thread and wait for it (directly when not running or already there)."""
        if self._in_loop():
            fn()
            return
        done = threading.Event()
        error: list[BaseException] = []

        def call() -> None:
            try:
                fn()
            except BaseException as e:
                error.append(e)
            finally:
                done.set()

        self.call_soon_threadsafe(call)
        while not done.wait(0.1):
            if self._thread is None or not self._thread.is_alive():  # loop stopped meanwhile
                fn()
                return
        if error:
            raise error[0]

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call *callback* (on the loop thread) whenever *fd* is readable; replaces an earlier callback."""

        def do() -> None:
            try:
                self._selector.modify(fd, selectors.EVENT_READ, callback)
            except KeyError:
                self._selector.register(fd, selectors.EVENT_READ, callback)

        self._run_in_loop(do)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching *fd*; True when it was watched.  Returns after the loop has let go of it."""
        removed: list[bool] = []

        def do() -> None:
            try:
                self._selector.unregister(fd)
                removed.append(True)
            except (KeyError, ValueError):
                removed.append(False)

        self._run_in_loop(do)
        return bool(removed and removed[0])

    def watch(self, fd: int, callback: Callback, *, read: bool, write: bool) -> None:
        """Call *callback* whenever *fd* is readable (*read*) or writable (*write*); neither: stop watching.

        Unlike :meth:`add_reader` it never waits: on the loop thread (or with the loop stopped) the change is
        made at once, from another thread it is queued for the loop thread, after earlier queued calls.
        Devices use it to follow their backend's readiness while holding locks the loop thread may want.
        """
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)

        def do() -> None:
            try:
                self._selector.get_key(fd)
                watched = True
            except (KeyError, ValueError):
                watched = False
            if not events:
                if watched:
                    self._selector.unregister(fd)
            elif watched:
                self._selector.modify(fd, events, callback)
            else:
                self._selector.register(fd, events, callback)

        if self._in_loop():
            do()
        else:
            self.call_soon_threadsafe(do)

    def call_soon_threadsafe(self, fn: Callback) -> None:
        """Run *fn* on the loop thread as soon as possible (from any thread)."""
        self._ready.append(fn)
        self._wakeup.write()

    def call_later(self, delay: float, fn: Callback) -> TimerHandle:
        """Run *fn* on the loop thread after *delay* seconds (from any thread)."""
        handle = TimerHandle(time.monotonic() + max(delay, 0.0), fn)
        with self._lock:
            heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        self._wakeup.write()
        return handle

    # -- running -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop and join its thread (pending timers are dropped)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._unpark.set()
        self._wakeup.write()
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: event loop thread did not stop within %s s", self.name, timeout)
                return
        self._thread = None

    def pause(self, timeout: float = 5.0) -> None:
        """Park the loop thread between two callbacks and return once it is parked: until :meth:`resume`,
        no callback runs (eventfds and timers that fire meanwhile are served after it).  Does nothing when
        the loop is not running or when called from the loop thread itself."""
        if not self.running or threading.current_thread() is self._thread or not self._unpark.is_set():
            return
        parked = threading.Event()
        self._unpark.clear()

        def park() -> None:
            parked.set()
            self._unpark.wait()

        self.call_soon_threadsafe(park)
        while not parked.wait(0.05):
            if not self.running:
                return
            if timeout <= 0:
                self._unpark.set()
                raise StateError(f"{self.name}: the I/O thread did not park")
            timeout -= 0.05

    def resume(self) -> None:
        """Let a paused loop go on."""
        self._unpark.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop the loop and close its selector and wake-up eventfd."""
        self.stop()
        self._selector.close()
        self._wakeup.close()

    def _drain_wakeup(self) -> None:
        self._wakeup.read()

    def _call(self, fn: Callback) -> None:
        try:
            fn()
        except Exception:
            self.errors += 1
            if self.errors <= MAX_LOGGED_ERRORS:
                log.exception("%s: exception in event loop callback %r", self.name, fn)
        finally:
            self.callbacks_run += 1

    def _next_timeout(self) -> float | None:
        if self._ready:
            return 0
        with self._lock:
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return None
            return max(self._timers[0][0] - time.monotonic(), 0)

    def _run(self) -> None:
        seccomp.thread_role("io")
        while not self._stopping:
            try:
                events = self._selector.select(self._next_timeout())
            except InterruptedError:
                continue
            fd_map = self._selector.get_map()
            for key, _ in events:
                if self._stopping:
                    break
                if fd_map.get(key.fd) is key:  # not removed by an earlier callback of this round
                    self._call(key.data)
            now = time.monotonic()
            due: list[TimerHandle] = []
            with self._lock:
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for handle in due:
                if not handle.cancelled and not self._stopping:
                    self._call(handle.callback)
            for _ in range(len(self._ready)):
                if self._stopping:
                    break
                self._call(self._ready.popleft())
