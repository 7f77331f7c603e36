"""From a :class:`~pyrovm.config.VmConfig` to a :class:`~pyrovm.machine.Machine`: :func:`build`.

The steps, in order: validate the config; read the kernel and decide the host workarounds; open the
console; map guest RAM; open ``/dev/kvm`` and create the VM (TSS, identity map, irqchip, PIT, memory
slots); create the devices (legacy, disks, entropy) and wire them; create and set up the vCPUs; load the
kernel, command line and initrd and set the boot vCPU's registers.  Every resource a step acquires is
pushed on one :class:`contextlib.ExitStack`: if a later step fails, everything already acquired (fds,
mappings, files, image locks) is released before the error propagates; on success the machine owns the
stack and releases it on :meth:`~pyrovm.machine.Machine.close`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import host
from . import kvm as k
from .arch.x86 import boot as x86boot
from .arch.x86 import layout
from .config import VmConfig
from .console import ConsoleLog
from .device_manager import DeviceManager
from .errors import ConfigError, SnapshotError
from .kvm.coalesced import CoalescedRing
from .loader import check_cmdline, load_kernel
from .loader.cmdline import Cmdline
from .machine import Machine, MachineEvents, MachineParts
from .memory import GuestMemory

if TYPE_CHECKING:  # (imported where used: a plain boot does not pay for them)
    from .arch.x86.state import VcpuState
    from .kvm.stats import StatsReader
    from .snapshot import SnapshotState

log = logging.getLogger(__name__)


def build(config: VmConfig, *, console: BinaryIO | None = None) -> Machine:
    """Build a machine for *config* (nothing runs until :meth:`Machine.start`).

    *console*: a binary stream that gets the guest's console output (besides ``config.console``).
    Raises :class:`~pyrovm.errors.ConfigError` (and its subclass KernelLoadError) for bad input,
    :class:`~pyrovm.errors.HostError` when the host cannot run VMs, :class:`~pyrovm.kvm.KvmError` when
    KVM refuses a step.
    """
    config.validate()
    stack = contextlib.ExitStack()
    kernel_file = contextlib.ExitStack()  # the mapped kernel: released once it is loaded
    try:
        kernel = _map_kernel(config, kernel_file)
        workarounds = host.workarounds_apply(kernel, config.host_workarounds)
        cmdline = Cmdline(config.cmdline)
        vendor = config.cpu_vendor
        if workarounds:
            host.warn_once()
            cmdline.add_missing(*host.PVM_CMDLINE_OPTIONS)
            vendor = vendor or host.PVM_CPU_VENDOR
        events = MachineEvents(_open_console(config, console, stack), config.boot_marker)
        memory = _map_memory(config.memory, stack)
        if config.track_dirty_pages:
            memory.track_vmm_writes()
        kvm, kvm_vm = _create_vm(config, memory, stack)
        devices = _create_devices(config, kvm_vm, memory, events, stack)
        vcpus = _create_vcpus(kvm, kvm_vm, config, vendor)
        stats = _open_stats(kvm, kvm_vm, stack)
        cmdline.add(*devices.cmdline_words())
        if config.rootfs is not None and not cmdline.has("root"):
            cmdline.add("root=/dev/vda", "ro" if config.rootfs.read_only else "rw")
        name = str(config.kernel)
        entry = load_kernel(memory, kernel, name, config.boot)
        text = cmdline.encode()
        check_cmdline(entry, text, name)
        setup = x86boot.configure_boot(memory, entry, text, initrd=config.initrd, cpus=config.cpus)
        x86boot.setup_boot_vcpu(vcpus[0], memory, setup)
        parts = MachineParts(
            config, kvm, kvm_vm, memory, devices, vcpus, setup, events.watcher.log, events, stack, workarounds
        )
        parts.kvm_stats = stats
        parts.coalesced = _coalesced_ring(config, kvm, vcpus, devices, stack)
        return Machine(parts)
    except BaseException:
        stack.close()
        raise
    finally:
        kernel_file.close()


@dataclasses.dataclass
class RestoreOptions:
    """What a restore changes in the saved VM: where its console goes, its NICs' taps (by name, ``eth0``
    ...), its vsock socket, its disk images (by name, ``vda`` ...: each clone needs its own), dirty-page
    tracking (for diff snapshots of the restored VM), and whether the guest's kvmclock catches up with the
    host's wall clock (``clock_realtime``; otherwise the guest sees no time pass)."""

    console: str = "none"
    metrics_path: Path | None = None
    timeout: float | None = None
    taps: dict[str, str] = dataclasses.field(default_factory=dict)
    vsock_uds: Path | None = None
    disks: dict[str, Path] = dataclasses.field(default_factory=dict)
    name: str | None = None
    track_dirty_pages: bool = False
    clock_realtime: bool = False

    def apply(self, config: VmConfig) -> VmConfig:
        """*config* (the snapshot's) with these changes; ConfigError for an override that names nothing."""
        nets = list(config.net)
        for iface, tap in self.taps.items():
            index = _index_of(iface, "eth", len(nets), "network interface")
            if nets[index].backend != "tap":
                raise ConfigError(f"network override {iface}: that interface is not on a tap")
            nets[index] = dataclasses.replace(nets[index], tap=tap)
        disks = list(config.all_disks)
        for name, path in self.disks.items():
            index = _index_of(name, "vd", len(disks), "disk", letters=True)
            disks[index] = dataclasses.replace(disks[index], path=Path(path))
        rootfs = disks.pop(0) if config.rootfs is not None else None
        vsock = config.vsock
        if self.vsock_uds is not None:
            if vsock is None:
                raise ConfigError("vsock override: the snapshot has no vsock device")
            vsock = dataclasses.replace(vsock, uds=Path(self.vsock_uds))
        return config.replace(
            console=self.console,
            metrics_path=self.metrics_path,
            timeout=self.timeout,
            net=tuple(nets),
            disks=tuple(disks),
            rootfs=rootfs,
            vsock=vsock,
            name=self.name or config.name,
            track_dirty_pages=self.track_dirty_pages,
        )


def _index_of(name: str, prefix: str, count: int, what: str, letters: bool = False) -> int:
    """The index in ``eth0``, ``eth1``... (or ``vda``, ``vdb``... with *letters*) that *name* is."""
    suffix = name[len(prefix) :] if name.startswith(prefix) else ""
    if letters:
        index = ord(suffix) - ord("a") if len(suffix) == 1 else -1
    else:
        index = int(suffix) if suffix.isdecimal() else -1
    if not 0 <= index < count:
        names = ", ".join(f"{prefix}{chr(ord('a') + i) if letters else i}" for i in range(count)) or "none"
        raise ConfigError(f"{what} {name!r}: the snapshot has no such {what} (it has: {names})")
    return index


def restore(
    state: SnapshotState,
    mem_path: str | os.PathLike[str],
    options: RestoreOptions | None = None,
    *,
    console: BinaryIO | None = None,
) -> Machine:
    """A machine from the snapshot *state* (:func:`pyrovm.snapshot.load_state`) and its memory file,
    ready to :meth:`~Machine.start` (where it continues).  Guest RAM is mapped copy-on-write from
    *mem_path* (which is never written).  Raises SnapshotError / ConfigError for bad input, HostError
    when this host lacks a KVM capability the snapshot needs; nothing is left half-built."""
    from .arch.x86 import state as vstate
    from .snapshot import decode_devices

    options = options or RestoreOptions()
    config = options.apply(VmConfig.from_json(state.config))
    config.validate(restoring=True)
    stack = contextlib.ExitStack()
    try:
        memory = _map_snapshot_memory(mem_path, state.memory_layout, stack)
        if config.track_dirty_pages:
            memory.track_vmm_writes()
        events = MachineEvents(_open_console(config, console, stack), config.boot_marker)
        kvm, kvm_vm = _create_vm(config, memory, stack, k.constants.SNAPSHOT_CAPS)
        devices = _create_devices(config, kvm_vm, memory, events, stack)
        saved_devices = decode_devices(state, devices)
        vstate.restore_vm(kvm_vm, state.vm, clock_realtime=options.clock_realtime)
        vcpus = [kvm_vm.create_vcpu(i) for i in range(config.cpus)]
        for vcpu, saved in zip(vcpus, state.vcpus, strict=True):
            _restore_vcpu(vcpu, saved)
        devices.restore_state(saved_devices)
        stats = _open_stats(kvm, kvm_vm, stack)
        parts = MachineParts(
            config,
            kvm,
            kvm_vm,
            memory,
            devices,
            vcpus,
            state.boot,
            events.watcher.log,
            events,
            stack,
            state.host_workarounds_applied,
            restored=True,
            kvm_stats=stats,
            coalesced=_coalesced_ring(config, kvm, vcpus, devices, stack),
        )
        return Machine(parts)
    except BaseException:
        stack.close()
        raise


def _restore_vcpu(vcpu: k.Vcpu, saved: VcpuState) -> None:
    from .arch.x86 import state as vstate

    try:
        vstate.restore_vcpu(vcpu, saved)
    except vstate.StateSizeError as exc:
        raise SnapshotError(f"vCPU {vcpu.id}: {exc}") from None
    except k.KvmError as exc:
        if "KVM_SET_TSC_KHZ" in str(exc):
            raise SnapshotError(
                f"the snapshot's TSC runs at {saved.tsc_khz} kHz, this host's at {vcpu.get_tsc_khz()} kHz, "
                "and its KVM cannot scale the TSC"
            ) from None
        raise


def _map_snapshot_memory(
    path: str | os.PathLike[str], regions: list[tuple[int, int]], stack: contextlib.ExitStack
) -> GuestMemory:
    expected = sum(size for _, size in regions)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    if size != expected:
        raise SnapshotError(
            f"memory file {path}: {size} bytes, the snapshot's guest RAM is {expected} bytes "
            "(not this snapshot's memory file)"
        )
    try:
        memory = GuestMemory.from_file(path, regions, private=True)
    except OSError as exc:
        raise SnapshotError(f"memory file {path}: {exc.strerror}") from None
    stack.callback(memory.close)
    return memory


def _map_kernel(config: VmConfig, stack: contextlib.ExitStack) -> bytes:
    """The kernel file, mapped read-only (the loaders copy only what they load; the size was checked)."""
    try:
        with open(config.kernel, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ConfigError(f"kernel {config.kernel}: empty file")
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except OSError as exc:
        raise ConfigError(f"kernel {config.kernel}: {exc.strerror}") from exc
    stack.callback(_unmap, mapped)
    return mapped  # type: ignore[return-value]  # read like bytes (slices, struct.unpack_from)


def _unmap(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
        pass


def _open_console(config: VmConfig, sink: BinaryIO | None, stack: contextlib.ExitStack) -> ConsoleLog:
    """The console log, copied to *sink*, to stdout (``stdio``) or to a file (``file:PATH``)."""
    if sink is None and config.console == "stdio":
        sink = sys.stdout.buffer
    path = config.console_path
    if sink is None and path is not None:
        try:
            sink = stack.enter_context(open(path, "wb"))
        except OSError as exc:
            raise ConfigError(f"console file {path}: {exc.strerror}") from exc
    return ConsoleLog(sink)


def _map_memory(size: int, stack: contextlib.ExitStack) -> GuestMemory:
    memory = GuestMemory(layout.ram_layout(size))
    stack.callback(memory.close)
    return memory


def _create_vm(
    config: VmConfig, memory: GuestMemory, stack: contextlib.ExitStack, extra_caps: tuple[int, ...] = ()
) -> tuple[k.Kvm, k.Vm]:
    """Open KVM, check it, create the VM with its in-kernel irqchip and PIT, register guest RAM (with
    KVM's dirty log when the config tracks dirty pages)."""
    kvm = k.Kvm(config.kvm_device)
    stack.callback(kvm.close)
    kvm.require()
    if extra_caps:
        kvm.require(extra_caps)
    if config.cpus > kvm.max_vcpus():
        raise ConfigError(f"{config.cpus} vCPUs: this host's KVM allows at most {kvm.max_vcpus()}")
    kvm_vm = kvm.create_vm()
    stack.callback(kvm_vm.close)  # closes the vCPUs too
    kvm_vm.set_tss_addr(layout.TSS_ADDR)
    kvm_vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    # guest RAM before the irqchip and the PIT (as Firecracker): a memory slot added after them waits for
    # an expedited SRCU grace period (5-7 ms for 128 MiB on this host instead of under 1 ms)
    flags = k.constants.KVM_MEM_LOG_DIRTY_PAGES if config.track_dirty_pages else 0
    for slot, region in enumerate(memory):
        kvm_vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr, flags)
    kvm_vm.create_irqchip()
    kvm_vm.create_pit2()
    return kvm, kvm_vm


def _create_devices(
    config: VmConfig, kvm_vm: k.Vm, memory: GuestMemory, events: MachineEvents, stack: contextlib.ExitStack
) -> DeviceManager:
    devices = DeviceManager(kvm_vm, memory)
    stack.callback(devices.close)
    devices.add_platform_devices(events.hooks())
    for i, spec in enumerate(config.all_disks):
        devices.add_disk(spec, i)
    if config.rng:
        devices.add_rng(config.rng_rate)
    for i, nic in enumerate(config.net):
        devices.add_net(nic, i, nic.mac_bytes(config.name, i))
    if config.vsock is not None:
        devices.add_vsock(config.vsock, config.name)
    return devices


def _open_stats(kvm: k.Kvm, kvm_vm: k.Vm, stack: contextlib.ExitStack) -> list[StatsReader]:
    """KVM's binary statistics of the VM and each vCPU (kept open: ``pyrovm stat`` finds them in
    /proc/PID/fd, ``--metrics`` reads them); none on a kernel without them."""
    from .kvm.stats import KVM_CAP_BINARY_STATS_FD, StatsError, StatsReader, open_stats_fd

    if kvm.check_extension(KVM_CAP_BINARY_STATS_FD) <= 0:
        return []
    readers: list[StatsReader] = []
    try:
        for fd in [kvm_vm.fd, *(v.fd for v in kvm_vm.vcpus)]:
            readers.append(StatsReader(open_stats_fd(fd)))
    except (k.KvmError, StatsError) as exc:
        log.info("KVM statistics unavailable: %s", exc)
    for reader in readers:
        stack.callback(reader.close)
    return readers


def _coalesced_ring(
    config: VmConfig, kvm: k.Kvm, vcpus: list[k.Vcpu], devices: DeviceManager, stack: contextlib.ExitStack
) -> CoalescedRing | None:
    """KVM's coalesced-write ring and the devices' zones in it (None when off or not available)."""
    if not config.coalesced_io:
        return None
    page = kvm.check_extension(k.constants.KVM_CAP_COALESCED_MMIO)
    if page <= 0 or kvm.check_extension(k.constants.KVM_CAP_COALESCED_PIO) <= 0:
        log.info("KVM has no coalesced PIO: every write exits")
        return None
    ring = CoalescedRing(vcpus[0].fd, page)
    stack.callback(ring.close)
    devices.coalesce_writes()
    return ring


def _create_vcpus(kvm: k.Kvm, kvm_vm: k.Vm, config: VmConfig, vendor: str | None) -> list[k.Vcpu]:
    supported = kvm.supported_cpuid()
    vcpus = []
    for i in range(config.cpus):
        vcpu = kvm_vm.create_vcpu(i)
        x86boot.setup_vcpu(vcpu, supported, i, config.cpus, vendor, config.hide_kvm, config.cpu_features)
        vcpus.append(vcpu)
    return vcpus
