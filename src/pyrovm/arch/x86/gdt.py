"""Global descriptor table entries and their KVM segment form."""

from __future__ import annotations

import struct

from pyrovm.kvm.structs import kvm_segment

# access byte | flags nibble << 12
CODE64 = 0xA09B  # present, DPL0, code exec/read accessed, L=1, G=1
CODE32 = 0xC09B  # present, DPL0, code exec/read accessed, D=1, G=1
DATA = 0xC093  # present, DPL0, data read/write accessed, D/B=1, G=1
TSS64 = 0x808B  # present, 64-bit busy TSS

# Selectors of the boot GDT (the Linux boot protocol wants __BOOT_CS=0x10 and __BOOT_DS=0x18).
NULL, CODE64_SEL, DATA_SEL, TSS_SEL, CODE32_SEL = 0x00, 0x10, 0x18, 0x20, 0x28


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """One 8-byte descriptor from access/flags bits, base and 20-bit limit."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


def segment_from_entry(entry: int, selector: int) -> kvm_segment:
    """The ``kvm_segment`` a CPU would load for descriptor *entry* at *selector*."""
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    seg = kvm_segment()
    seg.base = base
    seg.limit = limit
    seg.selector = selector
    seg.type = (entry >> 40) & 0xF
    seg.s = (entry >> 44) & 1
    seg.dpl = (entry >> 45) & 3
    seg.present = (entry >> 47) & 1
    seg.avl = (entry >> 52) & 1
    seg.l = (entry >> 53) & 1
    seg.db = (entry >> 54) & 1
    seg.g = g
    seg.unusable = 0 if seg.present else 1
    return seg


def boot_gdt() -> dict[int, int]:
    """Selector -> descriptor for the boot GDT."""
    return {
        NULL: 0,
        0x08: 0,
        CODE64_SEL: gdt_entry(CODE64, 0, 0xFFFFF),
        DATA_SEL: gdt_entry(DATA, 0, 0xFFFFF),
        TSS_SEL: gdt_entry(TSS64, 0, 0xFFFFF),
        CODE32_SEL: gdt_entry(CODE32, 0, 0xFFFFF),
    }


def gdt_bytes(entries: dict[int, int]) -> bytes:
    """The table as the CPU reads it (entries at selector / 8)."""
    n = max(entries) // 8 + 1
    table = [0] * n
    for sel, entry in entries.items():
        table[sel // 8] = entry
    return struct.pack(f"<{n}Q", *table)
