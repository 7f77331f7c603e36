"""A driver-side fake of a split virtqueue, for unit tests of devices without a guest.

:class:`MockSplitQueue` lays out a descriptor table, an avail ring and a used ring in a
:class:`~pyrovm.memory.GuestMemory`, plus a data area from which it hands out buffers.  Tests add chains
(direct or through an indirect table, or hand-crafted descriptors for the malicious cases), let the
device process them, then read the used ring back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyrovm.devices.virtio.queue import (
    DESC,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueState,
    SplitQueue,
)
from pyrovm.memory import GuestMemory


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


@dataclass
class MockChain:
    """What :meth:`MockSplitQueue.add_chain` placed: the head and the guest address of every buffer."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class MockSplitQueue:
    """A fake driver for one split virtqueue in *memory*."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int = 16,
        base: int = 0x1000,
        data_base: int | None = None,
        data_size: int = 0x10000,
        max_size: int | None = None,
    ) -> None:
        self.memory = memory
        self.size = size
        self.desc_addr = base
        self.avail_addr = base + DESC_SIZE * size
        self.used_addr = _align(self.avail_addr + 6 + 2 * size, 4)
        end = self.used_addr + 6 + 8 * size
        self.data_base = _align(end, 0x1000) if data_base is None else data_base
        self.data_end = self.data_base + data_size
        self._next_data = self.data_base
        self._next_desc = 0
        self._avail_idx = 0
        self._used_seen = 0
        self.state = QueueState(
            max_size=max_size if max_size is not None else max(size, 256),
            size=size,
            ready=True,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
        )
        memory.fill(base, end - base)

    # -- building ------------------------------------------------------------------------------------
    def queue(self, *, event_idx: bool = False, indirect: bool = False) -> SplitQueue:
        """A device-side :class:`SplitQueue` on this ring."""
        return SplitQueue(self.memory, self.state, event_idx=event_idx, indirect=indirect)

    def alloc(self, length: int, data: bytes | None = None, align: int = 8) -> int:
        """Reserve *length* bytes of the data area (filled with *data* or zeroes); returns the address."""
        gpa = _align(self._next_data, align)
        if gpa + length > self.data_end:
            raise MemoryError("mock queue data area is full")
        self._next_data = gpa + length
        self.memory.fill(gpa, length)
        if data is not None:
            self.memory.write(gpa, data[:length])
        return gpa

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Write descriptor *index* of the main table."""
        self.memory.write(self.desc_addr + DESC_SIZE * index, DESC.pack(addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put *head* on the avail ring and bump the avail index."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self._avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self._avail_idx = idx & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self._avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_addr, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def _take_descs(self, n: int) -> list[int]:
        out = [(self._next_desc + i) % self.size for i in range(n)]
        self._next_desc = (self._next_desc + n) % self.size
        return out

    def _buffers(
        self, readable: list[bytes | int], writable: list[int]
    ) -> tuple[list[tuple[int, int, int]], MockChain]:
        chain = MockChain(head=-1)
        bufs: list[tuple[int, int, int]] = []
        for r in readable:
            data = bytes(r) if isinstance(r, int) else r
            gpa = self.alloc(len(data), data)
            chain.readable.append((gpa, len(data)))
            bufs.append((gpa, len(data), 0))
        for w in writable:
            gpa = self.alloc(w)
            chain.writable.append((gpa, w))
            bufs.append((gpa, w, VIRTQ_DESC_F_WRITE))
        return bufs, chain

    def add_chain(
        self, readable: Sequence[bytes | int] = (), writable: Sequence[int] = (), publish: bool = True
    ) -> MockChain:
        """Place buffers (readable: contents or a length; writable: lengths) as a direct chain."""
        bufs, chain = self._buffers(list(readable), list(writable))
        idx = self._take_descs(len(bufs))
        for i, (gpa, n, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.write_desc(
                idx[i], gpa, n, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else idx[i + 1]
            )
        chain.head = idx[0]
        if publish:
            self.publish(chain.head)
        return chain

    def add_indirect_chain(
        self, readable: Sequence[bytes | int] = (), writable: Sequence[int] = (), publish: bool = True
    ) -> MockChain:
        """Place buffers through one indirect table referenced by a single main-table descriptor."""
        bufs, chain = self._buffers(list(readable), list(writable))
        table = self.alloc(DESC_SIZE * len(bufs), align=16)
        for i, (gpa, n, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            entry = DESC.pack(gpa, n, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            self.memory.write(table + DESC_SIZE * i, entry)
        (head,) = self._take_descs(1)
        self.write_desc(head, table, DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)
        chain.head = head
        if publish:
            self.publish(head)
        return chain

    def write_indirect_table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """Write raw ``(addr, len, flags, next)`` entries as an indirect table; returns its address."""
        table = self.alloc(DESC_SIZE * len(entries), align=16)
        for i, e in enumerate(entries):
            self.memory.write(table + DESC_SIZE * i, DESC.pack(*e))
        return table

    # -- reading back --------------------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)

    def used_flags(self) -> int:
        return self.memory.read_u16(self.used_addr)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_addr + 4 + 8 * self.size)

    def used_elem(self, i: int) -> tuple[int, int]:
        """Used ring entry *i* (free-running index): ``(head, written_len)``."""
        off = self.used_addr + 4 + 8 * (i % self.size)
        return self.memory.read_u32(off), self.memory.read_u32(off + 4)

    def take_used(self) -> list[tuple[int, int]]:
        """Used entries added since the last call."""
        end = self.used_idx()
        out = []
        while self._used_seen != end:
            out.append(self.used_elem(self._used_seen))
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return out

    def read(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)
