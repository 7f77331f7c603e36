"""virtio-rng through the mock queue: entropy, bad requests, the token-bucket rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pyrovm.devices.virtio.mmio import VirtioMmioTransport
from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.rng import MAX_REQUEST_BYTES, VirtioRng
from pyrovm.eventloop import EventLoop
from pyrovm.memory import GuestMemory


class FakeScheduler:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> object:
        self.timers.append((delay, fn))
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def activate(dev: VirtioRng, size: int = 16) -> tuple[GuestMemory, MockSplitQueue]:
    mem = GuestMemory.anonymous(1 << 20)
    mq = MockSplitQueue(mem, size=size, data_size=0x80000)
    dev.activate(mem, [mq.queue()])
    kicks: list[int] = []
    dev.bind(lambda i: (kicks.append(i), dev.process(i))[1])
    return mem, mq


def test_fills_writable_buffers() -> None:
    dev = VirtioRng()
    mem, mq = activate(dev)
    placed = mq.add_chain([], [64, 64])
    dev.process(0)
    assert mq.take_used() == [(placed.head, 128)]
    data = b"".join(mem.read(g, n) for g, n in placed.writable)
    assert data != bytes(128)
    assert data[:64] != data[64:]
    assert dev.metrics()["bytes_read"] == 128 and dev.metrics()["requests"] == 1


def test_large_request_capped() -> None:
    dev = VirtioRng()
    _, mq = activate(dev)
    mq.add_chain([], [MAX_REQUEST_BYTES + 4096])
    dev.process(0)
    assert mq.take_used()[0][1] == MAX_REQUEST_BYTES


def test_readable_only_request_is_error() -> None:
    dev = VirtioRng()
    _, mq = activate(dev)
    placed = mq.add_chain([b"junk"], [])
    dev.process(0)
    assert mq.take_used() == [(placed.head, 0)]
    assert dev.metrics()["errors"] == 1


def test_rate_limit_needs_scheduler() -> None:
    with pytest.raises(ValueError):
        VirtioRng(rate_bytes_per_s=100)
    with pytest.raises(ValueError):
        VirtioRng(rate_bytes_per_s=0, scheduler=FakeScheduler())


def test_rate_limit_defers_and_completes_later() -> None:
    sched, clock = FakeScheduler(), Clock()
    dev = VirtioRng(rate_bytes_per_s=100, scheduler=sched, clock=clock)
    _, mq = activate(dev)
    a = mq.add_chain([], [60])
    b = mq.add_chain([], [60])
    dev.process(0)
    assert mq.take_used() == [(a.head, 60)]  # 100 tokens: the first fits, the second waits
    assert len(sched.timers) == 1
    delay, fire = sched.timers[0]
    assert delay == pytest.approx(0.2)
    dev.process(0)  # another kick before the timer: still no tokens, no second timer
    assert mq.take_used() == []
    assert len(sched.timers) == 1
    clock.now += 0.2
    fire()
    assert mq.take_used() == [(b.head, 60)]
    # a request larger than a second's worth is served with a second's worth
    c = mq.add_chain([], [1000])
    clock.now += 10
    dev.process(0)
    assert mq.take_used() == [(c.head, 100)]


def test_timer_after_reset_does_nothing() -> None:
    sched, clock = FakeScheduler(), Clock()
    dev = VirtioRng(rate_bytes_per_s=10, scheduler=sched, clock=clock)
    _, mq = activate(dev)
    mq.add_chain([], [10])
    mq.add_chain([], [10])
    dev.process(0)
    dev.reset()
    clock.now += 5
    sched.timers[0][1]()  # stale timer: ignored
    assert mq.used_idx() == 1


def test_rate_limit_with_event_loop_and_transport() -> None:
    loop = EventLoop()
    loop.start()
    try:
        irqs: list[int] = []
        dev = VirtioRng(rate_bytes_per_s=1000, scheduler=loop)
        mem = GuestMemory.anonymous(1 << 20)
        t = VirtioMmioTransport(dev, mem, lambda: irqs.append(1))
        mq = MockSplitQueue(mem, size=16)
        t.state.driver_features = dev.acked_features = 1 << 32
        t.state.queues[0] = mq.state
        t.state.status = 0xF
        t._activate()
        first = mq.add_chain([], [1000])
        second = mq.add_chain([], [50])
        t.queue_notify(0)
        assert mq.take_used() == [(first.head, 1000)]
        deadline = time.monotonic() + 5
        while mq.used_idx() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mq.take_used() == [(second.head, 50)]
        assert len(irqs) == 2  # the deferred completion interrupts too
    finally:
        loop.close()
