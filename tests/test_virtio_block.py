"""virtio-blk through the mock queue, against a real temporary image file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pyrovm.devices.virtio.block import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockError,
    DiskLockedError,
    VirtioBlock,
)
from pyrovm.devices.virtio.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyrovm.devices.virtio.mock import MockChain, MockSplitQueue
from pyrovm.errors import DeviceError, PyrovmError
from pyrovm.memory import GuestMemory

DISK_SIZE = 1 << 20
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    pattern = bytes(range(256)) * (DISK_SIZE // 256)
    path.write_bytes(pattern)
    return path


class Rig:
    """A block device activated on one mock queue."""

    def __init__(self, dev: VirtioBlock, extra_features: int = 0) -> None:
        self.dev = dev
        self.mem = GuestMemory.anonymous(4 << 20)
        self.mq = MockSplitQueue(self.mem, size=64, data_size=3 << 20)
        dev.acked_features = dev.features & ~(1 << VIRTIO_F_INDIRECT_DESC) | extra_features
        dev.activate(self.mem, [self.mq.queue(indirect=True)])

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        out: list[bytes] | None = None,
        in_lens: list[int] | None = None,
        status: bool = True,
        indirect: bool = False,
    ) -> tuple[MockChain, int, int]:
        """Run one request; returns (placed chain, used len, status byte)."""
        readable: list[bytes | int] = [HDR.pack(rtype, 0, sector), *(out or [])]
        writable = [*(in_lens or []), *([1] if status else [])]
        add = self.mq.add_indirect_chain if indirect else self.mq.add_chain
        placed = add(readable, writable)
        self.dev.process(0)
        used = self.mq.take_used()
        assert len(used) == 1 and used[0][0] == placed.head
        st = self.mem.read_u8(placed.writable[-1][0]) if status else -1
        return placed, used[0][1], st

    def data_in(self, placed: MockChain) -> bytes:
        return b"".join(self.mem.read(g, n) for g, n in placed.writable[:-1])


@pytest.fixture
def rig(image: Path) -> Rig:
    with VirtioBlock(image, serial="pyrovm-serial-01") as dev:
        yield Rig(dev)


def file_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_features_and_config(image: Path) -> None:
    with VirtioBlock(image) as dev:
        assert dev.device_id == 2
        feats = dev.features
        for bit in (
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            2,
            6,
        ):
            assert feats >> bit & 1, bit
        assert not feats >> VIRTIO_BLK_F_RO & 1
        cfg = dev.read_config(0, 60)
        assert struct.unpack_from("<Q", cfg, 0)[0] == DISK_SIZE // 512
        assert struct.unpack_from("<I", cfg, 12)[0] == 254  # seg_max
        assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
        assert struct.unpack_from("<I", cfg, 36)[0] > 0  # max_discard_sectors
        assert cfg[56] == 1  # write_zeroes_may_unmap
        assert dev.read_config(0, 8) == struct.pack("<Q", DISK_SIZE // 512)
        assert dev.read_config(200, 4) == bytes(4)  # past the end: zeroes


def test_read(rig: Rig, image: Path) -> None:
    placed, used, st = rig.submit(VIRTIO_BLK_T_IN, sector=3, in_lens=[512, 1024])
    assert st == VIRTIO_BLK_S_OK
    assert used == 1536 + 1
    assert rig.data_in(placed) == file_bytes(image, 3 * 512, 1536)
    m = rig.dev.metrics()
    assert m["requests"] == 1 and m["bytes_read"] == 1536 and m["errors"] == 0


def test_read_indirect(rig: Rig, image: Path) -> None:
    placed, used, st = rig.submit(VIRTIO_BLK_T_IN, sector=1, in_lens=[256, 256, 512], indirect=True)
    assert st == VIRTIO_BLK_S_OK and used == 1025
    assert rig.data_in(placed) == file_bytes(image, 512, 1024)


def test_write(rig: Rig, image: Path) -> None:
    payload = os.urandom(2048)
    _, used, st = rig.submit(VIRTIO_BLK_T_OUT, sector=10, out=[payload[:100], payload[100:]])
    assert st == VIRTIO_BLK_S_OK and used == 1
    assert file_bytes(image, 10 * 512, 2048) == payload  # in the file when completed
    assert rig.dev.metrics()["bytes_written"] == 2048


def test_header_split_across_descriptors(rig: Rig, image: Path) -> None:
    hdr = HDR.pack(VIRTIO_BLK_T_IN, 0, 2)
    placed = rig.mq.add_chain([hdr[:5], hdr[5:]], [512, 1])
    rig.dev.process(0)
    assert rig.mq.take_used() == [(placed.head, 513)]
    assert rig.mem.read_u8(placed.writable[-1][0]) == VIRTIO_BLK_S_OK
    assert rig.mem.read(placed.writable[0][0], 512) == file_bytes(image, 1024, 512)


def test_flush_fsyncs(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    _, used, st = rig.submit(VIRTIO_BLK_T_FLUSH)
    assert st == VIRTIO_BLK_S_OK and used == 1
    assert calls == [rig.dev.fd]


def test_get_id(rig: Rig) -> None:
    placed, used, st = rig.submit(VIRTIO_BLK_T_GET_ID, in_lens=[20])
    assert st == VIRTIO_BLK_S_OK and used == 21
    assert rig.data_in(placed) == b"pyrovm-serial-01\0\0\0\0"


def test_serial_too_long(image: Path) -> None:
    with pytest.raises(BlockError, match="longer than 20"):
        VirtioBlock(image, serial="x" * 21)


def test_out_of_range_sector(rig: Rig) -> None:
    last = DISK_SIZE // 512 - 1
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=last, in_lens=[512])
    assert st == VIRTIO_BLK_S_OK
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=last, in_lens=[1024])
    assert st == VIRTIO_BLK_S_IOERR
    _, _, st = rig.submit(VIRTIO_BLK_T_OUT, sector=1 << 60, out=[bytes(512)])
    assert st == VIRTIO_BLK_S_IOERR
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=0xFFFF_FFFF_FFFF_FFFF, in_lens=[512])
    assert st == VIRTIO_BLK_S_IOERR
    assert rig.dev.metrics()["errors"] == 3


def test_partial_sector_is_ioerr(rig: Rig) -> None:
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=0, in_lens=[100])
    assert st == VIRTIO_BLK_S_IOERR


def test_unknown_type_unsupp(rig: Rig) -> None:
    _, used, st = rig.submit(99)
    assert st == VIRTIO_BLK_S_UNSUPP and used == 1


def test_header_in_writable_buffer(rig: Rig) -> None:
    placed = rig.mq.add_chain([], [16, 512, 1])
    rig.dev.process(0)
    assert rig.mq.take_used() == [(placed.head, 1)]
    assert rig.mem.read_u8(placed.writable[-1][0]) == VIRTIO_BLK_S_IOERR


def test_write_with_writable_data_is_ioerr(rig: Rig, image: Path) -> None:
    before = file_bytes(image, 0, 512)
    _, _, st = rig.submit(VIRTIO_BLK_T_OUT, sector=0, in_lens=[512])
    assert st == VIRTIO_BLK_S_IOERR
    assert file_bytes(image, 0, 512) == before


def test_read_with_readable_data_is_ioerr(rig: Rig) -> None:
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=0, out=[bytes(512)])
    assert st == VIRTIO_BLK_S_IOERR


def test_no_status_byte(rig: Rig) -> None:
    _, used, _ = rig.submit(VIRTIO_BLK_T_IN, sector=0, status=False)
    assert used == 0
    assert rig.dev.metrics()["errors"] == 1


def test_bad_chain_completed_with_zero(rig: Rig) -> None:
    rig.mq.write_desc(0, 1 << 40, 16)
    rig.mq.publish(0)
    rig.mq._next_desc = 1
    rig.dev.process(0)
    assert rig.mq.take_used() == [(0, 0)]
    _, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=0, in_lens=[512])
    assert st == VIRTIO_BLK_S_OK  # the next request still works
    assert rig.dev.metrics()["errors"] == 1


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _fill_allocated(image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(os.urandom(DISK_SIZE))
        f.flush()
        os.fsync(f.fileno())


def test_discard_punches_hole(rig: Rig, image: Path) -> None:
    _fill_allocated(image)
    before = allocated(image)
    _, used, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(256, 512, 0)])  # 256 KiB at 128 KiB
    assert st == VIRTIO_BLK_S_OK and used == 1
    assert allocated(image) <= before - 256 * 1024
    assert file_bytes(image, 128 * 1024, 256 * 1024) == bytes(256 * 1024)
    assert os.path.getsize(image) == DISK_SIZE
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 128 * 1024


def test_discard_with_unmap_flag_is_unsupp(rig: Rig) -> None:
    _, _, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(0, 8, 1)])
    assert st == VIRTIO_BLK_S_UNSUPP


def test_discard_bad_segments(rig: Rig) -> None:
    _, _, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(0, 8, 0)[:10]])
    assert st == VIRTIO_BLK_S_IOERR
    _, _, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(DISK_SIZE // 512, 8, 0)])
    assert st == VIRTIO_BLK_S_IOERR
    _, _, st = rig.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=[SEG.pack(0, 8, 0x4)])
    assert st == VIRTIO_BLK_S_UNSUPP


def test_write_zeroes_unmap_punches(rig: Rig, image: Path) -> None:
    _fill_allocated(image)
    before = allocated(image)
    segs = SEG.pack(0, 128, 1) + SEG.pack(1024, 128, 1)  # two 64 KiB ranges
    _, _, st = rig.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=[segs])
    assert st == VIRTIO_BLK_S_OK
    assert allocated(image) <= before - 128 * 1024
    assert file_bytes(image, 0, 64 * 1024) == bytes(64 * 1024)
    assert file_bytes(image, 512 * 1024, 64 * 1024) == bytes(64 * 1024)
    assert file_bytes(image, 64 * 1024, 512) != bytes(512)


def test_write_zeroes_without_unmap(rig: Rig, image: Path) -> None:
    _fill_allocated(image)
    _, _, st = rig.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=[SEG.pack(3, 5, 0)])
    assert st == VIRTIO_BLK_S_OK
    assert file_bytes(image, 3 * 512, 5 * 512) == bytes(5 * 512)
    assert file_bytes(image, 8 * 512, 512) != bytes(512)


def test_discard_not_negotiated_is_unsupp(image: Path) -> None:
    with VirtioBlock(image) as dev:
        rig = Rig(dev)
        dev.acked_features &= ~(1 << VIRTIO_BLK_F_DISCARD)
        _, _, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(0, 8, 0)])
        assert st == VIRTIO_BLK_S_UNSUPP


def test_read_only(image: Path) -> None:
    before = image.read_bytes()
    with VirtioBlock(image, read_only=True) as dev:
        assert dev.features >> VIRTIO_BLK_F_RO & 1
        assert not dev.features >> VIRTIO_BLK_F_DISCARD & 1
        rig = Rig(dev)
        _, _, st = rig.submit(VIRTIO_BLK_T_OUT, sector=0, out=[bytes(512)])
        assert st == VIRTIO_BLK_S_IOERR
        _, _, st = rig.submit(VIRTIO_BLK_T_DISCARD, out=[SEG.pack(0, 8, 0)])
        assert st == VIRTIO_BLK_S_UNSUPP
        _, _, st = rig.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=[SEG.pack(0, 8, 1)])
        assert st == VIRTIO_BLK_S_UNSUPP
        placed, _, st = rig.submit(VIRTIO_BLK_T_IN, sector=0, in_lens=[512])
        assert st == VIRTIO_BLK_S_OK and rig.data_in(placed) == before[:512]
        _, _, st = rig.submit(VIRTIO_BLK_T_FLUSH)
        assert st == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before


def test_size_not_multiple_of_512(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(1000))
    with pytest.raises(BlockError, match=r"odd\.img.*multiple of 512"):
        VirtioBlock(path)


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(BlockError, match=r"nope\.img") as info:
        VirtioBlock(tmp_path / "nope.img")
    assert isinstance(info.value, DeviceError) and isinstance(info.value, PyrovmError)
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the OSError is chained, not hidden


def test_lock_conflict(image: Path) -> None:
    with VirtioBlock(image) as first:
        with pytest.raises(DiskLockedError, match=r"disk\.img.*locked") as info:
            VirtioBlock(image)
        assert isinstance(info.value, DeviceError)
        assert isinstance(info.value.__cause__, BlockingIOError)
        with pytest.raises(DiskLockedError):
            VirtioBlock(image, read_only=True)
        first.close()
        VirtioBlock(image).close()  # released on close
    with VirtioBlock(image, read_only=True) as a, VirtioBlock(image, read_only=True) as b:
        assert a.capacity == b.capacity  # shared locks coexist
        with pytest.raises(DiskLockedError):
            VirtioBlock(image)


def test_many_requests_batch(rig: Rig, image: Path) -> None:
    placed = [rig.mq.add_chain([HDR.pack(VIRTIO_BLK_T_IN, 0, i)], [512, 1]) for i in range(20)]
    rig.dev.process(0)
    used = rig.mq.take_used()
    assert [h for h, _ in used] == [p.head for p in placed]
    for i, p in enumerate(placed):
        assert rig.mem.read(p.writable[0][0], 512) == file_bytes(image, i * 512, 512)


def test_swap_to_another_image(image: Path, tmp_path: Path) -> None:
    import fcntl

    other = tmp_path / "other.img"
    other.write_bytes(b"\xbb" * (2 * DISK_SIZE))
    dev = VirtioBlock(image)
    rig = Rig(dev)
    placed, _, st = rig.submit(VIRTIO_BLK_T_IN, 0, in_lens=[512])
    assert st == 0 and rig.mem.read(placed.writable[0][0], 4) == bytes(range(4))
    dev.swap(other)
    assert struct.unpack_from("<Q", dev.config_bytes())[0] == 2 * DISK_SIZE // 512  # the new capacity
    placed, _, st = rig.submit(VIRTIO_BLK_T_IN, 2047, in_lens=[512])  # past the old end
    assert st == 0 and rig.mem.read(placed.writable[0][0], 4) == b"\xbb" * 4
    with open(image, "rb+") as f:  # the old image is let go (its lock too)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(BlockError, match="cannot open"):
        dev.swap(tmp_path / "missing.img")
    placed, _, st = rig.submit(VIRTIO_BLK_T_IN, 0, in_lens=[512])  # still on the other image
    assert st == 0 and rig.mem.read(placed.writable[0][0], 1) == b"\xbb"
    dev.close()
