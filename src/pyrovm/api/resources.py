"""Firecracker's API bodies, read strictly, and the pre-boot resources they make up.

Each ``parse_*`` function takes a decoded JSON body and returns plain values or raises :class:`ApiError`
with Firecracker's wording (unknown fields refused, required fields named, types checked).
:class:`Resources` collects what a client configured before ``InstanceStart`` and turns it into a
:class:`~pyrovm.config.VmConfig` (which then validates the files and sizes without KVM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrovm.config import DiskSpec, NetSpec, VmConfig, VsockSpec
from pyrovm.devices.ratelimit import RateLimitSpec
from pyrovm.errors import ConfigError, PyrovmError

#: Firecracker's default kernel command line when ``boot_args`` is not given.
DEFAULT_BOOT_ARGS = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd"
ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
MAX_VCPUS = 32


class ApiError(PyrovmError, ValueError):
    """A refused request: answered 400 with ``{"fault_message": message}``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def fields(body: Any, allowed: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """*body* as a JSON object with only *allowed* keys (name -> type or tuple of types) and *required*."""
    if not isinstance(body, dict):
        raise ApiError(
            "An error occurred when deserializing the json body of a request: expected a JSON object."
        )
    for key in body:
        if key not in allowed:
            names = ", ".join(f"`{k}`" for k in allowed)
            raise ApiError(
                f"An error occurred when deserializing the json body of a request: unknown field `{key}`, "
                f"expected one of {names}."
            )
    for key in required:
        if key not in body:
            raise ApiError(
                f"An error occurred when deserializing the json body of a request: missing field `{key}`."
            )
    for key, value in body.items():
        kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if value is None and type(None) in kinds:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ApiError(
                f"An error occurred when deserializing the json body of a request: invalid type for "
                f"field `{key}`: {value!r}."
            )
    return body


def check_id(path_id: str, body_id: Any, what: str) -> None:
    if not ID_RE.fullmatch(path_id):
        raise ApiError(f"Invalid {what} ID: {path_id!r} (letters, digits and '_', at most 64).")
    if path_id != body_id:
        raise ApiError("The id from the path does not match the id from the body!")


_RATE_LIMITER = (dict, type(None))


def rate_limiter(data: Any) -> RateLimitSpec | None:
    """A Firecracker ``rate_limiter`` body (ApiError when malformed)."""
    try:
        return RateLimitSpec.from_json(data)
    except ConfigError as e:
        raise ApiError(f"An error occurred when deserializing the json body of a request: {e}.") from None


@dataclass
class Drive:
    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool
    limiter: RateLimitSpec | None = None

    def disk_spec(self) -> DiskSpec:
        return DiskSpec(Path(self.path_on_host), self.is_read_only, rate_limiter=self.limiter)

    def to_json(self) -> dict[str, Any]:
        return {
            "drive_id": self.drive_id,
            "path_on_host": self.path_on_host,
            "is_root_device": self.is_root_device,
            "is_read_only": self.is_read_only,
            "partuuid": None,
            "cache_type": "Unsafe",
            "io_engine": "Sync",
            "rate_limiter": None if self.limiter is None else self.limiter.to_json(),
        }


@dataclass
class Resources:
    """What a client set up before ``InstanceStart``."""

    kernel: str | None = None
    boot_args: str | None = None
    initrd: str | None = None
    vcpu_count: int = 1
    mem_size_mib: int = 128
    smt: bool = False
    track_dirty_pages: bool = False
    drives: dict[str, Drive] = field(default_factory=dict)
    nics: dict[str, dict[str, Any]] = field(default_factory=dict)
    vsock: dict[str, Any] | None = None
    entropy: bool = False
    entropy_limiter: RateLimitSpec | None = None
    entropy_rate: int | None = None
    metrics_path: str | None = None

    # -- bodies ----------------------------------------------------------------------------------------
    def put_boot_source(self, body: Any) -> None:
        b = fields(
            body,
            {"kernel_image_path": str, "boot_args": (str, type(None)), "initrd_path": (str, type(None))},
            ("kernel_image_path",),
        )
        self.kernel, self.boot_args, self.initrd = (
            b["kernel_image_path"],
            b.get("boot_args"),
            b.get("initrd_path"),
        )

    def put_machine_config(self, body: Any, partial: bool = False) -> None:
        allowed = {
            "vcpu_count": int,
            "mem_size_mib": int,
            "smt": bool,
            "track_dirty_pages": bool,
            "huge_pages": str,
            "cpu_template": (str, type(None)),
        }
        b = fields(body, allowed, () if partial else ("vcpu_count", "mem_size_mib"))
        vcpus = b.get("vcpu_count", self.vcpu_count)
        mem = b.get("mem_size_mib", self.mem_size_mib)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ApiError(f"The vCPU number is invalid! It can be from 1 to {MAX_VCPUS}, not {vcpus}.")
        if mem < 8:
            raise ApiError("The memory size (MiB) is invalid: at least 8.")
        if b.get("smt"):
            raise ApiError("Enabling simultaneous multithreading is not supported on this host.")
        if b.get("huge_pages", "None") != "None":
            raise ApiError("Huge pages are not supported by pyrovm yet.")
        if b.get("cpu_template") not in (None, "None"):
            raise ApiError("CPU templates are not supported by pyrovm yet.")
        self.vcpu_count, self.mem_size_mib = vcpus, mem
        self.track_dirty_pages = b.get("track_dirty_pages", self.track_dirty_pages)

    def put_drive(self, drive_id: str, body: Any) -> None:
        allowed = {
            "drive_id": str,
            "path_on_host": str,
            "is_root_device": bool,
            "is_read_only": (bool, type(None)),
            "partuuid": (str, type(None)),
            "cache_type": str,
            "io_engine": str,
            "rate_limiter": _RATE_LIMITER,
            "socket": (str, type(None)),
        }
        b = fields(body, allowed, ("drive_id", "is_root_device"))
        check_id(drive_id, b["drive_id"], "drive")
        if "path_on_host" not in b:
            raise ApiError(
                "Unable to create the block device: path_on_host is required (vhost-user is not supported)."
            )
        limiter = rate_limiter(b.get("rate_limiter"))
        if b.get("partuuid") is not None:
            raise ApiError("A root partition UUID (partuuid) is not supported by pyrovm yet.")
        root = b["is_root_device"]
        if root and any(d.is_root_device and d.drive_id != drive_id for d in self.drives.values()):
            raise ApiError("A root block device already exists!")
        self.drives[drive_id] = Drive(
            drive_id, b["path_on_host"], root, bool(b.get("is_read_only") or False), limiter
        )

    def put_nic(self, iface_id: str, body: Any) -> None:
        allowed = {
            "iface_id": str,
            "host_dev_name": str,
            "guest_mac": (str, type(None)),
            "rx_rate_limiter": _RATE_LIMITER,
            "tx_rate_limiter": _RATE_LIMITER,
        }
        b = fields(body, allowed, ("iface_id", "host_dev_name"))
        check_id(iface_id, b["iface_id"], "network interface")
        self.nics[iface_id] = {
            "iface_id": iface_id,
            "host_dev_name": b["host_dev_name"],
            "guest_mac": b.get("guest_mac"),
            "rx_rate_limiter": rate_limiter(b.get("rx_rate_limiter")),
            "tx_rate_limiter": rate_limiter(b.get("tx_rate_limiter")),
        }

    def put_vsock(self, body: Any) -> None:
        b = fields(
            body,
            {"guest_cid": int, "uds_path": str, "vsock_id": (str, type(None))},
            ("guest_cid", "uds_path"),
        )
        self.vsock = {"guest_cid": b["guest_cid"], "uds_path": b["uds_path"]}

    def put_entropy(self, body: Any) -> None:
        b = fields(body, {"rate_limiter": _RATE_LIMITER})
        limiter = rate_limiter(b.get("rate_limiter"))
        rate = None
        if limiter is not None:
            if limiter.ops is not None:
                raise ApiError(
                    "An ops limit on the entropy device is not supported by pyrovm yet (bandwidth is)."
                )
            bw = limiter.bandwidth
            if bw is not None and bw.size and bw.refill_time:
                rate = max(1, bw.size * 1000 // bw.refill_time)  # virtio-rng's limit: bytes a second
        self.entropy = True
        self.entropy_limiter = limiter
        self.entropy_rate = rate

    # -- views -----------------------------------------------------------------------------------------
    def machine_config(self) -> dict[str, Any]:
        return {
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "smt": self.smt,
            "track_dirty_pages": self.track_dirty_pages,
            "huge_pages": "None",
        }

    def vm_config(self) -> dict[str, Any]:
        boot = (
            None
            if self.kernel is None
            else {"kernel_image_path": self.kernel, "boot_args": self.boot_args, "initrd_path": self.initrd}
        )
        return {
            "boot-source": boot,
            "drives": [d.to_json() for d in self.drives.values()],
            "machine-config": self.machine_config(),
            "network-interfaces": [
                {k: (v.to_json() if isinstance(v, RateLimitSpec) else v) for k, v in n.items()}
                for n in self.nics.values()
            ],
            "vsock": self.vsock,
            "entropy": None
            if not self.entropy
            else {"rate_limiter": None if self.entropy_limiter is None else self.entropy_limiter.to_json()},
            "metrics": None if self.metrics_path is None else {"metrics_path": self.metrics_path},
        }

    def drive_order(self) -> list[str]:
        """Drive ids in guest order (the root first: vda, then the others as they were put)."""
        drives = self.drives.values()
        return [d.drive_id for d in drives if d.is_root_device] + [
            d.drive_id for d in drives if not d.is_root_device
        ]

    def to_config(self, name: str) -> VmConfig:
        """The VmConfig to build (ApiError when no kernel was given)."""
        if self.kernel is None:
            raise ApiError("Cannot start microvm without kernel configuration.")
        cmdline = DEFAULT_BOOT_ARGS if self.boot_args is None else self.boot_args
        root = [d for d in self.drives.values() if d.is_root_device]
        others = [d for d in self.drives.values() if not d.is_root_device]
        nets = tuple(
            NetSpec(
                "tap",
                n["host_dev_name"],
                n["guest_mac"],
                rx_rate_limiter=n["rx_rate_limiter"],
                tx_rate_limiter=n["tx_rate_limiter"],
            )
            for n in self.nics.values()
        )
        return VmConfig(
            kernel=Path(self.kernel),
            memory=self.mem_size_mib << 20,
            cpus=self.vcpu_count,
            cmdline="console=ttyS0 " + cmdline if "console=" not in cmdline else cmdline,
            initrd=None if self.initrd is None else Path(self.initrd),
            rootfs=root[0].disk_spec() if root else None,
            disks=tuple(d.disk_spec() for d in others),
            rng=self.entropy,
            rng_rate=self.entropy_rate,
            net=nets,
            vsock=None
            if self.vsock is None
            else VsockSpec(self.vsock["guest_cid"], Path(self.vsock["uds_path"])),
            console="none",  # the server copies the console to its stdout itself
            name=name,
        )
