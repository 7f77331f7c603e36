"""Boot structures in guest memory: the Linux zero page (``boot_params``) with its e820 map, and the PVH
``hvm_start_info`` with its memory map.

Offsets follow ``Documentation/arch/x86/zero-page.rst`` and ``boot.rst``, and Xen's
``arch-x86/hvm/start_info.h``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyrovm.errors import ConfigError
from pyrovm.memory import GuestMemory

from . import layout

E820_RAM = 1
E820_RESERVED = 2

# boot_params offsets
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_SECTS = 0x1F1
BP_BOOT_FLAG = 0x1FE
BP_HEADER = 0x202
BP_VERSION = 0x206
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_INITRD_ADDR_MAX = 0x22C
BP_CMDLINE_SIZE = 0x238
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
SETUP_HEADER_START = 0x1F1
BOOT_PARAMS_SIZE = 4096

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
KEEP_SEGMENTS = 0x40

PVH_MAGIC = 0x336EC578
PVH_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")  # 56 bytes
PVH_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(ram: list[tuple[int, int]]) -> list[E820Entry]:
    """The e820 map for RAM regions *ram* (from :func:`layout.ram_layout`).

    Low RAM stops at the EBDA (the MP table lives there); 640 KiB..1 MiB is reserved; RAM above 1 MiB up
    to the device hole, then everything above 4 GiB.
    """
    entries: list[E820Entry] = []
    for addr, size in ram:
        end = addr + size
        if addr == 0:
            entries.append(E820Entry(0, min(end, layout.EBDA_START), E820_RAM))
            if end > layout.HIGH_MEMORY_START:
                entries.append(
                    E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED)
                )
                entries.append(E820Entry(layout.HIGH_MEMORY_START, end - layout.HIGH_MEMORY_START, E820_RAM))
        else:
            entries.append(E820Entry(addr, size, E820_RAM))
    return entries


def write_cmdline(
    mem: GuestMemory, cmdline: bytes, addr: int = layout.CMDLINE_ADDR, max_size: int = layout.CMDLINE_MAX_SIZE
) -> int:
    """Write the NUL-terminated command line; returns its address."""
    if len(cmdline) + 1 > max_size:
        raise ConfigError(f"kernel command line is {len(cmdline)} bytes, the limit is {max_size - 1}")
    mem.write(addr, cmdline + b"\0")
    return addr


def write_zero_page(
    mem: GuestMemory,
    e820: list[E820Entry],
    cmdline_addr: int,
    cmdline_size: int,
    setup_header: bytes | None = None,
    initrd: tuple[int, int] | None = None,
    addr: int = layout.ZERO_PAGE_ADDR,
) -> int:
    """Write ``boot_params`` at *addr*.

    *setup_header* is the kernel's own setup header (bytes from offset 0x1f1 of a bzImage) to copy in
    first; without it (vmlinux, the test guest) a minimal valid header is made.
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise ConfigError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")
    bp = bytearray(BOOT_PARAMS_SIZE)
    if setup_header is not None:
        bp[SETUP_HEADER_START : SETUP_HEADER_START + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", bp, BP_BOOT_FLAG, 0xAA55)
        bp[BP_HEADER : BP_HEADER + 4] = b"HdrS"
        struct.pack_into("<H", bp, BP_VERSION, 0x020F)
        struct.pack_into("<I", bp, BP_INITRD_ADDR_MAX, 0x7FFFFFFF)
    bp[BP_TYPE_OF_LOADER] = 0xFF  # undefined boot loader
    bp[BP_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP | KEEP_SEGMENTS
    struct.pack_into("<H", bp, BP_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, BP_CMDLINE_SIZE, cmdline_size)
    if initrd is not None:
        struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, initrd[0], initrd[1])
    bp[BP_E820_ENTRIES] = len(e820)
    for i, ent in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, ent.addr, ent.size, ent.type)
    mem.write(addr, bp)
    return addr


def write_pvh_start_info(
    mem: GuestMemory,
    e820: list[E820Entry],
    cmdline_addr: int,
    initrd: tuple[int, int] | None = None,
    addr: int = layout.PVH_INFO_ADDR,
    memmap_addr: int = layout.PVH_MEMMAP_ADDR,
    rsdp_addr: int = 0,
) -> int:
    """Write ``hvm_start_info`` (version 1, with a memory map and an optional initrd module)."""
    if len(e820) > layout.PVH_MEMMAP_MAX_ENTRIES:
        raise ConfigError("too many memory map entries for the PVH start_info")
    for i, ent in enumerate(e820):
        PVH_MEMMAP_ENTRY.pack_into(
            mem.view(memmap_addr + i * PVH_MEMMAP_ENTRY.size, PVH_MEMMAP_ENTRY.size),
            0,
            ent.addr,
            ent.size,
            ent.type,
            0,
        )
    nr_modules = 0
    modlist = 0
    if initrd is not None:
        modlist = memmap_addr + len(e820) * PVH_MEMMAP_ENTRY.size
        # hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
        mem.write(modlist, struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0))
        nr_modules = 1
    info = START_INFO.pack(
        PVH_MAGIC, PVH_VERSION, 0, nr_modules, modlist, cmdline_addr, rsdp_addr, memmap_addr, len(e820), 0
    )
    mem.write(addr, info)
    return addr
