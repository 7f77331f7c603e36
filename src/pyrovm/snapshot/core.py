"""The snapshot machinery (see :mod:`pyrovm.snapshot`)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..arch.x86 import layout
from ..arch.x86.boot import BootSetup
from ..arch.x86.state import (
    StateSizeError,
    VcpuState,
    VmState,
    check_vcpu_state,
    check_vm_state,
    msr_indices,
    save_vcpu,
    save_vm,
)
from ..config import VmConfig
from ..device_manager import VirtioSlotState
from ..devices.virtio.mmio import MmioTransportState
from ..errors import ConfigError, SnapshotError
from ..kvm import is_pvm_host
from . import fileformat, memfile
from .codec import decode, encode

if TYPE_CHECKING:
    from ..device_manager import DeviceManager
    from ..machine import Machine


@dataclass
class HostInfo:
    """The host the snapshot was taken on (what a restore compares with its own)."""

    tsc_khz: int = 0
    pvm: bool = False


@dataclass
class SnapshotState:
    """Everything in a state file."""

    pyrovm_version: str
    created_at: float  # time.time()
    kind: str  # "full" or "diff"
    memory_layout: list[tuple[int, int]]
    config: dict[str, Any]  # VmConfig.to_json(), MAC addresses written out
    boot: BootSetup
    host_workarounds_applied: bool
    host: HostInfo
    vm: VmState
    vcpus: list[VcpuState]
    devices: dict[str, Any]  # name -> JSON values; decoded against the restoring VM's devices
    memory_size: int = 0
    #: what a front end keeps with the snapshot (the API server: its resources, to answer GETs and
    #: PATCHes after a load, and the Firecracker ids of the NICs)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return sum(size for _, size in self.memory_layout)


@dataclass
class SnapshotInfo:
    """What :func:`take_snapshot` wrote."""

    kind: str
    state_path: str
    mem_path: str
    state_bytes: int
    mem_bytes_written: int
    seconds: float
    pages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# -- taking -------------------------------------------------------------------------------------------
def _check_outputs(machine: Machine, state_path: Path, mem_path: Path) -> None:
    if state_path == mem_path or (
        state_path.exists() and mem_path.exists() and os.path.samefile(state_path, mem_path)
    ):
        raise SnapshotError(f"the state file and the memory file are the same file ({state_path})")
    cfg = machine.config
    inputs = [("kernel", cfg.kernel), ("initrd", cfg.initrd)] + [
        (f"disk {d.path}", d.path) for d in cfg.all_disks
    ]
    for out in (state_path, mem_path):
        if out.is_dir():
            raise SnapshotError(f"{out}: is a directory")
        for what, path in inputs:
            if path is not None and out.exists() and Path(path).exists() and os.path.samefile(out, path):
                raise SnapshotError(f"{out}: it is the VM's {what}: refusing to overwrite it")


def _dirty_pages(machine: Machine) -> dict[int, set[int]]:
    """Region index -> page numbers written since the last snapshot (or the restore): KVM's dirty log
    (reading it clears it) and the pages the devices wrote, which KVM does not see."""
    dirty: dict[int, set[int]] = {}
    vmm = machine.memory.vmm_dirty or set()
    _add_used_rings(machine.devices, vmm)
    for index, region in enumerate(machine.memory):
        pages = region.size // memfile.PAGE
        bitmap = machine.kvm_vm.get_dirty_log(index, pages)
        found = {i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1}
        first = region.guest_addr // memfile.PAGE
        found.update(p - first for p in vmm if first <= p < first + pages)
        dirty[index] = found
    vmm.clear()
    return dirty


def _add_used_rings(devices: DeviceManager, pages: set[int]) -> None:
    for slot in devices.slots:
        for q in slot.transport.device.queues:
            if q is not None:
                start, end = q.state.used_addr, q.state.used_addr + 6 + 8 * q.size
                pages.update(range(start // memfile.PAGE, (end - 1) // memfile.PAGE + 1))


def _saved_config(config: VmConfig) -> dict[str, Any]:
    """The config as saved: default MAC addresses written out (a restore may rename the VM)."""
    nets = tuple(
        n if n.mac else dataclasses.replace(n, mac=n.mac_bytes(config.name, i).hex(":"))
        for i, n in enumerate(config.net)
    )
    return config.replace(net=nets).to_json()


def take_snapshot(
    machine: Machine,
    state_path: str | os.PathLike[str],
    mem_path: str | os.PathLike[str],
    diff: bool = False,
    extra: dict[str, Any] | None = None,
) -> SnapshotInfo:
    """Write a snapshot of the paused *machine* (the caller holds its lock and checked it is paused);
    *extra*: JSON values kept with it (:attr:`SnapshotState.extra`)."""
    started = time.monotonic()
    state_file, mem_file = Path(state_path), Path(mem_path)
    _check_outputs(machine, state_file, mem_file)
    if diff and not machine.config.track_dirty_pages:
        raise SnapshotError("a diff snapshot needs dirty-page tracking: boot the VM with track_dirty_pages")
    if diff and not machine.has_snapshot_base:
        raise SnapshotError("a diff snapshot needs a base: take a full snapshot of this VM first")
    indices = msr_indices(machine.kvm)
    vcpus = [save_vcpu(v, indices) for v in machine.vcpu_threads.vcpus]
    vm_state = save_vm(machine.kvm_vm)
    devices = machine.devices.save_state()
    if diff:
        dirty = _dirty_pages(machine)
        written = memfile.write_diff(machine.memory, mem_file, dirty)
    else:
        if machine.config.track_dirty_pages:
            _dirty_pages(machine)  # the next diff starts from here
        written = memfile.write_full(machine.memory, mem_file)
    state = SnapshotState(
        pyrovm_version=__version__,
        created_at=time.time(),
        kind="diff" if diff else "full",
        memory_layout=[(r.guest_addr, r.size) for r in machine.memory],
        config=_saved_config(machine.config),
        boot=machine.boot,
        host_workarounds_applied=machine.host_workarounds_applied,
        host=HostInfo(tsc_khz=vcpus[0].tsc_khz if vcpus else 0, pvm=is_pvm_host()),
        vm=vm_state,
        vcpus=vcpus,
        devices={name: encode(s) for name, s in devices.items()},
        memory_size=machine.memory.size,
        extra=extra or {},
    )
    state_bytes = fileformat.write(state_file, encode(state))
    machine.has_snapshot_base = True
    return SnapshotInfo(
        state.kind, str(state_file), str(mem_file), state_bytes, written, time.monotonic() - started
    )


# -- reading ------------------------------------------------------------------------------------------
def load_state(path: str | os.PathLike[str]) -> SnapshotState:
    """Read and check the state file at *path* (everything that needs no KVM)."""
    raw = fileformat.read(path)
    state: SnapshotState = decode(SnapshotState, raw, "state")
    where = f"state file {path}"
    if state.kind not in ("full", "diff"):
        raise SnapshotError(f"{where}: unknown snapshot kind {state.kind!r}")
    try:
        config = VmConfig.from_json(state.config)
    except ConfigError as exc:
        raise SnapshotError(f"{where}: its VM config: {exc}") from None
    if state.memory_layout != layout.ram_layout(config.memory) or state.memory_size != config.memory:
        raise SnapshotError(f"{where}: its memory layout does not match its {config.memory >> 20} MiB")
    if len(state.vcpus) != config.cpus:
        raise SnapshotError(f"{where}: {len(state.vcpus)} vCPU states for {config.cpus} vCPUs")
    try:
        check_vm_state(state.vm)
        for vcpu in state.vcpus:
            check_vcpu_state(vcpu)
    except StateSizeError as exc:
        raise SnapshotError(f"{where}: {exc}") from None
    return state


def decode_devices(state: SnapshotState, devices: DeviceManager) -> dict[str, Any]:
    """The saved device states, decoded against the restoring VM's *devices*; SnapshotError when the
    snapshot has a device the restore does not provide, or lacks one it does."""
    types = devices.state_types()
    extra = sorted(set(state.devices) - set(types))
    if extra:
        raise SnapshotError(f"the snapshot has device {extra[0]!r}, which this restore does not provide")
    missing = sorted(set(types) - set(state.devices))
    if missing:
        raise SnapshotError(f"the snapshot has no state for device {missing[0]!r}")
    out: dict[str, Any] = {}
    for name, kinds in types.items():
        data = state.devices[name]
        if len(kinds) == 1:
            out[name] = decode(kinds[0], data, f"devices.{name}")
            continue
        if not isinstance(data, dict) or set(data) != {"device", "transport"}:
            raise SnapshotError(f"devices.{name}: expected its device and transport states")
        out[name] = VirtioSlotState(
            decode(kinds[0], data["device"], f"devices.{name}.device"),
            decode(MmioTransportState, data["transport"], f"devices.{name}.transport"),
        )
    return out
