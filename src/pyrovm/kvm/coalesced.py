"""KVM's coalesced MMIO/PIO ring: guest writes to registered zones that KVM queues instead of exiting.

A write to a zone registered with ``KVM_REGISTER_COALESCED_MMIO`` (a port range with ``pio``) does not
leave the guest: KVM appends ``(address, length, data)`` to a one-page ring shared by all the VM's vCPUs
(page ``KVM_CAP_COALESCED_MMIO`` of a vCPU's mmap) and goes on; when the ring is full the write exits as
usual.  User space empties the ring (:meth:`CoalescedRing.drain`) before it serves any exit, so the
device sees every access in the order the guest made it: only the side effects of the queued writes come
later (at the next exit of any vCPU).  That is right for registers whose writes have no effect the guest
waits for without touching the device again.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Callable

PAGE_SIZE = mmap.PAGESIZE
_HEAD = struct.Struct("<II")  # first (user space's), last (KVM's)
_FIRST = struct.Struct("<I")
_ENTRY = struct.Struct("<QII8s")  # kvm_coalesced_mmio: phys_addr, len, pio, data[8]

Write = Callable[[int, bytes], object]


class CoalescedRing:
    """The ring, mapped from a vCPU's fd at *page_offset* (what ``KVM_CAP_COALESCED_MMIO`` answered)."""

    def __init__(self, vcpu_fd: int, page_offset: int) -> None:
        self._mm = mmap.mmap(
            vcpu_fd,
            PAGE_SIZE,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=page_offset * PAGE_SIZE,
        )
        #: entries in the ring (KVM_COALESCED_MMIO_MAX: 170 with 4 KiB pages)
        self.size = (PAGE_SIZE - _HEAD.size) // _ENTRY.size
        self._lock = threading.Lock()
        self.drained = 0  # writes served from the ring

    def pending(self) -> bool:
        """True when KVM has queued writes (cheap: two loads; call after every exit)."""
        first, last = _HEAD.unpack_from(self._mm, 0)
        return first != last

    def drain(self, pio_write: Write, mmio_write: Write) -> int:
        """Serve the queued writes in order (from any thread: one at a time); returns how many.  An
        exception of a device's write goes to the caller (that write counts as taken)."""
        mm = self._mm
        size = self.size
        n = 0
        with self._lock:  # (another vCPU that finds the ring non-empty waits until these are served)
            try:
                # at most a ringful: what was queued when this began is all served by then (the ring holds
                # size - 1), and other vCPUs that keep writing cannot keep this thread here for ever
                for _ in range(size):
                    first, last = _HEAD.unpack_from(mm, 0)
                    if first == last or first >= size:
                        return n
                    addr, length, pio, data = _ENTRY.unpack_from(mm, _HEAD.size + first * _ENTRY.size)
                    try:
                        (pio_write if pio else mmio_write)(addr, data[: min(length, 8)])
                    finally:  # only now: until it is served the ring is not empty, so a vCPU that exits
                        # meanwhile waits on the lock instead of serving its exit before this write (and
                        # a write whose device failed is not served twice)
                        _FIRST.pack_into(mm, 0, (first + 1) % size)
                    n += 1
                return n
            finally:
                self.drained += n

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # (never exported; kept for symmetry with the kvm_run mapping)
            pass
