"""Token-bucket rate limiters, as Firecracker's API describes them (``{size, refill_time, one_time_burst}``).

A bucket holds up to ``size`` tokens (bytes or operations) and refills completely in ``refill_time``
milliseconds, a steady rate of ``size / refill_time``; ``one_time_burst`` tokens are there once, on top,
and do not come back.  A size or refill time of 0 means no limit.  A request larger than the bucket is let
through once the bucket is full and leaves it in debt, so the long-run rate holds whatever the request
sizes.  :class:`RateLimiter` pairs a bandwidth bucket with an operations bucket: a request goes when
both allow it (:meth:`RateLimiter.reserve` says how long to wait otherwise; nothing is taken then).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyrovm.errors import ConfigError


@dataclass(frozen=True)
class BucketSpec:
    """One bucket's settings (``size`` tokens, ``refill_time`` ms, ``one_time_burst`` tokens)."""

    size: int
    refill_time: int
    one_time_burst: int = 0

    @classmethod
    def from_json(cls, data: Any, what: str) -> BucketSpec | None:
        if data is None:
            return None
        if not isinstance(data, dict) or not {"size", "refill_time"} <= set(data) or set(data) - {
            "size", "refill_time", "one_time_burst"
        }:  # fmt: skip
            raise ConfigError(f"{what}: a token bucket is {{size, refill_time[, one_time_burst]}}")
        values = [data["size"], data["refill_time"], data.get("one_time_burst") or 0]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ConfigError(f"{what}: size, refill_time and one_time_burst are whole numbers, 0 or more")
        return cls(*values)

    def to_json(self) -> dict[str, int]:
        return {"size": self.size, "refill_time": self.refill_time, "one_time_burst": self.one_time_burst}


@dataclass(frozen=True)
class RateLimitSpec:
    """A bandwidth (bytes) and an operations bucket; either may be absent."""

    bandwidth: BucketSpec | None = None
    ops: BucketSpec | None = None

    @classmethod
    def from_json(cls, data: Any, what: str = "rate_limiter") -> RateLimitSpec | None:
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) - {"bandwidth", "ops"}:
            raise ConfigError(f"{what}: a rate limiter is {{bandwidth, ops}}")
        return cls(
            BucketSpec.from_json(data.get("bandwidth"), f"{what}.bandwidth"),
            BucketSpec.from_json(data.get("ops"), f"{what}.ops"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "bandwidth": None if self.bandwidth is None else self.bandwidth.to_json(),
            "ops": None if self.ops is None else self.ops.to_json(),
        }


class TokenBucket:
    """A running bucket (see the module doc)."""

    def __init__(self, spec: BucketSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = spec.size
        self.rate = spec.size * 1000 / spec.refill_time if spec.refill_time else 0.0
        self.tokens = float(spec.size)
        self.burst = float(spec.one_time_burst)
        self._clock = clock
        self._last = clock()

    @property
    def unlimited(self) -> bool:
        return self.size == 0 or self.rate == 0

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(float(self.size), self.tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_for(self, n: int) -> float:
        """Seconds until *n* tokens may be taken (0: now)."""
        if self.unlimited or n <= self.burst:
            return 0.0
        self._refill()
        need = min(n - self.burst, self.size)  # a request larger than the bucket waits for a full one
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def level(self) -> float:
        """The tokens in the bucket now (below 0 while in debt)."""
        self._refill()
        return self.tokens

    def set_level(self, tokens: float) -> None:
        """Put *tokens* in the bucket (at most its size), refilling from now on (a restored device)."""
        self.tokens = min(float(self.size), tokens)
        self._last = self._clock()

    def take(self, n: int) -> None:
        if self.unlimited:
            return
        from_burst = min(self.burst, n)
        self.burst -= from_burst
        self.tokens -= n - from_burst  # may go below 0: the debt of a request larger than the bucket


class RateLimiter:
    """Bandwidth and operations buckets of one device (or one direction of one)."""

    def __init__(self, spec: RateLimitSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.bandwidth = None if spec.bandwidth is None else TokenBucket(spec.bandwidth, clock)
        self.ops = None if spec.ops is None else TokenBucket(spec.ops, clock)
        self.throttled = 0  # how many times a request had to wait

    def reserve(self, nbytes: int, nops: int = 1) -> float:
        """Take *nbytes* and *nops* tokens and return 0, or return the seconds to wait (nothing taken)."""
        wait = max(
            0.0 if self.bandwidth is None else self.bandwidth.wait_for(nbytes),
            0.0 if self.ops is None else self.ops.wait_for(nops),
        )
        if wait > 0:
            self.throttled += 1
            return wait
        if self.bandwidth is not None:
            self.bandwidth.take(nbytes)
        if self.ops is not None:
            self.ops.take(nops)
        return 0.0


class Scheduler(Protocol):
    """What a throttled device needs of the event loop: a one-shot timer."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...


class Throttle:
    """A device's rate limiter and the timer that brings its queue back once tokens have refilled.

    :meth:`allow` says whether a request of *nbytes* may go now; when not, the device gives the request
    back to its queue and returns, and the timer calls *resume* (the transport's re-processing of that
    queue) when the request could go.  :meth:`update` swaps the limits while the VM runs.
    """

    def __init__(
        self,
        spec: RateLimitSpec | None,
        scheduler: Scheduler | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if spec is not None and scheduler is None:
            raise ConfigError("a rate-limited device needs a scheduler (the event loop) for its timers")
        self._clock = clock
        self.limiter = None if spec is None else RateLimiter(spec, clock)
        self.scheduler = scheduler
        self.resume: Callable[[], None] | None = None
        self._pending = False
        self.throttled = 0  # requests that had to wait, over every limit this device has had

    def update(self, spec: RateLimitSpec | None) -> None:
        if spec is not None and self.scheduler is None:
            raise ConfigError("a rate-limited device needs a scheduler (the event loop) for its timers")
        self.limiter = None if spec is None else RateLimiter(spec, self._clock)
        if self.resume is not None and self.scheduler is not None:  # requests waiting go by the new limits
            self.scheduler.call_later(0, self.resume)

    def allow(self, nbytes: int, nops: int = 1) -> bool:
        limiter = self.limiter
        if limiter is None:
            return True
        wait = limiter.reserve(nbytes, nops)
        if not wait:
            return True
        self.throttled += 1
        if not self._pending and self.scheduler is not None:
            self._pending = True
            self.scheduler.call_later(max(wait, 0.001), self._fire)
        return False

    def charge(self, nbytes: int) -> None:
        """Take *nbytes* more, now, whatever the bucket holds (for sizes known only after the request went,
        such as a received frame: the debt delays the next one)."""
        limiter = self.limiter
        if limiter is not None and limiter.bandwidth is not None:
            limiter.bandwidth.take(nbytes)

    def _fire(self) -> None:
        self._pending = False
        if self.resume is not None:
            self.resume()

    def metrics(self) -> dict[str, int]:
        return {"throttled": self.throttled}
