"""vCPU register set-up for the two ways pyrovm enters a guest.

- :func:`setup_long_mode`: the Linux 64-bit boot protocol (``startup_64`` of a vmlinux/bzImage, the test
  guest's ELF entry): long mode, identity-mapped paging, RSI = zero page.
- :func:`setup_pvh`: the PVH entry (Xen ELF note): 32-bit protected mode, paging off, EBX = start_info.
"""

from __future__ import annotations

import ctypes
import struct

from pyrovm.kvm import Vcpu
from pyrovm.kvm.structs import kvm_sregs
from pyrovm.memory import GuestMemory

from . import gdt, layout, msrs, paging

X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def write_boot_gdt(mem: GuestMemory) -> dict[int, int]:
    """Write the boot GDT and an empty IDT into guest memory; return the GDT entries."""
    entries = gdt.boot_gdt()
    mem.write(layout.GDT_ADDR, gdt.gdt_bytes(entries))
    mem.write_u64(layout.IDT_ADDR, 0)
    return entries


def _load_segments(vcpu: Vcpu, entries: dict[int, int], code_sel: int) -> kvm_sregs:
    sregs = vcpu.get_sregs()
    code = gdt.segment_from_entry(entries[code_sel], code_sel)
    data = gdt.segment_from_entry(entries[gdt.DATA_SEL], gdt.DATA_SEL)
    tss = gdt.segment_from_entry(entries[gdt.TSS_SEL], gdt.TSS_SEL)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(gdt.gdt_bytes(entries)) - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    return sregs


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def setup_msrs(vcpu: Vcpu) -> int:
    """Set the boot MSRs; returns how many KVM took."""
    return vcpu.set_msrs(msrs.boot_msrs())


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the PIC's virtual wire) and LINT1 as NMI, as firmware leaves them."""
    lapic = vcpu.get_lapic()
    raw = bytearray(lapic.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", raw, reg)[0]
        struct.pack_into("<I", raw, reg, (value & ~0x700) | (mode << 8))
    ctypes.memmove(lapic.regs, bytes(raw), len(raw))
    vcpu.set_lapic(lapic)


def setup_long_mode(vcpu: Vcpu, mem: GuestMemory, entry: int, zero_page: int = layout.ZERO_PAGE_ADDR) -> None:
    """Enter at *entry* in 64-bit mode with the low 4 GiB identity mapped and RSI = *zero_page*."""
    entries = write_boot_gdt(mem)
    cr3 = paging.write_identity_map(mem)
    sregs = _load_segments(vcpu, entries, gdt.CODE64_SEL)
    sregs.cr3 = cr3
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = 2
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = zero_page
    vcpu.set_regs(regs)


def setup_pvh(vcpu: Vcpu, mem: GuestMemory, entry: int, start_info: int = layout.PVH_INFO_ADDR) -> None:
    """Enter at the 32-bit PVH *entry*: protected mode, paging off, EBX = *start_info*."""
    entries = write_boot_gdt(mem)
    sregs = _load_segments(vcpu, entries, gdt.CODE32_SEL)
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_NE) & ~X86_CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = 2
    regs.rip = entry
    regs.rbx = start_info
    vcpu.set_regs(regs)
