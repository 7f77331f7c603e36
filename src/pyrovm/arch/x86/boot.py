"""The x86 boot set-up of a VM: where the kernel, its command line and the initrd go in guest memory,
the boot structures that describe them (Linux zero page or PVH ``start_info``, e820 map, MP table), and
the registers each vCPU starts with.

:func:`load_kernel` does everything in guest memory and returns a :class:`BootSetup`;
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
from pyrovm.loader import KernelLoadError
from pyrovm.loader.bzimage import check_cmdline, is_bzimage, load_bzimage
from pyrovm.loader.cmdline import Cmdline
from pyrovm.loader.elf import is_elf, load_elf
from pyrovm.memory import GuestMemory

from . import bootparams, cpuid, layout, mptable, regs

BOOT_MODES = ("auto", "pvh", "linux64")
#: Highest address an initrd may end at when the kernel does not say (ELF kernels).
DEFAULT_INITRD_ADDR_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class BootSetup:
    """What :func:`load_kernel` put in guest memory and where the boot vCPU starts."""

    mode: str  # "bzimage", "pvh" or "linux64"
    entry: int
    cmdline: str
    initrd: tuple[int, int] | None  # (guest address, size)


def load_kernel(
    memory: GuestMemory,
    kernel: bytes,
    name: str,
    cmdline: Cmdline,
    *,
    initrd: Path | None = None,
    boot: str = "auto",
    cpus: int = 1,
) -> BootSetup:
    """Load *kernel* (bzImage or ELF bytes) and everything it boots with into *memory*.

    Raises :class:`KernelLoadError` (not a kernel, does not fit) or :class:`ConfigError` (a command line
    or initrd that does not fit).
    """
    if boot not in BOOT_MODES:
        raise ConfigError(f"boot mode {boot!r}: choose {', '.join(BOOT_MODES)}")
    e820 = bootparams.e820_map([(r.guest_addr, r.size) for r in memory])
    mptable.write(memory, cpus)
    if is_bzimage(kernel):
        if boot == "pvh":
            raise KernelLoadError(f"{name}: a bzImage has no PVH entry (boot the vmlinux for PVH)")
        bz = load_bzimage(memory, kernel, name)
        data = cmdline.encode()
        check_cmdline(bz.header, data, name)
        cmdline_addr = bootparams.write_cmdline(memory, data)
        placed = load_initrd(memory, initrd, bz.load_end, bz.header.initrd_addr_max)
        bootparams.write_zero_page(
            memory, e820, cmdline_addr, bz.header.cmdline_size, bz.header.setup_header, placed
        )
        return BootSetup("bzimage", bz.entry64, str(cmdline), placed)
    if not is_elf(kernel):
        raise KernelLoadError(
            f"{name}: not a kernel pyrovm can boot "
            "(not an ELF with a PVH note or 64-bit entry, not a bzImage)"
        )
    elf = load_elf(memory, kernel, name)
    low = [start for start, _ in elf.segments if start < layout.HIGH_MEMORY_START]
    if low:
        raise KernelLoadError(
            f"{name}: not a kernel: it loads at {low[0]:#x}, below 1 MiB where the boot structures go "
            "(kernels load at 1 MiB or above)"
        )
    cmdline_addr = bootparams.write_cmdline(memory, cmdline.encode(layout.CMDLINE_MAX_SIZE - 1))
    placed = load_initrd(memory, initrd, elf.load_end)
    mode = boot if boot != "auto" else ("pvh" if elf.pvh_entry is not None else "linux64")
    if mode == "pvh":
        if elf.pvh_entry is None:
            raise KernelLoadError(f"{name}: no PVH entry note (use boot=linux64)")
        bootparams.write_pvh_start_info(memory, e820, cmdline_addr, placed)
        return BootSetup("pvh", elf.pvh_entry, str(cmdline), placed)
    if not elf.loaded(elf.entry64):
        raise KernelLoadError(
            f"{name}: not a kernel: its entry point {elf.entry64:#x} is outside its loaded segments "
            "and it has no PVH note"
        )
    bootparams.write_zero_page(memory, e820, cmdline_addr, layout.CMDLINE_MAX_SIZE, None, placed)
    return BootSetup("linux64", elf.entry64, str(cmdline), placed)


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
    vcpu: Vcpu, supported: list[kvm_cpuid_entry2], index: int, cpus: int, vendor: str | None
) -> None:
    """CPUID (APIC id *index* of *cpus*), boot MSRs, FPU and local APIC of one vCPU."""
    vcpu.set_cpuid2(cpuid.vcpu_cpuid(supported, index, cpus, vendor))
    regs.setup_msrs(vcpu)
    regs.setup_fpu(vcpu)
    regs.setup_lapic(vcpu)


def setup_boot_vcpu(vcpu: Vcpu, memory: GuestMemory, setup: BootSetup) -> None:
    """Registers of the boot vCPU for *setup* (the others wait for INIT-SIPI in the in-kernel LAPIC)."""
    if setup.mode == "pvh":
        regs.setup_pvh(vcpu, memory, setup.entry)
    else:
        regs.setup_long_mode(vcpu, memory, setup.entry)
