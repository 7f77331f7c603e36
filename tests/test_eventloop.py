"""The I/O thread: eventfds, readers, timers, cross-thread calls, errors, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pyrovm.eventloop import EventFd, EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    lp.start()
    yield lp
    lp.close()


def wait_for(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def test_eventfd_basics() -> None:
    with EventFd() as efd:
        assert efd.read() == 0  # non-blocking
        efd.write()
        efd.write(4)
        assert efd.read() == 5
        assert efd.read() == 0
    assert efd.fd == -1


def test_eventfd_wakes_reader(loop: EventLoop) -> None:
    efd = EventFd()
    seen: list[int] = []
    thread_names: list[str] = []

    def cb() -> None:
        seen.append(efd.read())
        thread_names.append(threading.current_thread().name)

    loop.add_reader(efd.fd, cb)
    efd.write(3)
    assert wait_for(lambda: seen == [3])
    efd.write()
    assert wait_for(lambda: seen == [3, 1])
    assert thread_names[0] == loop.name
    assert loop.remove_reader(efd.fd)
    assert not loop.remove_reader(efd.fd)
    efd.write()
    time.sleep(0.05)
    assert seen == [3, 1]
    efd.close()


def test_add_reader_before_start() -> None:
    lp = EventLoop()
    efd = EventFd()
    hits: list[int] = []
    lp.add_reader(efd.fd, lambda: hits.append(efd.read()))
    efd.write()
    lp.start()
    try:
        assert wait_for(lambda: hits == [1])
    finally:
        lp.close()
        efd.close()


def test_call_later_order(loop: EventLoop) -> None:
    order: list[str] = []
    t0 = time.monotonic()
    loop.call_later(0.08, lambda: order.append("late"))
    loop.call_later(0.02, lambda: order.append("early"))
    cancelled = loop.call_later(0.05, lambda: order.append("cancelled"))
    cancelled.cancel()
    assert wait_for(lambda: len(order) == 2)
    assert order == ["early", "late"]
    assert time.monotonic() - t0 >= 0.08
    time.sleep(0.05)
    assert order == ["early", "late"]


def test_call_soon_threadsafe(loop: EventLoop) -> None:
    got: list[str] = []
    for i in range(100):
        loop.call_soon_threadsafe(lambda i=i: got.append(threading.current_thread().name + str(i)))
    assert wait_for(lambda: len(got) == 100)
    assert got[0] == loop.name + "0" and got[-1] == loop.name + "99"


def test_exception_in_callback_does_not_kill_loop(loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    efd = EventFd()

    def bad_reader() -> None:
        efd.read()
        raise ValueError("bad reader")

    loop.add_reader(efd.fd, bad_reader)
    loop.call_soon_threadsafe(boom)
    loop.call_later(0.01, boom)
    efd.write()
    assert wait_for(lambda: loop.errors == 3)
    ok: list[int] = []
    loop.call_soon_threadsafe(lambda: ok.append(1))
    assert wait_for(lambda: ok == [1])
    assert loop.running
    assert any("boom" in r.getMessage() or r.exc_info for r in caplog.records)
    loop.remove_reader(efd.fd)
    efd.close()


def test_stop_joins_and_restart() -> None:
    lp = EventLoop()
    lp.start()
    assert lp.running
    lp.call_later(60, lambda: None)  # a far timer does not hold stop() up
    t0 = time.monotonic()
    lp.stop()
    assert time.monotonic() - t0 < 2
    assert not lp.running
    lp.stop()  # idempotent
    lp.start()
    hit: list[int] = []
    lp.call_soon_threadsafe(lambda: hit.append(1))
    assert wait_for(lambda: hit == [1])
    lp.close()


def test_stop_from_callback() -> None:
    lp = EventLoop()
    lp.start()
    lp.call_soon_threadsafe(lp.stop)
    assert wait_for(lambda: not lp.running)
    lp.close()


def test_remove_reader_from_other_thread_while_busy(loop: EventLoop) -> None:
    efds = [EventFd() for _ in range(8)]
    counts = [0] * 8
    for i, e in enumerate(efds):

        def cb(i: int = i, e: EventFd = e) -> None:
            counts[i] += e.read()

        loop.add_reader(e.fd, cb)
    for _ in range(50):
        for e in efds:
            e.write()
    assert wait_for(lambda: sum(counts) == 400)
    for e in efds:
        assert loop.remove_reader(e.fd)
        e.close()
