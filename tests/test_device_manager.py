"""The device manager with a fake KVM: slots, pins, eventfd wiring, command line, release."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyrovm.arch.x86 import layout
from pyrovm.config import DiskSpec
from pyrovm.device_manager import MAX_VIRTIO_DEVICES, VIRTIO_IRQS, DeviceManager, PlatformHooks
from pyrovm.devices.virtio import QUEUE_NOTIFY
from pyrovm.errors import ConfigError
from pyrovm.memory import GuestMemory


class FakeKvm:
    """Records the three KVM calls the device manager makes."""

    def __init__(self, fail_ioeventfd_after: int | None = None) -> None:
        self.lines: list[tuple[int, bool]] = []
        self.ioeventfds: list[tuple[int, int, int, int | None]] = []
        self.irqfds: list[tuple[int, int]] = []
        self.fail_after = fail_ioeventfd_after

    def irq_line(self, irq: int, level: bool) -> None:
        self.lines.append((irq, level))

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        if self.fail_after is not None and len(self.ioeventfds) >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.ioeventfds.append((fd, addr, length, datamatch))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        self.irqfds.append((fd, gsi))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.anonymous(16 << 20)


def _image(tmp_path: Path, name: str = "disk.img") -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(1 << 20))
    return p


def test_platform_devices_and_serial_irq(memory: GuestMemory) -> None:
    kvm = FakeKvm()
    dm = DeviceManager(kvm, memory)
    out: list[bytes] = []
    resets: list[int] = []
    statuses: list[int] = []
    dm.add_platform_devices(
        PlatformHooks(out.append, lambda: resets.append(1), statuses.append, lambda t: None)
    )
    names = {r.name for r in dm.pio_bus.ranges}
    assert names == {"uart0", "i8042", "exit-port", "rtc"}
    assert [r.name for r in dm.mmio_bus.ranges] == ["boot-timer"]
    dm.pio_bus.write(layout.UART_COM1_PORT + 1, b"\x02")  # IER: THRE interrupt on
    assert kvm.lines == [(layout.UART_COM1_IRQ, True)]
    dm.pio_bus.write(layout.UART_COM1_PORT, b"x")
    assert out == [b"x"]
    dm.pio_bus.write(layout.EXIT_PORT, b"\x07")
    assert statuses == [7]
    dm.pio_bus.write(layout.I8042_COMMAND_PORT, b"\xfe")
    assert resets == [1]
    dm.close()


def test_virtio_wiring(memory: GuestMemory, tmp_path: Path) -> None:
    kvm = FakeKvm()
    dm = DeviceManager(kvm, memory)
    dm.add_disk(DiskSpec(_image(tmp_path)), 0)
    dm.add_rng()
    assert [s.name for s in dm.slots] == ["virtio-blk:vda", "virtio-rng"]
    assert [gsi for _, gsi in kvm.irqfds] == list(VIRTIO_IRQS[:2])
    bases = [layout.VIRTIO_MMIO_BASE, layout.VIRTIO_MMIO_BASE + layout.VIRTIO_MMIO_SLOT_SIZE]
    # one ioeventfd per queue, on QueueNotify, matched on the queue index
    assert [(addr, length, dm_) for _, addr, length, dm_ in kvm.ioeventfds] == [
        (bases[0] + QUEUE_NOTIFY, 4, 0),
        (bases[1] + QUEUE_NOTIFY, 4, 0),
    ]
    assert dm.cmdline_words() == [
        f"virtio_mmio.device=4K@{bases[0]:#x}:{VIRTIO_IRQS[0]}",
        f"virtio_mmio.device=4K@{bases[1]:#x}:{VIRTIO_IRQS[1]}",
    ]
    assert set(dm.metrics()) == {"virtio-blk:vda", "virtio-rng"}
    dm.close()
    assert set(dm.metrics()) == {"virtio-blk:vda", "virtio-rng"}  # still answered after close


def test_close_releases_every_fd_and_lock(memory: GuestMemory, tmp_path: Path) -> None:
    import fcntl

    img = _image(tmp_path)
    before = _fds()
    dm = DeviceManager(FakeKvm(), memory)
    dm.add_disk(DiskSpec(img), 0)
    dm.add_rng()
    dm.start()
    assert _fds() > before
    dm.pause()
    dm.resume()
    dm.close()
    assert _fds() == before
    with open(img, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the image lock is gone


def test_failed_wiring_releases_what_it_took(memory: GuestMemory, tmp_path: Path) -> None:
    before = _fds()
    dm = DeviceManager(FakeKvm(fail_ioeventfd_after=1), memory)
    dm.add_rng()
    with pytest.raises(OSError, match="No space"):
        dm.add_disk(DiskSpec(_image(tmp_path)), 1)
    assert [s.name for s in dm.slots] == ["virtio-rng"]
    dm.close()
    assert _fds() == before


def test_too_many_devices(memory: GuestMemory) -> None:
    dm = DeviceManager(FakeKvm(), memory)
    for _ in range(MAX_VIRTIO_DEVICES):
        dm.add_rng()
    with pytest.raises(ConfigError, match="too many virtio devices"):
        dm.add_rng()
    dm.close()


def test_bad_disk_is_a_config_error(memory: GuestMemory, tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    dm = DeviceManager(FakeKvm(), memory)
    with pytest.raises(ConfigError, match="multiple of 512") as info:
        dm.add_disk(DiskSpec(odd), 0)
    assert info.value.__cause__ is not None
    dm.close()
