"""The snapshot memory file: guest RAM, region after region, as the guest left it.

A full snapshot writes every page that is not all zeroes and leaves the rest as holes (the file is sparse
where the guest never wrote).  A diff snapshot writes only the pages dirtied since the previous snapshot
(zero or not: a page the guest cleared must overwrite the base's); everything else is a hole.
:func:`rebase` copies a diff's written extents onto its base (``SEEK_DATA`` / ``SEEK_HOLE``), after which
the base restores the VM as it was at the diff.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator

from ..errors import SnapshotError
from ..memory import GuestMemory, MemoryRegion

PAGE = mmap.PAGESIZE
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE)


_PRESENT = bytes(0x01 if b & 0xC0 else 0 for b in range(256))  # top byte: bit 63 present, 62 swapped
_RUN = re.compile(b"\x01+")


def _touched_runs(region: MemoryRegion) -> list[tuple[int, int]]:
    """``(offset, length)`` of the parts of an anonymous region the process ever touched (present or
    swapped, from ``/proc/self/pagemap``): the rest is zero and need not be read.  The whole region when
    the pagemap cannot be read or the region is a file's."""
    whole = [(0, region.size)]
    if not region.anonymous:
        return whole
    pages = region.size // PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(region.host_addr // PAGE * 8)
            entries = f.read(pages * 8)
    except OSError:
        return whole
    if len(entries) != pages * 8:
        return whole
    flags = entries[7::8].translate(_PRESENT)
    return [(m.start() * PAGE, (m.end() - m.start()) * PAGE) for m in _RUN.finditer(flags)]


def _nonzero_runs(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the runs of pages of *region* that are not all zeroes (pages never touched
    skipped at once; then 1 MiB at a time, page by page only inside a chunk that is not all zero)."""
    for first, length in _touched_runs(region):
        yield from _nonzero_in(region.mm, first, first + length)


def _nonzero_in(mm: mmap.mmap, begin: int, size: int) -> Iterator[tuple[int, int]]:
    start: int | None = None
    for off in range(begin, size, _CHUNK):
        end = min(off + _CHUNK, size)
        if mm[off:end] == _ZERO_CHUNK[: end - off]:
            if start is not None:
                yield start, off - start
                start = None
            continue
        for page in range(off, end, PAGE):
            if mm[page : page + PAGE] == _ZERO_PAGE:
                if start is not None:
                    yield start, page - start
                    start = None
            elif start is None:
                start = page
    if start is not None:
        yield start, size - start


def _page_runs(pages: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Sorted page numbers as ``(first, count)`` runs."""
    first = count = -1
    for p in sorted(pages):
        if count > 0 and p == first + count:
            count += 1
            continue
        if count > 0:
            yield first, count
        first, count = p, 1
    if count > 0:
        yield first, count


def _open_new(path: str | os.PathLike[str], size: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    return fd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_runs(
    memory: GuestMemory,
    path: str | os.PathLike[str],
    runs: Callable[[int, MemoryRegion], Iterable[tuple[int, int]]],
) -> int:
    """Write, for each region, the ``(offset, length)`` runs *runs(index, region)* gives, at their offsets
    in a full memory file (holes elsewhere); returns the bytes written."""
    fd = _open_new(path, memory.size)
    written = 0
    try:
        base = 0
        for index, region in enumerate(memory):
            for off, length in runs(index, region):
                _pwrite_all(fd, region.view[off : off + length], base + off)
                written += length
            base += region.size
        os.fsync(fd)
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return written


def write_full(memory: GuestMemory, path: str | os.PathLike[str]) -> int:
    """Write all of guest RAM to *path* (sparse); returns the bytes written (not counting holes)."""
    return _write_runs(memory, path, lambda index, region: _nonzero_runs(region))


def write_diff(memory: GuestMemory, path: str | os.PathLike[str], dirty: dict[int, set[int]]) -> int:
    """Write the pages of *dirty* (region index -> page numbers within the region) to *path*, at their
    offsets in a full memory file; returns the bytes written."""

    def runs(index: int, region: MemoryRegion) -> Iterator[tuple[int, int]]:
        for first, count in _page_runs(dirty.get(index, ())):
            yield first * PAGE, count * PAGE

    return _write_runs(memory, path, runs)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the parts of the file that hold data (not holes)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        off = end


def rebase(base: str | os.PathLike[str], diff: str | os.PathLike[str]) -> int:
    """Copy the data of the diff memory file *diff* onto *base* (same size); returns the bytes copied."""
    try:
        src = os.open(diff, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"diff memory file {diff}: {exc.strerror}") from None
    try:
        dst = os.open(base, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(src)
        raise SnapshotError(f"base memory file {base}: {exc.strerror}") from None
    copied = 0
    try:
        size = os.fstat(src).st_size
        if os.fstat(dst).st_size != size:
            raise SnapshotError(
                f"{diff} ({size} bytes) and {base} ({os.fstat(dst).st_size} bytes) are not the same size: "
                "not a diff of that base"
            )
        for off, length in data_extents(src, size):
            while length:
                n = os.copy_file_range(src, dst, length, off, off)
                if n == 0:
                    break
                off, length, copied = off + n, length - n, copied + n
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return copied
