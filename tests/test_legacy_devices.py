"""The UART, i8042 and exit port driven through their registers, without a guest."""

from __future__ import annotations

from pyrovm.devices import serial as s
from pyrovm.devices.debug_exit import DebugExit
from pyrovm.devices.i8042 import I8042


class Uart:
    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[bool] = []
        self.dev = s.Serial(out=self.out.extend, irq=self.levels.append)

    def w(self, reg: int, value: int) -> None:
        self.dev.write(reg, bytes([value]))

    def r(self, reg: int) -> int:
        return self.dev.read(reg, 1)[0]


def test_transmit_and_lsr() -> None:
    u = Uart()
    for ch in b"ok\n":
        assert u.r(s.LSR) & s.LSR_THRE
        u.w(s.RBR_THR_DLL, ch)
    assert bytes(u.out) == b"ok\n"
    assert u.r(s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    assert u.dev.stats.tx_bytes == 3
    assert u.dev.metrics() == {"tx_bytes": 3, "rx_overruns": 0}


def test_dlab_divisor_latch_and_scratch() -> None:
    u = Uart()
    u.w(s.LCR, 0x80 | 0x03)
    u.w(s.RBR_THR_DLL, 0x01)
    u.w(s.IER_DLM, 0x00)
    assert (u.r(s.RBR_THR_DLL), u.r(s.IER_DLM)) == (0x01, 0x00)
    assert u.out == b""  # a DLL write is not output
    u.w(s.LCR, 0x03)
    assert u.r(s.IER_DLM) == 0  # IER untouched by the DLM write
    assert u.dev.state.dll == 1
    u.w(s.SCR, 0x5A)
    assert u.r(s.SCR) == 0x5A


def test_thre_interrupt_raised_and_cleared_by_iir_read() -> None:
    u = Uart()
    assert u.r(s.IIR_FCR) & 0x0F == s.IIR_NONE
    u.w(s.IER_DLM, s.IER_THRE)  # enabling THRE with an empty THR raises it
    assert u.levels == [True]
    assert u.r(s.IIR_FCR) & 0x0F == s.IIR_THRE
    assert u.levels == [True, False]  # the IIR read that reported THRE cleared it
    assert u.r(s.IIR_FCR) & 0x0F == s.IIR_NONE
    u.w(s.RBR_THR_DLL, ord("x"))
    assert u.levels == [True, False, True]
    u.w(s.IER_DLM, 0)
    assert u.levels[-1] is False


def test_fifo_bits_in_iir() -> None:
    u = Uart()
    u.w(s.IIR_FCR, 0x07)
    assert u.r(s.IIR_FCR) & 0xC0 == 0xC0  # 16550A: FIFOs enabled
    u.w(s.IIR_FCR, 0x00)
    assert u.r(s.IIR_FCR) & 0xC0 == 0


def test_receive_sets_dr_and_rda_interrupt() -> None:
    u = Uart()
    u.w(s.IER_DLM, s.IER_RDA)
    assert not u.r(s.LSR) & s.LSR_DR
    u.dev.receive(b"ab")
    assert u.levels == [True]
    assert u.r(s.LSR) & s.LSR_DR
    assert u.r(s.IIR_FCR) & 0x0F == s.IIR_RDA
    assert u.r(s.RBR_THR_DLL) == ord("a")
    assert u.r(s.RBR_THR_DLL) == ord("b")
    assert not u.r(s.LSR) & s.LSR_DR
    assert u.levels == [True, False]


def test_mcr_loopback() -> None:
    u = Uart()
    u.w(s.MCR, s.MCR_LOOP | s.MCR_OUT2 | s.MCR_RTS)
    assert u.r(s.MSR) & 0xF0 == s.MSR_DCD | s.MSR_CTS  # the probe Linux's 8250 driver does
    u.w(s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_OUT1)
    assert u.r(s.MSR) & 0xF0 == s.MSR_DSR | s.MSR_RI
    u.w(s.RBR_THR_DLL, 0x42)  # looped back, not sent
    assert u.out == b""
    assert u.r(s.LSR) & s.LSR_DR
    assert u.r(s.RBR_THR_DLL) == 0x42
    u.w(s.MCR, s.MCR_OUT2)
    assert u.r(s.MSR) & 0xF0 == s.MSR_DCD | s.MSR_DSR | s.MSR_CTS


def test_rx_overrun() -> None:
    u = Uart()
    u.dev.receive(b"x" * (s.RX_BUFFER_LIMIT + 10))
    assert u.dev.rx_pending == s.RX_BUFFER_LIMIT
    assert u.r(s.LSR) & s.LSR_OE
    assert not u.r(s.LSR) & s.LSR_OE  # cleared by the read
    assert u.dev.stats.rx_overruns == 10


def test_i8042_reset_and_probe() -> None:
    resets: list[int] = []
    kbd = I8042(on_reset=lambda: resets.append(1))
    kbd.write(4, b"\xaa")
    assert kbd.read(4, 1)[0] & 1
    assert kbd.read(0, 1) == b"\x55"
    kbd.write(4, b"\x20")
    ctr = kbd.read(0, 1)[0]
    kbd.write(4, b"\x60")
    kbd.write(0, bytes([ctr & ~1]))
    kbd.write(4, b"\x20")
    assert kbd.read(0, 1)[0] == ctr & ~1
    assert resets == []
    kbd.write(4, b"\xfe")
    assert resets == [1]
    assert kbd.stats.resets == 1 and kbd.metrics() == {"resets": 1, "keys_sent": 0}


def test_i8042_ctrl_alt_del_raises_an_edge_per_byte() -> None:
    levels: list[bool] = []
    kbd = I8042(on_reset=lambda: None, irq=levels.append)
    kbd.ctrl_alt_del()
    got = []
    while kbd.read(4, 1)[0] & 1:  # OBF: a byte waits
        got.append(kbd.read(0, 1)[0])
    assert bytes(got) == bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])  # set 2
    assert levels.count(True) == len(got) and levels[-1] is False  # one rising edge per byte, then low
    kbd.write(4, b"\x60")  # the guest turns translation on: set 1
    kbd.write(0, bytes([0x45]))
    kbd.ctrl_alt_del()
    got = []
    while kbd.read(4, 1)[0] & 1:
        got.append(kbd.read(0, 1)[0])
    assert bytes(got) == bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
    assert kbd.metrics()["keys_sent"] == 6
    kbd.write(4, b"\x60")  # keyboard interrupt off: bytes wait, no interrupt
    kbd.write(0, bytes([0x44]))
    before = len(levels)
    kbd.ctrl_alt_del()
    assert levels[before:] == [] and kbd.read(4, 1)[0] & 1


def test_debug_exit() -> None:
    got: list[int] = []
    dev = DebugExit(got.append)
    dev.write(0, (5).to_bytes(4, "little"))
    assert got == [5]


def test_thr_writes_may_be_coalesced_only_while_their_interrupt_is_off() -> None:
    """The UART says when a THR write has no effect but the output (KVM may then queue it)."""
    u = Uart()
    switches: list[bool] = []
    u.dev.coalesce_writes(switches.append)
    assert switches == [True]  # IER 0 at reset: polled output
    u.w(s.IER_DLM, s.IER_RDA)  # receive interrupts change nothing for THR
    u.w(s.LCR, s.LCR_DLAB)
    u.w(s.IER_DLM, s.IER_THRE)  # (DLAB: the divisor latch, not IER)
    u.w(s.LCR, 0x03)
    assert switches == [True]
    u.w(s.IER_DLM, s.IER_RDA | s.IER_THRE)  # an interrupt per byte now: each write must exit
    assert switches == [True, False]
    u.w(s.IER_DLM, s.IER_RDA)
    u.w(s.MCR, s.MCR_LOOP)  # loopback: a THR write is received, which the guest may wait for
    assert switches == [True, False, True, False]
    u.w(s.MCR, 0)
    saved = u.dev.save_state()
    u.w(s.IER_DLM, s.IER_THRE)
    assert switches[-1] is False
    u.dev.restore_state(saved)  # back to IER without THRE
    assert switches[-1] is True


def test_the_coalesced_zone_gives_up_after_its_switches() -> None:
    from pyrovm.device_manager import _CoalescedZone

    calls: list[tuple[int, bool]] = []

    class Wiring:
        def coalesce(self, addr: int, length: int, pio: bool = False, deassign: bool = False) -> None:
            assert length == 1 and pio
            calls.append((addr, deassign))

    zone = _CoalescedZone(Wiring(), 0x3F8)  # type: ignore[arg-type]
    for _ in range(_CoalescedZone.SWITCHES + 5):
        zone(True)
        zone(True)  # (no change: nothing to do)
        zone(False)
    assert calls == [(0x3F8, False), (0x3F8, True)] * _CoalescedZone.SWITCHES
    assert not zone.on
