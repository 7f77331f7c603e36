"""Tiny hand-assembled ELF64 guests for tests that need exact control over what the vCPU executes."""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDR = 0x100000


def make_elf(code: bytes, path: Path, load_addr: int = LOAD_ADDR, pvh_entry: int | None = None) -> Path:
    """Write an ELF64 x86-64 executable whose single PT_LOAD puts *code* at *load_addr* (= e_entry)."""
    ehsize, phsize = 64, 56
    phnum = 2 if pvh_entry is not None else 1
    note = b""
    if pvh_entry is not None:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", pvh_entry)
    code_off = ehsize + phsize * phnum + len(note)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        62,
        1,
        load_addr,
        ehsize,
        0,
        0,
        ehsize,
        phsize,
        phnum,
        0,
        0,
        0,
    )
    phdrs = struct.pack("<IIQQQQQQ", 1, 7, code_off, load_addr, load_addr, len(code), len(code), 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, ehsize + phsize * phnum, 0, 0, len(note), len(note), 4)
    path.write_bytes(ehdr + phdrs + note + code)
    return path


# mov dx, imm16 ; mov al, imm8 ; out dx, al
def out8(port: int, value: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb0" + bytes([value]) + b"\xee"


def out32(port: int, value: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb8" + struct.pack("<I", value) + b"\xef"


HLT = b"\xf4"
CLI = b"\xfa"
JMP_SELF = b"\xeb\xfe"
UD2 = b"\x0f\x0b"
