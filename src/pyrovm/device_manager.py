"""Every device of a VM, legacy and virtio, with the buses they sit on, the I/O thread that serves them
and every eventfd wired to KVM for them.

Legacy devices (port I/O): the 16550A UART (COM1, IRQ 4), the i8042 (its reset line ends the VM), the
``isa-debug-exit`` compatible exit port (0xf4), the CMOS RTC; on MMIO the boot-timer device.

virtio-mmio devices: each gets a 4 KiB slot above RAM (``layout.VIRTIO_MMIO_BASE`` + i * 4 KiB) and an
IOAPIC pin.  Queue notifications reach the device without a vCPU round trip: KVM signals an eventfd per
queue (``KVM_IOEVENTFD`` on the slot's QueueNotify register, matched on the queue index), which the I/O
thread's event loop waits on.  Interrupts go out through an eventfd bound to the pin with ``KVM_IRQFD``.
Linux learns of the devices from ``virtio_mmio.device=4K@BASE:IRQ`` on its command line.

The manager makes only three KVM calls (``irq_line``, ``ioeventfd``, ``irqfd``), through the
:class:`IrqWiring` protocol, which :class:`pyrovm.kvm.Vm` implements and tests fake.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from .arch.x86 import layout
from .config import DiskSpec, NetSpec, VsockSpec
from .devices.boot_timer import BootTimer
from .devices.bus import Bus
from .devices.debug_exit import DebugExit
from .devices.i8042 import I8042
from .devices.rtc import Rtc
from .devices.serial import Serial
from .devices.virtio.device import VirtioDevice, VirtioDeviceState
from .devices.virtio.mmio import (
    MMIO_SLOT_SIZE,
    QUEUE_NOTIFY,
    MmioTransportState,
    VirtioMmioTransport,
    cmdline_fragment,
)
from .errors import ConfigError
from .eventloop import EventFd, EventLoop
from .memory import GuestMemory

if TYPE_CHECKING:
    from .devices.virtio.vsock import VirtioVsock

#: IOAPIC pins free for virtio devices (0 timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC, 12 mouse, 13 FPU).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 3, 16, 17, 18, 19, 20, 21, 22, 23)
MAX_VIRTIO_DEVICES = min(layout.VIRTIO_MMIO_MAX_SLOTS, len(VIRTIO_IRQS))


class IrqWiring(Protocol):
    """The KVM calls the device manager makes (implemented by :class:`pyrovm.kvm.Vm`)."""

    def irq_line(self, irq: int, level: bool) -> None: ...

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None: ...

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None: ...

    def coalesce(self, addr: int, length: int, pio: bool = False, deassign: bool = False) -> None: ...


class _CoalescedZone:
    """A one-port zone of KVM's coalesced ring, on and off as a device says.  Each switch costs KVM an
    SRCU grace period (about 4 ms on a nested host), so after :data:`SWITCHES` the zone stays off: a
    guest that keeps turning the UART's transmit interrupt on and off (a busy interactive tty) then
    simply exits for every byte."""

    SWITCHES = 16

    def __init__(self, wiring: IrqWiring, port: int) -> None:
        self._wiring = wiring
        self._port = port
        self._left = self.SWITCHES
        self.on = False

    def __call__(self, on: bool) -> None:
        if on and not self.on and self._left > 0:
            self._left -= 1
            self._wiring.coalesce(self._port, 1, pio=True)
            self.on = True
        elif not on and self.on:
            self._wiring.coalesce(self._port, 1, pio=True, deassign=True)
            self.on = False


@dataclass
class PlatformHooks:
    """What the legacy devices tell the rest of the VMM."""

    console_out: Callable[[bytes], object]  # UART output
    on_reset: Callable[[], None]  # the guest reset the machine (i8042)
    on_exit_port: Callable[[int], None]  # the guest wrote its status to the exit port
    on_boot_timer: Callable[[float], None]  # the guest wrote 123 to the boot-timer device


@dataclass
class VirtioSlotState:
    """A virtio device's saved state and its transport's."""

    device: VirtioDeviceState
    transport: MmioTransportState


#: The legacy devices' attribute names (also their names in saved states), in restore order.
LEGACY_DEVICES = ("serial", "i8042", "debug_exit", "rtc", "boot_timer")


@dataclass
class VirtioSlot:
    """One virtio-mmio device as wired: its slot, pin, transport and eventfds."""

    name: str
    base: int
    irq: int
    transport: VirtioMmioTransport
    irq_fd: EventFd
    notify_fds: list[tuple[int, EventFd]]


class DeviceManager:
    """Creates, wires, serves and releases the devices of one VM."""

    def __init__(self, wiring: IrqWiring, memory: GuestMemory) -> None:
        self._wiring = wiring
        self._memory = memory
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.loop = EventLoop()
        self.slots: list[VirtioSlot] = []
        self._stoppers: list[Callable[[], None]] = []  # host helpers (passt) ended after the devices
        self._closed_metrics: dict[str, dict[str, Any]] | None = None

    def coalesce_writes(self) -> None:
        """Let KVM queue the writes that may wait (its coalesced PIO; the vCPU threads serve the queue
        before every exit): the CMOS index port always (only the next data access uses it, as QEMU
        does), the UART's THR while its interrupt is off (polled console output: each byte's LSR read
        serves the bytes before it, so every byte costs one exit instead of two)."""
        self._wiring.coalesce(layout.RTC_PORT, 1, pio=True)
        self.serial.coalesce_writes(_CoalescedZone(self._wiring, layout.UART_COM1_PORT))

    # -- legacy devices ----------------------------------------------------------------------------------
    def add_platform_devices(self, hooks: PlatformHooks) -> None:
        """The UART, i8042, exit port, CMOS RTC and boot-timer device at their fixed addresses."""
        wiring = self._wiring
        self.serial = Serial(
            out=hooks.console_out, irq=lambda level: wiring.irq_line(layout.UART_COM1_IRQ, level)
        )
        self.pio_bus.register(layout.UART_COM1_PORT, 8, self.serial, "uart0")
        self.i8042 = I8042(
            on_reset=hooks.on_reset, irq=lambda level: wiring.irq_line(layout.I8042_KBD_IRQ, level)
        )
        self.pio_bus.register(layout.I8042_PORT, 5, self.i8042, "i8042")
        self.debug_exit = DebugExit(hooks.on_exit_port)
        self.pio_bus.register(layout.EXIT_PORT, 4, self.debug_exit, "exit-port")
        self.rtc = Rtc()
        self.pio_bus.register(layout.RTC_PORT, 2, self.rtc, "rtc")
        self.boot_timer = BootTimer(hooks.on_boot_timer)
        self.mmio_bus.register(layout.BOOT_TIMER_MMIO_ADDR, 8, self.boot_timer, "boot-timer")

    # -- virtio devices ----------------------------------------------------------------------------------
    def add_virtio(self, device: VirtioDevice, name: str | None = None) -> VirtioSlot:
        """Put *device* in the next free slot and wire its interrupt and queue notifications."""
        i = len(self.slots)
        if i >= MAX_VIRTIO_DEVICES:
            raise ConfigError(f"too many virtio devices (at most {MAX_VIRTIO_DEVICES})")
        base = layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SLOT_SIZE
        irq = VIRTIO_IRQS[i]
        irq_fd = EventFd()
        notify: list[tuple[int, EventFd]] = []
        label = name or device.name
        try:
            self._wiring.irqfd(irq_fd.fd, irq)
            transport = VirtioMmioTransport(
                device, self._memory, irq_fd.write, self.loop.call_soon_threadsafe
            )
            notify = queue_eventfds(transport, self.loop)
            for index, efd in notify:
                self._wiring.ioeventfd(efd.fd, base + QUEUE_NOTIFY, 4, datamatch=index)
            self.mmio_bus.register(base, MMIO_SLOT_SIZE, transport, label)
        except BaseException:
            self._release_fds(irq_fd, notify)
            raise
        slot = VirtioSlot(label, base, irq, transport, irq_fd, notify)
        self.slots.append(slot)
        return slot

    def add_disk(self, spec: DiskSpec, index: int) -> VirtioSlot:
        """virtio-blk for *spec* as ``/dev/vd<letter of index>``; ConfigError when it cannot be opened."""
        name = f"vd{chr(ord('a') + index)}"
        from .devices.virtio.block import BlockError, VirtioBlock  # (a VM without disks does not import it)

        try:
            dev = VirtioBlock(
                spec.path,
                read_only=spec.read_only,
                serial=spec.serial,
                name=name,
                rate_limiter=spec.rate_limiter,
                scheduler=self.loop,
            )
        except BlockError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            return self.add_virtio(dev, f"virtio-blk:{name}")
        except BaseException:
            dev.close()
            raise

    def add_rng(self, rate_bytes_per_s: int | None = None) -> VirtioSlot:
        from .devices.virtio.rng import VirtioRng

        dev = VirtioRng(rate_bytes_per_s=rate_bytes_per_s, scheduler=self.loop)
        return self.add_virtio(dev, "virtio-rng")

    def add_net(self, spec: NetSpec, index: int, mac: bytes) -> VirtioSlot:
        """virtio-net NIC *index* (``eth<index>``) on a tap or on passt; ConfigError when the backend
        cannot be had (no such tap, passt missing, a port in use)."""
        name = f"eth{index}"
        from .devices.virtio.net import FrameBackend, VirtioNet  # (a VM without NICs does not import them)
        from .netback import open_tap, start_passt

        backend: FrameBackend
        if spec.backend == "tap":
            backend = open_tap(spec.tap or "")
        else:
            passt = start_passt(mac=mac, mtu=spec.mtu, forwards=spec.hostfwd, name=f"passt:{name}")
            self._stoppers.append(passt.stop)
            backend = passt.backend
        try:
            dev = VirtioNet(
                backend,
                mac=mac,
                mtu=spec.mtu,
                poller=self.loop,
                name=name,
                rx_rate_limiter=spec.rx_rate_limiter,
                tx_rate_limiter=spec.tx_rate_limiter,
                scheduler=self.loop,
            )
            return self.add_virtio(dev, f"virtio-net:{name}")
        except BaseException:
            backend.close()
            raise

    def add_vsock(self, spec: VsockSpec, vm_name: str) -> VirtioSlot:
        """virtio-vsock for guest CID ``spec.cid``, its host side listening at the socket path."""
        from .devices.virtio.vsock import VirtioVsock
        from .netback.vsock import VsockMuxer, remove_stale_socket

        path = spec.socket_path(vm_name)
        if spec.uds is None:
            remove_stale_socket(path)
        muxer = VsockMuxer(path, self.loop)
        try:
            return self.add_virtio(VirtioVsock(spec.cid, muxer), "virtio-vsock")
        except BaseException:
            muxer.close()
            raise

    def cmdline_words(self) -> list[str]:
        """The ``virtio_mmio.device=`` words announcing every virtio device."""
        return [cmdline_fragment(s.base, s.irq) for s in self.slots]

    # -- running -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread (only when there are virtio devices to serve)."""
        if self.slots:
            self.loop.start()

    def pause(self) -> None:
        """Returns once the I/O thread is parked between callbacks: no device touches guest memory."""
        self.loop.pause()

    def resume(self) -> None:
        self.loop.resume()

    def send_input(self, data: bytes) -> None:
        """Bytes typed on the serial console."""
        self.serial.receive(data)

    # -- state and counters ------------------------------------------------------------------------------
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per-virtio-device counters (still answered after :meth:`close`); a vsock device also lists its
        open connections."""
        if self._closed_metrics is not None:
            return self._closed_metrics
        return {s.name: _slot_metrics(s) for s in self.slots}

    def platform_metrics(self) -> dict[str, Any]:
        return {
            "serial": {"tx_bytes": self.serial.stats.tx_bytes} if hasattr(self, "serial") else {},
            "pio_unclaimed": self.pio_bus.stats.unclaimed_reads + self.pio_bus.stats.unclaimed_writes,
            "mmio_unclaimed": self.mmio_bus.stats.unclaimed_reads + self.mmio_bus.stats.unclaimed_writes,
        }

    def save_state(self) -> dict[str, Any]:
        """The state of every device, by name: a legacy device's own ``State`` dataclass; for a virtio
        device a :class:`VirtioSlotState` (the device's state and its transport's)."""
        states: dict[str, Any] = {}
        for name in LEGACY_DEVICES:
            dev = getattr(self, name, None)
            if dev is not None:
                states[name] = dev.save_state()
        for slot in self.slots:  # (paused: the I/O thread does not touch them)
            states[slot.name] = VirtioSlotState(
                slot.transport.device.save_state(), slot.transport.save_state()
            )
        return states

    def state_types(self) -> dict[str, tuple[type, ...]]:
        """The state class(es) of each device :meth:`save_state` names (to read saved states back)."""
        types: dict[str, tuple[type, ...]] = {}
        for name in LEGACY_DEVICES:
            dev = getattr(self, name, None)
            if dev is not None:
                types[name] = (type(dev.save_state()),)
        for slot in self.slots:
            types[slot.name] = (type(slot.transport.device.save_state()), MmioTransportState)
        return types

    def restore_state(self, states: dict[str, Any]) -> None:
        """Load *states* (from :meth:`save_state` of a VM with the same devices) before the VM starts;
        vsock devices then tell the guest its connections are gone (TRANSPORT_RESET)."""
        for name in LEGACY_DEVICES:
            if name in states:
                getattr(self, name).restore_state(states[name])
        for slot in self.slots:
            saved: VirtioSlotState = states[slot.name]
            slot.transport.device.restore_state(saved.device)
            slot.transport.restore_state(saved.transport)

    def after_restore(self) -> None:
        """Once the I/O thread runs after a restore: serve what the guest queued before the snapshot
        (it will not notify again) and reset vsock connections (the host side is a new process)."""
        for slot in self.slots:
            device = slot.transport.device
            if _is_vsock(device):
                self.loop.call_soon_threadsafe(functools.partial(device.locked, device.transport_reset))
            for index in range(device.num_queues):  # (announces the reset event too)
                self.loop.call_soon_threadsafe(functools.partial(slot.transport.process_queue, index))

    # -- releasing ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the I/O thread and release every eventfd and backend file (disk images unlocked)."""
        if self._closed_metrics is None:
            self._closed_metrics = {s.name: _slot_metrics(s) for s in self.slots}
        if self.loop.running:
            self.loop.stop()
        for s in self.slots:
            self._release_fds(s.irq_fd, s.notify_fds)
            close = getattr(s.transport.device, "close", None)
            if close is not None:
                close()
        for stop in self._stoppers:
            stop()
        self._stoppers.clear()
        self.loop.close()
        self.slots.clear()

    def _release_fds(self, irq_fd: EventFd, notify: list[tuple[int, EventFd]]) -> None:
        for _, efd in notify:
            self.loop.remove_reader(efd.fd)
            efd.close()
        irq_fd.close()


def _slot_metrics(slot: VirtioSlot) -> dict[str, Any]:
    metrics: dict[str, Any] = dict(slot.transport.metrics())
    if _is_vsock(slot.transport.device):
        metrics["connections"] = slot.transport.device.connections()
    return metrics


def _is_vsock(device: VirtioDevice) -> TypeGuard[VirtioVsock]:
    """(Without importing the vsock module: when nothing imported it, no device is a vsock device.)"""
    module = sys.modules.get("pyrovm.devices.virtio.vsock")
    return module is not None and isinstance(device, module.VirtioVsock)


def queue_eventfds(transport: VirtioMmioTransport, loop: EventLoop) -> list[tuple[int, EventFd]]:
    """One eventfd per queue of *transport*, watched by *loop*, which calls the transport's
    :meth:`~VirtioMmioTransport.queue_notify` when one fires.  The caller registers each with
    ``KVM_IOEVENTFD`` at ``base + QUEUE_NOTIFY``, 4 bytes, datamatch = the queue index."""
    out: list[tuple[int, EventFd]] = []
    try:
        for index in range(transport.device.num_queues):
            efd = EventFd()
            out.append((index, efd))

            def fire(efd: EventFd = efd, index: int = index) -> None:
                if efd.read():
                    transport.queue_notify(index)

            loop.add_reader(efd.fd, fire)
    except BaseException:
        for _, efd in out:
            loop.remove_reader(efd.fd)
            efd.close()
        raise
    return out
