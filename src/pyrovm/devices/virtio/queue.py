"""Split virtqueues (VIRTIO 1.2 §2.7), read through zero-copy views of guest memory.

A :class:`SplitQueue` is built from the driver's queue registers (a :class:`QueueState`) once the driver
sets DRIVER_OK.  :meth:`SplitQueue.pop` walks the next available descriptor chain and returns a
:class:`DescriptorChain` (every buffer checked to lie in guest RAM);
:meth:`SplitQueue.drain` is the loop every device serves a kick with (pop until empty with driver
notifications off, then re-check after turning them back on); :meth:`SplitQueue.add_used` puts a chain
back on the used ring;
:meth:`SplitQueue.needs_notification` applies the notification suppression rules
(``VIRTQ_AVAIL_F_NO_INTERRUPT`` or ``VIRTIO_F_EVENT_IDX``'s ``used_event``).

Everything the guest controls is checked.  Two kinds of errors come out:

* :class:`ChainError` (``fatal = False``): one request is malformed (a buffer outside guest RAM, a loop, a
  readable descriptor after a writable one, a bad indirect table...).  The chain has been consumed and
  its head is in ``error.head``: the device completes it (``add_used(head, 0)`` or an error status) and
  goes on with the next one.
* :class:`QueueBrokenError` (``fatal = True``): the queue itself cannot be trusted any more (bad size or
  ring addresses, the avail index jumping by more than the queue size, a head index out of range).  The
  transport sets ``DEVICE_NEEDS_RESET`` and stops using the device until the driver resets it.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyrovm.errors import GuestError
from pyrovm.memory import GuestMemory, GuestMemoryError

# Descriptor flags (§2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
#: Largest queue size a split virtqueue can have (§2.7: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768
#: Most buffers one chain may have, direct and indirect descriptors together (QEMU's VIRTQUEUE_MAX_SIZE;
#: Linux never builds longer chains): a longer chain breaks the queue, so that one notification cannot make
#: the device walk millions of descriptors.
MAX_CHAIN_DESCRIPTORS = 1024
#: Largest indirect table (its entries count towards MAX_CHAIN_DESCRIPTORS too).
MAX_INDIRECT_ENTRIES = MAX_CHAIN_DESCRIPTORS
#: Work one :meth:`SplitQueue.drain` does before it yields to other devices: descriptors walked (each
#: chain counts one more).  The rest waits for the next slice (:attr:`SplitQueue.deferred`).
DRAIN_BUDGET = 4096

# The rings are read and written through native-order typed views (single aligned loads and stores).
if sys.byteorder != "little":  # pragma: no cover - KVM on x86-64 only
    raise ImportError("pyrovm's virtqueues need a little-endian host")

_FENCE = threading.Lock()
_fence_acquire, _fence_release = _FENCE.acquire, _FENCE.release


def full_barrier() -> None:
    """A full memory barrier: taking a lock is a locked read-modify-write, which x86 never reorders.

    Needed where the device stores to a ring and then loads something the driver stores (store -> load),
    which x86 may otherwise reorder and so lose a notification.  (Two C calls: half the cost of a
    ``with`` block on the lock, on the hot path of every queue.)
    """
    _fence_acquire()
    _fence_release()


#: One descriptor: ``addr`` (u64), ``len`` (u32), ``flags`` (u16), ``next`` (u16), little-endian.
DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


# -- errors ---------------------------------------------------------------------------------------------
class VirtqueueError(GuestError):
    """Something the driver put in a virtqueue is invalid."""

    #: True when the queue as a whole is unusable (the transport must set DEVICE_NEEDS_RESET).
    fatal: ClassVar[bool] = False


class QueueBrokenError(VirtqueueError):
    """The queue itself is unusable until the driver resets the device."""

    fatal = True


class QueueConfigError(QueueBrokenError):
    """Bad queue size or ring addresses (not a power of two, over the max, outside RAM, misaligned)."""


class AvailIndexError(QueueBrokenError):
    """The avail index moved by more than the queue size since the device last looked."""


class HeadIndexError(QueueBrokenError):
    """The avail ring names a head descriptor index outside the descriptor table."""


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; it has been consumed and should be completed with an error."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"descriptor chain {head}: {message}")
        self.head = head


class DescriptorOutOfRangeError(ChainError):
    """A buffer (or an indirect table) is not inside guest RAM."""


class DescriptorIndexError(ChainError):
    """A ``next`` field points past the end of the descriptor table."""


class ChainTooLongError(QueueBrokenError):
    """A chain with more than MAX_CHAIN_DESCRIPTORS buffers, or an indirect table longer than that."""


class ChainLoopError(ChainError):
    """The chain has more descriptors than its table: it loops or is too long."""


class ChainOrderError(ChainError):
    """A device-readable descriptor follows a device-writable one."""


class IndirectError(ChainError):
    """An indirect descriptor that is not allowed here or malformed."""


class NestedIndirectError(IndirectError):
    """An indirect table contains another indirect descriptor."""


class IndirectLengthError(IndirectError):
    """The indirect table length is zero, not a multiple of 16, or too large."""


# -- state ----------------------------------------------------------------------------------------------
@dataclass
class QueueState:
    """Driver-visible registers and device progress of one queue: plain data, for snapshots."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    next_avail: int = 0
    next_used: int = 0
    #: ``next_used`` when the device last decided whether to interrupt (None: never).
    signalled_used: int | None = None

    def reset(self) -> None:
        """Back to the values after a device reset (keeps ``max_size``)."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.next_avail = self.next_used = 0
        self.signalled_used = None


# -- chains ---------------------------------------------------------------------------------------------
class DescriptorChain:
    """One request: its head index and its device-readable then device-writable buffers ``(gpa, len)``."""

    __slots__ = ("head", "memory", "readable", "view", "writable")

    def __init__(
        self, memory: GuestMemory, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]
    ) -> None:
        self.memory = memory
        self.head = head
        self.readable = readable
        self.writable = writable
        #: ``view(gpa, length)``: a bounds-checked zero-copy view of guest memory (``memory.view``).
        self.view = memory.view

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"

    @property
    def readable_len(self) -> int:
        total = 0
        for _, n in self.readable:
            total += n
        return total

    @property
    def writable_len(self) -> int:
        total = 0
        for _, n in self.writable:
            total += n
        return total

    def readable_views(self) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers, in order."""
        view = self.view
        return [view(gpa, n) for gpa, n in self.readable]

    def writable_views(self) -> list[memoryview]:
        """Zero-copy views of the device-writable buffers, in order."""
        view = self.view
        return [view(gpa, n) for gpa, n in self.writable]

    def read_prefix(self, length: int) -> bytes | memoryview:
        """The first *length* readable bytes (a view when they lie in one buffer); shorter if the chain is."""
        readable = self.readable
        if readable and readable[0][1] >= length:
            return self.view(readable[0][0], length)
        out = bytearray()
        for gpa, n in readable:
            take = min(n, length - len(out))
            out += self.view(gpa, take)
            if len(out) == length:
                break
        return bytes(out)

    def write_to_writable(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy *data* into the writable buffers starting *offset* bytes in; returns the bytes written."""
        src = memoryview(data).cast("B")
        done = 0
        for gpa, n in self.writable:
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(src) - done)
            if take <= 0:
                break
            self.view(gpa + offset, take)[:] = src[done : done + take]
            done += take
            offset = 0
        return done


def split_views(views: list[memoryview], length: int) -> tuple[list[memoryview], list[memoryview]]:
    """Cut a scatter list after *length* bytes: ``(first, rest)``; *first* is shorter if the list is."""
    first: list[memoryview] = []
    for i, v in enumerate(views):
        n = v.nbytes
        if length >= n:
            first.append(v)
            length -= n
            if length == 0:
                return first, views[i + 1 :]
            continue
        if length:
            first.append(v[:length])
        return first, [v[length:], *views[i + 1 :]]
    return first, []


def scatter(views: list[memoryview], data: memoryview | bytes, offset: int = 0) -> int:
    """Copy *data* into *views* starting *offset* bytes in; the bytes copied (fewer if they are full)."""
    src = memoryview(data)
    done = 0
    left = len(src)
    for v in views:
        n = v.nbytes
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, left)
        v[offset : offset + take] = src[done : done + take]
        done += take
        left -= take
        offset = 0
        if not left:
            break
    return done


def trim_views(views: list[memoryview], length: int) -> tuple[list[memoryview], list[memoryview]]:
    """Cut a scatter list *length* bytes before its end: ``(head, last_bytes)``."""
    total = sum(v.nbytes for v in views)
    return split_views(views, max(total - length, 0))


# -- the queue --------------------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SplitQueue:
    """A split virtqueue living in guest memory.

    The hot path avoids per-request lookups: the ring fields are read and written through typed
    ``memoryview.cast`` views made once here (aligned 2- and 4-byte loads and stores, as the driver does),
    and buffers are checked and viewed with :class:`GuestMemory`'s own ``contains`` / ``view`` (which
    skip the region lookup when guest RAM is one region).
    """

    def __init__(
        self,
        memory: GuestMemory,
        state: QueueState,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        """Check the driver's configuration in *state* and map the rings; raises :class:`QueueConfigError`."""
        size = state.size
        if not _is_pow2(size) or size > min(state.max_size, MAX_QUEUE_SIZE):
            raise QueueConfigError(
                f"queue size {size} is not a power of two between 1 and {min(state.max_size, MAX_QUEUE_SIZE)}"
            )
        extra = 2 if event_idx else 0
        areas = (
            ("descriptor table", state.desc_addr, DESC_SIZE * size, 16),
            ("driver area (avail ring)", state.avail_addr, 4 + 2 * size + extra, 2),
            ("device area (used ring)", state.used_addr, 4 + 8 * size + extra, 4),
        )
        views: list[memoryview] = []
        for name, addr, length, align in areas:
            if addr % align:
                raise QueueConfigError(f"{name} at {addr:#x} is not {align}-byte aligned")
            try:
                views.append(memory.view(addr, length))
            except GuestMemoryError as e:
                raise QueueConfigError(f"{name} {addr:#x}+{length:#x} is outside guest RAM") from e
        self.memory = memory
        self.state = state
        self.size = size
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc, self._avail, self._used = views
        avail, used = self._avail, self._used
        # Typed views (native byte order, checked little-endian above): [0] flags, [1] idx.
        self._avail_hdr = avail[0:4].cast("H")
        self._avail_ring = avail[4 : 4 + 2 * size].cast("H")
        self._used_hdr = used[0:4].cast("H")
        self._used_ring = used[4 : 4 + 8 * size].cast("I")  # [2i] id, [2i + 1] len
        self._used_event = avail[4 + 2 * size : 4 + 2 * size + extra].cast("H")
        self._avail_event = used[4 + 8 * size : 4 + 8 * size + extra].cast("H")
        self._typed = (
            self._avail_hdr,
            self._avail_ring,
            self._used_hdr,
            self._used_ring,
            self._used_event,
            self._avail_event,
        )
        self._view = memory.view
        self._contains = memory.contains
        self._vmm_dirty = memory.vmm_dirty  # (the used rings are added by the snapshot that reads it)
        self._added = 0  # used entries added since the last needs_notification()
        #: the most descriptors a direct chain may have (a longer one counts as a loop)
        self._direct_limit = min(size, MAX_CHAIN_DESCRIPTORS)
        #: True when the last :meth:`drain` stopped at its budget with chains left (serve them later).
        self.deferred = False

    # -- driver -> device ---------------------------------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's avail index (free-running u16)."""
        return self._avail_hdr[1]

    def pending(self) -> int:
        """How many chains are available and not yet popped.  Raises :class:`AvailIndexError`."""
        idx = self._avail_hdr[1]
        n = (idx - self.state.next_avail) & 0xFFFF
        if n > self.size:
            raise AvailIndexError(
                f"avail index {idx} is {n} ahead of the device ({self.state.next_avail}), "
                f"more than the queue size {self.size}"
            )
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises :class:`ChainError` (chain consumed) or fatal errors."""
        st = self.state
        next_avail = st.next_avail
        idx = self._avail_hdr[1]  # one load: the driver may be moving it
        n = (idx - next_avail) & 0xFFFF
        if not n:
            return None
        size = self.size
        if n > size:
            raise AvailIndexError(
                f"avail index {idx} is {n} ahead of the device ({next_avail}), "
                f"more than the queue size {size}"
            )
        head = self._avail_ring[next_avail & self._mask]
        if head >= size:
            raise HeadIndexError(f"avail ring entry names descriptor {head}, queue size is {size}")
        st.next_avail = (next_avail + 1) & 0xFFFF
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        self._walk(head, readable, writable)
        dirty = self._vmm_dirty
        if dirty is not None and writable:  # dirty-page tracking: the device may write all of them
            for gpa, length in writable:
                dirty.update(range(gpa >> 12, ((gpa + length - 1) >> 12) + 1))
        return DescriptorChain(self.memory, head, readable, writable)

    def _outside(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> None:
        """The span check failed: find the buffer outside guest RAM (guest RAM of several regions may still
        hold every buffer, each in one region)."""
        for addr, length in (*readable, *writable):
            if not self.memory.contains(addr, length):
                raise DescriptorOutOfRangeError(head, f"buffer {addr:#x}+{length:#x} outside guest RAM")

    def undo_pop(self, count: int = 1) -> None:
        """Give back the last *count* popped chains: the next :meth:`pop` returns the first of them again."""
        self.state.next_avail = (self.state.next_avail - count) & 0xFFFF

    def drain(self, serve: Callable[[SplitQueue, list[DescriptorChain | ChainError]], bool]) -> None:
        """Hand every available chain to *serve*, in batches, until the queue stays empty.

        A batch is every chain available now, popped with driver notifications off; a malformed chain is
        in it as its :class:`ChainError` (already consumed: complete ``error.head``).  ``serve(batch)``
        completes the whole batch (requests kept back to be merged too) before it returns, so that a
        driver waiting for them can publish more before notifications are turned back on and the avail
        index is read again (a chain published in between is not left behind); it gets this queue and the
        batch (``serve(queue, batch)``, so a bound method of the device serves), and returns False when it
        stopped early, after giving the chain it could not serve and the rest of the batch back with
        :meth:`undo_pop` (notifications then stay off until the device comes back).  Fatal errors
        (:class:`QueueBrokenError`) propagate, after the chains popped before them were served.  A batch
        ends after :data:`DRAIN_BUDGET` descriptors; if chains are left then, :attr:`deferred` is set and
        draining stops: whoever called the device serves the rest later, so that one notification cannot
        hold the I/O thread for long.
        """
        pop, avail_hdr, state = self.pop, self._avail_hdr, self.state
        self.deferred = False
        event_idx = self.event_idx
        budget = DRAIN_BUDGET  # for the whole call: chains that keep coming while serving count too
        while True:
            if not event_idx:  # (with EVENT_IDX the driver kicks only past avail_event: nothing to turn off)
                self.disable_notification()
            batch: list[DescriptorChain | ChainError] = []
            try:
                while budget > 0:
                    try:
                        chain = pop()
                    except ChainError as e:
                        batch.append(e)
                        budget -= 1
                        continue
                    if chain is None:
                        break
                    batch.append(chain)
                    budget -= len(chain.readable) + len(chain.writable) + 1
                else:
                    self.deferred = self.pending() > 0
            except QueueBrokenError:
                if batch:  # what was popped before the queue broke is served first
                    serve(self, batch)
                raise
            if batch and not serve(self, batch):
                return
            if self.deferred:
                return
            if batch and avail_hdr[1] != state.next_avail:
                continue  # more came while serving: go on with notifications still off
            if not self.enable_notification():
                return

    def _walk(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> None:
        """Collect the chain's buffers and check them with one call: RAM in one region from 0 up to the
        highest buffer end holds every buffer (the usual case); otherwise each is checked on its own."""
        view, contains = self._view, self._contains
        hi = 0  # the highest end of a buffer: guest RAM from 0 up to it holds every buffer
        table = self._desc
        table_size = self.size
        ttl = self._direct_limit
        index = head
        in_indirect = False
        unpack = DESC.unpack_from
        while True:
            if ttl == 0:
                raise ChainLoopError(
                    head, f"more than {min(table_size, MAX_CHAIN_DESCRIPTORS)} descriptors: it loops"
                )
            ttl -= 1
            addr, length, flags, nxt = unpack(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise NestedIndirectError(head, "indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise IndirectError(head, "indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectError(head, "indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE:
                    raise IndirectLengthError(head, f"indirect table length {length} is invalid")
                if length > MAX_INDIRECT_ENTRIES * DESC_SIZE:
                    raise ChainTooLongError(
                        f"chain {head}: an indirect table of {length // DESC_SIZE} descriptors "
                        f"(at most {MAX_INDIRECT_ENTRIES})"
                    )
                try:
                    table = view(addr, length)
                except GuestMemoryError as e:
                    raise DescriptorOutOfRangeError(
                        head, f"indirect table {addr:#x}+{length:#x} outside guest RAM"
                    ) from e
                table_size = ttl = length // DESC_SIZE
                index = 0
                in_indirect = True
                continue
            end = addr + length
            if end > hi:
                hi = end
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise ChainOrderError(head, "device-readable descriptor after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                if in_indirect and len(readable) + len(writable) > MAX_CHAIN_DESCRIPTORS:
                    raise ChainTooLongError(f"chain {head}: more than {MAX_CHAIN_DESCRIPTORS} descriptors")
                if not contains(0, hi):  # one check for the span; the buffers one by one only if it fails
                    self._outside(head, readable, writable)
                return
            if nxt >= table_size:
                raise DescriptorIndexError(head, f"next index {nxt} outside a table of {table_size}")
            index = nxt

    # -- device -> driver ---------------------------------------------------------------------------
    def add_used(self, head: int, written_len: int) -> None:
        """Return chain *head* to the driver with *written_len* bytes written into its writable buffers.

        The used index is published at once, so a polling driver can reuse the chain while the device
        goes on with the next one.
        """
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} outside queue of size {self.size}")
        st = self.state
        i = (st.next_used & self._mask) << 1
        ring = self._used_ring
        ring[i] = head
        ring[i + 1] = written_len & 0xFFFFFFFF
        st.next_used = used = (st.next_used + 1) & 0xFFFF
        self._added += 1
        # The element is written before the index that publishes it (x86 stores are not reordered).
        self._used_hdr[1] = used

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last call."""
        st = self.state
        new = st.next_used
        old = st.signalled_used
        st.signalled_used = new
        if not self._added:
            return False
        self._added = 0
        full_barrier()  # the used index store must be visible before we read the driver's flags/used_event
        if not self.event_idx:
            return not self._avail_hdr[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = self._used_event[0]
        # vring_need_event(): notify when used_event lies in [old, new)
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def disable_notification(self) -> None:
        """Ask the driver not to kick while the device is busy draining the queue."""
        if not self.event_idx:
            self._used_hdr[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for kicks again; True when more chains arrived meanwhile (drain again before sleeping)."""
        if self.event_idx:
            self._avail_event[0] = self.state.next_avail
        else:
            self._used_hdr[0] = 0
        full_barrier()  # publish avail_event / flags before re-reading the avail index
        return self._avail_hdr[1] != self.state.next_avail

    def used_flags(self) -> int:
        return self._used_hdr[0]

    def avail_event(self) -> int:
        """The avail_event field the device publishes (EVENT_IDX only)."""
        return self._avail_event[0]

    def release(self) -> None:
        """Drop the views of guest memory (after reset)."""
        for v in (*self._typed, self._desc, self._avail, self._used):
            v.release()
