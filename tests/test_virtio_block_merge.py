"""virtio-blk request merging: adjacent reads (or writes) of one notification share one preadv/pwritev."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyrovm.devices.virtio import block
from pyrovm.devices.virtio.block import (
    MERGE_MAX_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from pyrovm.devices.virtio.device import VIRTIO_F_INDIRECT_DESC
from pyrovm.devices.virtio.mock import MockChain, MockSplitQueue
from pyrovm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyrovm.memory import GuestMemory

DISK_SIZE = 8 << 20
ORIG_SECTOR = bytes(range(256)) * 2  # every sector of the image before the test
HDR = struct.Struct("<IIQ")
IOV_MAX = 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    return path


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 7 + i) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


def file_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


class Rig:
    """A block device on one mock queue; requests are queued first and served by one :meth:`run`."""

    def __init__(self, dev: VirtioBlock) -> None:
        self.dev = dev
        self.mem = GuestMemory.anonymous(16 << 20)
        self.mq = MockSplitQueue(self.mem, size=256, data_size=12 << 20)
        dev.acked_features = dev.features & ~(1 << VIRTIO_F_INDIRECT_DESC)
        dev.activate(self.mem, [self.mq.queue(indirect=True)])
        self.placed: list[MockChain] = []

    def write(self, sector: int, data: bytes, pieces: int = 1, indirect: bool = False) -> MockChain:
        step = len(data) // pieces
        bufs: list[bytes | int] = [data[i * step : (i + 1) * step] for i in range(pieces)]
        add = self.mq.add_indirect_chain if indirect else self.mq.add_chain
        placed = add([HDR.pack(VIRTIO_BLK_T_OUT, 0, sector), *bufs], [1])
        self.placed.append(placed)
        return placed

    def read(self, sector: int, nbytes: int, pieces: int = 1, indirect: bool = False) -> MockChain:
        add = self.mq.add_indirect_chain if indirect else self.mq.add_chain
        placed = add([HDR.pack(VIRTIO_BLK_T_IN, 0, sector)], [nbytes // pieces] * pieces + [1])
        self.placed.append(placed)
        return placed

    def other(self, rtype: int, in_len: int = 0) -> MockChain:
        placed = self.mq.add_chain([HDR.pack(rtype, 0, 0)], [in_len, 1] if in_len else [1])
        self.placed.append(placed)
        return placed

    def run(self) -> list[tuple[int, int]]:
        """Serve everything queued; check the completions come in submission order; ``(used len, status)``."""
        self.dev.process(0)
        used = self.mq.take_used()
        assert [h for h, _ in used] == [p.head for p in self.placed]
        out = [(n, self.mem.read_u8(p.writable[-1][0])) for (_, n), p in zip(used, self.placed, strict=True)]
        self.placed = []
        return out

    def data_in(self, placed: MockChain) -> bytes:
        return b"".join(self.mem.read(g, n) for g, n in placed.writable[:-1])


@pytest.fixture
def rig(image: Path) -> Iterator[Rig]:
    with VirtioBlock(image) as dev:
        yield Rig(dev)


Call = tuple[str, int, int, int]  # (op, offset, iovecs, bytes)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every preadv / pwritev / fsync the block device makes, in order."""
    log: list[Call] = []

    def wrap(name: str, real: Callable[[int, list[memoryview], int], int]) -> None:
        def op(fd: int, views: list[memoryview], offset: int) -> int:
            assert len(views) <= IOV_MAX
            log.append((name, offset, len(views), sum(v.nbytes for v in views)))
            return real(fd, views, offset)

        monkeypatch.setattr(block.os, name, op)

    wrap("preadv", os.preadv)
    wrap("pwritev", os.pwritev)
    real_fsync = os.fsync
    monkeypatch.setattr(block.os, "fsync", lambda fd: (log.append(("fsync", 0, 0, 0)), real_fsync(fd))[1])
    return log


def test_contiguous_writes_one_syscall(rig: Rig, image: Path, calls: list[Call]) -> None:
    datas = [pattern(i, 4096) for i in range(8)]
    for i, d in enumerate(datas):
        rig.write(100 + 8 * i, d)
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)] * 8
    assert calls == [("pwritev", 100 * 512, 8, 8 * 4096)]
    assert file_bytes(image, 100 * 512, 8 * 4096) == b"".join(datas)
    assert rig.dev.stats.requests == 8 and rig.dev.stats.bytes_written == 8 * 4096
    assert rig.dev.stats.errors == 0


def test_contiguous_reads_one_syscall(rig: Rig, image: Path, calls: list[Call]) -> None:
    pieces = [(1, 2, 4)[i % 3] for i in range(16)]
    placed = [rig.read(8 * i, 4096, pieces=pieces[i]) for i in range(16)]
    assert rig.run() == [(4097, VIRTIO_BLK_S_OK)] * 16
    assert calls == [("preadv", 0, sum(pieces), 16 * 4096)]
    for i, p in enumerate(placed):
        assert rig.data_in(p) == file_bytes(image, i * 4096, 4096)
    assert rig.dev.stats.requests == 16 and rig.dev.stats.bytes_read == 16 * 4096


def test_single_request_one_syscall(rig: Rig, image: Path, calls: list[Call]) -> None:
    p = rig.read(3, 1024)
    assert rig.run() == [(1025, VIRTIO_BLK_S_OK)]
    assert rig.data_in(p) == file_bytes(image, 3 * 512, 1024)
    assert calls == [("preadv", 3 * 512, 1, 1024)]


def test_gap_splits_run(rig: Rig, image: Path, calls: list[Call]) -> None:
    rig.write(0, pattern(1, 1024))
    rig.write(2, pattern(2, 1024))
    rig.write(5, pattern(3, 512))  # sector 4 skipped
    rig.write(6, pattern(4, 512))
    rig.write(0, pattern(5, 512))  # backwards: a new run
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)] * 5
    assert calls == [
        ("pwritev", 0, 2, 2048),
        ("pwritev", 5 * 512, 2, 1024),
        ("pwritev", 0, 1, 512),
    ]
    p = [pattern(i, n) for i, n in ((5, 512), (1, 1024), (2, 1024), (3, 512), (4, 512))]
    assert file_bytes(image, 0, 4096) == b"".join(
        (p[0], p[1][512:], p[2], ORIG_SECTOR, p[3], p[4], ORIG_SECTOR)
    )


def test_mixed_reads_and_writes_keep_order(rig: Rig, image: Path, calls: list[Call]) -> None:
    old = file_bytes(image, 0, 4096)
    r0 = rig.read(0, 2048)
    rig.write(0, pattern(1, 1024))
    rig.write(2, pattern(2, 1024))
    r1 = rig.read(0, 1024)
    r2 = rig.read(2, 1024)
    r3 = rig.read(4, 1024)
    rig.write(4, pattern(3, 1024))
    r4 = rig.read(4, 1024)
    assert rig.run() == [
        (2049, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_OK),
        (1025, VIRTIO_BLK_S_OK),
        (1025, VIRTIO_BLK_S_OK),
        (1025, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_OK),
        (1025, VIRTIO_BLK_S_OK),
    ]
    assert rig.data_in(r0) == old[:2048]
    assert rig.data_in(r1) + rig.data_in(r2) == pattern(1, 1024) + pattern(2, 1024)
    assert rig.data_in(r3) == old[2048:3072]
    assert rig.data_in(r4) == pattern(3, 1024)
    assert [c[0] for c in calls] == ["preadv", "pwritev", "preadv", "pwritev", "preadv"]
    assert [c[2] for c in calls] == [1, 2, 3, 1, 1]


def test_flush_in_the_middle(rig: Rig, image: Path, calls: list[Call]) -> None:
    for i in range(3):
        rig.write(i, pattern(i, 512))
    rig.other(VIRTIO_BLK_T_FLUSH)
    for i in range(3, 6):
        rig.write(i, pattern(i, 512))  # contiguous with the writes before the FLUSH, yet not merged
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)] * 7
    assert calls == [("pwritev", 0, 3, 1536), ("fsync", 0, 0, 0), ("pwritev", 1536, 3, 1536)]
    assert file_bytes(image, 0, 3072) == b"".join(pattern(i, 512) for i in range(6))


def test_get_id_is_a_barrier(rig: Rig, calls: list[Call]) -> None:
    rig.read(0, 512)
    get_id = rig.other(VIRTIO_BLK_T_GET_ID, in_len=20)
    rig.read(1, 512)
    assert rig.run() == [(513, VIRTIO_BLK_S_OK), (21, VIRTIO_BLK_S_OK), (513, VIRTIO_BLK_S_OK)]
    assert rig.data_in(get_id) == bytes(20)
    assert [c[:3] for c in calls] == [("preadv", 0, 1), ("preadv", 512, 1)]


def test_out_of_range_in_the_middle_fails_alone(rig: Rig, image: Path, calls: list[Call]) -> None:
    last = DISK_SIZE // 512
    rig.write(0, pattern(1, 512))
    rig.write(1, pattern(2, 512))
    rig.write(last - 1, pattern(3, 1024))  # runs off the end of the disk
    rig.write(2, pattern(4, 512))
    rig.write(3, pattern(5, 512))
    r = rig.read(last, 512)  # starts at the end
    rig.read(0, 512)
    assert rig.run() == [
        (1, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_IOERR),
        (1, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_OK),
        (1, VIRTIO_BLK_S_IOERR),
        (513, VIRTIO_BLK_S_OK),
    ]
    assert rig.data_in(r) == bytes(512)
    assert file_bytes(image, 0, 2048) == b"".join(pattern(i, 512) for i in (1, 2, 4, 5))
    assert file_bytes(image, DISK_SIZE - 512, 512) == ORIG_SECTOR
    assert calls == [("pwritev", 0, 2, 1024), ("pwritev", 1024, 2, 1024), ("preadv", 0, 1, 512)]
    assert rig.dev.stats.errors == 2 and rig.dev.stats.requests == 7


def test_read_only_write_in_a_run_of_reads(image: Path, calls: list[Call]) -> None:
    with VirtioBlock(image, read_only=True) as dev:
        rig = Rig(dev)
        rig.read(0, 512)
        rig.read(1, 512)
        rig.write(2, pattern(1, 512))
        rig.read(2, 512)
        rig.read(3, 512)
        assert [s for _, s in rig.run()] == [VIRTIO_BLK_S_OK] * 2 + [VIRTIO_BLK_S_IOERR] + [
            VIRTIO_BLK_S_OK
        ] * 2
    assert [c[:3] for c in calls] == [("preadv", 0, 2), ("preadv", 1024, 2)]
    assert file_bytes(image, 1024, 512) == ORIG_SECTOR


def test_malformed_chain_in_the_middle(rig: Rig, image: Path, calls: list[Call]) -> None:
    rig.write(0, pattern(1, 512))
    rig.write(1, pattern(2, 512))
    # A chain whose data buffer lies outside guest RAM: completed with 0 bytes, between its neighbours.
    hdr = rig.mq.alloc(16, HDR.pack(VIRTIO_BLK_T_OUT, 0, 2))
    status = rig.mq.alloc(1)
    rig.mq.write_desc(200, hdr, 16, VIRTQ_DESC_F_NEXT, 201)
    rig.mq.write_desc(201, 1 << 40, 512, VIRTQ_DESC_F_NEXT, 202)
    rig.mq.write_desc(202, status, 1, VIRTQ_DESC_F_WRITE)
    rig.mq.publish(200)
    rig.placed.append(MockChain(200, [(hdr, 16)], [(status, 1)]))
    rig.write(2, pattern(3, 512))
    rig.write(3, pattern(4, 512))
    result = rig.run()
    assert result[:2] == result[3:] == [(1, VIRTIO_BLK_S_OK)] * 2
    assert result[2][0] == 0
    assert [c[:3] for c in calls] == [("pwritev", 0, 2), ("pwritev", 1024, 2)]
    assert file_bytes(image, 0, 2048) == b"".join(pattern(i, 512) for i in range(1, 5))


@pytest.mark.parametrize("op", ["read", "write"])
def test_run_longer_than_iov_max(rig: Rig, image: Path, calls: list[Call], op: str) -> None:
    # 12 requests of 100 buffers of 512 bytes: 1200 iovecs, 600 KiB; at most IOV_MAX a call.
    n, pieces = 12, 100
    size = 512 * pieces
    datas = [pattern(i, size) for i in range(n)]
    placed = []
    for i in range(n):
        if op == "write":
            placed.append(rig.write(i * pieces, datas[i], pieces=pieces, indirect=True))
        else:
            placed.append(rig.read(i * pieces, size, pieces=pieces, indirect=True))
    used_len = 1 if op == "write" else size + 1
    assert rig.run() == [(used_len, VIRTIO_BLK_S_OK)] * n
    name = "pwritev" if op == "write" else "preadv"
    assert calls == [(name, 0, 1000, 10 * size), (name, 10 * size, 200, 2 * size)]
    if op == "write":
        assert file_bytes(image, 0, n * size) == b"".join(datas)
    else:
        for i, p in enumerate(placed):
            assert rig.data_in(p) == file_bytes(image, i * size, size)


def test_run_capped_in_bytes(rig: Rig, image: Path, calls: list[Call]) -> None:
    bs = 64 << 10
    datas = [pattern(i, bs) for i in range(40)]
    for i, d in enumerate(datas):
        rig.write(i * bs // 512, d)
    big = rig.write(40 * bs // 512, pattern(99, 2 * MERGE_MAX_BYTES))  # larger than the cap: alone
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)] * 41
    per_call = MERGE_MAX_BYTES // bs
    assert [c[3] for c in calls] == [MERGE_MAX_BYTES, MERGE_MAX_BYTES, (40 - 2 * per_call) * bs, 2 << 20]
    assert file_bytes(image, 0, 40 * bs) == b"".join(datas)
    assert file_bytes(image, 40 * bs, 2 * MERGE_MAX_BYTES) == rig.mem.read(*big.readable[1])


def test_merged_call_error_retried_per_request(
    rig: Rig, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure of the merged call: each request is done again alone; only the bad one fails."""
    real = os.pwritev
    bad = 3 * 512
    seen: list[tuple[int, int]] = []

    def pwritev(fd: int, views: list[memoryview], offset: int) -> int:
        nbytes = sum(v.nbytes for v in views)
        seen.append((offset, nbytes))
        if offset <= bad < offset + nbytes:
            raise OSError(errno.EIO, "bad sector")
        return real(fd, views, offset)

    monkeypatch.setattr(block.os, "pwritev", pwritev)
    for i in range(6):
        rig.write(i, pattern(i, 512))
    assert [s for _, s in rig.run()] == [VIRTIO_BLK_S_OK] * 3 + [VIRTIO_BLK_S_IOERR] + [VIRTIO_BLK_S_OK] * 2
    assert seen == [(0, 3072)] + [(i * 512, 512) for i in range(6)]
    assert file_bytes(image, 0, 3072) == b"".join(
        pattern(i, 512) if i != 3 else ORIG_SECTOR for i in range(6)
    )
    assert rig.dev.stats.errors == 1 and rig.dev.stats.requests == 6


def test_merged_short_read_retried_per_request(
    rig: Rig, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merged read that comes up short (say the image shrank meanwhile) is finished request by request."""
    real = os.preadv
    calls: list[int] = []

    def preadv(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(len(views))
        if len(calls) == 1:  # the merged call: deliver only part of the first buffer
            return real(fd, [views[0][:100]], offset)
        return real(fd, views, offset)

    monkeypatch.setattr(block.os, "preadv", preadv)
    placed = [rig.read(i, 512) for i in range(4)]
    assert rig.run() == [(513, VIRTIO_BLK_S_OK)] * 4
    assert calls == [4, 1, 1, 1, 1]
    for i, p in enumerate(placed):
        assert rig.data_in(p) == file_bytes(image, i * 512, 512)
    assert rig.dev.stats.requests == 4 and rig.dev.stats.bytes_read == 4 * 512


def test_runs_across_notifications(rig: Rig, image: Path, calls: list[Call]) -> None:
    """Each notification serves what is available then; nothing is held back for later."""
    rig.write(0, pattern(1, 512))
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)]
    rig.write(1, pattern(2, 512))
    rig.write(2, pattern(3, 512))
    assert rig.run() == [(1, VIRTIO_BLK_S_OK)] * 2
    assert [c[2] for c in calls] == [1, 2]
    assert file_bytes(image, 0, 1536) == pattern(1, 512) + pattern(2, 512) + pattern(3, 512)
