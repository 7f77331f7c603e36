"""Identity-mapped boot page tables (the low 4 GiB with 2 MiB pages)."""

from __future__ import annotations

import struct

from pyrovm.memory import GuestMemory

from . import layout

PRESENT, WRITABLE, USER, PAGE_SIZE = 1, 2, 4, 0x80


def write_identity_map(mem: GuestMemory, pml4: int = layout.PML4_ADDR) -> int:
    """Write PML4, PDPT and four PDs that map 0..4 GiB one to one; return CR3."""
    pdpt = layout.PDPT_ADDR
    pd = layout.PD_ADDR
    flags = PRESENT | WRITABLE
    mem.write(pml4, struct.pack("<Q", pdpt | flags) + bytes(4096 - 8))
    mem.write(pdpt, struct.pack("<4Q", *(pd + i * 4096 | flags for i in range(4))) + bytes(4096 - 32))
    entries = [(i << 21) | flags | PAGE_SIZE for i in range(4 * 512)]
    mem.write(pd, struct.pack(f"<{len(entries)}Q", *entries))
    return pml4
