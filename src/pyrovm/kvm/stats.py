"""KVM's binary statistics: the stats file descriptor of a VM or a vCPU (``KVM_GET_STATS_FD``).

The file describes itself (``Documentation/virt/kvm/api.rst``, "KVM_GET_STATS_FD"): a header
(:data:`HEADER`), an id string (``kvm-PID`` or ``kvm-PID/vcpu-N``), one descriptor per statistic
(:data:`DESC_HEAD` followed by its name) and a data block of u64 words, each statistic ``size`` words at
its ``offset``.  :class:`StatsReader` parses the header and descriptors once and reads the whole data
block with one ``pread`` per sample, so the counters a newer kernel adds appear without a change here.

:class:`StatsGroup` is a VM's statistics together with its vCPUs' (one :class:`Sample` at a time), the
table rows with rates per second (:func:`stat_rows`, :func:`format_table`) that ``pyrovm stat`` and the
end of a run print, and :func:`stats_snapshot`, the JSON-friendly dictionary for ``--metrics``.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence

from pyrovm.errors import HostError

from .constants import _io
from .system import KvmError

#: ``_IO(KVMIO, 0xce)``, on a VM or a vCPU fd: returns a new (close-on-exec) stats fd.
KVM_GET_STATS_FD = _io(0xCE)
KVM_CAP_BINARY_STATS_FD = 203

# struct kvm_stats_desc.flags (<linux/kvm.h>; the values are the shifted ones, as in the header)
KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LINEAR_HIST = 0x3 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LOG_HIST = 0x4 << KVM_STATS_TYPE_SHIFT

KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT

KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT

TYPE_NAMES = {
    KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    KVM_STATS_TYPE_INSTANT: "instant",
    KVM_STATS_TYPE_PEAK: "peak",
    KVM_STATS_TYPE_LINEAR_HIST: "linear-hist",
    KVM_STATS_TYPE_LOG_HIST: "log-hist",
}
UNIT_NAMES = {
    KVM_STATS_UNIT_NONE: "",
    KVM_STATS_UNIT_BYTES: "bytes",
    KVM_STATS_UNIT_SECONDS: "seconds",
    KVM_STATS_UNIT_CYCLES: "cycles",
    KVM_STATS_UNIT_BOOLEAN: "boolean",
}

#: struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset
HEADER = struct.Struct("<IIIIII")
#: struct kvm_stats_desc without its name: flags, exponent, size, offset, bucket_size
DESC_HEAD = struct.Struct("<IhHII")

# limits far above what any kernel writes (name_size is 48 in Linux 5.14-6.x), so that a corrupt file
# gives a StatsError instead of a huge read
_MAX_NAME_SIZE = 4096
_MAX_DESCS = 1 << 16
_MAX_DATA = 64 << 20

Value = int | list[int]
Values = dict[str, Value]


class StatsError(HostError):
    """A KVM stats file cannot be read or does not parse (short, truncated, implausible, closed)."""


def open_stats_fd(kvm_fd: int) -> int:
    """``KVM_GET_STATS_FD`` on a VM or vCPU fd: the new stats fd (close-on-exec; the caller owns it).
    A failure (e.g. ENOTTY on a kernel without binary stats) raises :class:`~pyrovm.kvm.KvmError`."""
    while True:
        try:
            return int(fcntl.ioctl(kvm_fd, KVM_GET_STATS_FD, 0))
        except InterruptedError:
            continue
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise KvmError(err, f"KVM_GET_STATS_FD: {os.strerror(err)}") from exc


@dataclasses.dataclass(frozen=True)
class StatDesc:
    """One statistic's descriptor; *type*, *unit* and *base* are the masked flag values, comparable with
    the ``KVM_STATS_TYPE_*``, ``KVM_STATS_UNIT_*`` and ``KVM_STATS_BASE_*`` constants."""

    name: str
    type: int
    unit: int
    base: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def is_histogram(self) -> bool:
        return self.type in (KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST)

    @property
    def is_scalar(self) -> bool:
        """One value (a counter or a gauge), not a histogram."""
        return self.size == 1 and not self.is_histogram

    @property
    def is_cumulative(self) -> bool:
        """A counter that only grows: it has a rate."""
        return self.type == KVM_STATS_TYPE_CUMULATIVE


def _pread(fd: int, size: int, offset: int, what: str) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise StatsError(f"KVM stats fd {fd}: cannot read the {what}: {exc.strerror or exc}") from exc
    if len(data) < size:
        raise StatsError(
            f"KVM stats fd {fd}: short {what}: {len(data)} bytes at offset {offset}, expected {size}"
        )
    return data


def _parse_descs(raw: bytes, count: int, name_size: int) -> list[StatDesc]:
    step = DESC_HEAD.size + name_size
    descs: list[StatDesc] = []
    for i in range(count):
        flags, exponent, size, offset, bucket_size = DESC_HEAD.unpack_from(raw, i * step)
        start = i * step + DESC_HEAD.size
        name = raw[start : start + name_size].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name or size == 0 or offset % 8:
            raise StatsError(
                f"KVM stats: descriptor {i} is invalid (name {name!r}, size {size}, offset {offset})"
            )
        descs.append(
            StatDesc(
                name=name,
                type=flags & KVM_STATS_TYPE_MASK,
                unit=flags & KVM_STATS_UNIT_MASK,
                base=flags & KVM_STATS_BASE_MASK,
                exponent=exponent,
                size=size,
                offset=offset,
                bucket_size=bucket_size,
            )
        )
    return descs


class StatsReader:
    """A KVM stats fd (taken over: :meth:`close` closes it): its :attr:`id`, :attr:`descriptors`, and
    :meth:`read` for the current values.  A file that does not parse raises :class:`StatsError` (and the
    fd is closed)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        _flags, name_size, num_desc, id_offset, desc_offset, data_offset = HEADER.unpack(
            _pread(self.fd, HEADER.size, 0, "header")
        )
        if not 1 <= name_size <= _MAX_NAME_SIZE or num_desc > _MAX_DESCS:
            raise StatsError(f"KVM stats: implausible header (name_size {name_size}, num_desc {num_desc})")
        raw_id = _pread(self.fd, name_size, id_offset, "id string")
        #: ``kvm-PID`` for a VM, ``kvm-PID/vcpu-N`` for a vCPU
        self.id = raw_id.split(b"\0", 1)[0].decode("utf-8", "replace")
        raw = _pread(self.fd, num_desc * (DESC_HEAD.size + name_size), desc_offset, "descriptors")
        self.descriptors = _parse_descs(raw, num_desc, name_size)
        self.data_offset = data_offset
        self.data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)
        if self.data_size > _MAX_DATA:
            raise StatsError(f"KVM stats: implausible data block of {self.data_size} bytes")
        self._slices = [(d.name, d.offset // 8, d.size, d.is_histogram) for d in self.descriptors]

    @property
    def vcpu_index(self) -> int | None:
        """N for a vCPU's stats (id ``kvm-PID/vcpu-N``), None for a VM's."""
        m = re.search(r"/vcpu-(\d+)$", self.id)
        return int(m.group(1)) if m else None

    def read(self) -> Values:
        """Every statistic's current value: an int, or a list of ints for a histogram (or any statistic
        of more than one word)."""
        if self.fd < 0:
            raise StatsError("KVM stats: read after close")
        words = memoryview(_pread(self.fd, self.data_size, self.data_offset, "data block")).cast("Q")
        values: Values = {}
        for name, index, size, hist in self._slices:
            values[name] = words[index : index + size].tolist() if hist or size != 1 else words[index]
        return values

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> StatsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StatsReader {self.id!r} fd={self.fd} {len(self.descriptors)} stats>"


def open_stats(kvm_fd: int) -> StatsReader:
    """The :class:`StatsReader` of a VM or vCPU fd."""
    return StatsReader(open_stats_fd(kvm_fd))


def combine(desc: StatDesc, values: Sequence[Value]) -> Value:
    """One value for several VMs' or vCPUs' values of *desc*: the maximum of peaks, the sum of the rest
    (histograms bucket by bucket)."""
    if not values:
        return [0] * desc.size if desc.is_histogram or desc.size != 1 else 0
    if isinstance(values[0], list):
        lists = [v if isinstance(v, list) else [v] for v in values]
        return [sum(col) for col in zip(*lists, strict=False)]
    ints = [v for v in values if isinstance(v, int)]
    return max(ints) if desc.type == KVM_STATS_TYPE_PEAK else sum(ints)


@dataclasses.dataclass(frozen=True)
class Sample:
    """The values of a :class:`StatsGroup` at one moment (``time.monotonic()``)."""

    time: float
    vm: tuple[Values, ...]
    vcpus: tuple[Values, ...]


@dataclasses.dataclass(frozen=True)
class StatRow:
    """One line of the table: a scalar statistic's total over the VM (or over the vCPUs), its rate per
    second (counters only, once two samples are known) and, for a vCPU statistic, each vCPU's rate
    (counters) or value (gauges)."""

    name: str
    scope: str  # "vm" or "vcpu"
    total: int
    rate: float | None
    per_vcpu: tuple[float | int | None, ...] = ()


class StatsGroup:
    """The statistics of one VM: its VM stats reader(s) and its vCPUs' (ordered by vCPU index).  It owns
    the readers (:meth:`close`)."""

    def __init__(self, vm: Sequence[StatsReader], vcpus: Sequence[StatsReader]) -> None:
        self.vm = list(vm)
        self.vcpus = sorted(vcpus, key=lambda r: (r.vcpu_index is None, r.vcpu_index or 0))
        self.vm_descs = self.vm[0].descriptors if self.vm else []
        self.vcpu_descs = self.vcpus[0].descriptors if self.vcpus else []

    @classmethod
    def of(cls, readers: Iterable[StatsReader]) -> StatsGroup:
        """Sort *readers* into VM and vCPU ones by their id."""
        readers = list(readers)
        return cls(
            [r for r in readers if r.vcpu_index is None], [r for r in readers if r.vcpu_index is not None]
        )

    @property
    def id(self) -> str:
        return self.vm[0].id if self.vm else (self.vcpus[0].id.split("/")[0] if self.vcpus else "")

    def vcpu_labels(self) -> list[str]:
        return [f"vcpu{r.vcpu_index}" for r in self.vcpus]

    def sample(self) -> Sample:
        return Sample(time.monotonic(), tuple(r.read() for r in self.vm), tuple(r.read() for r in self.vcpus))

    def close(self) -> None:
        for reader in (*self.vm, *self.vcpus):
            reader.close()


def _int(value: Value) -> int:
    return value if isinstance(value, int) else sum(value)


def _rate(now: int, before: int | None, dt: float) -> float | None:
    if before is None or dt <= 0:
        return None
    return max(now - before, 0) / dt


def _scope_rows(
    scope: str, descs: Sequence[StatDesc], now: Sequence[Values], before: Sequence[Values] | None, dt: float
) -> list[StatRow]:
    rows: list[StatRow] = []
    for d in descs:
        if not d.is_scalar:
            continue
        per_now = [_int(v.get(d.name, 0)) for v in now]
        total = _int(combine(d, per_now))
        per_before: list[int | None] = [None] * len(per_now)
        rate = None
        if before is not None and d.is_cumulative:
            ints = [_int(v.get(d.name, 0)) for v in before]
            rate = _rate(total, _int(combine(d, ints)), dt)
            per_before = list(ints)
        per: tuple[float | int | None, ...] = ()
        if scope == "vcpu":
            per = (
                tuple(per_now)
                if not d.is_cumulative
                else tuple(map(_rate, per_now, per_before, [dt] * len(per_now)))
            )
        rows.append(StatRow(d.name, scope, total, rate, per))
    return rows


def stat_rows(
    group: StatsGroup, now: Sample, before: Sample | None = None, show_all: bool = False
) -> list[StatRow]:
    """The table's rows for *now* (rates against *before*): the VM's scalar statistics and the vCPUs'
    (summed; peaks: the maximum), sorted by rate, then total, then name; only the non-zero ones unless
    *show_all*."""
    dt = now.time - before.time if before is not None else 0.0
    rows = _scope_rows("vm", group.vm_descs, now.vm, before.vm if before else None, dt)
    rows += _scope_rows("vcpu", group.vcpu_descs, now.vcpus, before.vcpus if before else None, dt)
    if not show_all:
        rows = [r for r in rows if r.total or r.rate]
    rows.sort(key=lambda r: (-(r.rate or 0.0), -r.total, r.name, r.scope))
    return rows


def _fmt_rate(rate: float | int | None) -> str:
    if rate is None:
        return ""
    if isinstance(rate, int):
        return str(rate)
    return f"{rate:.0f}" if rate >= 100 or rate == 0 else f"{rate:.1f}"


def format_table(rows: Sequence[StatRow], vcpu_labels: Sequence[str] = ()) -> list[str]:
    """*rows* as text lines (a header first): name, total, rate per second, and one column per label in
    *vcpu_labels* (a vCPU's rate for counters, its value for gauges; blank for VM statistics).  A name
    that is both a VM and a vCPU statistic is shown with its scope."""
    names = [r.name for r in rows]
    labels = [f"{r.name} ({r.scope})" if names.count(r.name) > 1 else r.name for r in rows]
    width = max([len("Event"), *map(len, labels)])
    head = f"{'Event':<{width}}  {'Total':>14}  {'/s':>10}"
    head += "".join(f"  {label + '/s':>10}" for label in vcpu_labels)
    lines = [head.rstrip()]
    for label, r in zip(labels, rows, strict=True):
        line = f"{label:<{width}}  {r.total:>14}  {_fmt_rate(r.rate):>10}"
        if vcpu_labels:
            per = list(r.per_vcpu) + [None] * (len(vcpu_labels) - len(r.per_vcpu))
            line += "".join(f"  {_fmt_rate(v):>10}" for v in per[: len(vcpu_labels)])
        lines.append(line.rstrip())
    return lines


def stats_snapshot(readers: Iterable[StatsReader]) -> dict[str, object]:
    """KVM's statistics now, for ``--metrics`` (JSON-friendly): ``vm`` (name -> value, several VM fds
    combined), ``vcpus`` (one such dict per vCPU, by vCPU index) and ``vcpu_total`` (the vCPUs combined:
    sums, peaks' maximum, histograms bucket by bucket); histograms are lists."""
    group = StatsGroup.of(readers)
    now = group.sample()
    vm = {d.name: combine(d, [v[d.name] for v in now.vm if d.name in v]) for d in group.vm_descs}
    total = {d.name: combine(d, [v[d.name] for v in now.vcpus if d.name in v]) for d in group.vcpu_descs}
    return {"id": group.id, "vm": vm, "vcpus": list(now.vcpus), "vcpu_total": total}
