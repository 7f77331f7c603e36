"""Guest physical memory.

Guest RAM is a set of non-overlapping regions, each backed by an anonymous (or file) ``mmap`` that is
also registered with KVM.  Every access goes through :class:`GuestMemory`, which checks that the whole
range lies inside one region: a bad guest address raises :class:`GuestMemoryError`, it never reads or
writes outside the mapping.  :meth:`GuestMemory.view` gives zero-copy ``memoryview`` slices for the hot
paths (virtqueues, ``os.preadv`` straight into guest RAM).

The bounds check lives here only.  :meth:`GuestMemory._find` looks a range up among any number of
regions; when guest RAM is a single region (the usual case) :meth:`GuestMemory.view` and
:meth:`GuestMemory.contains` are replaced at construction by closures over that region's base, size and
view (:func:`_one_region_access`), so the hot paths pay one call and no lookup.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pyrovm.errors import PyrovmError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(PyrovmError, ValueError):
    """A guest physical address range that is not (entirely) backed by guest RAM."""


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest RAM backed by a host mapping."""

    guest_addr: int
    size: int
    mm: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)
    host_addr: int
    #: anonymous memory (not a file's): pages never touched are zero and not present
    anonymous: bool = True

    @property
    def end(self) -> int:
        """First guest address past the region."""
        return self.guest_addr + self.size


def _outside(gpa: int, length: int) -> GuestMemoryError:
    return GuestMemoryError(f"guest address range {gpa:#x}+{length:#x} is outside guest RAM")


def _one_region_access(
    region: MemoryRegion,
) -> tuple[Callable[[int, int], memoryview], Callable[[int, int], bool]]:
    """``(view, contains)`` for guest RAM made of *region* alone: the region lookup is done once, here."""
    base, size, ram = region.guest_addr, region.size, region.view

    def contains(gpa: int, length: int = 1) -> bool:
        off = gpa - base
        return off >= 0 and length >= 0 and off + length <= size

    def view(gpa: int, length: int) -> memoryview:
        off = gpa - base
        if off >= 0 and length >= 0 and off + length <= size:
            return ram[off : off + length]
        raise _outside(gpa, length)

    return view, contains


def _map(size: int, fd: int | None, offset: int, private: bool = False) -> mmap.mmap:
    if fd is None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0) if private else mmap.MAP_SHARED
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)


class GuestMemory:
    """Guest RAM made of one or more regions, addressed by guest physical address."""

    #: ``view(gpa, length)``: a zero-copy, writable, bounds-checked view of ``[gpa, gpa + length)``.
    view: Callable[[int, int], memoryview]
    #: ``contains(gpa, length=1)``: True when ``[gpa, gpa + length)`` lies in one region.
    contains: Callable[..., bool]

    def __init__(
        self, layout: Iterable[tuple[int, int]], fd: int | None = None, private: bool = False
    ) -> None:
        """Map each ``(guest_addr, size)`` of *layout*: anonymous memory, or consecutive parts of *fd*
        (shared, or with *private* copy-on-write: pages load from the file on demand and writes stay in
        this process, the file never changes)."""
        regions: list[MemoryRegion] = []
        offset = 0
        for guest_addr, size in sorted(layout):
            if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
                raise GuestMemoryError(
                    f"memory region {guest_addr:#x}+{size:#x} is not a positive whole number of pages"
                )
            if regions and guest_addr < regions[-1].end:
                raise GuestMemoryError(f"memory region at {guest_addr:#x} overlaps the previous one")
            mm = _map(size, fd, offset, private)
            offset += size
            host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            regions.append(MemoryRegion(guest_addr, size, mm, memoryview(mm), host_addr, fd is None))
        if not regions:
            raise GuestMemoryError("guest memory needs at least one region")
        self._regions = regions
        self._starts = [r.guest_addr for r in regions]
        #: guest page numbers (``gpa >> 12``) the VMM wrote into, collected only after
        #: :meth:`track_vmm_writes` (the virtqueues add the pages of every device-writable buffer)
        self.vmm_dirty: set[int] | None = None
        if len(regions) == 1:
            self.view, self.contains = _one_region_access(regions[0])
        else:
            self.view, self.contains = self._view_any, self._contains_any

    # -- layout --------------------------------------------------------------------------------------
    @property
    def regions(self) -> list[MemoryRegion]:
        """The regions, sorted by guest address."""
        return list(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def _find(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self._regions[i]
            off = gpa - r.guest_addr
            if off + length <= r.size:
                return r, off
        raise _outside(gpa, length)

    def _contains_any(self, gpa: int, length: int = 1) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, gpa: int) -> int:
        """Host virtual address of guest physical address *gpa*."""
        r, off = self._find(gpa, 1)
        return r.host_addr + off

    def track_vmm_writes(self) -> None:
        """Start collecting the pages the VMM's devices write (KVM's dirty log sees only the guest's)."""
        if self.vmm_dirty is None:
            self.vmm_dirty = set()

    # -- access --------------------------------------------------------------------------------------
    def _view_any(self, gpa: int, length: int) -> memoryview:
        r, off = self._find(gpa, length)
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy *length* bytes out of guest memory."""
        r, off = self._find(gpa, length)
        return r.mm[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy *data* into guest memory at *gpa*."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        r, off = self._find(gpa, n)
        r.view[off : off + n] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        """Set *length* bytes at *gpa* to *value*.  Zeroing whole pages of anonymous memory gives them
        back to the kernel instead (``MADV_DONTNEED``: they read as zero and cost nothing until written; a
        kernel's multi-MiB BSS is not touched at load)."""
        r, off = self._find(gpa, length)
        page = mmap.PAGESIZE
        first, last = -(-off // page) * page, (off + length) // page * page
        if value == 0 and r.anonymous and last - first >= 16 * page:
            r.mm[off:first] = bytes(first - off)
            r.mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            r.mm[last : off + length] = bytes(off + length - last)
            return
        r.mm[off : off + length] = bytes([value]) * length

    def read_u8(self, gpa: int) -> int:
        r, off = self._find(gpa, 1)
        return r.mm[off]

    def read_u16(self, gpa: int) -> int:
        r, off = self._find(gpa, 2)
        return _U16.unpack_from(r.mm, off)[0]

    def read_u32(self, gpa: int) -> int:
        r, off = self._find(gpa, 4)
        return _U32.unpack_from(r.mm, off)[0]

    def read_u64(self, gpa: int) -> int:
        r, off = self._find(gpa, 8)
        return _U64.unpack_from(r.mm, off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        r, off = self._find(gpa, 1)
        r.mm[off] = value

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._find(gpa, 2)
        _U16.pack_into(r.mm, off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._find(gpa, 4)
        _U32.pack_into(r.mm, off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._find(gpa, 8)
        _U64.pack_into(r.mm, off, value)

    def read_cstring(self, gpa: int, max_length: int = 4096) -> bytes:
        """The NUL-terminated string at *gpa* (without the NUL), at most *max_length* bytes."""
        r, off = self._find(gpa, 1)
        end = r.mm.find(b"\0", off, min(r.size, off + max_length))
        if end < 0:
            raise GuestMemoryError(f"no NUL-terminated string within {max_length} bytes at {gpa:#x}")
        return r.mm[off:end]

    def close(self) -> None:
        """Unmap everything (views handed out earlier must be released first)."""
        for r in self._regions:
            r.view.release()
            try:
                r.mm.close()
            except BufferError:  # a caller still holds a view or ctypes object: leave it mapped
                pass

    @classmethod
    def anonymous(cls, size: int) -> GuestMemory:
        """One region of *size* bytes at guest address 0 (tests, simple guests)."""
        return cls([(0, size)])

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], layout: Iterable[tuple[int, int]], private: bool = False
    ) -> GuestMemory:
        """Regions backed by consecutive parts of the file at *path*: a shared mapping, or with *private*
        a copy-on-write one of a file opened read-only (snapshot restore)."""
        fd = os.open(path, os.O_RDONLY if private else os.O_RDWR)
        try:
            return cls(layout, fd=fd, private=private)
        finally:
            os.close(fd)
