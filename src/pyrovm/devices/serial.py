"""A 16550A UART, as Linux's 8250 driver probes and drives it.

It knows nothing of KVM: output bytes go to ``out`` (a callable taking bytes), the interrupt pin is
driven through ``irq(level)``, and input arrives with :meth:`Serial.receive` from any thread.
:meth:`Serial.save_state` / :meth:`Serial.restore_state` give and take its state as a
:class:`SerialState` (plain data); counters are apart, in :attr:`Serial.stats` (:class:`SerialMetrics`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from . import IrqLevel

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_MS = 0x00
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_DCTS = 0x01
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_BUFFER_LIMIT = 4096


@dataclass
class SerialState:
    """Everything a snapshot needs to restore the UART (``rx``: the bytes waiting to be read)."""

    dll: int = 0x0C  # 9600 baud
    dlm: int = 0
    ier: int = 0
    lcr: int = 0x03  # 8N1
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_DCD | MSR_DSR | MSR_CTS
    scr: int = 0
    fcr: int = 0
    thr_interrupt: bool = False
    irq_level: bool = False
    rx: bytes = b""


@dataclass
class SerialMetrics:
    """Counters: bytes the guest sent, received bytes dropped because the buffer was full."""

    tx_bytes: int = 0
    rx_overruns: int = 0


class Serial:
    """A 16550A at some base port (8 registers)."""

    def __init__(self, out: Callable[[bytes], object] | None = None, irq: IrqLevel | None = None) -> None:
        #: The registers (its ``rx`` stays empty: received bytes wait in a deque while running).
        self.state = SerialState()
        self.stats = SerialMetrics()
        self._rx: deque[int] = deque()
        self._out = out or (lambda data: None)
        self._irq = irq or (lambda level: None)
        self._lock = threading.Lock()
        self._coalesce: Callable[[bool], object] | None = None
        self._coalescing = False

    def coalesce_writes(self, switch: Callable[[bool], object]) -> None:
        """Let the VMM defer THR writes while that is safe: *switch(True)* when a write to THR has no
        effect but the output (its interrupt is off, no loopback), so the VMM may queue such writes and
        serve them at the guest's next exit (KVM's coalesced PIO); *switch(False)* when a write must be
        served at once.  Every other register is read or written at once, after the queued writes."""
        with self._lock:
            self._coalesce = switch
            self._coalescing = False
            self._update_coalescing()

    def _update_coalescing(self) -> None:
        if self._coalesce is None:
            return
        st = self.state
        safe = not st.ier & IER_THRE and not st.mcr & MCR_LOOP
        if safe != self._coalescing:
            self._coalescing = safe
            self._coalesce(safe)

    # -- snapshots -----------------------------------------------------------------------------------
    def save_state(self) -> SerialState:
        """A copy of the UART's state, received bytes included."""
        with self._lock:
            return replace(self.state, rx=bytes(self._rx))

    def restore_state(self, state: SerialState) -> None:
        """Load *state* (from :meth:`save_state`); the IRQ line is driven to the saved level."""
        with self._lock:
            self.state = replace(state, rx=b"")
            self._rx = deque(state.rx[:RX_BUFFER_LIMIT])
            self._irq(state.irq_level)
            self._update_coalescing()

    def metrics(self) -> dict[str, int]:
        """``tx_bytes`` and ``rx_overruns``."""
        return asdict(self.stats)

    # -- guest side ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        return bytes((value,)) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data[0])
            self._update_irq()
            if offset in (IER_DLM, MCR):
                self._update_coalescing()

    def _read(self, offset: int) -> int:
        st = self.state
        dlab = st.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return st.dll
            rx = self._rx
            if not rx:
                return 0
            value = rx.popleft()
            if not rx:
                st.lsr &= ~LSR_DR
            return value
        if offset == IER_DLM:
            return st.dlm if dlab else st.ier
        if offset == IIR_FCR:
            iir = self._pending_iir()
            if iir == IIR_THRE:
                st.thr_interrupt = False  # reading IIR clears a THRE interrupt it reports
            return iir | (IIR_FIFO_ENABLED if st.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return st.lcr
        if offset == MCR:
            return st.mcr
        if offset == LSR:
            value = st.lsr
            st.lsr &= ~LSR_OE
            return value
        if offset == MSR:
            if st.mcr & MCR_LOOP:
                m = st.mcr
                return (
                    (MSR_CTS if m & MCR_RTS else 0)
                    | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0)
                    | (MSR_DCD if m & MCR_OUT2 else 0)
                )
            value = st.msr
            st.msr &= 0xF0  # delta bits clear on read
            return value
        return st.scr  # SCR

    def _write(self, offset: int, value: int) -> None:
        st = self.state
        dlab = st.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                st.dll = value
                return
            if st.mcr & MCR_LOOP:
                self._push_rx(bytes((value,)))
            else:
                self.stats.tx_bytes += 1
                self._out(bytes((value,)))
            # the byte left at once: THR is empty again
            st.thr_interrupt = True
        elif offset == IER_DLM:
            if dlab:
                st.dlm = value
                return
            if value & IER_THRE and not st.ier & IER_THRE:
                st.thr_interrupt = True  # enabling THRE with an empty THR raises it
            st.ier = value & 0x0F
        elif offset == IIR_FCR:
            st.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self._rx.clear()
                st.lsr &= ~LSR_DR
        elif offset == LCR:
            st.lcr = value
        elif offset == MCR:
            st.mcr = value & 0x1F
        elif offset == LSR:
            pass  # read-only (factory test register on some chips)
        elif offset == MSR:
            pass
        else:
            st.scr = value

    def _pending_iir(self) -> int:
        st = self.state
        if st.ier & IER_RLS and st.lsr & LSR_OE:
            return IIR_RLS
        if st.ier & IER_RDA and st.lsr & LSR_DR:
            return IIR_RDA
        if st.ier & IER_THRE and st.thr_interrupt:
            return IIR_THRE
        if st.ier & IER_MS and st.msr & 0x0F:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending_iir() != IIR_NONE
        if level != self.state.irq_level:
            self.state.irq_level = level
            self._irq(level)

    def _push_rx(self, data: bytes) -> None:
        st = self.state
        room = RX_BUFFER_LIMIT - len(self._rx)
        if len(data) > room:
            self.stats.rx_overruns += len(data) - room
            st.lsr |= LSR_OE
            data = data[:room]
        if data:
            self._rx.extend(data)
            st.lsr |= LSR_DR

    # -- host side -----------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes typed on the console (any thread)."""
        with self._lock:
            self._push_rx(data)
            self._update_irq()

    @property
    def rx_pending(self) -> int:
        return len(self._rx)
