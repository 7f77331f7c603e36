"""Token-bucket rate limiters: the buckets' arithmetic with a fake clock, and a virtio-blk disk whose
bandwidth or request rate the test guest measures, held within 10 % over a few seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyrovm.config import DiskSpec
from pyrovm.devices.ratelimit import BucketSpec, RateLimiter, RateLimitSpec, TokenBucket
from pyrovm.errors import ConfigError

from conftest import needs_kvm


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_rate_burst_and_debt() -> None:
    clock = Clock()
    b = TokenBucket(BucketSpec(size=1000, refill_time=100, one_time_burst=500), clock)  # 10000 tokens/s
    assert b.wait_for(1500) == 0  # the one-time burst first
    b.take(1500)
    assert b.burst == 0 and b.tokens == 0
    assert b.wait_for(500) == pytest.approx(0.05)
    clock.now = 0.05
    assert b.wait_for(500) == 0
    b.take(500)
    clock.now = 0.2
    assert b.wait_for(5000) == 0  # larger than the bucket: goes once it is full, and leaves a debt
    b.take(5000)
    assert b.tokens == -4000 and b.wait_for(1) == pytest.approx(0.4001)
    assert TokenBucket(BucketSpec(0, 100)).wait_for(10**9) == 0  # size 0: no limit


def test_limiter_takes_nothing_while_either_bucket_refuses() -> None:
    clock = Clock()
    lim = RateLimiter(RateLimitSpec(BucketSpec(1000, 1000), BucketSpec(2, 1000)), clock)
    assert lim.reserve(100) == 0 and lim.reserve(100) == 0
    assert lim.reserve(100) > 0  # the ops bucket is empty
    assert lim.bandwidth is not None and lim.bandwidth.tokens == 800 and lim.throttled == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"bandwidth": {"size": 1}}, "a token bucket is"),
        ({"bandwidth": {"size": -1, "refill_time": 1}}, "whole numbers"),
        ({"bandwidth": {"size": True, "refill_time": 1}}, "whole numbers"),
        ({"speed": 1}, "a rate limiter is"),
    ],
)
def test_bad_specs(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RateLimitSpec.from_json(data)


def timed_blkbench(guest: Path, image: Path, limiter: RateLimitSpec, cmdline: str) -> float:
    from pyrovm import VM

    with VM(guest, memory="64M", cmdline=cmdline, disks=[DiskSpec(image, rate_limiter=limiter)]) as vm:
        assert vm.console.wait_for("blkbench start", 30), vm.console.text
        t0 = time.monotonic()
        assert vm.console.wait_for("blkbench done", 60), vm.console.text
        return time.monotonic() - t0


@needs_kvm
def test_disk_bandwidth_and_request_rate_hold(guest: Path, tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(16 << 20))
    # 4 MiB/s in 256 KiB buckets: 12 MiB of 64 KiB reads take (12 MiB - 256 KiB) / 4 MiB/s
    bandwidth = RateLimitSpec(bandwidth=BucketSpec(256 << 10, 62, 0))
    expected = ((12 << 20) - (256 << 10)) / ((256 << 10) * 1000 / 62)
    secs = timed_blkbench(guest, image, bandwidth, "test=blkbench op=read bs=65536 depth=1 count=192")
    assert abs(secs - expected) / expected < 0.10, (secs, expected)
    # 100 requests a second in buckets of 10: 250 writes of 4 KiB take (250 - 10) / 100 s
    ops = RateLimitSpec(ops=BucketSpec(10, 100, 0))
    secs = timed_blkbench(guest, image, ops, "test=blkbench op=write bs=4096 depth=4 count=250")
    assert abs(secs - 2.4) / 2.4 < 0.10, secs


@needs_kvm
def test_api_patch_changes_a_running_disks_limit(guest: Path, tmp_path: Path) -> None:
    from pyrovm.api.controller import Controller

    image = tmp_path / "d.img"
    image.write_bytes(bytes(4 << 20))
    c = Controller()
    boot = {"kernel_image_path": str(guest), "boot_args": "test=blkbench op=read bs=65536 depth=1 count=64"}
    slow = {"bandwidth": {"size": 65536, "refill_time": 1000}}  # 64 KiB/s: 4 MiB would take a minute
    drive = {"drive_id": "d", "path_on_host": str(image), "is_root_device": False, "rate_limiter": slow}
    assert c.handle("PUT", "/boot-source", boot)[0] == 204
    assert c.handle("PUT", "/drives/d", drive)[0] == 204
    assert c.handle("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    try:
        assert c.vm.console.wait_for("blkbench start", 30)
        time.sleep(0.5)
        assert c.vm.console.wait_for("blkbench done", 0.1) is None  # held back
        t0 = time.monotonic()
        assert c.handle("PATCH", "/drives/d", {"drive_id": "d", "rate_limiter": None}) == (204, None)
        assert c.vm.console.wait_for("blkbench done", 10), c.vm.console.text
        assert time.monotonic() - t0 < 5
        assert c.vm.metrics()["devices"]["virtio-blk:vda"]["throttled"] > 0
    finally:
        c.close()
