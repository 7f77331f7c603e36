"""Split virtqueue parsing, indirect descriptors, EVENT_IDX and hostile descriptor layouts."""

from __future__ import annotations

import pytest

from pyrovm.devices.virtio.mock import MockSplitQueue
from pyrovm.devices.virtio.queue import (
    MAX_INDIRECT_ENTRIES,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    AvailIndexError,
    ChainError,
    ChainLoopError,
    ChainOrderError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorOutOfRangeError,
    HeadIndexError,
    IndirectError,
    IndirectLengthError,
    NestedIndirectError,
    QueueConfigError,
    QueueState,
    SplitQueue,
    split_views,
    trim_views,
)
from pyrovm.errors import GuestError
from pyrovm.memory import GuestMemory

MEM_SIZE = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.anonymous(MEM_SIZE)


@pytest.fixture
def mq(mem: GuestMemory) -> MockSplitQueue:
    return MockSplitQueue(mem, size=16)


def test_pop_direct_chain(mq: MockSplitQueue) -> None:
    q = mq.queue()
    placed = mq.add_chain([b"hello", b"world!"], [8, 4])
    chain = q.pop()
    assert chain is not None
    assert chain.head == placed.head
    assert chain.readable == placed.readable
    assert chain.writable == placed.writable
    assert chain.readable_len == 11 and chain.writable_len == 12
    assert b"".join(bytes(v) for v in chain.readable_views()) == b"helloworld!"
    assert bytes(chain.read_prefix(7)) == b"hellowo"
    views = chain.writable_views()
    views[0][:3] = b"abc"  # zero-copy: lands in guest memory
    assert mq.read(placed.writable[0][0], 3) == b"abc"
    assert q.pop() is None


def test_add_used_and_ring_wrap(mq: MockSplitQueue) -> None:
    q = mq.queue()
    for round_ in range(3):  # 48 chains through a 16-entry ring
        heads = [mq.add_chain([b"x"], [4]).head for _ in range(16)]
        got = []
        while (chain := q.pop()) is not None:
            got.append(chain.head)
            q.add_used(chain.head, 4)
        assert got == heads
        assert mq.take_used() == [(h, 4) for h in heads], round_
    assert mq.used_idx() == 48
    with pytest.raises(ValueError):
        q.add_used(16, 0)


def test_avail_index_wraps_at_u16(mem: GuestMemory) -> None:
    mq = MockSplitQueue(mem, size=4)
    mq.state.next_avail = mq.state.next_used = 0xFFFE
    mq.set_avail_idx(0xFFFE)
    q = mq.queue()
    heads = [mq.add_chain([b"a"]).head for _ in range(3)]
    assert [q.pop().head for _ in range(3)] == heads  # type: ignore[union-attr]
    assert q.state.next_avail == 1


def test_write_to_writable_spans_buffers(mq: MockSplitQueue) -> None:
    q = mq.queue()
    placed = mq.add_chain([], [3, 3, 3])
    chain = q.pop()
    assert chain is not None
    assert chain.write_to_writable(b"abcdefg", offset=1) == 7
    data = b"".join(mq.read(g, n) for g, n in placed.writable)
    assert data == b"\0abcdefg\0"


def test_split_and_trim_views() -> None:
    buf = bytearray(range(10))
    views = [memoryview(buf)[0:4], memoryview(buf)[4:7], memoryview(buf)[7:10]]
    first, rest = split_views(views, 5)
    assert b"".join(bytes(v) for v in first) == bytes(range(5))
    assert b"".join(bytes(v) for v in rest) == bytes(range(5, 10))
    head, last = trim_views(views, 1)
    assert b"".join(bytes(v) for v in head) == bytes(range(9))
    assert [bytes(v) for v in last] == [b"\x09"]
    first, rest = split_views(views, 4)
    assert len(first) == 1 and len(rest) == 2
    first, rest = split_views(views, 99)
    assert len(first) == 3 and rest == []


def test_indirect_chain(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    placed = mq.add_indirect_chain([b"hdr", b"payload"], [1])
    chain = q.pop()
    assert chain is not None
    assert chain.head == placed.head
    assert chain.readable == placed.readable
    assert chain.writable == placed.writable


def test_direct_descriptors_then_indirect_table(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    a = mq.alloc(8, b"directAA")
    b = mq.alloc(4)
    table = mq.write_indirect_table([(b, 4, VIRTQ_DESC_F_WRITE, 0)])
    mq.write_desc(0, a, 8, VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, table, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    chain = q.pop()
    assert chain is not None
    assert chain.readable == [(a, 8)] and chain.writable == [(b, 4)]


def test_zero_length_descriptor_is_accepted(mq: MockSplitQueue) -> None:
    q = mq.queue()
    mq.write_desc(0, 0, 0, VIRTQ_DESC_F_WRITE)
    mq.publish(0)
    chain = q.pop()
    assert chain is not None and chain.writable == [(0, 0)]


# -- notification suppression -----------------------------------------------------------------------------
def test_no_interrupt_flag(mq: MockSplitQueue) -> None:
    q = mq.queue()
    assert not q.needs_notification()  # nothing used yet
    mq.add_chain([b"a"])
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since
    mq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    mq.add_chain([b"a"])
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    assert not q.needs_notification()


def test_event_idx_used_event(mq: MockSplitQueue) -> None:
    q = mq.queue(event_idx=True)
    for _ in range(6):
        mq.add_chain([b"a"])
    # The driver wants an interrupt once the used index passes 3 (used_event = 3).
    mq.set_used_event(3)
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    assert q.needs_notification()  # first time: always
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]  # used idx 2
    assert not q.needs_notification()
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]  # used idx 3
    assert not q.needs_notification()
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]  # used idx 4: crossed used_event 3
    assert q.needs_notification()
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]  # used idx 6, used_event still 3
    assert not q.needs_notification()
    # Batched: two used entries that jump over used_event in one go still notify.
    mq.set_used_event(6)
    for _ in range(2):
        mq.add_chain([b"a"])
        q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    assert q.needs_notification()


def test_event_idx_wraps(mem: GuestMemory) -> None:
    mq = MockSplitQueue(mem, size=4)
    mq.state.next_avail = mq.state.next_used = 0xFFFF
    mq.state.signalled_used = 0xFFFF
    mq.set_avail_idx(0xFFFF)
    q = mq.queue(event_idx=True)
    mq.set_used_event(0xFFFF)
    mq.add_chain([b"a"])
    q.add_used(q.pop().head, 0)  # type: ignore[union-attr]
    assert q.state.next_used == 0
    assert q.needs_notification()


def test_enable_disable_notification(mq: MockSplitQueue) -> None:
    q = mq.queue()
    q.disable_notification()
    assert mq.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    assert not q.enable_notification()
    assert mq.used_flags() == 0
    mq.add_chain([b"a"])
    assert q.enable_notification()  # more work arrived
    qe = MockSplitQueue(GuestMemory.anonymous(MEM_SIZE), size=8)
    q2 = qe.queue(event_idx=True)
    qe.add_chain([b"a"])
    qe.add_chain([b"a"])
    q2.pop()
    q2.pop()
    assert not q2.enable_notification()
    assert qe.avail_event() == 2


def test_undo_pop(mq: MockSplitQueue) -> None:
    q = mq.queue()
    placed = mq.add_chain([b"a"])
    assert q.pop().head == placed.head  # type: ignore[union-attr]
    q.undo_pop()
    assert q.pop().head == placed.head  # type: ignore[union-attr]
    assert q.pop() is None


# -- queue configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 12, 512])
def test_bad_queue_size(mem: GuestMemory, size: int) -> None:
    st = QueueState(256, size=size, ready=True, desc_addr=0x1000, avail_addr=0x3000, used_addr=0x4000)
    with pytest.raises(QueueConfigError):
        SplitQueue(mem, st)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (MEM_SIZE - 16, 0x3000, 0x4000),  # table runs past the end of RAM
        (0x1000, 0x3000, 1 << 40),  # used ring far outside RAM
        (0x1008, 0x3000, 0x4000),  # table not 16-byte aligned
        (0x1000, 0x3001, 0x4000),  # avail not 2-byte aligned
        (0x1000, 0x3000, 0x4002),  # used not 4-byte aligned
    ],
)
def test_bad_ring_addresses(mem: GuestMemory, desc: int, avail: int, used: int) -> None:
    st = QueueState(max_size=256, size=16, ready=True, desc_addr=desc, avail_addr=avail, used_addr=used)
    with pytest.raises(QueueConfigError):
        SplitQueue(mem, st)


def test_avail_idx_jump_is_fatal(mq: MockSplitQueue) -> None:
    q = mq.queue()
    mq.set_avail_idx(17)
    with pytest.raises(AvailIndexError) as info:
        q.pop()
    assert info.value.fatal


def test_head_index_out_of_range_is_fatal(mq: MockSplitQueue) -> None:
    q = mq.queue()
    mq.publish(16)
    with pytest.raises(HeadIndexError) as info:
        q.pop()
    assert info.value.fatal


# -- hostile chains: each consumes the chain and names its head -----------------------------------------
def _expect_chain_error(q: SplitQueue, mq: MockSplitQueue, head: int, kind: type[ChainError]) -> None:
    with pytest.raises(kind) as info:
        q.pop()
    assert info.value.head == head
    assert not info.value.fatal
    assert isinstance(info.value, GuestError)
    # the queue goes on: a good chain after the bad one pops normally
    good = mq.add_chain([b"ok"])
    chain = q.pop()
    assert chain is not None and chain.head == good.head


def test_buffer_outside_guest_memory(mq: MockSplitQueue) -> None:
    q = mq.queue()
    mq.write_desc(0, MEM_SIZE - 4, 8)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, DescriptorOutOfRangeError)


def test_huge_address_buffer(mq: MockSplitQueue) -> None:
    q = mq.queue()
    mq.write_desc(0, 0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, DescriptorOutOfRangeError)


def test_chain_loop(mq: MockSplitQueue) -> None:
    q = mq.queue()
    buf = mq.alloc(4)
    mq.write_desc(0, buf, 4, VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, buf, 4, VIRTQ_DESC_F_NEXT, 0)
    mq.publish(0)
    mq._next_desc = 2
    _expect_chain_error(q, mq, 0, ChainLoopError)


def test_self_loop(mq: MockSplitQueue) -> None:
    q = mq.queue()
    buf = mq.alloc(4)
    mq.write_desc(3, buf, 4, VIRTQ_DESC_F_NEXT, 3)
    mq.publish(3)
    mq._next_desc = 4
    _expect_chain_error(q, mq, 3, ChainLoopError)


def test_next_index_out_of_range(mq: MockSplitQueue) -> None:
    q = mq.queue()
    buf = mq.alloc(4)
    mq.write_desc(0, buf, 4, VIRTQ_DESC_F_NEXT, 200)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, DescriptorIndexError)


def test_readable_after_writable(mq: MockSplitQueue) -> None:
    q = mq.queue()
    buf = mq.alloc(4)
    mq.write_desc(0, buf, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, buf, 4, 0)
    mq.publish(0)
    mq._next_desc = 2
    _expect_chain_error(q, mq, 0, ChainOrderError)


def test_indirect_not_negotiated(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=False)
    placed = mq.add_indirect_chain([b"a"], [1])
    _expect_chain_error(q, mq, placed.head, IndirectError)


def test_nested_indirect(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    inner = mq.write_indirect_table([(mq.alloc(4), 4, 0, 0)])
    outer = mq.write_indirect_table([(inner, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    mq.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, NestedIndirectError)


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_length_not_multiple_of_16(mq: MockSplitQueue, length: int) -> None:
    q = mq.queue(indirect=True)
    table = mq.write_indirect_table([(mq.alloc(4), 4, 0, 0), (mq.alloc(4), 4, 0, 0)])
    mq.write_desc(0, table, length, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, IndirectLengthError)


def test_indirect_with_next_flag(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    table = mq.write_indirect_table([(mq.alloc(4), 4, 0, 0)])
    mq.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, mq.alloc(4), 4)
    mq.publish(0)
    mq._next_desc = 2
    _expect_chain_error(q, mq, 0, IndirectError)


def test_indirect_table_outside_memory(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    mq.write_desc(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, DescriptorOutOfRangeError)


def test_indirect_table_loop(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    buf = mq.alloc(4)
    table = mq.write_indirect_table([(buf, 4, VIRTQ_DESC_F_NEXT, 1), (buf, 4, VIRTQ_DESC_F_NEXT, 0)])
    mq.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, ChainLoopError)


def test_indirect_next_out_of_table(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    table = mq.write_indirect_table([(mq.alloc(4), 4, VIRTQ_DESC_F_NEXT, 5)])
    mq.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    _expect_chain_error(q, mq, 0, DescriptorIndexError)


def test_indirect_table_too_large_breaks_the_queue(mq: MockSplitQueue) -> None:
    q = mq.queue(indirect=True)
    mq.write_desc(0, 0, 16 * (MAX_INDIRECT_ENTRIES + 1), VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    mq._next_desc = 1
    with pytest.raises(ChainTooLongError):
        q.pop()
