"""virtio-rng / entropy device (VIRTIO 1.2 §5.4): fills device-writable buffers with ``os.getrandom``.

An optional byte-rate limit (token bucket of ``rate_bytes_per_s`` bytes per second, bursts of up to one
second's worth) defers requests when the bucket is empty: the chain is put back on the queue and a timer
of the event loop processes the queue again once enough tokens have accumulated.  Its state
(:class:`VirtioRngState`) adds the tokens in the bucket to the negotiated features.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyrovm.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice, VirtioDeviceState
from pyrovm.devices.virtio.queue import DescriptorChain, SplitQueue
from pyrovm.errors import ConfigError

#: The most bytes one request gets (the device may fill less than the driver offers).
MAX_REQUEST_BYTES = 64 * 1024


class Scheduler(Protocol):
    """What the device needs of the event loop: a one-shot timer."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...


@dataclass
class VirtioRngState(VirtioDeviceState):
    """The rate limiter's bucket: *tokens* bytes available when saved (0 without a limit)."""

    tokens: float = 0.0


class VirtioRng(VirtioDevice):
    """An entropy source for the guest."""

    device_id = VIRTIO_ID_RNG

    def __init__(
        self,
        *,
        rate_bytes_per_s: int | None = None,
        scheduler: Scheduler | None = None,
        queue_size: int = 256,
        name: str = "virtio-rng",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, [queue_size])
        if rate_bytes_per_s is not None:
            if rate_bytes_per_s <= 0:
                raise ConfigError(
                    f"virtio-rng rate {rate_bytes_per_s}: must be a positive number of bytes a second"
                )
            if scheduler is None:
                raise ConfigError(
                    "a rate-limited virtio-rng needs a scheduler (the event loop) for its timers"
                )
        self.rate = rate_bytes_per_s
        self.scheduler = scheduler
        self._clock = clock
        self._tokens = float(rate_bytes_per_s or 0)
        self._last = clock()
        self._timer_pending = False
        self._generation = 0
        self.deferred = 0  # how many times a request waited for tokens

    def reset(self) -> None:
        self._generation += 1  # a timer armed before the reset does nothing
        self._timer_pending = False
        super().reset()

    def save_state(self) -> VirtioRngState:
        if self.rate is not None:
            self._refill()
        return VirtioRngState(self.acked_features, self._tokens)

    def restore_state(self, state: VirtioDeviceState) -> None:
        """Load *state*; the bucket refills from the saved level from now on (capped at this rate)."""
        super().restore_state(state)
        if isinstance(state, VirtioRngState) and self.rate is not None:
            self._tokens = min(float(self.rate), state.tokens)
            self._last = self._clock()

    def _refill(self) -> None:
        assert self.rate is not None
        now = self._clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def handle_chain(self, queue_index: int, queue: SplitQueue, chain: DescriptorChain) -> int | None:
        want = min(chain.writable_len, MAX_REQUEST_BYTES)
        if not chain.writable:
            self.stats.requests += 1
            self.stats.errors += 1
            self.log_once("no-writable", "%s: request without device-writable buffers", self.name)
            return 0
        if self.rate is not None:
            want = min(want, self.rate)
            self._refill()
            if self._tokens < want:
                queue.undo_pop()
                self._arm_timer((want - self._tokens) / self.rate)
                return None
            self._tokens -= want
        self.stats.requests += 1
        left = want
        for view in chain.writable_views():
            if not left:
                break
            n = min(left, view.nbytes)
            view[:n] = os.getrandom(n)
            left -= n
        self.stats.bytes_read += want
        return want

    def _arm_timer(self, delay: float) -> None:
        self.deferred += 1
        if self._timer_pending or self.scheduler is None:
            return
        self._timer_pending = True
        generation = self._generation

        def fire() -> None:
            if generation != self._generation:
                return
            self._timer_pending = False
            if self._kick is not None:
                self._kick(0)

        self.scheduler.call_later(max(delay, 0.001), fire)
