from __future__ import annotations

import pytest

from pyrovm.errors import PyrovmError
from pyrovm.memory import GuestMemory, GuestMemoryError


def test_read_write_integers_and_bytes() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u8(0x10, 0xAB)
    mem.write_u16(0x20, 0xBEEF)
    mem.write_u32(0x30, 0xDEADBEEF)
    mem.write_u64(0x40, 0x0123456789ABCDEF)
    assert (mem.read_u8(0x10), mem.read_u16(0x20), mem.read_u32(0x30)) == (0xAB, 0xBEEF, 0xDEADBEEF)
    assert mem.read_u64(0x40) == 0x0123456789ABCDEF
    assert mem.read(0x40, 8) == bytes.fromhex("efcdab8967452301")  # little-endian


def test_view_is_zero_copy() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    view = mem.view(0x2000, 16)
    view[0:4] = b"abcd"
    assert mem.read(0x2000, 4) == b"abcd"
    mem.write(0x2004, b"efgh")
    assert bytes(view[4:8]) == b"efgh"


@pytest.mark.parametrize(
    ("addr", "length"),
    [(1 << 20, 1), ((1 << 20) - 4, 8), (-1, 1), (0x3000_0000, 4)],
)
def test_out_of_bounds_raises(addr: int, length: int) -> None:
    mem = GuestMemory.anonymous(1 << 20)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        mem.read(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.write(addr, b"x" * length)
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)


def test_two_regions_and_the_hole_between() -> None:
    mem = GuestMemory([(0, 0x10000), (0x100000, 0x10000)])
    assert mem.size == 0x20000
    mem.write_u32(0x100000, 7)
    assert mem.read_u32(0x100000) == 7
    assert not mem.contains(0x20000)
    with pytest.raises(GuestMemoryError):
        mem.read(0xFFFC, 8)  # straddles the end of the first region
    with pytest.raises(GuestMemoryError):
        mem.write_u8(0x50000, 1)  # in the hole
    assert mem.host_address(0x100000) == mem.regions[1].host_addr


def test_bad_layouts() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 100)])
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 0x2000), (0x1000, 0x1000)])
    with pytest.raises(GuestMemoryError):
        GuestMemory([])


def test_cstring() -> None:
    mem = GuestMemory.anonymous(0x10000)
    mem.write(0x100, b"console=ttyS0\0junk")
    assert mem.read_cstring(0x100) == b"console=ttyS0"
    mem.fill(0x200, 0x100, 0x41)
    with pytest.raises(GuestMemoryError):
        mem.read_cstring(0x200, 0x80)


def test_file_backed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ram"
    path.write_bytes(bytes(0x2000))
    mem = GuestMemory.from_file(path, [(0, 0x2000)])
    mem.write(0x1000, b"persist")
    mem.regions[0].mm.flush()
    assert path.read_bytes()[0x1000:0x1007] == b"persist"


def test_guest_memory_error_is_rooted() -> None:
    mem = GuestMemory.anonymous(0x2000)
    with pytest.raises(PyrovmError):
        mem.read(0x1FFF, 2)
    with pytest.raises(ValueError):
        mem.read(0x1FFF, 2)
    mem.close()


@pytest.mark.parametrize(
    "layout", [[(0x10000, 0x10000)], [(0x10000, 0x10000), (0x100000, 0x1000)]], ids=["one", "two"]
)
def test_view_and_contains_agree_with_find(layout: list[tuple[int, int]]) -> None:
    """The one-region fast path and the general lookup answer the same for edges, holes and negatives."""
    mem = GuestMemory(layout)
    cases = [
        (0x10000, 0x10000, True),
        (0x10000, 0, True),
        (0x1FFFF, 1, True),
        (0x1FFFF, 2, False),
        (0x20000, 0, True),  # an empty range right at the end of a region
        (0x20000, 1, False),
        (0xFFFF, 1, False),
        (0xFFFF, 2, False),
        (0x10000, -1, False),
        (-1, 1, False),
    ]
    for gpa, length, inside in cases:
        assert mem.contains(gpa, length) is inside, (gpa, length)
        if inside:
            assert mem.view(gpa, length).nbytes == length
        else:
            with pytest.raises(GuestMemoryError):
                mem.view(gpa, length)
    assert mem.contains(0x10000) and not mem.contains(0x0)
    mem.view(0x10004, 4)[:] = b"abcd"
    assert mem.read(0x10004, 4) == b"abcd"


def _rss_pages(mem: GuestMemory) -> int:
    """Resident pages of *mem*'s one region (mincore through the kernel's page map of this process)."""
    import mmap

    region = mem.regions[0]
    start, end = region.host_addr, region.host_addr + region.size
    total = 0
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                inside = lo <= start < hi or start <= lo < end
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024 // mmap.PAGESIZE
    return total


def test_fill_zeroes_whole_pages_without_touching_them() -> None:
    mem = GuestMemory.anonymous(4 << 20)
    mem.write(0x1000, b"\xaa" * (1 << 20))  # dirty 256 pages
    mem.write(0x0FFF, b"\x55")
    before = _rss_pages(mem)
    mem.fill(0x0800, (1 << 20) + 0x1000)  # unaligned at both ends
    assert mem.read(0x0800, (1 << 20) + 0x1000) == bytes((1 << 20) + 0x1000)
    assert mem.read(0x07FF, 1) == b"\0" and mem.read(0x100800, 1) == b"\0"
    assert _rss_pages(mem) < before - 200  # given back, not written
    mem.fill(0x2000, 5000, 0x7F)
    assert mem.read(0x2000, 5000) == b"\x7f" * 5000 and mem.read(0x2000 + 5000, 1) == b"\0"
    mem.close()


def test_fill_zeroes_file_backed_memory_by_writing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mem"
    path.write_bytes(b"\x11" * (1 << 20))
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        mem = GuestMemory([(0, 1 << 20)], fd=fd, private=True)
        mem.fill(0, 1 << 20)  # (MADV_DONTNEED would bring the file's bytes back)
        assert mem.read(0, 1 << 20) == bytes(1 << 20)
        mem.close()
    finally:
        os.close(fd)
