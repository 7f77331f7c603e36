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
import logging
import mmap
import os
import sys
from typing import BinaryIO

from . import host
from . import kvm as k
from .arch.x86 import boot as x86boot
from .arch.x86 import layout
from .config import VmConfig
from .console import ConsoleLog
from .device_manager import DeviceManager
from .errors import ConfigError
from .loader import check_cmdline, load_kernel
from .loader.cmdline import Cmdline
from .machine import Machine, MachineEvents, MachineParts
from .memory import GuestMemory

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
        kvm, kvm_vm = _create_vm(config, memory, stack)
        devices = _create_devices(config, kvm_vm, memory, events, stack)
        vcpus = _create_vcpus(kvm, kvm_vm, config.cpus, vendor)
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
        return Machine(parts)
    except BaseException:
        stack.close()
        raise
    finally:
        kernel_file.close()


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


def _create_vm(config: VmConfig, memory: GuestMemory, stack: contextlib.ExitStack) -> tuple[k.Kvm, k.Vm]:
    """Open KVM, check it, create the VM with its in-kernel irqchip and PIT, register guest RAM."""
    kvm = k.Kvm(config.kvm_device)
    stack.callback(kvm.close)
    kvm.require()
    if config.cpus > kvm.max_vcpus():
        raise ConfigError(f"{config.cpus} vCPUs: this host's KVM allows at most {kvm.max_vcpus()}")
    kvm_vm = kvm.create_vm()
    stack.callback(kvm_vm.close)  # closes the vCPUs too
    kvm_vm.set_tss_addr(layout.TSS_ADDR)
    kvm_vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    kvm_vm.create_irqchip()
    kvm_vm.create_pit2()
    for slot, region in enumerate(memory):
        kvm_vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)
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


def _create_vcpus(kvm: k.Kvm, kvm_vm: k.Vm, cpus: int, vendor: str | None) -> list[k.Vcpu]:
    supported = kvm.supported_cpuid()
    vcpus = []
    for i in range(cpus):
        vcpu = kvm_vm.create_vcpu(i)
        x86boot.setup_vcpu(vcpu, supported, i, cpus, vendor)
        vcpus.append(vcpu)
    return vcpus
