"""What a VM is made of: :class:`VmConfig` and its device specs, validated without ``/dev/kvm``.

A :class:`VmConfig` holds every option of ``pyrovm run`` and of :class:`pyrovm.VM`.  It is frozen: a
changed VM is a new config (:meth:`VmConfig.replace`).  :meth:`VmConfig.validate` checks it against the
host's files and memory only (no KVM), and raises :class:`ConfigError` with one line naming the problem.
:meth:`VmConfig.to_json` / :meth:`VmConfig.from_json` turn it into plain JSON data and back (the API and
snapshot files carry it); unknown keys are refused.

The builder (:mod:`pyrovm.builder`) turns a validated config into a running machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch.x86 import layout
from .devices.ratelimit import RateLimitSpec
from .errors import ConfigError
from .kvm.system import DEFAULT_KVM_DEVICE
from .loader.cmdline import Cmdline
from .loader.kernel import BOOT_MODES

if TYPE_CHECKING:  # (the network and vsock modules are imported only for a VM that has them)
    from .netback.passt import PortForward

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
DEFAULT_MEMORY = 128 << 20
MIN_MEMORY = 8 << 20
MAX_CPUS = 254  # 8-bit APIC ids, and the IOAPIC's id after them in the MP table
#: The generic kernel command-line limit (a bzImage may accept less: checked when it is loaded).
CMDLINE_LIMIT = layout.CMDLINE_MAX_SIZE - 1
SERIAL_MAX = 20  # virtio-blk id bytes


def parse_size(value: str | int, what: str = "memory") -> int:
    """``"128M"``, ``"1G"``, ``"512K"``, ``"4096B"`` → bytes; a bare number (or an int) is MiB, as in QEMU."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{what} size {value!r} is not a size like 128M, 1G or 512K")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} size {value} is negative")
        return value << 20
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not m or (not m.group(2) and (m.group(3) or "B").upper() != "B"):  # "iB" alone is no unit
        raise ConfigError(f"{what} size {value!r} is not a size like 128M, 1G or 512K")
    n = int(m.group(1))
    unit = m.group(2).upper()
    if not unit:
        return n if (m.group(3) or "").upper() == "B" else n << 20
    return n << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def host_memory() -> int:
    """Bytes of RAM this host has."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk: ``PATH[,ro][,serial=ID]``."""

    path: Path
    read_only: bool = False
    serial: str | None = None
    rate_limiter: RateLimitSpec | None = None  # Firecracker's token buckets (bytes, requests)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def parse(cls, spec: str) -> DiskSpec:
        path, *opts = spec.split(",")
        if not path:
            raise ConfigError(f"disk {spec!r}: no path (use PATH[,ro][,serial=ID])")
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
                raise ConfigError(f"disk {spec!r}: unknown option {opt!r} (ro, rw, serial=ID)")
        return cls(Path(path), read_only, serial)

    @classmethod
    def of(cls, spec: str | os.PathLike[str] | DiskSpec) -> DiskSpec:
        """A DiskSpec from a spec string, a path, or a DiskSpec."""
        if isinstance(spec, DiskSpec):
            return spec
        return cls.parse(spec) if isinstance(spec, str) else cls(Path(spec))

    def to_json(self) -> dict[str, Any]:
        limiter = None if self.rate_limiter is None else self.rate_limiter.to_json()
        return {
            "path": str(self.path),
            "read_only": self.read_only,
            "serial": self.serial,
            "rate_limiter": limiter,
        }

    @classmethod
    def from_json(cls, data: Any) -> DiskSpec:
        fields = _object(data, "disk", {"path", "read_only", "serial", "rate_limiter"})
        if "path" not in fields:
            raise ConfigError("disk: 'path' is required")
        return cls(
            Path(_typed(fields["path"], str, "disk path")),
            bool(_typed(fields.get("read_only", False), bool, "disk read_only")),
            _typed(fields.get("serial"), str | None, "disk serial"),  # type: ignore[arg-type]
            RateLimitSpec.from_json(fields.get("rate_limiter"), "disk rate_limiter"),
        )

    def validate(self) -> None:
        what = f"disk {self.path}"
        st = _stat(self.path, what)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"{what}: not a regular file or block device")
        mode = os.R_OK if self.read_only else os.R_OK | os.W_OK
        if not os.access(self.path, mode):
            raise ConfigError(f"{what}: not {'readable' if self.read_only else 'writable'}")
        if self.serial is not None:
            if not self.serial.isascii() or len(self.serial) > SERIAL_MAX:
                raise ConfigError(f"{what}: serial {self.serial!r}: at most {SERIAL_MAX} ASCII characters")


#: passt's largest MTU (the 802.3 maximum less its header).
PASST_MAX_MTU = 65520
NET_BACKENDS = ("tap", "user")


@dataclass(frozen=True)
class NetSpec:
    """One virtio-net NIC: ``tap=NAME[,mac=MAC][,mtu=N]`` or ``user[,hostfwd=...][,mac=MAC][,mtu=N]``.

    ``tap``: an existing tap device (created when it does not exist and pyrovm may).  ``user``: rootless
    user-mode networking through passt, with QEMU-style port forwards
    ``hostfwd=tcp|udp:[HOSTADDR]:HOSTPORT-:GUESTPORT`` (HOSTADDR defaults to 127.0.0.1).  ``mac``
    defaults to one derived from the VM's name and the NIC's index; ``mtu`` (default 1500) is announced to
    the guest (and to passt's DHCP).
    """

    backend: str  # tap | user
    tap: str | None = None
    mac: str | None = None
    mtu: int = 1500
    hostfwd: tuple[PortForward, ...] = ()
    rx_rate_limiter: RateLimitSpec | None = None  # frames to the guest (Firecracker's token buckets)
    tx_rate_limiter: RateLimitSpec | None = None  # frames from the guest

    def __post_init__(self) -> None:
        if self.hostfwd:
            from .netback.passt import PortForward, parse_forward

            forwards = tuple(f if isinstance(f, PortForward) else parse_forward(f) for f in self.hostfwd)
            object.__setattr__(self, "hostfwd", forwards)

    @classmethod
    def parse(cls, spec: str) -> NetSpec:
        head, *opts = spec.split(",")
        if head == "user":
            backend, tap = "user", None
        elif head.startswith("tap="):
            backend, tap = "tap", head[4:]
        else:
            raise ConfigError(f"net {spec!r}: use tap=NAME[,mac=MAC][,mtu=N] or user[,hostfwd=...]")
        mac: str | None = None
        mtu = 1500
        forwards: list[PortForward] = []
        for opt in opts:
            key, sep, value = opt.partition("=")
            if key == "mac" and sep:
                mac = value
            elif key == "mtu" and sep:
                if not value.isdecimal():
                    raise ConfigError(f"net {spec!r}: mtu {value!r} is not a number")
                mtu = int(value)
            elif key == "hostfwd" and sep and backend == "user":
                from .netback.passt import parse_forward

                forwards.append(parse_forward(value))
            else:
                known = "mac=, mtu=, hostfwd=" if backend == "user" else "mac=, mtu="
                raise ConfigError(f"net {spec!r}: unknown option {opt!r} ({known})")
        return cls(backend, tap, mac, mtu, tuple(forwards))

    @classmethod
    def of(cls, spec: str | NetSpec) -> NetSpec:
        return spec if isinstance(spec, NetSpec) else cls.parse(spec)

    def mac_bytes(self, vm_name: str, index: int) -> bytes:
        """The MAC given, or a locally administered one derived from the VM's name and the NIC's index."""
        if self.mac is not None:
            from .devices.virtio.net import parse_mac

            return parse_mac(self.mac)
        return default_mac(vm_name, index)

    def validate(self) -> None:
        from .devices.virtio.net import MAX_MTU, MIN_MTU, parse_mac
        from .netback.passt import find_passt
        from .netback.tap import check_ifname

        what = f"net {self.backend}" + (f"={self.tap}" if self.tap is not None else "")
        if self.backend not in NET_BACKENDS:
            raise ConfigError(f"net backend {self.backend!r}: use tap or user")
        if self.backend == "tap":
            check_ifname(self.tap or "")
            if self.hostfwd:
                raise ConfigError(f"{what}: hostfwd= is for the user backend")
        elif self.tap is not None:
            raise ConfigError(f"{what}: a user NIC has no tap")
        if self.mac is not None:
            parse_mac(self.mac)
        top = PASST_MAX_MTU if self.backend == "user" else MAX_MTU
        if not isinstance(self.mtu, int) or isinstance(self.mtu, bool) or not MIN_MTU <= self.mtu <= top:
            raise ConfigError(f"{what}: mtu {self.mtu}: from {MIN_MTU} to {top}")
        if self.backend == "user":
            find_passt()

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "tap": self.tap,
            "mac": self.mac,
            "mtu": self.mtu,
            "hostfwd": [str(f) for f in self.hostfwd],
            "rx_rate_limiter": None if self.rx_rate_limiter is None else self.rx_rate_limiter.to_json(),
            "tx_rate_limiter": None if self.tx_rate_limiter is None else self.tx_rate_limiter.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> NetSpec:
        fields = _object(
            data, "net", {"backend", "tap", "mac", "mtu", "hostfwd", "rx_rate_limiter", "tx_rate_limiter"}
        )
        if "backend" not in fields:
            raise ConfigError("net: 'backend' is required")
        return cls(
            _typed(fields["backend"], str, "net backend"),
            _typed(fields.get("tap"), str | None, "net tap"),  # type: ignore[arg-type]
            _typed(fields.get("mac"), str | None, "net mac"),  # type: ignore[arg-type]
            _typed(fields.get("mtu", 1500), int, "net mtu"),
            tuple(
                _typed(f, str, "net hostfwd") for f in _typed(fields.get("hostfwd", []), list, "net hostfwd")
            ),
            RateLimitSpec.from_json(fields.get("rx_rate_limiter"), "net rx_rate_limiter"),
            RateLimitSpec.from_json(fields.get("tx_rate_limiter"), "net tx_rate_limiter"),
        )


@dataclass(frozen=True)
class VsockSpec:
    """The vsock device: ``cid=N[,uds=PATH]`` (Firecracker's hybrid vsock: host side on Unix sockets).

    *uds* defaults to ``$XDG_RUNTIME_DIR/pyrovm-<name>.vsock`` (``/tmp`` without it); an existing file
    there is refused, except at the default path a socket nobody listens on (left by a killed VM).
    """

    cid: int
    uds: Path | None = None

    def __post_init__(self) -> None:
        if self.uds is not None:
            object.__setattr__(self, "uds", Path(self.uds))

    @classmethod
    def parse(cls, spec: str) -> VsockSpec:
        cid: int | None = None
        uds: Path | None = None
        for opt in spec.split(","):
            key, sep, value = opt.partition("=")
            if key == "cid" and sep:
                if not value.isdecimal():
                    raise ConfigError(f"vsock {spec!r}: cid {value!r} is not a number")
                cid = int(value)
            elif key == "uds" and sep and value:
                uds = Path(value)
            else:
                raise ConfigError(f"vsock {spec!r}: unknown option {opt!r} (cid=N, uds=PATH)")
        if cid is None:
            raise ConfigError(f"vsock {spec!r}: cid=N is required (3 or more)")
        return cls(cid, uds)

    @classmethod
    def of(cls, spec: str | VsockSpec) -> VsockSpec:
        return spec if isinstance(spec, VsockSpec) else cls.parse(spec)

    def socket_path(self, vm_name: str) -> Path:
        if self.uds is not None:
            return self.uds
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        return Path(base) / f"pyrovm-{vm_name}.vsock"

    def validate(self, vm_name: str) -> None:
        from .devices.virtio.vsock import check_cid

        check_cid(self.cid)
        path = self.socket_path(vm_name)
        what = f"vsock socket {path}"
        try:
            encoded = os.fsencode(path)
        except UnicodeEncodeError as exc:  # an unpaired surrogate (a JSON "\ud800" escape)
            raise ConfigError(f"{what}: not a usable path ({exc})") from None
        if b"\0" in encoded:
            raise ConfigError(f"{what}: not a usable path (a NUL byte)")
        if len(encoded) >= 108:
            raise ConfigError(f"{what}: longer than a Unix socket path may be (107 bytes)")
        if self.uds is not None and os.path.lexists(path):
            raise ConfigError(f"{what} already exists (remove it, or give another uds=)")
        _writable_dir(path, what)

    def to_json(self) -> dict[str, Any]:
        return {"cid": self.cid, "uds": None if self.uds is None else str(self.uds)}

    @classmethod
    def from_json(cls, data: Any) -> VsockSpec:
        fields = _object(data, "vsock", {"cid", "uds"})
        if "cid" not in fields:
            raise ConfigError("vsock: 'cid' is required")
        return cls(
            _typed(fields["cid"], int, "vsock cid"), _typed(fields.get("uds"), str | None, "vsock uds")
        )  # type: ignore[arg-type]


def default_mac(vm_name: str, index: int) -> bytes:
    """``02:xx:xx:xx:xx:xx`` from a hash of the VM's name and the NIC's index: stable across runs, locally
    administered, unicast."""
    import hashlib  # (here: it loads libcrypto, 3 MiB a VM without NICs does not need)

    digest = hashlib.sha256(f"pyrovm-nic:{vm_name}:{index}".encode()).digest()
    return b"\x02" + digest[:5]


@dataclass(frozen=True)
class VmConfig:
    """Everything a VM is built from (every option of ``pyrovm run`` and of :class:`pyrovm.VM`)."""

    kernel: Path
    memory: int = DEFAULT_MEMORY  # bytes
    cpus: int = 1
    cmdline: str = DEFAULT_CMDLINE
    initrd: Path | None = None
    boot: str = "auto"  # auto | pvh | linux64
    cpu_vendor: str | None = None  # 12 characters, e.g. GenuineIntel; None: the host's
    disks: tuple[DiskSpec, ...] = ()
    rootfs: DiskSpec | None = None  # put first (/dev/vda) and booted as the root
    rng: bool = False
    rng_rate: int | None = None  # bytes per second
    host_workarounds: bool = True  # PVM hosts only (see pyrovm.host)
    boot_marker: str | None = None  # regular expression over console lines
    console: str = "none"  # none | stdio | file:PATH
    metrics_path: Path | None = None
    timeout: float | None = None  # seconds; None: no limit
    kvm_device: str = DEFAULT_KVM_DEVICE
    net: tuple[NetSpec, ...] = ()
    name: str = "pyrovm"  # the VM's name: default MAC addresses derive from it
    vsock: VsockSpec | None = None
    track_dirty_pages: bool = False  # KVM's dirty log on guest RAM, for diff snapshots
    hide_kvm: bool = False  # no KVM hypervisor CPUID leaves (QEMU's -cpu ...,kvm=off)
    coalesced_io: bool = True  # KVM queues writes that may wait (UART THR while polled, CMOS index)
    cpu_features: tuple[str, ...] = ()  # "+name" (required) / "-name" (hidden), QEMU's names

    def __post_init__(self) -> None:
        # accept lists and plain strings where tuples and Paths belong (frozen: through object.__setattr__)
        object.__setattr__(self, "kernel", Path(self.kernel))
        if self.initrd is not None:
            object.__setattr__(self, "initrd", Path(self.initrd))
        object.__setattr__(self, "disks", tuple(DiskSpec.of(d) for d in self.disks))
        if isinstance(self.net, str | NetSpec):
            object.__setattr__(self, "net", (self.net,))
        object.__setattr__(self, "net", tuple(NetSpec.of(n) for n in self.net))
        if self.vsock is not None:
            object.__setattr__(self, "vsock", VsockSpec.of(self.vsock))
        if self.rootfs is not None:
            object.__setattr__(self, "rootfs", DiskSpec.of(self.rootfs))
        if self.metrics_path is not None:
            object.__setattr__(self, "metrics_path", Path(self.metrics_path))
        if self.rng_rate is not None and not self.rng:
            object.__setattr__(self, "rng", True)
        object.__setattr__(self, "cpu_features", tuple(self.cpu_features))

    def replace(self, **changes: Any) -> VmConfig:
        """A copy with *changes*."""
        return dataclasses.replace(self, **changes)

    @property
    def all_disks(self) -> tuple[DiskSpec, ...]:
        """The virtio-blk disks in guest order (the root file system first)."""
        return ((self.rootfs,) if self.rootfs is not None else ()) + self.disks

    @property
    def console_path(self) -> Path | None:
        return Path(self.console[5:]) if self.console.startswith("file:") else None

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, restoring: bool = False) -> None:
        """Check everything that can be checked without KVM; :class:`ConfigError` names the problem.
        *restoring*: the config of a snapshot being restored (no kernel or initrd is loaded)."""
        for check in self._checks():
            if not (restoring and check == self._check_kernel):
                check()

    def _checks(self) -> Iterator[Any]:
        yield self._check_memory  # first: the kernel and initrd sizes are checked against it
        yield self._check_kernel
        yield self._check_cpus
        yield self._check_options
        yield self._check_disks
        yield self._check_net
        yield self._check_outputs

    def _check_kernel(self) -> None:
        _readable_file(self.kernel, f"kernel {self.kernel}", self.memory)
        if self.initrd is not None:
            _readable_file(self.initrd, f"initrd {self.initrd}", self.memory)
        try:
            Cmdline(self.cmdline).encode(CMDLINE_LIMIT)
        except ConfigError as exc:
            raise ConfigError(f"command line: {exc}") from exc

    def _check_memory(self) -> None:
        if not isinstance(self.memory, int) or isinstance(self.memory, bool):
            raise ConfigError(f"memory {self.memory!r}: not a number of bytes")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"memory {self.memory >> 20} MiB is too small: at least {MIN_MEMORY >> 20} MiB")
        if self.memory % 4096:
            raise ConfigError("memory size must be a multiple of 4 KiB")
        host = host_memory()
        if self.memory > host:
            raise ConfigError(f"memory {self.memory >> 20} MiB is more than this host has ({host >> 20} MiB)")

    def _check_cpus(self) -> None:
        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool) or self.cpus < 1:
            raise ConfigError(f"cpus must be at least 1, not {self.cpus}")
        if self.cpus > MAX_CPUS:
            raise ConfigError(f"{self.cpus} vCPUs: at most {MAX_CPUS} (8-bit APIC ids)")

    def _check_options(self) -> None:
        if self.boot not in BOOT_MODES:
            raise ConfigError(f"boot mode {self.boot!r}: choose auto, pvh or linux64")
        if self.cpu_vendor is not None and (len(self.cpu_vendor) != 12 or not self.cpu_vendor.isascii()):
            raise ConfigError(f"CPU vendor {self.cpu_vendor!r}: 12 ASCII characters, e.g. GenuineIntel")
        rate = self.rng_rate
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0):
            raise ConfigError(f"rng rate {self.rng_rate}: must be a positive number of bytes per second")
        if self.timeout is not None and (
            not isinstance(self.timeout, int | float)
            or isinstance(self.timeout, bool)
            or math.isnan(self.timeout)
            or self.timeout < 0
        ):
            raise ConfigError(f"timeout {self.timeout}: must be a number of seconds, 0 or more")
        if self.boot_marker is not None:
            _utf8(self.boot_marker, "boot marker")
            try:
                re.compile(self.boot_marker.encode())
            except (re.error, UnicodeEncodeError) as exc:
                marker = self.boot_marker
                raise ConfigError(f"boot marker {marker!r}: not a regular expression ({exc})") from exc
        from .arch.x86.cpuid import FEATURES

        for feat in self.cpu_features:
            if not isinstance(feat, str) or feat[:1] not in ("+", "-") or feat[1:] not in FEATURES:
                raise ConfigError(f"CPU feature {feat!r}: +NAME or -NAME with a name QEMU uses (e.g. -avx)")

    def _check_disks(self) -> None:
        seen: dict[tuple[int, int], Path] = {}
        for disk in self.all_disks:
            disk.validate()
            st = os.stat(disk.path)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ConfigError(f"disk {disk.path}: the same image as disk {seen[key]} (given twice)")
            seen[key] = disk.path

    def _check_net(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or len(self.name) > 64
            or not self.name.isprintable()
        ):
            raise ConfigError(f"VM name {self.name!r}: 1 to 64 printable characters")
        macs: dict[bytes, int] = {}
        taps: set[str] = set()
        ports: set[tuple[str, str, int]] = set()
        for i, nic in enumerate(self.net):
            nic.validate()
            mac = nic.mac_bytes(self.name, i)
            if mac in macs:
                from .devices.virtio.net import format_mac

                raise ConfigError(f"net {i}: MAC {format_mac(mac)} is also NIC {macs[mac]}'s")
            macs[mac] = i
            if nic.tap is not None:
                if nic.tap in taps:
                    raise ConfigError(f"net {i}: tap {nic.tap} is given twice")
                taps.add(nic.tap)
            for fwd in nic.hostfwd:
                key = (fwd.proto, fwd.host_addr, fwd.host_port)
                if key in ports:
                    raise ConfigError(
                        f"hostfwd {fwd}: host port {fwd.host_port}/{fwd.proto} is forwarded twice"
                    )
                ports.add(key)
        if self.vsock is not None:
            self.vsock.validate(self.name)

    def _check_outputs(self) -> None:
        if self.console not in ("none", "stdio") and self.console_path is None:
            raise ConfigError(f"console {self.console!r}: use stdio, none or file:PATH")
        outputs = [(f"console file {p}", p) for p in [self.console_path] if p is not None]
        outputs += [(f"metrics file {p}", p) for p in [self.metrics_path] if p is not None]
        inputs = [("kernel", self.kernel)] + [("initrd", p) for p in [self.initrd] if p is not None]
        inputs += [(f"disk {d.path}", d.path) for d in self.all_disks]
        for what, path in outputs:
            _writable_path(path, what)
            for other, ipath in inputs + [(w, p) for w, p in outputs if w != what]:
                if _same_file(path, ipath):
                    raise ConfigError(f"{what}: it is also the {other}: refusing to overwrite it")

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (every field; paths as strings)."""
        return {
            "kernel": str(self.kernel),
            "memory": self.memory,
            "cpus": self.cpus,
            "cmdline": self.cmdline,
            "initrd": None if self.initrd is None else str(self.initrd),
            "boot": self.boot,
            "cpu_vendor": self.cpu_vendor,
            "disks": [d.to_json() for d in self.disks],
            "rootfs": None if self.rootfs is None else self.rootfs.to_json(),
            "rng": self.rng,
            "rng_rate": self.rng_rate,
            "host_workarounds": self.host_workarounds,
            "boot_marker": self.boot_marker,
            "console": self.console,
            "metrics_path": None if self.metrics_path is None else str(self.metrics_path),
            "timeout": self.timeout,
            "kvm_device": self.kvm_device,
            "net": [n.to_json() for n in self.net],
            "name": self.name,
            "vsock": None if self.vsock is None else self.vsock.to_json(),
            "track_dirty_pages": self.track_dirty_pages,
            "hide_kvm": self.hide_kvm,
            "coalesced_io": self.coalesced_io,
            "cpu_features": list(self.cpu_features),
        }

    @classmethod
    def from_json(cls, data: Any) -> VmConfig:
        """The config :meth:`to_json` gave (missing keys take their defaults); ConfigError on bad data."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = _object(data, "config", names)
        if "kernel" not in fields:
            raise ConfigError("config: 'kernel' is required")
        return cls(**{name: _json_field(name, value) for name, value in fields.items()})


#: JSON type of each plain field and whether it may be null (paths are strings: ``__post_init__`` makes
#: them Paths; ``disks`` and ``rootfs`` are DiskSpec objects, read by :meth:`DiskSpec.from_json`).
_JSON_FIELDS: dict[str, tuple[Any, bool]] = {
    "kernel": (str, False),
    "memory": (int, False),
    "cpus": (int, False),
    "cmdline": (str, False),
    "initrd": (str, True),
    "boot": (str, False),
    "cpu_vendor": (str, True),
    "rng": (bool, False),
    "rng_rate": (int, True),
    "host_workarounds": (bool, False),
    "boot_marker": (str, True),
    "console": (str, False),
    "metrics_path": (str, True),
    "timeout": (int | float, True),
    "kvm_device": (str, False),
    "name": (str, False),
    "track_dirty_pages": (bool, False),
    "hide_kvm": (bool, False),
    "coalesced_io": (bool, False),
}


def _json_field(name: str, value: Any) -> Any:
    if name == "disks":
        return tuple(DiskSpec.from_json(d) for d in _typed(value, list, name))
    if name == "rootfs":
        return None if value is None else DiskSpec.from_json(value)
    if name == "net":
        return tuple(NetSpec.from_json(n) for n in _typed(value, list, name))
    if name == "vsock":
        return None if value is None else VsockSpec.from_json(value)
    if name == "cpu_features":
        return tuple(_typed(f, str, name) for f in _typed(value, list, name))
    kind, nullable = _JSON_FIELDS[name]
    if value is None and nullable:
        return None
    value = _typed(value, kind, name)
    return float(value) if name == "timeout" else value


def _object(data: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}")
    return data


def _typed(value: Any, kind: Any, name: str) -> Any:
    if isinstance(value, bool) and kind in (int, int | float):
        raise ConfigError(f"{name}: expected a number, not {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: {value!r} has the wrong type")
    return value


def _utf8(text: str, what: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} {text!r}: not valid UTF-8") from exc


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"{what}: not a usable path ({exc})") from exc


def _readable_file(path: Path, what: str, memory: int) -> None:
    st = _stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what}: not readable")
    if isinstance(memory, int) and st.st_size > memory:
        raise ConfigError(f"{what}: {st.st_size} bytes, more than the guest's memory ({memory} bytes)")


def _writable_path(path: Path, what: str) -> None:
    """An output file: a regular file (made or replaced) or a character device (written in place, such as
    ``/dev/null``); never a directory, FIFO or socket (opening a FIFO would wait for a reader)."""
    st = _stat_or_none(path, what)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what}: is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise ConfigError(f"{what}: not a regular file or character device")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what}: not writable")
        return
    _writable_dir(path, what)


def _writable_dir(path: Path, what: str) -> None:
    """ConfigError unless the directory *path* would be made in exists and is writable."""
    parent = path.parent if str(path.parent) else Path(".")
    pst = _stat_or_none(parent, f"{what}: directory {parent}")
    if pst is None or not stat.S_ISDIR(pst.st_mode):
        raise ConfigError(f"{what}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: directory {parent} is not writable")


def _stat_or_none(path: Path, what: str) -> os.stat_result | None:
    """``os.stat``; None when nothing is there, ConfigError for any other failure (a name too long...)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"{what}: not a usable path ({exc})") from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
