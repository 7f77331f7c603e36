"""A CMOS real-time clock (MC146818) on ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data).

The time registers follow the host clock (UTC) plus an offset that a guest write to them moves; they are
BCD or binary and 12- or 24-hour as status register B says (the reset value: BCD, 24-hour).  Register A
has UIP clear and the 32.768 kHz divider, register C (interrupt flags) reads 0 and clears on read,
register D has VRT (valid RAM and time) set.  Bytes 0x0e..0x7f are plain CMOS memory.  No interrupts are
raised (alarm, periodic and update-ended interrupts would go to IRQ 8; Linux's rtc-cmos does without).
State: :class:`RtcState` (:meth:`Rtc.save_state` / :meth:`Rtc.restore_state`): the guest's time is kept as
its offset from the host clock, so a restored RTC goes on from the host's time plus that offset.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
CMOS_SIZE = 128

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
REG_D_VRT = 0x80
HOUR_PM = 0x80

_TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


@dataclass
class RtcState:
    """Index register, NMI mask, time offset from the host clock, CMOS bytes, and the time being set
    (``frozen``: a ``time.struct_time`` as 9 ints while register B's SET bit is on, else None)."""

    index: int = 0
    nmi_disabled: bool = False
    offset: float = 0.0
    cmos: bytes = bytes(CMOS_SIZE)
    frozen: tuple[int, ...] | None = None


@dataclass
class RtcMetrics:
    """How many guest writes moved the clock."""

    time_sets: int = 0


class Rtc:
    """The CMOS RTC and its 128 bytes of memory (two ports: index at offset 0, data at offset 1)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0  # seconds added to the host clock (moved by guest writes to the time registers)
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = REG_A_DEFAULT
        self.cmos[REG_B] = REG_B_DEFAULT
        self.cmos[REG_D] = REG_D_VRT
        self._frozen: time.struct_time | None = None  # while REG_B_SET: the time the guest is writing
        self.stats = RtcMetrics()

    # -- snapshots -------------------------------------------------------------------------------------
    def save_state(self) -> RtcState:
        """A copy of the RTC's state."""
        with self._lock:
            frozen = tuple(self._frozen) if self._frozen is not None else None
            return RtcState(self.index, self.nmi_disabled, self.offset, bytes(self.cmos), frozen)

    def restore_state(self, state: RtcState) -> None:
        """Load *state* (from :meth:`save_state`)."""
        with self._lock:
            self.index = state.index
            self.nmi_disabled = state.nmi_disabled
            self.offset = state.offset
            self.cmos = bytearray(state.cmos)
            self._frozen = time.struct_time(state.frozen) if state.frozen is not None else None

    def metrics(self) -> dict[str, int]:
        """``time_sets``."""
        return asdict(self.stats)

    # -- encoding --------------------------------------------------------------------------------------
    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & REG_B_DM_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & REG_B_DM_BINARY else _from_bcd(value)

    def _now(self) -> time.struct_time:
        return self._frozen or time.gmtime(self._clock() + self.offset)

    def _time_register(self, reg: int, t: time.struct_time) -> int:
        if reg == SECONDS:
            return self._encode(t.tm_sec)
        if reg == MINUTES:
            return self._encode(t.tm_min)
        if reg == HOURS:
            if self.cmos[REG_B] & REG_B_24H:
                return self._encode(t.tm_hour)
            hour12 = t.tm_hour % 12 or 12
            return self._encode(hour12) | (HOUR_PM if t.tm_hour >= 12 else 0)
        if reg == DAY_OF_WEEK:
            return self._encode((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        if reg == DAY_OF_MONTH:
            return self._encode(t.tm_mday)
        if reg == MONTH:
            return self._encode(t.tm_mon)
        if reg == YEAR:
            return self._encode(t.tm_year % 100)
        return self._encode(t.tm_year // 100)  # CENTURY

    # -- registers -------------------------------------------------------------------------------------
    def read_register(self, reg: int) -> int:
        with self._lock:
            reg &= 0x7F
            if reg in _TIME_REGS:
                return self._time_register(reg, self._now())
            if reg == REG_A:
                return self.cmos[REG_A] & ~REG_A_UIP
            if reg == REG_C:
                value = self.cmos[REG_C]
                self.cmos[REG_C] = 0
                return value
            if reg == REG_D:
                return REG_D_VRT
            return self.cmos[reg]

    def write_register(self, reg: int, value: int) -> None:
        with self._lock:
            reg &= 0x7F
            if reg in _TIME_REGS:
                self._write_time(reg, value)
            elif reg == REG_B:
                was_set = self.cmos[REG_B] & REG_B_SET
                if value & REG_B_SET and not was_set:
                    self._frozen = self._now()
                self.cmos[REG_B] = value
                if was_set and not value & REG_B_SET and self._frozen is not None:
                    self.offset = calendar.timegm(self._frozen) - self._clock()
                    self._frozen = None
                    self.stats.time_sets += 1
            elif reg == REG_A:
                self.cmos[REG_A] = value & ~REG_A_UIP
            elif reg in (REG_C, REG_D):
                pass  # read-only
            else:
                self.cmos[reg] = value

    def _write_time(self, reg: int, value: int) -> None:
        t = list(self._now())  # year, mon, mday, hour, min, sec, wday, yday, isdst
        if reg == HOURS and not self.cmos[REG_B] & REG_B_24H:
            hour = self._decode(value & 0x7F) % 12
            t[3] = hour + (12 if value & HOUR_PM else 0)
        elif reg == SECONDS:
            t[5] = self._decode(value)
        elif reg == MINUTES:
            t[4] = self._decode(value)
        elif reg == HOURS:
            t[3] = self._decode(value)
        elif reg == DAY_OF_MONTH:
            t[2] = self._decode(value)
        elif reg == MONTH:
            t[1] = self._decode(value)
        elif reg == YEAR:
            t[0] = (t[0] // 100) * 100 + self._decode(value)
        elif reg == CENTURY:
            t[0] = self._decode(value) * 100 + t[0] % 100
        else:
            return  # day of week follows from the date
        try:
            new = time.gmtime(calendar.timegm((*t[:6], 0, 0, 0)))
        except (OverflowError, ValueError):
            return
        if self._frozen is not None:
            self._frozen = new
        else:
            self.offset = calendar.timegm(new) - self._clock()
            self.stats.time_sets += 1

    # -- bus device ------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            value = self.index | (0x80 if self.nmi_disabled else 0)
        else:
            value = self.read_register(self.index)
        return bytes((value,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.index = data[0] & 0x7F
            self.nmi_disabled = bool(data[0] & 0x80)
        else:
            self.write_register(self.index, data[0])
