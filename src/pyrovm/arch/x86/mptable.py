"""The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI finds its CPUs and IOAPIC.

Written at :data:`layout.MPTABLE_START` (the last KiB of base memory, where Linux's ``smp_scan_config``
looks): a 16-byte floating pointer ``_MP_`` followed by the configuration table ``PCMP`` with one processor
entry per vCPU (APIC ids 0..N-1, the first the bootstrap processor), the ISA bus, the IOAPIC at
:data:`layout.IOAPIC_ADDR` (id N, 24 pins), an I/O interrupt entry per IRQ 0-23 (INT, edge triggered,
active high, to the IOAPIC pin of the same number: 16-23 serve virtio devices past the ninth, as in
Firecracker) and the local interrupts (LINT0 ExtINT,
LINT1 NMI, to every local APIC).

IRQ 0 is an INT entry like the others (as Firecracker and Cloud Hypervisor do), not ExtINT: with an ExtINT
entry on IOAPIC pin 0, Linux 6.1 says "ExtINT not setup in hardware but reported by MP table" and then
dereferences NULL in its timer check (seen on this project's kernel); KVM routes the PIT (GSI 0) to IOAPIC
pin 0, so the INT entry is what the hardware does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyrovm.errors import ConfigError, GuestError
from pyrovm.memory import GuestMemory

from . import layout

FLOATING_SIG = b"_MP_"
TABLE_SIG = b"PCMP"
SPEC_REV = 4  # MP spec 1.4
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24
ISA_BUS_ID = 0
OEM_ID = b"PYROVM  "
PRODUCT_ID = b"000000000000"

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED = 0x01
CPU_BOOTPROCESSOR = 0x02
MP_IRQ_INT, MP_IRQ_NMI, MP_IRQ_SMI, MP_IRQ_EXTINT = 0, 1, 2, 3
#: polarity active high (01) in bits 0-1, trigger edge (01) in bits 2-3
IRQ_FLAGS_EDGE_HIGH = 0x0005
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = 0x201  # FPU, APIC

FLOATING = struct.Struct("<4sIBBBB4s")  # 16 bytes
HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # 44 bytes
PROCESSOR = struct.Struct("<BBBBII8s")  # 20 bytes
BUS = struct.Struct("<BB6s")  # 8
IOAPIC = struct.Struct("<BBBBI")  # 8
INTSRC = struct.Struct("<BBHBBBB")  # 8 (also local interrupts)


def _checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes *data* (with that byte as 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def build(cpus: int, addr: int = layout.MPTABLE_START) -> bytes:
    """The floating pointer and configuration table for *cpus* vCPUs, as placed at *addr*."""
    if not 1 <= cpus <= 254:
        raise ConfigError(f"{cpus} vCPUs: the MP table (8-bit APIC ids, IOAPIC id after them) takes 1..254")
    ioapic_id = cpus
    entries: list[bytes] = []
    for i in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0)
        entries.append(
            PROCESSOR.pack(MP_PROCESSOR, i, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES, bytes(8))
        )
    entries.append(BUS.pack(MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED, layout.IOAPIC_ADDR))
    flags = IRQ_FLAGS_EDGE_HIGH
    for irq in range(layout.MAX_LEGACY_IRQ + 1):
        entries.append(INTSRC.pack(MP_INTSRC, MP_IRQ_INT, flags, ISA_BUS_ID, irq, ioapic_id, irq))
    entries.append(INTSRC.pack(MP_LINTSRC, MP_IRQ_EXTINT, IRQ_FLAGS_EDGE_HIGH, ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(INTSRC.pack(MP_LINTSRC, MP_IRQ_NMI, IRQ_FLAGS_EDGE_HIGH, ISA_BUS_ID, 0, 0xFF, 1))
    body = b"".join(entries)
    length = HEADER.size + len(body)
    header = HEADER.pack(
        TABLE_SIG, length, SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0
    )
    table = bytearray(header + body)
    table[7] = _checksum_byte(table)
    table_addr = addr + FLOATING.size
    fp = bytearray(FLOATING.pack(FLOATING_SIG, table_addr, 1, SPEC_REV, 0, 0, bytes(4)))
    fp[10] = _checksum_byte(fp)
    return bytes(fp + table)


def write(mem: GuestMemory, cpus: int, addr: int = layout.MPTABLE_START) -> int:
    """Write the MP table for *cpus* vCPUs at *addr*; returns its size in bytes."""
    data = build(cpus, addr)
    mem.write(addr, data)
    return len(data)


class MpTableError(GuestError, ValueError):
    """An MP table image that does not parse (bad signature, checksum, length or entry type)."""


@dataclass
class ParsedMpTable:
    """What :func:`parse` reads back (for tests and debugging)."""

    table_addr: int
    oem_id: bytes
    lapic_addr: int
    cpus: list[tuple[int, int]]  # (apic id, flags)
    buses: list[tuple[int, bytes]]
    ioapics: list[tuple[int, int, int]]  # (id, version, address)
    interrupts: list[tuple[int, int, int, int, int, int]]  # (type, flags, bus, bus irq, ioapic id, pin)
    local_interrupts: list[tuple[int, int, int, int]]  # (type, flags, lapic id, lint)


def parse(data: bytes, addr: int = layout.MPTABLE_START) -> ParsedMpTable:
    """Parse an MP table image that starts at guest address *addr*; checks signatures and checksums."""
    sig, table_addr, length16, _rev, _ck, feature1, _ = FLOATING.unpack_from(data)
    if sig != FLOATING_SIG or length16 != 1 or sum(data[:16]) & 0xFF:
        raise MpTableError("bad MP floating pointer (signature, length or checksum)")
    if feature1 != 0:
        raise MpTableError("MP floating pointer names a default configuration, not a table")
    off = table_addr - addr
    tsig, length, _rev, _ck, oem, _prod, _oemp, _oems, count, lapic, *_ = HEADER.unpack_from(data, off)
    if tsig != TABLE_SIG or sum(data[off : off + length]) & 0xFF:
        raise MpTableError("bad MP configuration table (signature or checksum)")
    out = ParsedMpTable(table_addr, oem, lapic, [], [], [], [], [])
    pos = off + HEADER.size
    for _ in range(count):
        kind = data[pos]
        if kind == MP_PROCESSOR:
            _, apic_id, _ver, flags, _sig, _feat, _ = PROCESSOR.unpack_from(data, pos)
            out.cpus.append((apic_id, flags))
            pos += PROCESSOR.size
        elif kind == MP_BUS:
            _, bus_id, name = BUS.unpack_from(data, pos)
            out.buses.append((bus_id, name))
            pos += BUS.size
        elif kind == MP_IOAPIC:
            _, ioapic_id, ver, _flags, ioaddr = IOAPIC.unpack_from(data, pos)
            out.ioapics.append((ioapic_id, ver, ioaddr))
            pos += IOAPIC.size
        elif kind == MP_INTSRC:
            _, itype, flags, bus, irq, dst, pin = INTSRC.unpack_from(data, pos)
            out.interrupts.append((itype, flags, bus, irq, dst, pin))
            pos += INTSRC.size
        elif kind == MP_LINTSRC:
            _, itype, flags, _bus, _irq, dst, lint = INTSRC.unpack_from(data, pos)
            out.local_interrupts.append((itype, flags, dst, lint))
            pos += INTSRC.size
        else:
            raise MpTableError(f"unknown MP table entry type {kind}")
    if pos - off != length:
        raise MpTableError("MP table length does not match its entries")
    return out
