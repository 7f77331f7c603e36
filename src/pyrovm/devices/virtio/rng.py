"""virtio-rng / entropy device (VIRTIO 1.2 §5.4): fills device-writable buffers with ``os.urandom``.

An optional byte-rate limit (token bucket of ``rate_bytes_per_s`` bytes per second, bursts of up to one
second's worth) defers requests when the bucket is empty: the chain is put back on the queue and a timer
of the event loop processes the queue again once enough tokens have accumulated (the devices' common
:class:`~pyrovm.devices.ratelimit.Throttle`).  Its state
(:class:`VirtioRngState`) adds the tokens in the bucket to the negotiated features.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyrovm.devices.ratelimit import BucketSpec, RateLimitSpec, Scheduler, Throttle, TokenBucket
from pyrovm.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice, VirtioDeviceState
from pyrovm.devices.virtio.queue import DescriptorChain, SplitQueue
from pyrovm.errors import ConfigError

#: The most bytes one request gets (the device may fill less than the driver offers).
MAX_REQUEST_BYTES = 64 * 1024


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
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ConfigError(
                f"virtio-rng rate {rate_bytes_per_s}: must be a positive number of bytes a second"
            )
        self.rate = rate_bytes_per_s
        #: a bucket of one second's worth (``rate_bytes_per_s`` bytes, refilled in 1000 ms)
        spec = None if rate_bytes_per_s is None else RateLimitSpec(BucketSpec(rate_bytes_per_s, 1000))
        self.throttle = Throttle(spec, scheduler, clock)
        self.throttle.resume = self._resume

    @property
    def deferred(self) -> int:
        """How many times a request waited for tokens."""
        return self.throttle.throttled

    def _resume(self) -> None:
        if self._kick is not None:
            self._kick(0)

    def _bucket(self) -> TokenBucket | None:
        limiter = self.throttle.limiter
        return None if limiter is None else limiter.bandwidth

    def save_state(self) -> VirtioRngState:
        bucket = self._bucket()
        return VirtioRngState(self.acked_features, 0.0 if bucket is None else bucket.level())

    def restore_state(self, state: VirtioDeviceState) -> None:
        """Load *state*; the bucket refills from the saved level from now on (capped at this rate)."""
        super().restore_state(state)
        bucket = self._bucket()
        if isinstance(state, VirtioRngState) and bucket is not None:
            bucket.set_level(state.tokens)

    def handle_chain(self, queue_index: int, queue: SplitQueue, chain: DescriptorChain) -> int | None:
        want = min(chain.writable_len, MAX_REQUEST_BYTES)
        if not chain.writable:
            self.stats.requests += 1
            self.stats.errors += 1
            self.log_once("no-writable", "%s: request without device-writable buffers", self.name)
            return 0
        if self.rate is not None:
            want = min(want, self.rate)  # a request gets at most a second's worth
            if not self.throttle.allow(want, 0):
                queue.undo_pop()
                return None
        self.stats.requests += 1
        left = want
        for view in chain.writable_views():
            if not left:
                break
            n = min(left, view.nbytes)
            view[:n] = os.urandom(n)  # (getrandom(2) underneath; os.getrandom may return fewer bytes)
            left -= n
        self.stats.bytes_read += want
        return want
