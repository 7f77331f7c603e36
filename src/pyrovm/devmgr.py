"""virtio-mmio devices of a VM: slots, IRQs, ioeventfd/irqfd wiring, command line and metrics.

Each device gets a 4 KiB slot above RAM (``layout.VIRTIO_MMIO_BASE`` + i * 4 KiB) and an IOAPIC pin.
Queue notifications reach the device without a vCPU round trip: KVM signals an eventfd per queue
(``KVM_IOEVENTFD`` on the slot's QueueNotify register, matched on the queue index), which the I/O
thread's event loop waits on.  Interrupts go out through an eventfd bound to the pin with
``KVM_IRQFD``.  Linux learns of the devices from ``virtio_mmio.device=4K@BASE:IRQ`` on its command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import kvm as k
from .arch.x86 import layout
from .devices.bus import Bus
from .devices.virtio import (
    MMIO_SLOT_SIZE,
    QUEUE_NOTIFY,
    VirtioBlock,
    VirtioDevice,
    VirtioMmioTransport,
    VirtioRng,
    cmdline_fragment,
)
from .eventloop import EventFd, EventLoop
from .memory import GuestMemory

#: IOAPIC pins free for virtio devices (0 timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC, 12 mouse, 13 FPU).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 3, 16, 17, 18, 19, 20, 21, 22, 23)


class DeviceConfigError(ValueError):
    """A device option that cannot be honoured."""


@dataclass(frozen=True)
class DiskSpec:
    """One ``--disk PATH[,ro][,serial=ID]``."""

    path: Path
    read_only: bool = False
    serial: str | None = None

    @classmethod
    def parse(cls, spec: str) -> DiskSpec:
        path, *opts = spec.split(",")
        if not path:
            raise DeviceConfigError(f"disk {spec!r}: no path (use PATH[,ro][,serial=ID])")
        read_only = False
        serial = None
        for opt in opts:
            if opt in ("ro", "readonly"):
                read_only = True
            elif opt == "rw":
                read_only = False
            elif opt.startswith("serial="):
                serial = opt[7:]
            else:
                raise DeviceConfigError(f"disk {spec!r}: unknown option {opt!r} (ro, rw, serial=ID)")
        return cls(Path(path), read_only, serial)


@dataclass
class _Slot:
    name: str
    base: int
    irq: int
    transport: VirtioMmioTransport
    irq_fd: EventFd
    notify_fds: list[tuple[int, EventFd]]


class VirtioManager:
    """Creates and wires the virtio-mmio devices of one VM."""

    def __init__(self, vm: k.Vm, memory: GuestMemory, mmio: Bus) -> None:
        self._vm = vm
        self._memory = memory
        self._mmio = mmio
        self.loop = EventLoop()
        self.slots: list[_Slot] = []

    def add(self, device: VirtioDevice, name: str | None = None) -> _Slot:
        i = len(self.slots)
        if i >= min(layout.VIRTIO_MMIO_MAX_SLOTS, len(VIRTIO_IRQS)):
            raise DeviceConfigError(f"too many virtio devices (at most {len(VIRTIO_IRQS)})")
        base = layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SLOT_SIZE
        irq = VIRTIO_IRQS[i]
        irq_fd = EventFd()
        self._vm.irqfd(irq_fd.fd, irq)
        transport = VirtioMmioTransport(device, self._memory, irq_fd.write)
        label = name or device.name
        self._mmio.register(base, MMIO_SLOT_SIZE, transport, label)
        notify = transport.notify_eventfds(self.loop)
        for index, efd in notify:
            self._vm.ioeventfd(efd.fd, base + QUEUE_NOTIFY, 4, datamatch=index)
        slot = _Slot(label, base, irq, transport, irq_fd, notify)
        self.slots.append(slot)
        return slot

    def add_disk(self, spec: DiskSpec, index: int) -> _Slot:
        # existence is checked with the rest of the configuration (VM._validate); VirtioBlock reports races
        if not os.access(spec.path, os.R_OK if spec.read_only else os.R_OK | os.W_OK):
            raise DeviceConfigError(f"disk {spec.path}: not {'readable' if spec.read_only else 'writable'}")
        dev = VirtioBlock(
            spec.path, read_only=spec.read_only, serial=spec.serial, name=f"vd{chr(97 + index)}"
        )
        return self.add(dev, f"virtio-blk:vd{chr(97 + index)}")

    def add_rng(self, rate_bytes_per_s: int | None = None) -> _Slot:
        dev = VirtioRng(rate_bytes_per_s=rate_bytes_per_s, scheduler=self.loop)
        return self.add(dev, "virtio-rng")

    def cmdline(self) -> str:
        """The ``virtio_mmio.device=`` words announcing every device."""
        return " ".join(cmdline_fragment(s.base, s.irq) for s in self.slots)

    def start(self) -> None:
        if self.slots:
            self.loop.start()

    def metrics(self) -> dict[str, dict[str, int]]:
        return {s.name: s.transport.metrics() for s in self.slots}

    def close(self) -> None:
        """Stop the I/O thread and release every eventfd and backend file."""
        if self.loop.running:
            self.loop.stop()
        for s in self.slots:
            for _, efd in s.notify_fds:
                self.loop.remove_reader(efd.fd)
                efd.close()
            s.irq_fd.close()
            close = getattr(s.transport.device, "close", None)
            if close is not None:
                close()
        self.loop.close()
        self.slots.clear()
