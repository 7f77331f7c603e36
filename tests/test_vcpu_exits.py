"""handle_exit for every exit type, without KVM: fake buses' devices and a fake vCPU completer."""

from __future__ import annotations

import pytest

from pyrovm.devices.bus import Bus
from pyrovm.kvm import constants as c
from pyrovm.kvm import exits as ex
from pyrovm.result import ExitReason
from pyrovm.vcpu import Next, Stop, VcpuStats, fatal_exit, handle_exit


class Recorder:
    """A bus device that records accesses and answers reads with a known pattern."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes(range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


class FakeVcpu:
    def __init__(self) -> None:
        self.io_in: list[bytes] = []
        self.mmio_read: list[bytes] = []

    def complete_io_in(self, data: bytes) -> None:
        self.io_in.append(data)

    def complete_mmio_read(self, data: bytes) -> None:
        self.mmio_read.append(data)


@pytest.fixture
def rig() -> tuple[Bus, Bus, Recorder, Recorder, FakeVcpu, VcpuStats]:
    pio, mmio = Bus("pio"), Bus("mmio")
    pdev, mdev = Recorder(), Recorder()
    pio.register(0x3F8, 8, pdev)
    mmio.register(0xD000_0000, 0x1000, mdev)
    return pio, mmio, pdev, mdev, FakeVcpu(), VcpuStats()


def test_port_write(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, pdev, _, vcpu, stats = rig
    assert handle_exit(ex.IoOut(0x3F9, 1, 1, b"A"), pio, mmio, vcpu, stats) is Next.CONTINUE
    assert pdev.writes == [(1, b"A")]
    assert (stats.exits, stats.io, stats.mmio) == (1, 1, 0)


def test_rep_outs_is_split_per_element(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, pdev, _, vcpu, stats = rig
    handle_exit(ex.IoOut(0x3F8, 2, 3, b"aabbcc"), pio, mmio, vcpu, stats)
    assert pdev.writes == [(0, b"aa"), (0, b"bb"), (0, b"cc")]


def test_port_read_and_rep_ins(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, _pdev, _, vcpu, stats = rig
    assert handle_exit(ex.IoIn(0x3FD, 1, 1), pio, mmio, vcpu, stats) is Next.CONTINUE
    assert vcpu.io_in == [bytes([5])]
    handle_exit(ex.IoIn(0x3F8, 2, 3), pio, mmio, vcpu, stats)
    assert vcpu.io_in[-1] == bytes([0, 1]) * 3
    assert stats.io == 2


def test_unclaimed_port_read_is_all_ones(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, _, _, vcpu, stats = rig
    handle_exit(ex.IoIn(0x500, 4, 1), pio, mmio, vcpu, stats)
    assert vcpu.io_in == [b"\xff" * 4]
    assert pio.stats.unclaimed_reads == 1


def test_mmio_write_and_read(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, _, mdev, vcpu, stats = rig
    assert handle_exit(ex.MmioWrite(0xD000_0070, b"\x0f\0\0\0"), pio, mmio, vcpu, stats) is Next.CONTINUE
    assert mdev.writes == [(0x70, b"\x0f\0\0\0")]
    assert handle_exit(ex.MmioRead(0xD000_0004, 4), pio, mmio, vcpu, stats) is Next.CONTINUE
    assert vcpu.mmio_read == [bytes([4, 5, 6, 7])]
    assert (stats.exits, stats.mmio, stats.io) == (2, 2, 0)


def test_interrupted(rig) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, _, _, vcpu, stats = rig
    assert handle_exit(ex.INTERRUPTED, pio, mmio, vcpu, stats) is Next.INTERRUPTED
    assert stats.interrupted == 1 and stats.exits == 1


@pytest.mark.parametrize(
    ("exit_", "reason", "crash", "words"),
    [
        (ex.SHUTDOWN, ExitReason.TRIPLE_FAULT, True, "triple fault"),
        (ex.InternalError(1, (0x10, 0x20)), ExitReason.INTERNAL_ERROR, True, "failure, data 0x10 0x20"),
        (ex.InternalError(7), ExitReason.INTERNAL_ERROR, True, "suberror 7"),
        (ex.FailEntry(0x80000021, 0), ExitReason.FAIL_ENTRY, True, "hardware reason 0x80000021"),
        (ex.SystemEvent(c.KVM_SYSTEM_EVENT_RESET), ExitReason.RESET, False, "reset"),
        (ex.SystemEvent(c.KVM_SYSTEM_EVENT_SHUTDOWN), ExitReason.POWEROFF, False, "powered off"),
        (ex.SystemEvent(3), ExitReason.INTERNAL_ERROR, True, "crash event (type 3)"),
        (ex.HLT, ExitReason.HALTED, False, "halted"),
        (ex.UnhandledExit(99), ExitReason.INTERNAL_ERROR, True, "unhandled KVM exit"),
    ],
)
def test_exits_that_end_the_vm(rig, exit_, reason, crash, words) -> None:  # type: ignore[no-untyped-def]
    pio, mmio, pdev, mdev, vcpu, stats = rig
    out = handle_exit(exit_, pio, mmio, vcpu, stats)
    assert isinstance(out, Stop)
    assert out.reason is reason and out.crash is crash
    assert words in out.message
    assert out == fatal_exit(exit_)
    assert stats.exits == 1 and not pdev.writes and not mdev.writes and not vcpu.io_in
