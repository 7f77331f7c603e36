"""QEMU's command-line syntax: single-dash options and ``key=value,...`` property lists.

:func:`split_options` pairs each option with its argument (QEMU also takes ``--opt``), refusing an unknown
option or a missing argument; :func:`parse_props` reads a property list the way QEMU's ``QemuOpts`` does:
``,,`` is a literal comma, a first item without ``=`` is the list's implied key (``-M microvm,acpi=off``,
``-device virtio-net-pci,netdev=n``), and a later bare ``key`` means ``key=on`` (``server`` in ``-qmp``).
"""

from __future__ import annotations

from ..errors import ConfigError


class QemuArgError(ConfigError):
    """A command line ``pyrovm qemu`` does not take: one line naming the option."""


#: every option ``pyrovm qemu`` knows, and whether it takes an argument
OPTIONS: dict[str, bool] = {
    "enable-kvm": False,
    "accel": True,
    "machine": True,
    "M": True,
    "m": True,
    "smp": True,
    "cpu": True,
    "kernel": True,
    "initrd": True,
    "append": True,
    "drive": True,
    "device": True,
    "netdev": True,
    "nographic": False,
    "display": True,
    "serial": True,
    "monitor": True,
    "no-reboot": False,
    "name": True,
    "pidfile": True,
    "daemonize": False,
    "object": True,
    "qmp": True,
    "nodefaults": False,
    "no-user-config": False,
    "global": True,
    "sandbox": True,
}

#: options people often give that pyrovm does not have, with the nearest thing it does
NEAREST = {
    "hda": "-drive file=IMG,if=virtio,format=raw",
    "cdrom": "a raw image through -drive file=IMG,if=virtio,format=raw,readonly=on",
    "net": "-netdev user,id=n -device virtio-net-pci,netdev=n",
    "nic": "-netdev user,id=n -device virtio-net-pci,netdev=n",
    "vga": "-nographic (pyrovm has a serial console only)",
    "vnc": "-nographic (pyrovm has a serial console only)",
    "spice": "-nographic (pyrovm has a serial console only)",
    "bios": "-kernel (pyrovm boots a kernel directly, no firmware)",
    "boot": "-kernel (pyrovm boots a kernel directly, no firmware)",
    "usb": "none: pyrovm has no USB",
    "loadvm": "pyrovm snapshot restore",
    "incoming": "pyrovm snapshot restore",
    "snapshot": "a copy of the image (pyrovm writes disks in place)",
    "s": "none: pyrovm has no gdb stub",
    "S": "pyrovm snapshot restore (without --resume) or pyrovm run --api-sock and PATCH /vm",
    "chardev": "-serial stdio|file:PATH|null",
    "mon": "-qmp unix:PATH,server,wait=off",
    "rtc": "none: the guest's CMOS RTC follows the host's clock",
    "numa": "none: one NUMA node",
    "fsdev": "none: pyrovm has no 9p; use a disk image",
    "virtfs": "none: pyrovm has no 9p; use a disk image",
    "trace": "pyrovm trace",
    "d": "pyrovm trace",
    "D": "pyrovm trace -o FILE",
}


def split_options(argv: list[str]) -> list[tuple[str, str | None]]:
    """``[(name, argument or None), ...]`` in order; QemuArgError for anything else."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word in ("-", "--"):
            raise QemuArgError(f"{word!r}: not an option (QEMU takes a disk image as the first argument; "
                               "pyrovm: -drive file=IMG,if=virtio,format=raw)")  # fmt: skip
        name = word.lstrip("-")
        if name not in OPTIONS:
            hint = NEAREST.get(name)
            raise QemuArgError(
                f"-{name}: not supported by pyrovm qemu" + (f" (nearest: {hint})" if hint else "")
            )
        if OPTIONS[name]:
            if i + 1 >= len(argv):
                raise QemuArgError(f"-{name}: requires an argument")
            out.append((name, argv[i + 1]))
            i += 2
        else:
            out.append((name, None))
            i += 1
    return out


def _split_commas(text: str) -> list[str]:
    items, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def parse_props(text: str, option: str, implied: str | None = None) -> dict[str, str]:
    """The property list *text* of ``-option`` as a dict; the first item without ``=`` goes under
    *implied* (QemuArgError when the option has no implied key or an item is empty or repeated)."""
    props: dict[str, str] = {}
    for n, item in enumerate(_split_commas(text)):
        if item == "":
            raise QemuArgError(f"-{option} {text}: an empty item")
        key, sep, value = item.partition("=")
        if not sep:
            if n == 0 and implied is not None:
                key, value = implied, item
            else:
                key, value = item, "on"
        if key in props:
            raise QemuArgError(f"-{option} {text}: {key} given twice")
        props[key] = value
    return props


def on_off(value: str, what: str) -> bool:
    """QEMU's booleans."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QemuArgError(f"{what}={value}: expected on or off")


def size_mib(value: str, what: str) -> int:
    """QEMU's ``-m`` sizes: a bare number is MiB; suffixes K, M, G, T (and B)."""
    v = value.strip().upper()
    units = {"B": 1 / (1 << 20), "K": 1 / 1024, "M": 1, "G": 1024, "T": 1 << 20}
    mult = 1.0
    if v and v[-1] in units:
        mult = units[v[-1]]
        v = v[:-1]
    try:
        mib = float(v) * mult
    except ValueError:
        raise QemuArgError(f"{what} {value}: not a size (e.g. 512, 512M, 2G)") from None
    if not 0 < mib < float("inf") or mib != int(mib):  # (NaN and infinity too)
        raise QemuArgError(f"{what} {value}: not a whole, positive number of MiB")
    return int(mib)
