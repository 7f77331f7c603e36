"""The x86 boot set-up of a VM: where the kernel, its command line and the initrd go in guest memory,
the boot structures that describe them (Linux zero page or PVH ``start_info``, e820 map, MP table), and
the registers each vCPU starts with.

:func:`configure_boot` writes everything a loaded kernel (a :class:`KernelEntry` from
:func:`pyrovm.loader.load_kernel`) boots with into guest memory and returns a :class:`BootSetup`;
:func:`setup_vcpu` gives every vCPU its CPUID, MSRs, FPU and local APIC; :func:`setup_boot_vcpu` puts the
boot vCPU at the kernel's entry.  Three ways in:

- ``bzimage``: a Linux bzImage through its 64-bit entry (boot protocol 2.12+), zero page with the kernel's
  own setup header;
- ``pvh``: an ELF with a Xen PVH note, 32-bit protected mode, EBX = ``start_info``;
- ``linux64``: an ELF's ``e_entry`` in 64-bit mode with a minimal zero page (RSI).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyrovm.errors import ConfigError
from pyrovm.kvm import Vcpu
from pyrovm.kvm.structs import kvm_cpuid_entry2
from pyrovm.memory import GuestMemory

from . import bootparams, cpuid, layout, mptable, regs

#: Highest address an initrd may end at when the kernel does not say (ELF kernels).
DEFAULT_INITRD_ADDR_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class KernelEntry:
    """How to enter a kernel the loader (:func:`pyrovm.loader.load_kernel`) put in guest memory."""

    mode: str  # "bzimage" (64-bit entry, zero page), "pvh" (32-bit entry, start_info) or "linux64"
    entry: int
    load_end: int  # first byte past what the kernel uses while it boots: the initrd goes above
    setup_header: bytes | None = None  # a bzImage's own setup header, copied into the zero page
    cmdline_size: int = layout.CMDLINE_MAX_SIZE - 1  # the longest command line it takes (no NUL)
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX


@dataclass(frozen=True)
class BootSetup:
    """What :func:`configure_boot` put in guest memory and where the boot vCPU starts."""

    mode: str  # "bzimage", "pvh" or "linux64"
    entry: int
    cmdline: str
    initrd: tuple[int, int] | None  # (guest address, size)


def configure_boot(
    memory: GuestMemory, kernel: KernelEntry, cmdline: bytes, *, initrd: Path | None = None, cpus: int = 1
) -> BootSetup:
    """Everything a loaded *kernel* boots with, in guest memory: the MP table for *cpus*, the command
    line, the initrd (streamed in above the kernel) and the zero page or PVH ``start_info`` with the e820
    map.  Raises :class:`ConfigError` for a command line or initrd that does not fit (the kernel's own limit
    on the command line is :func:`pyrovm.loader.check_cmdline`'s)."""
    e820 = bootparams.e820_map([(r.guest_addr, r.size) for r in memory])
    mptable.write(memory, cpus)
    cmdline_addr = bootparams.write_cmdline(memory, cmdline)
    placed = load_initrd(memory, initrd, kernel.load_end, kernel.initrd_addr_max)
    if kernel.mode == "pvh":
        bootparams.write_pvh_start_info(memory, e820, cmdline_addr, placed)
    else:
        size = kernel.cmdline_size if kernel.setup_header is not None else layout.CMDLINE_MAX_SIZE
        bootparams.write_zero_page(memory, e820, cmdline_addr, size, kernel.setup_header, placed)
    return BootSetup(kernel.mode, kernel.entry, cmdline.decode(), placed)


def place_initrd(memory: GuestMemory, size: int, kernel_end: int, max_addr: int) -> int:
    """The guest address for an initrd of *size* bytes: as high in low RAM as it goes, page-aligned, its
    last byte at or below *max_addr* (the kernel's ``initrd_addr_max``), above *kernel_end*."""
    top = min(memory.regions[0].end, max_addr + 1)
    addr = (top - size) & ~(layout.INITRD_ALIGN - 1)
    if addr < kernel_end:
        raise ConfigError(
            f"initrd ({size} bytes) does not fit in guest memory between the kernel (up to {kernel_end:#x}) "
            f"and {top:#x}: give the VM more memory or use a smaller initrd"
        )
    return addr


def load_initrd(
    memory: GuestMemory, path: Path | None, kernel_end: int, max_addr: int = DEFAULT_INITRD_ADDR_MAX
) -> tuple[int, int] | None:
    """Stream the initrd at *path* into guest memory (see :func:`place_initrd`); ``(address, size)``."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                addr = place_initrd(memory, size, kernel_end, max_addr)
            except ConfigError as exc:
                raise ConfigError(f"initrd {path}: {exc}") from exc
            with memory.view(addr, size) as view:
                done = 0
                while done < size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise ConfigError(f"initrd {path}: the file shrank while it was read")
                    done += n
    except OSError as exc:
        raise ConfigError(f"initrd {path}: {exc.strerror}") from exc
    return addr, size


def setup_vcpu(
    vcpu: Vcpu,
    supported: list[kvm_cpuid_entry2],
    index: int,
    cpus: int,
    vendor: str | None,
    hide_kvm: bool = False,
    features: tuple[str, ...] = (),
) -> None:
    """CPUID (APIC id *index* of *cpus*; QEMU's ``kvm=off`` and ``+feat``/``-feat``, see
    :func:`cpuid.apply_cpu_options`), boot MSRs, FPU and local APIC of one vCPU."""
    entries = cpuid.vcpu_cpuid(supported, index, cpus, vendor)
    try:
        entries = cpuid.apply_cpu_options(entries, hide_kvm, features)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    vcpu.set_cpuid2(entries)
    regs.setup_msrs(vcpu)
    regs.setup_fpu(vcpu)
    regs.setup_lapic(vcpu)


def setup_boot_vcpu(vcpu: Vcpu, memory: GuestMemory, setup: BootSetup) -> None:
    """Registers of the boot vCPU for *setup* (the others wait for INIT-SIPI in the in-kernel LAPIC)."""
    if setup.mode == "pvh":
        regs.setup_pvh(vcpu, memory, setup.entry)
    else:
        regs.setup_long_mode(vcpu, memory, setup.entry)
