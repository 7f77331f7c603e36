"""A QEMU command line (``qemu-system-x86_64 -enable-kvm ...``) as pyrovm's :class:`~pyrovm.config.VmConfig`.

:func:`translate` reads the options in order (each has a small handler), then puts the pieces together:
``-drive``/``-netdev``/``-object`` are looked up by ``id`` from the ``-device`` that uses them, exactly as
QEMU does.  pyrovm has one platform for every ``-machine`` (no PCI bus): ``-device virtio-*-pci`` become
virtio-mmio devices announced on the kernel command line, and a notice says so once.  Anything pyrovm does
not do is a :class:`~pyrovm.qemu.args.QemuArgError` naming the option and, where there is one, pyrovm's
nearest equivalent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..arch.x86.cpuid import FEATURES
from ..config import DiskSpec, NetSpec, VmConfig, VsockSpec
from ..errors import ConfigError
from .args import QemuArgError, on_off, parse_props, size_mib, split_options

MACHINES = ("q35", "pc", "microvm")
CPU_MODELS = ("host", "max", "qemu64", "kvm64", "qemu32", "kvm32", "base")
BLK = ("virtio-blk-pci", "virtio-blk-device", "virtio-blk")
NET = ("virtio-net-pci", "virtio-net-device", "virtio-net")
VSOCK = ("vhost-vsock-pci", "vhost-vsock-device", "vhost-vsock")
RNG = ("virtio-rng-pci", "virtio-rng-device", "virtio-rng")


@dataclass
class QemuSetup:
    """What the command line asks for: the VM's config and what the process does around it."""

    config: VmConfig
    notices: list[str] = field(default_factory=list)
    pidfile: Path | None = None
    daemonize: bool = False
    qmp: Path | None = None
    no_reboot: bool = False
    sandbox: bool = True  # pyrovm's seccomp filters (QEMU's -sandbox on|off)


@dataclass
class _State:
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory_mib: int = 128
    cpus: int = 1
    hide_kvm: bool = False
    features: list[str] = field(default_factory=list)
    console: str | None = None
    nographic: bool = False
    name: str = "pyrovm"
    drives: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> props (if=none)
    disks: list[DiskSpec] = field(default_factory=list)
    netdevs: dict[str, dict[str, str]] = field(default_factory=dict)
    objects: dict[str, dict[str, str]] = field(default_factory=dict)
    net: list[NetSpec] = field(default_factory=list)
    vsock: VsockSpec | None = None
    rng: bool = False
    setup: QemuSetup | None = None
    notices: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)


def translate(argv: list[str]) -> QemuSetup:
    """The setup for *argv* (without the program name); QemuArgError / ConfigError for bad input."""
    st = _State()
    for name, value in split_options(argv):
        handler = _HANDLERS.get(name)
        if handler is not None:
            handler(st, value or "")
    if st.kernel is None:
        raise QemuArgError("-kernel is required: pyrovm boots a kernel directly (no firmware, no boot disk)")
    for drive_id in st.drives:
        st.notice(f"-drive id={drive_id} is not used by any -device: it is left out")
    console = st.console or "stdio"
    config = VmConfig(
        kernel=Path(st.kernel),
        memory=st.memory_mib << 20,
        cpus=st.cpus,
        cmdline=st.append,
        initrd=None if st.initrd is None else Path(st.initrd),
        disks=tuple(st.disks),
        net=tuple(st.net),
        vsock=st.vsock,
        rng=st.rng,
        console=console,
        name=st.name,
        hide_kvm=st.hide_kvm,
        cpu_features=tuple(st.features),
    )
    return QemuSetup(config, st.notices, **st.extra)  # type: ignore[arg-type]


# -- the options ----------------------------------------------------------------------------------------
def _accel(st: _State, value: str) -> None:
    props = parse_props(value, "accel", "accel")
    if props.get("accel") != "kvm" or set(props) - {"accel"}:
        raise QemuArgError(f"-accel {value}: pyrovm runs on KVM only (-accel kvm)")


def _machine(st: _State, value: str) -> None:
    props = parse_props(value, "machine", "type")
    kind = props.pop("type", "pc")
    base = kind.split("-")[0] if kind.startswith(("pc-q35", "pc-i440fx")) else kind
    if base not in MACHINES and not kind.startswith(("pc-q35", "pc-i440fx")):
        raise QemuArgError(f"-machine {kind}: not one of {', '.join(MACHINES)}")
    if props.pop("accel", "kvm") != "kvm":
        raise QemuArgError(f"-machine {value}: pyrovm runs on KVM only (accel=kvm)")
    for key in list(props):
        if key in ("acpi", "x-option-roms", "pit", "pic", "rtc", "isa-serial", "auto-kernel-cmdline", "usb",
                   "graphics", "smm", "vmport", "hpet", "i8042"):  # fmt: skip
            props.pop(key)
    if props:
        raise QemuArgError(f"-machine {value}: property {next(iter(props))} is not supported by pyrovm qemu")
    st.notice(
        f"machine {kind}: pyrovm has one platform for every machine type, with no PCI bus: virtio devices "
        "(-device virtio-*-pci too) are virtio-mmio devices announced on the kernel command line "
        "(virtio_mmio.device=), the serial port is a 16550A on 0x3f8, the i8042 is there"
    )


def _memory(st: _State, value: str) -> None:
    props = parse_props(value, "m", "size")
    extra = set(props) - {"size"}
    if extra:
        raise QemuArgError(f"-m {value}: {sorted(extra)[0]} is not supported (no memory hotplug in pyrovm)")
    st.memory_mib = size_mib(props.get("size", ""), "-m")


def _smp(st: _State, value: str) -> None:
    props = parse_props(value, "smp", "cpus")
    counts: dict[str, int] = {}
    for key, v in props.items():
        if key not in ("cpus", "sockets", "cores", "threads", "dies", "clusters", "maxcpus"):
            raise QemuArgError(f"-smp {value}: {key} is not supported")
        n = _digits(v)
        if n is None or n < 1:
            raise QemuArgError(f"-smp {value}: {key}={v} is not a positive number")
        counts[key] = n
    topology = 1
    for key in ("sockets", "dies", "clusters", "cores", "threads"):
        topology *= counts.get(key, 1)
    cpus = counts.get("cpus", topology)
    if "cpus" in counts and any(k in counts for k in ("sockets", "cores", "threads")) and topology != cpus:
        raise QemuArgError(f"-smp {value}: sockets * cores * threads = {topology}, not cpus={cpus}")
    if counts.get("maxcpus", cpus) != cpus:
        raise QemuArgError(f"-smp {value}: maxcpus must equal cpus (pyrovm has no vCPU hotplug)")
    if any(counts.get(k, 1) > 1 for k in ("sockets", "threads", "dies", "clusters")):
        st.notice(f"-smp {value}: the guest sees one socket of {cpus} single-thread cores")
    st.cpus = cpus


def _cpu(st: _State, value: str) -> None:
    items = value.split(",")
    model, rest = items[0], items[1:]
    if model not in CPU_MODELS:
        raise QemuArgError(f"-cpu {model}: pyrovm gives the guest the host's CPU (-cpu host); known: "
                           f"{', '.join(CPU_MODELS)}")  # fmt: skip
    if model != "host":
        st.notice(f"-cpu {model}: the guest sees the host's CPU as KVM offers it (as -cpu host), not {model}")
    for item in rest:
        key, sep, v = item.partition("=")
        if item[:1] in ("+", "-") and not sep:
            name, sign = item[1:], item[0]
        elif key == "kvm" and sep:
            st.hide_kvm = not on_off(v, "-cpu kvm")
            continue
        elif sep and key in FEATURES:
            name, sign = key, "+" if on_off(v, f"-cpu {key}") else "-"
        else:
            raise QemuArgError(f"-cpu {value}: {item} is not supported (kvm=off, +FEATURE, -FEATURE)")
        if name not in FEATURES:
            raise QemuArgError(f"-cpu {value}: unknown CPU feature {name}")
        st.features.append(sign + name)


def _drive(st: _State, value: str) -> None:
    props = parse_props(value, "drive")
    unknown = set(props) - {
        "file",
        "if",
        "format",
        "readonly",
        "id",
        "cache",
        "media",
        "index",
        "aio",
        "discard",
    }
    if unknown:
        raise QemuArgError(f"-drive {value}: {sorted(unknown)[0]} is not supported")
    if "file" not in props:
        raise QemuArgError(f"-drive {value}: file= is required")
    fmt = props.get("format")
    if fmt is None:
        st.notice(f"-drive file={props['file']}: no format given, read as raw (pyrovm reads raw images only)")
    elif fmt != "raw":
        raise QemuArgError(f"-drive {value}: format={fmt}: pyrovm reads raw images only "
                           f"(qemu-img convert -O raw {props['file']} disk.raw)")  # fmt: skip
    iface = props.get("if", "ide")
    if iface == "none":
        if "id" not in props:
            raise QemuArgError(f"-drive {value}: if=none needs an id= for its -device")
        st.drives[props["id"]] = props
        return
    if iface != "virtio":
        st.notice(f"-drive if={iface}: pyrovm has no {iface}; the disk is a virtio disk (/dev/vd*)")
    st.disks.append(_disk(props, None))


def _disk(props: dict[str, str], serial: str | None) -> DiskSpec:
    ro = on_off(props.get("readonly", "off"), "-drive readonly") or props.get("media") == "cdrom"
    return DiskSpec(Path(props["file"]), read_only=ro, serial=serial)


def _device(st: _State, value: str) -> None:
    props = parse_props(value, "device", "driver")
    driver = props.pop("driver", "")
    props.pop("id", None)
    props.pop("bus", None)
    props.pop("addr", None)
    if driver in BLK:
        _blk_device(st, value, props)
    elif driver in NET:
        _net_device(st, value, props)
    elif driver in VSOCK:
        cid = _digits(props.pop("guest-cid", ""))
        if cid is None:
            raise QemuArgError(f"-device {value}: guest-cid=N is required")
        _no_more(props, value)
        st.vsock = VsockSpec(cid)
    elif driver in RNG:
        rng = props.pop("rng", None)
        if rng is not None and rng not in st.objects:
            raise QemuArgError(f"-device {value}: no -object with id={rng}")
        _no_more(props, value)
        st.rng = True
    elif driver == "isa-debug-exit":
        try:
            port = int(props.pop("iobase", "0x501"), 0), int(props.pop("iosize", "1"), 0)
        except ValueError:
            port = (0, 0)
        if port[0] != 0xF4 or port[1] not in (1, 2, 4):
            raise QemuArgError(f"-device {value}: pyrovm's exit port is iobase=0xf4,iosize=0x04")
        _no_more(props, value)
    else:
        raise QemuArgError(f"-device {driver}: not a device pyrovm has (it has virtio-blk, virtio-net, "
                           "vhost-vsock, virtio-rng, isa-debug-exit)")  # fmt: skip


def _digits(value: str) -> int | None:
    """The number *value* writes in ASCII digits, or None (``str.isdigit`` also takes "²", which ``int``
    refuses)."""
    if not (value.isascii() and value.isdigit()):
        return None
    try:
        return int(value)
    except ValueError:  # more digits than int() converts
        return None


def _no_more(props: dict[str, str], value: str) -> None:
    if props:
        raise QemuArgError(f"-device {value}: property {next(iter(props))} is not supported")


def _blk_device(st: _State, value: str, props: dict[str, str]) -> None:
    drive_id = props.pop("drive", None)
    serial = props.pop("serial", None)
    _no_more(props, value)
    if drive_id is None or drive_id not in st.drives:
        raise QemuArgError(f"-device {value}: no -drive with if=none,id={drive_id}")
    st.disks.append(_disk(st.drives.pop(drive_id), serial))


def _net_device(st: _State, value: str, props: dict[str, str]) -> None:
    netdev_id = props.pop("netdev", None)
    mac = props.pop("mac", None)
    _no_more(props, value)
    if netdev_id is None or netdev_id not in st.netdevs:
        raise QemuArgError(f"-device {value}: no -netdev with id={netdev_id}")
    nd = st.netdevs.pop(netdev_id)
    if nd["type"] == "user":
        fwd = ",".join(f"hostfwd={f}" for f in nd.get("hostfwd", "").split("\n") if f)
        spec = NetSpec.parse("user" + (f",{fwd}" if fwd else "") + (f",mac={mac}" if mac else ""))
    else:
        spec = NetSpec("tap", nd["ifname"], mac)
    st.net.append(spec)


def _netdev(st: _State, value: str) -> None:
    items = [i for i in value.split(",") if i.startswith("hostfwd=")]
    rest = ",".join(i for i in value.split(",") if not i.startswith("hostfwd="))
    props = parse_props(rest, "netdev", "type")
    kind, nd_id = props.get("type"), props.get("id")
    if nd_id is None:
        raise QemuArgError(f"-netdev {value}: id= is required")
    if kind == "user":
        unknown = set(props) - {"type", "id", "net", "host", "dns", "hostname", "ipv6", "ipv4"}
        props["hostfwd"] = "\n".join(i.removeprefix("hostfwd=") for i in items)
    elif kind == "tap":
        if "ifname" not in props:
            raise QemuArgError(f"-netdev {value}: ifname= is required (pyrovm opens an existing or new tap)")
        for key in ("script", "downscript"):
            if props.get(key, "no") != "no":
                raise QemuArgError(f"-netdev {value}: {key}={props[key]}: pyrovm runs no scripts ({key}=no)")
        unknown = set(props) - {"type", "id", "ifname", "script", "downscript", "vhost"}
    else:
        raise QemuArgError(f"-netdev {kind}: pyrovm has user (passt) and tap")
    if unknown:
        raise QemuArgError(f"-netdev {value}: {sorted(unknown)[0]} is not supported")
    st.netdevs[nd_id] = props


def _serial(st: _State, value: str) -> None:
    if st.console is not None:
        raise QemuArgError("-serial: pyrovm has one serial port (give -serial once)")
    if value in ("stdio", "mon:stdio"):
        st.console = "stdio"
    elif value.startswith("file:"):
        st.console = value
    elif value in ("null", "none"):
        st.console = "none"
    else:
        raise QemuArgError(f"-serial {value}: pyrovm takes stdio, mon:stdio, file:PATH or null")


def _qmp(st: _State, value: str) -> None:
    props = parse_props(value, "qmp", "addr")
    addr = props.pop("addr", "")
    if not addr.startswith("unix:"):
        raise QemuArgError(
            f"-qmp {value}: pyrovm serves QMP on a Unix socket only (unix:PATH,server,wait=off)"
        )
    if not on_off(props.pop("server", "off"), "-qmp server"):
        raise QemuArgError(f"-qmp {value}: pyrovm listens (server) and does not connect out")
    wait = props.pop("wait", "on")
    if props.pop("nowait", None) is None and on_off(wait, "-qmp wait"):
        raise QemuArgError(f"-qmp {value}: pyrovm does not wait for a client before it starts (wait=off)")
    if props:
        raise QemuArgError(f"-qmp {value}: {next(iter(props))} is not supported")
    st.extra["qmp"] = Path(addr[5:])


def _simple(key: str, value: object) -> Callable[[_State, str], None]:
    def handler(st: _State, v: str) -> None:
        st.extra[key] = value if value is not None else Path(v)

    return handler


def _display(st: _State, value: str) -> None:
    if value.split(",")[0] != "none":
        raise QemuArgError(f"-display {value}: pyrovm has no display (-display none, -nographic)")


def _monitor(st: _State, value: str) -> None:
    if value != "none":
        raise QemuArgError(f"-monitor {value}: pyrovm has no human monitor (-monitor none; QMP: -qmp)")


def _object(st: _State, value: str) -> None:
    props = parse_props(value, "object", "type")
    if props.get("type") not in ("rng-random", "rng-builtin") or "id" not in props:
        raise QemuArgError(f"-object {value}: pyrovm has rng-random and rng-builtin objects (with id=)")
    if props.get("filename", "/dev/urandom") not in ("/dev/urandom", "/dev/random"):
        raise QemuArgError(f"-object {value}: pyrovm's entropy comes from getrandom() (/dev/urandom)")
    st.objects[props["id"]] = props


def _global(st: _State, value: str) -> None:
    if value not in ("virtio-mmio.force-legacy=false", "virtio-mmio.force-legacy=off"):
        raise QemuArgError(f"-global {value}: not supported (pyrovm's virtio-mmio is modern, version 2)")


def _sandbox(st: _State, value: str) -> None:
    props = parse_props(value, "sandbox", "enable")
    if set(props) - {"enable"}:
        raise QemuArgError(f"-sandbox {value}: pyrovm takes on or off (its own filters per thread role)")
    st.extra["sandbox"] = on_off(props.get("enable", "on"), "-sandbox")


def _name(st: _State, value: str) -> None:
    st.name = parse_props(value, "name", "guest").get("guest", "pyrovm")


def _set(attr: str) -> Callable[[_State, str], None]:
    def handler(st: _State, value: str) -> None:
        setattr(st, attr, value)

    return handler


_HANDLERS: dict[str, Callable[[_State, str], None]] = {
    "enable-kvm": lambda st, v: None,
    "accel": _accel,
    "machine": _machine,
    "M": _machine,
    "m": _memory,
    "smp": _smp,
    "cpu": _cpu,
    "kernel": _set("kernel"),
    "initrd": _set("initrd"),
    "append": _set("append"),
    "drive": _drive,
    "device": _device,
    "netdev": _netdev,
    "nographic": lambda st, v: None,
    "display": _display,
    "serial": _serial,
    "monitor": _monitor,
    "no-reboot": _simple("no_reboot", True),
    "name": _name,
    "pidfile": _simple("pidfile", None),
    "daemonize": _simple("daemonize", True),
    "object": _object,
    "qmp": _qmp,
    "nodefaults": lambda st, v: None,
    "no-user-config": lambda st, v: None,
    "global": _global,
    "sandbox": _sandbox,
}


__all__ = ["ConfigError", "QemuSetup", "translate"]
