#!/usr/bin/env python3
"""Fuzz split-virtqueue parsing (:class:`pyrovm.devices.virtio.queue.SplitQueue`).

The input sets the queue registers (size, ring addresses, the device's indices, the negotiated EVENT_IDX
and INDIRECT_DESC), the contents of a small guest RAM holding the descriptor table and the rings, then a
sequence of device operations: pop, drain (with a serve callback that completes, defers or rewrites
memory in the middle of a batch, as a racing driver would), add_used, the notification rules, undo_pop.

Expected: :class:`QueueConfigError` from the constructor, :class:`ChainError` from one chain,
:class:`QueueBrokenError` (then the queue is not used again).  Checked besides: every chain handed out lies
inside guest RAM, has at most MAX_CHAIN_DESCRIPTORS buffers and a head inside the queue; the error of a
malformed chain names a head inside the queue.

    python fuzz/fuzz_virtqueue.py -max_total_time=600 fuzz/corpus/virtqueue
"""

from __future__ import annotations

import _common
import atheris

with _common.instrumented(__name__):
    from pyrovm.devices.virtio.queue import (
        DRAIN_BUDGET,
        MAX_CHAIN_DESCRIPTORS,
        ChainError,
        DescriptorChain,
        QueueBrokenError,
        QueueState,
        SplitQueue,
    )
    from pyrovm.memory import GuestMemory

MEM_SIZE = 0x4000
_MEMORY = GuestMemory.anonymous(MEM_SIZE)


def _check_chain(q: SplitQueue, chain: DescriptorChain) -> None:
    if not 0 <= chain.head < q.size:
        raise AssertionError(f"chain head {chain.head} outside a queue of {q.size}")
    if len(chain.readable) + len(chain.writable) > MAX_CHAIN_DESCRIPTORS:
        raise AssertionError(f"a chain of {len(chain.readable) + len(chain.writable)} buffers")
    for gpa, n in (*chain.readable, *chain.writable):
        if not _MEMORY.contains(gpa, n):
            raise AssertionError(f"buffer {gpa:#x}+{n:#x} outside guest RAM was handed out")
    # the buffers are usable as the devices use them
    chain.readable_views()
    chain.writable_views()
    chain.read_prefix(16)
    chain.write_to_writable(b"\xaa" * 8, 3)


def _check_error(q: SplitQueue, e: ChainError) -> None:
    if not 0 <= e.head < q.size:
        raise AssertionError(f"ChainError head {e.head} outside a queue of {q.size}")


def _registers(fdp: atheris.FuzzedDataProvider) -> tuple[QueueState, bool, bool]:
    sel = fdp.ConsumeIntInRange(0, 15)
    size = 1 << sel if sel <= 9 else fdp.ConsumeIntInRange(0, 0xFFFF)
    max_size = 256 if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0x10000)

    def addr() -> int:
        return fdp.ConsumeIntInRange(0, MEM_SIZE + 0x400) if fdp.ConsumeBool() else fdp.ConsumeUInt(8)

    state = QueueState(
        max_size=max_size,
        size=size,
        ready=True,
        desc_addr=addr(),
        avail_addr=addr(),
        used_addr=addr(),
        next_avail=fdp.ConsumeUInt(2),
        next_used=fdp.ConsumeUInt(2),
        signalled_used=None if fdp.ConsumeBool() else fdp.ConsumeUInt(2),
    )
    return state, fdp.ConsumeBool(), fdp.ConsumeBool()


def _poke(fdp: atheris.FuzzedDataProvider) -> None:
    """The driver writes guest RAM (a ring, a descriptor) while the device works."""
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
    gpa = fdp.ConsumeIntInRange(0, MEM_SIZE - 1)
    if data and _MEMORY.contains(gpa, len(data)):
        _MEMORY.write(gpa, data)


def _drain(q: SplitQueue, fdp: atheris.FuzzedDataProvider) -> None:
    def serve(queue: SplitQueue, batch: list[DescriptorChain | ChainError]) -> bool:
        if queue is not q:
            raise AssertionError("drain served another queue")
        work = sum(1 + len(c.readable) + len(c.writable) for c in batch if isinstance(c, DescriptorChain))
        if work > DRAIN_BUDGET + 2 * MAX_CHAIN_DESCRIPTORS + 1:
            raise AssertionError(f"a batch of {work} descriptors, over the drain budget")
        for i, item in enumerate(batch):
            if isinstance(item, ChainError):
                _check_error(q, item)
                q.add_used(item.head, 0)
                continue
            _check_chain(q, item)
            action = fdp.ConsumeIntInRange(0, 7) if fdp.remaining_bytes() else 0
            if action == 6:  # defer: give this chain and the rest back
                q.undo_pop(len(batch) - i)
                return False
            if action == 7:
                _poke(fdp)
            q.add_used(item.head, fdp.ConsumeUInt(4) if action == 5 else item.writable_len)
        return True

    q.drain(serve)


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    state, event_idx, indirect = _registers(fdp)
    _MEMORY.fill(0, MEM_SIZE)
    image = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, MEM_SIZE))
    _MEMORY.write(0, image)
    try:
        q = SplitQueue(_MEMORY, state, event_idx=event_idx, indirect=indirect)
    except QueueBrokenError:
        return
    try:
        for _ in range(64):
            if not fdp.remaining_bytes():
                break
            op = fdp.ConsumeIntInRange(0, 9)
            if op == 0:
                try:
                    chain = q.pop()
                except ChainError as e:
                    _check_error(q, e)
                    continue
                if chain is not None:
                    _check_chain(q, chain)
            elif op == 1:
                _drain(q, fdp)
            elif op == 2:
                q.add_used(fdp.ConsumeIntInRange(0, max(q.size - 1, 0)), fdp.ConsumeUInt(4))
            elif op == 3:
                q.needs_notification()
            elif op == 4:
                q.disable_notification()
            elif op == 5:
                q.enable_notification()
            elif op == 6:
                q.undo_pop(fdp.ConsumeIntInRange(0, 3))
            elif op == 7:
                _poke(fdp)
            elif op == 8:
                q.pending()
            else:
                q.used_flags()
                if event_idx:
                    q.avail_event()
    except QueueBrokenError:
        pass
    finally:
        q.release()


if __name__ == "__main__":
    _common.run(fuzz_one)
