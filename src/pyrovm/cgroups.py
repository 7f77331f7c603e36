"""cgroup limits for the jailer: ``--cgroup FILE=VALUE`` in cgroup v2 or v1, as Firecracker's jailer.

A jailed VM gets a cgroup of its own, ``PARENT/ID`` (``PARENT`` is ``pyrovm`` unless told), in each
hierarchy a setting needs; the values are written before the VMM joins it, so that the limits hold from
its first instruction, and the cgroups are removed when it ends.

- **cgroup v2** (one hierarchy, the ``cgroup2`` mount in ``/proc/self/mounts``): the file is written as
  given (``cpu.max=50000 100000``, ``memory.max=256M``, ``pids.max=64``...); each controller is enabled in
  the ``cgroup.subtree_control`` of the cgroups above.
- **cgroup v1** (a hierarchy per controller, ``cgroup`` mounts): v1 file names are written as given
  (``memory.limit_in_bytes=...``, ``cpu.cfs_quota_us=...``), in the hierarchy of their controller; the v2
  names ``cpu.max``, ``memory.max``, ``memory.high``, ``memory.swap.max`` and ``pids.max`` are translated to
  their v1 files, so that one command line works on both kinds of host.

The version is the host's (v2 when ``/sys/fs/cgroup`` is a v2 mount, else v1) unless ``--cgroup-version``
says which.  Sizes take the suffixes K, M, G (powers of 1024).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

NAME = re.compile(r"[a-z][a-z0-9_]*\.[a-z0-9_.]+")
SIZE = re.compile(r"(\d+)([KMG]?)")
SIZE_FILES = {
    "memory.max",
    "memory.high",
    "memory.swap.max",
    "memory.limit_in_bytes",
    "memory.soft_limit_in_bytes",
}


@dataclass
class Plan:
    """Where the VM's cgroups go and what is written in them."""

    version: int
    dirs: list[Path] = field(default_factory=list)  # the VM's cgroups, one per hierarchy used
    made: list[Path] = field(default_factory=list)  # every directory made for it, innermost first
    writes: list[tuple[Path, str]] = field(default_factory=list)  # file, value (in order)
    enable: list[tuple[Path, str]] = field(default_factory=list)  # subtree_control, "+controller" (v2)


def mounts(text: str) -> tuple[dict[str, Path], Path | None]:
    """(v1 controller -> hierarchy mount, the v2 mount) from the text of /proc/self/mounts."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = Path(parts[1].replace("\\040", " "))
        if parts[2] == "cgroup2" and (v2 is None or point == Path("/sys/fs/cgroup")):
            v2 = point
        elif parts[2] == "cgroup":
            for opt in parts[3].split(","):
                if opt not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec") and "=" not in opt:
                    v1.setdefault(opt, point)
    return v1, v2


def host_version(v2: Path | None) -> int:
    return 2 if v2 == Path("/sys/fs/cgroup") else 1


def _size(name: str, value: str) -> str:
    if name not in SIZE_FILES or value == "max":
        return value
    m = SIZE.fullmatch(value)
    if not m:
        raise ConfigError(f"--cgroup {name}={value}: a size in bytes (K, M, G suffixes) or max")
    return str(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])


def to_v1(name: str, value: str) -> list[tuple[str, str]]:
    """The v1 files and values for one setting (v2 names translated; v1 ones as they are)."""
    if name == "cpu.max":
        quota, _, period = value.partition(" ")
        if not (quota == "max" or quota.isdecimal()) or not (period == "" or period.isdecimal()):
            raise ConfigError(f"--cgroup cpu.max={value}: 'QUOTA [PERIOD]' in microseconds, QUOTA may be max")
        out = [("cpu.cfs_period_us", period)] if period else []
        return [*out, ("cpu.cfs_quota_us", "-1" if quota == "max" else quota)]
    if name == "memory.max":
        return [("memory.limit_in_bytes", "-1" if value == "max" else value)]
    if name == "memory.high":
        return [("memory.soft_limit_in_bytes", "-1" if value == "max" else value)]
    if name == "memory.swap.max":
        raise ConfigError(
            "--cgroup memory.swap.max: no v1 equivalent (memory.memsw.limit_in_bytes counts RAM too)"
        )
    return [(name, value)]


def _settings(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not NAME.fullmatch(name) or not value or "\n" in value or "\0" in value:
            raise ConfigError(
                f"--cgroup {item!r}: FILE=VALUE, e.g. cpu.max='50000 100000' or memory.max=256M"
            )
        out.append((name, _size(name, value)))
    return out


def check_parent(parent: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", parent) or ".." in parent.split("/"):
        raise ConfigError(f"--parent-cgroup {parent!r}: a relative path of names")


def plan(items: list[str], version: int | None, parent: str, vm_id: str, mounts_text: str) -> Plan:
    """Check the settings against the host's hierarchies; nothing is made yet."""
    check_parent(parent)
    v1, v2 = mounts(mounts_text)
    version = version or host_version(v2)
    result = Plan(version)
    settings = _settings(items)
    if version == 2:
        if v2 is None:
            raise ConfigError("--cgroup-version 2: this host has no cgroup2 mount")
        _plan_v2(result, v2, parent, vm_id, settings)
    else:
        for name, value in settings:
            for file, v in to_v1(name, value):
                controller = file.split(".")[0]
                if controller not in v1:
                    raise ConfigError(
                        f"--cgroup {name}: this host's cgroup v1 has no {controller} controller"
                    )
                base = v1[controller]
                _add_dirs(result, base, parent, vm_id)
                result.writes.append((base / parent / vm_id / file, v))
    return result


def _add_dirs(result: Plan, base: Path, parent: str, vm_id: str) -> None:
    leaf = base / parent / vm_id
    if leaf in result.dirs:
        return
    if leaf.exists():
        raise ConfigError(f"cgroup {leaf} exists: another jail with this id, or a stale one (rmdir it)")
    result.dirs.append(leaf)
    path = leaf
    while path != base and not path.exists():
        result.made.append(path)
        path = path.parent


def _plan_v2(result: Plan, base: Path, parent: str, vm_id: str, settings: list[tuple[str, str]]) -> None:
    available = (base / "cgroup.controllers").read_text().split()
    _add_dirs(result, base, parent, vm_id)
    parts = Path(parent).parts
    chain = [base.joinpath(*parts[:i]) for i in range(len(parts) + 1)]  # the cgroups above the VM's
    for name, value in settings:
        controller = name.split(".")[0]
        if controller != "cgroup" and controller not in available:
            raise ConfigError(f"--cgroup {name}: this host's cgroup v2 has no {controller} controller")
        if controller != "cgroup":
            for above in chain:
                if (above / "cgroup.subtree_control", f"+{controller}") not in result.enable:
                    result.enable.append((above / "cgroup.subtree_control", f"+{controller}"))
        result.writes.append((result.dirs[0] / name, value))


def make(p: Plan) -> None:
    """Make the cgroups and write the settings (as root, before the VMM joins them)."""
    try:
        for d in reversed(p.made):
            d.mkdir()
        for file, value in [*p.enable, *p.writes]:
            try:
                file.write_text(value)
            except OSError as exc:
                raise ConfigError(f"cgroup: writing {value!r} to {file}: {exc.strerror}") from None
    except BaseException:
        remove(p)
        raise


def join(p: Plan, pid: int) -> None:
    """Move *pid* into the VM's cgroups (its children follow it)."""
    for d in p.dirs:
        (d / "cgroup.procs").write_text(str(pid))


def remove(p: Plan) -> None:
    """Remove what :func:`make` made, once the processes in it are gone: the VM's own cgroups with a few
    tries (its processes may still be exiting), the ones above once (another jail may be using them)."""
    for d in p.made:
        for _ in range(50 if d in p.dirs else 1):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if d in p.dirs:
                    time.sleep(0.02)


def read_mounts() -> str:
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        return f.read()


def current(pid: int | str = "self") -> list[str]:
    """The lines of /proc/PID/cgroup (for checks and tests)."""
    return Path(f"/proc/{pid}/cgroup").read_text().splitlines()


__all__ = ["Plan", "current", "join", "make", "mounts", "plan", "read_mounts", "remove", "to_v1"]
