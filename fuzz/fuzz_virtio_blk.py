#!/usr/bin/env python3
"""Fuzz virtio-blk's request handling through the virtio-mmio transport (see ``_virtio.py``): requests of
every type (reads, writes, flush, get-id, discard, write-zeroes, unknown) in the usual layouts and in odd
ones (a split header, a status buffer longer than a byte, data on the wrong side), with hostile chains in
between, on a small image (read-write or read-only, with or without a rate limiter).

    python fuzz/fuzz_virtio_blk.py -max_total_time=600 fuzz/corpus/virtio_blk
"""

from __future__ import annotations

import os
import tempfile

import _common
import atheris

with _common.instrumented(__name__):
    import _virtio

    from pyrovm.devices.virtio.block import (
        DISCARD_SEGMENT,
        REQ_HEADER,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VirtioBlock,
    )
    from pyrovm.devices.virtio.mock import MockSplitQueue

IMAGE_SECTORS = 128
_TMP = tempfile.TemporaryDirectory(prefix="pvf-blk-", dir="/tmp")
IMAGE = os.path.join(_TMP.name, "disk.img")
TYPES = [
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES, 10, 14, 0xFFFFFFFF,
]  # fmt: skip


def _fresh_image() -> None:
    with open(IMAGE, "wb") as f:
        f.truncate(IMAGE_SECTORS * 512)


def _request(driver: _virtio.FuzzDriver, fdp: atheris.FuzzedDataProvider) -> _virtio.Request:
    rtype = fdp.PickValueInList(TYPES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(4)
    kind = fdp.ConsumeIntInRange(0, 3)
    sector = (
        fdp.ConsumeIntInRange(0, IMAGE_SECTORS + 2)
        if kind
        else fdp.PickValueInList([IMAGE_SECTORS - 1, 1 << 54, (1 << 64) - 1, fdp.ConsumeUInt(8)])
    )
    header = REQ_HEADER.pack(rtype, fdp.ConsumeUInt(4) if kind == 3 else 0, sector)
    readable: list[bytes] = [header]
    if fdp.ConsumeIntInRange(0, 7) == 0:  # the header cut in two buffers
        cut = fdp.ConsumeIntInRange(0, len(header))
        readable = [header[:cut], header[cut:]]
    writable: list[int] = []
    if rtype == VIRTIO_BLK_T_OUT:
        readable += [
            fdp.ConsumeBytes(512 * fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeBool() else driver.length())
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        ]
    elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        segments = b"".join(
            DISCARD_SEGMENT.pack(
                fdp.ConsumeIntInRange(0, IMAGE_SECTORS + 8) if fdp.ConsumeBool() else fdp.ConsumeUInt(8),
                fdp.ConsumeIntInRange(0, 64) if fdp.ConsumeBool() else fdp.ConsumeUInt(4),
                fdp.ConsumeIntInRange(0, 3),
            )
            for _ in range(fdp.ConsumeIntInRange(0, 4))
        )
        readable.append(segments + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3)))
    else:
        writable += [driver.length() for _ in range(fdp.ConsumeIntInRange(0, 3))]
    writable.append(1 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 3))
    return [r for r in readable if r], writable


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    _fresh_image()
    timers = _virtio.Timers()
    device = VirtioBlock(
        IMAGE,
        read_only=fdp.ConsumeIntInRange(0, 3) == 0,
        serial=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)),
        queue_size=fdp.PickValueInList([2, 16, 256]),
        rate_limiter=_virtio.rate_limiter(fdp),
        scheduler=timers,
    )
    try:
        driver = _virtio.FuzzDriver(device, fdp)

        def request(index: int, mq: MockSplitQueue) -> _virtio.Request:
            return _request(driver, fdp)

        try:
            driver.run(request, lambda: timers.run())
            timers.run()
            driver.run_later()
            driver.check()
        finally:
            driver.close()
    finally:
        device.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
