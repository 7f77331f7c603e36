"""virtio-mmio transport, version 2 (modern only), VIRTIO 1.2 §4.2.

:class:`VirtioMmioTransport` is a bus device for one 4 KiB MMIO slot.  It owns the driver-visible
registers, runs the status state machine, builds :class:`SplitQueue` objects at DRIVER_OK and hands
them to its :class:`VirtioDevice`.

Wiring, in the VMM::

    t = VirtioMmioTransport(device, memory, interrupt=irq_eventfd.write)   # irqfd (KVM_IRQFD) on GSI irq
    mmio_bus.register(base, MMIO_SLOT_SIZE, t)
    for index, efd in queue_eventfds(t, loop):   # pyrovm.device_manager: one eventfd per queue
        kvm_ioeventfd(efd.fd, addr=base + QUEUE_NOTIFY, len=4, datamatch=index)
    cmdline += " " + cmdline_fragment(base, irq)

A plain MMIO write to QueueNotify (no ioeventfd) calls :meth:`VirtioMmioTransport.queue_notify` too.
Nothing a guest does makes :meth:`read`, :meth:`write` or :meth:`queue_notify` raise: a broken queue
sets DEVICE_NEEDS_RESET (0x40) and raises a configuration-change interrupt; the VMM goes on.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyrovm.devices import IrqTrigger
from pyrovm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from pyrovm.devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
from pyrovm.memory import GuestMemory

log = logging.getLogger("pyrovm.devices.virtio")

MMIO_SLOT_SIZE = 0x1000
MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x4F525950  # "PYRO"

# Register offsets (§4.2.2)
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (§2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# InterruptStatus bits
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2


def cmdline_fragment(base: int, irq: int) -> str:
    """The kernel command-line option that declares a virtio-mmio slot at *base* on *irq*."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


#: The per-queue registers holding the queue size and ring addresses (QueueReady is apart).
_QUEUE_ADDRESS_REGS = frozenset(
    (
        QUEUE_NUM,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
    )
)
#: For each 32-bit half of a ring address: the QueueState field and the bit shift of that half.
_ADDRESS_HALVES = {
    QUEUE_DESC_LOW: ("desc_addr", 0),
    QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("avail_addr", 0),
    QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    QUEUE_DEVICE_LOW: ("used_addr", 0),
    QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


def read_queue_register(q: QueueState, offset: int) -> int:
    """QueueNum or one half of a ring address of *q* (*offset* in ``_QUEUE_ADDRESS_REGS``)."""
    if offset == QUEUE_NUM:
        return q.size
    field_name, shift = _ADDRESS_HALVES[offset]
    return (getattr(q, field_name) >> shift) & 0xFFFFFFFF


def write_queue_register(q: QueueState, offset: int, value: int) -> None:
    """Set QueueNum or one half of a ring address of *q* (*offset* in ``_QUEUE_ADDRESS_REGS``)."""
    value &= 0xFFFFFFFF
    if offset == QUEUE_NUM:
        q.size = value
        return
    field_name, shift = _ADDRESS_HALVES[offset]
    old = getattr(q, field_name)
    setattr(q, field_name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))


@dataclass
class MmioTransportState:
    """Everything the transport must keep across a snapshot (queue progress included)."""

    status: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    queue_sel: int = 0
    shm_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    queues: list[QueueState] = field(default_factory=list)


def features_refusal(status: int, driver_features: int, offered: int) -> tuple[str, str] | None:
    """Why FEATURES_OK must be refused (a log key and message), or None when the driver's features are
    acceptable: DRIVER set first, VERSION_1 taken (no legacy drivers), nothing taken that was not offered."""
    if not status & STATUS_DRIVER:
        return "features-order", "FEATURES_OK before DRIVER: refused"
    if not driver_features >> VIRTIO_F_VERSION_1 & 1:
        return "legacy", "driver did not accept VIRTIO_F_VERSION_1 (legacy driver): FEATURES_OK refused"
    extra = driver_features & ~offered
    if extra:
        return "features-extra", f"driver took features {extra:#x} that were not offered: refused"
    return None


class VirtioMmioTransport:
    """One virtio-mmio slot (BusDevice protocol: ``read(offset, size)``, ``write(offset, data)``)."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: IrqTrigger,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """*defer(fn)* runs *fn* later on the I/O thread (the event loop's ``call_soon_threadsafe``): the
        rest of a queue that stopped at its work budget is served there, after other devices' events.
        Without it the rest is served at once."""
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self._defer = defer
        self.state = MmioTransportState(
            queues=[QueueState(max_size=m, size=m) for m in device.queue_max_sizes]
        )
        self._lock = threading.RLock()
        device.bind(self.process_queue, self._lock)

    # -- helpers -------------------------------------------------------------------------------------
    def _log_once(self, key: str, msg: str, *args: object) -> None:
        self.device.log_once("mmio:" + key, "%s: " + msg, self.device.name, *args)

    def _selected(self) -> QueueState | None:
        sel = self.state.queue_sel
        return self.state.queues[sel] if sel < len(self.state.queues) else None

    @property
    def status(self) -> int:
        return self.state.status

    @property
    def needs_reset(self) -> bool:
        return bool(self.state.status & STATUS_DEVICE_NEEDS_RESET)

    # -- BusDevice -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """A guest read of *size* bytes at *offset* in the slot."""
        with self._lock:
            if offset >= CONFIG:
                try:
                    return self.device.read_config(offset - CONFIG, size)
                except Exception:
                    log.exception("%s: config read failed", self.device.name)
                    return bytes(size)
            if size != 4 or offset % 4:
                self._log_once("width", "register read of %d byte(s) at %#x ignored", size, offset)
                return bytes(size)
            return (self._read_reg(offset) & 0xFFFFFFFF).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        """A guest write of *data* at *offset* in the slot."""
        with self._lock:
            if offset >= CONFIG:
                try:
                    self.device.write_config(offset - CONFIG, bytes(data))
                except Exception:
                    log.exception("%s: config write failed", self.device.name)
                return
            if len(data) != 4 or offset % 4:
                self._log_once("width", "register write of %d byte(s) at %#x ignored", len(data), offset)
                return
            self._write_reg(offset, int.from_bytes(data, "little"))

    # -- registers -------------------------------------------------------------------------------------
    def _read_reg(self, offset: int) -> int:
        st = self.state
        q = self._selected()
        if offset == MAGIC_VALUE:
            return MMIO_MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device.features >> (32 * st.device_features_sel) if st.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return st.interrupt_status
        if offset == STATUS:
            return st.status
        if offset == CONFIG_GENERATION:
            return st.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length -1
        if q is not None and offset in _QUEUE_ADDRESS_REGS:
            return read_queue_register(q, offset)
        if offset == QUEUE_RESET:
            return 0
        self._log_once(f"read:{offset:#x}", "read of unknown or write-only register %#x", offset)
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        st = self.state
        if offset == QUEUE_NOTIFY:
            self.queue_notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            st.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == DEVICE_FEATURES_SEL:
            st.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            st.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if st.status & STATUS_FEATURES_OK or not st.status & STATUS_DRIVER:
                self._log_once("features-late", "driver features written outside feature negotiation")
            elif st.driver_features_sel < 2:
                shift = 32 * st.driver_features_sel
                st.driver_features = (st.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            st.queue_sel = value
        elif offset == SHM_SEL:
            st.shm_sel = value
        elif offset == QUEUE_READY or offset in _QUEUE_ADDRESS_REGS:
            self._write_queue_reg(offset, value)
        else:
            self._log_once(f"write:{offset:#x}", "write to unknown or read-only register %#x", offset)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            self._log_once("queue-sel", "queue register %#x written for missing queue", offset)
            return
        if self.state.status & STATUS_DRIVER_OK:
            self._log_once("queue-late", "queue register %#x written after DRIVER_OK", offset)
            return
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready:
            self._log_once("queue-ready", "queue register %#x written while the queue is ready", offset)
            return
        write_queue_register(q, offset, value)

    # -- status machine ----------------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        st = self.state
        if value == 0:
            self.reset()
            return
        old = st.status
        value &= ~STATUS_DEVICE_NEEDS_RESET  # only the device sets it
        if (old & ~STATUS_DEVICE_NEEDS_RESET) & ~value:
            self._log_once(
                "status-clear", "driver cleared status bits (%#x -> %#x) without a reset", old, value
            )
            return
        new = value & ~old
        if new & STATUS_FEATURES_OK and not self._features_ok():
            value &= ~STATUS_FEATURES_OK
        if new & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            self._log_once("driver-ok-early", "DRIVER_OK set before FEATURES_OK: ignored")
            value &= ~STATUS_DRIVER_OK
        st.status = value | (old & STATUS_DEVICE_NEEDS_RESET)
        if new & STATUS_FEATURES_OK and value & STATUS_FEATURES_OK:
            self.device.acked_features = st.driver_features
        if new & STATUS_DRIVER_OK and value & STATUS_DRIVER_OK:
            self._activate()

    def _features_ok(self) -> bool:
        refusal = features_refusal(self.state.status, self.state.driver_features, self.device.features)
        if refusal is not None:
            self._log_once(*refusal)
        return refusal is None

    def _activate(self) -> None:
        st = self.state
        feats = self.device.acked_features
        event_idx = bool(feats >> VIRTIO_F_EVENT_IDX & 1)
        indirect = bool(feats >> VIRTIO_F_INDIRECT_DESC & 1)
        queues: list[SplitQueue | None] = []
        try:
            for qs in st.queues:
                queues.append(
                    SplitQueue(self.memory, qs, event_idx=event_idx, indirect=indirect) if qs.ready else None
                )
        except VirtqueueError as e:
            self._fail(e)
            return
        try:
            self.device.activate(self.memory, queues)
        except Exception as e:
            self._fail(e)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status): all in-flight state is dropped."""
        with self._lock:
            for q in self.device.queues:
                if q is not None:
                    q.release()
            try:
                self.device.reset()
            except Exception:
                log.exception("%s: device reset failed", self.device.name)
            st = self.state
            for qs in st.queues:
                qs.reset()
            st.status = 0
            st.device_features_sel = st.driver_features_sel = st.driver_features = 0
            st.queue_sel = st.shm_sel = 0
            st.interrupt_status = 0

    def _fail(self, error: BaseException) -> None:
        """The device cannot go on: set DEVICE_NEEDS_RESET and raise a config-change interrupt."""
        if isinstance(error, VirtqueueError):
            self._log_once("needs-reset", "queue broken, device needs reset: %s", error)
        else:
            self.device.log_once(
                "mmio:crash", "%s: device failed, needs reset: %r", self.device.name, error, exc_info=error
            )
        self.device.stats.errors += 1
        if not self.state.status & STATUS_DEVICE_NEEDS_RESET:
            self.state.status |= STATUS_DEVICE_NEEDS_RESET
            self._raise_interrupt(INT_CONFIG_CHANGE)

    # -- interrupts and notifications ------------------------------------------------------------------
    def _raise_interrupt(self, bit: int) -> None:
        self.state.interrupt_status |= bit
        self.device.stats.interrupts += 1
        try:
            self.interrupt()
        except Exception as e:
            self.device.log_once("mmio:irq", "%s: raising the interrupt failed: %r", self.device.name, e)

    def config_changed(self) -> None:
        """The device configuration changed (e.g. a resized disk): bump ConfigGeneration and interrupt."""
        with self._lock:
            self.state.config_generation = (self.state.config_generation + 1) & 0xFFFFFFFF
            self._raise_interrupt(INT_CONFIG_CHANGE)

    def queue_notify(self, index: int) -> None:
        """The driver kicked queue *index* (ioeventfd or a write to QueueNotify)."""
        with self._lock:
            self.device.stats.notifications += 1
            self._process(index)

    def process_queue(self, index: int) -> None:
        """Serve queue *index* and interrupt the driver if it wants to know.  Never raises."""
        with self._lock:
            self._process(index)

    def _process(self, index: int) -> None:
        """:meth:`process_queue` with the lock held."""
        dev = self.device
        if not dev.active or self.state.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED):
            return
        q = dev.queues[index] if 0 <= index < len(dev.queues) else None
        if q is None:
            self._log_once("notify", "notification for queue %d, which is not live", index)
            return
        while True:
            try:
                dev.process(index)
            except Exception as e:
                self._fail(e)
            try:  # also after a failure: requests completed before it are announced
                if q.needs_notification():
                    self._raise_interrupt(INT_USED_BUFFER)
            except Exception as e:
                self._fail(e)
            if not q.deferred or self.state.status & STATUS_DEVICE_NEEDS_RESET:
                return
            if self._defer is not None:  # the rest later, after the other devices' events
                self._defer(lambda: self.process_queue(index))
                return

    # -- snapshots ---------------------------------------------------------------------------------------
    def save_state(self) -> MmioTransportState:
        """A copy of the transport state (registers, queue addresses and indices, acked features)."""
        with self._lock:
            return copy.deepcopy(self.state)

    def restore_state(self, state: MmioTransportState) -> None:
        """Load *state* (from :meth:`save_state`) into a fresh transport over the same guest memory.

        Restore the device's own state first.  When the driver had set DRIVER_OK the queues are rebuilt
        from the saved addresses and indices and handed to the device again: requests still in the
        avail ring are served at the next notification, requests already completed are not redone.
        """
        with self._lock:
            self.device.reset()
            self.state = copy.deepcopy(state)
            if self.state.status & STATUS_FEATURES_OK:
                self.device.acked_features = self.state.driver_features
            if self.state.status & STATUS_DRIVER_OK and not self.needs_reset:
                self._activate()

    def metrics(self) -> dict[str, int]:
        """The device's counters (see :meth:`VirtioDevice.metrics`)."""
        return self.device.metrics()
