#!/usr/bin/env python3
"""Fuzz virtio-rng's request handling through the virtio-mmio transport (see ``_virtio.py``): a fuzzed
driver negotiates, lays out its queue and chains (well formed or hostile), kicks, resets; with or without
a byte-rate limit (deferred requests come back through the timers the input runs).

    python fuzz/fuzz_virtio_rng.py -max_total_time=600 fuzz/corpus/virtio_rng
"""

from __future__ import annotations

import _common
import atheris

with _common.instrumented(__name__):
    import _virtio

    from pyrovm.devices.virtio.mock import MockSplitQueue
    from pyrovm.devices.virtio.rng import VirtioRng


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    timers = _virtio.Timers()
    rate = fdp.ConsumeIntInRange(1, 8192) if fdp.ConsumeIntInRange(0, 3) == 0 else None
    device = VirtioRng(rate_bytes_per_s=rate, scheduler=timers, queue_size=fdp.PickValueInList([1, 16, 256]))
    driver = _virtio.FuzzDriver(device, fdp)

    def request(index: int, mq: MockSplitQueue) -> _virtio.Request:
        return [], [driver.length() for _ in range(fdp.ConsumeIntInRange(1, 4))]

    try:
        driver.run(request, lambda: timers.run())
        timers.run()
        driver.check()
    finally:
        driver.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
