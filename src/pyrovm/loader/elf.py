"""ELF64 kernels (a Linux ``vmlinux``, the test guest): ``PT_LOAD`` segments at their physical addresses,
the 64-bit entry (``e_entry``) and, when present, the PVH 32-bit entry from the Xen ELF note."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pyrovm.errors import ConfigError
from pyrovm.memory import GuestMemory, GuestMemoryError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
ET_CORE = 4
PT_LOAD = 1
PT_INTERP = 3
PT_NOTE = 4
PT_TLS = 7
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


class KernelLoadError(ConfigError):
    """The file is not a kernel pyrovm can load, or it does not fit in guest memory."""


@dataclass(frozen=True)
class ElfKernel:
    entry64: int  # e_entry: the 64-bit entry (Linux boot protocol: RSI = zero page)
    pvh_entry: int | None  # 32-bit PVH entry from the Xen note, if any
    load_start: int
    load_end: int  # first byte past the highest loaded segment (memsz included)
    segments: tuple[tuple[int, int], ...] = ()  # (physical address, memsz) of each loaded segment

    def loaded(self, addr: int) -> bool:
        """True when *addr* lies in a loaded segment (an entry point must)."""
        return any(start <= addr < start + size for start, size in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def iter_notes(data: bytes, off: int, size: int) -> Iterator[tuple[bytes, int, bytes]]:
    """``(owner name, type, descriptor)`` of each ELF note in ``data[off:off + size]``."""
    end = off + size
    while off + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(data, off)
        off += _NHDR.size
        name = bytes(data[off : off + namesz]).rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = bytes(data[off : off + descsz])
        off += (descsz + 3) & ~3
        yield name, ntype, desc


def note_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """``(offset, size)`` of each ``PT_NOTE`` segment of an ELF64 file that lies within *data*."""
    if len(data) < _EHDR.size or not is_elf(data) or data[4] != ELFCLASS64:
        return
    fields = _EHDR.unpack_from(data)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        return
    for i in range(phnum):
        ptype, _flags, off, _vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if ptype == PT_NOTE and off + filesz <= len(data):
            yield off, filesz


def _pvh_note(data: bytes, off: int, size: int) -> int | None:
    for name, ntype, desc in iter_notes(data, off, size):
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return int.from_bytes(desc[: 8 if len(desc) >= 8 else 4], "little") & 0xFFFFFFFF
    return None


def load_elf(mem: GuestMemory, data: bytes, name: str = "kernel") -> ElfKernel:
    """Copy the ``PT_LOAD`` segments of ELF *data* into guest memory."""
    if len(data) < _EHDR.size or not is_elf(data):
        raise KernelLoadError(f"{name}: not an ELF file")
    ident, etype, machine, _ver, entry, phoff, _sh, _fl, _ehsz, phentsize, phnum, *_ = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise KernelLoadError(f"{name}: not a little-endian 64-bit ELF")
    if machine != EM_X86_64:
        raise KernelLoadError(f"{name}: ELF for machine {machine}, not x86-64")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data) or phnum == 0:
        raise KernelLoadError(f"{name}: truncated or malformed ELF program headers")
    _check_kernel_kind(data, name, etype, phoff, phnum)
    pvh: int | None = None
    lo, hi = None, 0
    segments: list[tuple[int, int]] = []
    for i in range(phnum):
        ptype, _flags, off, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if ptype == PT_NOTE:
            if off + filesz > len(data):
                raise KernelLoadError(f"{name}: truncated ELF note segment")
            pvh = _pvh_note(data, off, filesz) if pvh is None else pvh
        if ptype != PT_LOAD or memsz == 0:
            continue
        if off + filesz > len(data) or filesz > memsz:
            raise KernelLoadError(f"{name}: truncated (segment {i} runs past the end of the file)")
        try:
            mem.write(paddr, memoryview(data)[off : off + filesz])
            if memsz > filesz:
                mem.fill(paddr + filesz, memsz - filesz)
        except GuestMemoryError as exc:
            raise KernelLoadError(
                f"{name}: segment at {paddr:#x}+{memsz:#x} does not fit in guest memory (more memory?)"
            ) from exc
        lo = paddr if lo is None else min(lo, paddr)
        hi = max(hi, paddr + memsz)
        segments.append((paddr, memsz))
    if lo is None:
        raise KernelLoadError(f"{name}: ELF has no loadable segments")
    return ElfKernel(entry64=entry, pvh_entry=pvh, load_start=lo, load_end=hi, segments=tuple(segments))


_NOT_EXEC = {
    ET_REL: "a relocatable object file",
    ET_DYN: "a shared object or position-independent program",
    ET_CORE: "a core dump",
}


def _check_kernel_kind(data: bytes, name: str, etype: int, phoff: int, phnum: int) -> None:
    """Refuse ELF files that are clearly not kernels: other types than ``ET_EXEC``, and programs that ask
    for a dynamic loader (``PT_INTERP``) or have thread-local storage (``PT_TLS``), as user programs do."""
    if etype != ET_EXEC:
        what = _NOT_EXEC.get(etype, f"ELF type {etype}")
        raise KernelLoadError(f"{name}: not a kernel: {what} (a kernel is an ET_EXEC image)")
    for i in range(phnum):
        ptype = _PHDR.unpack_from(data, phoff + i * _PHDR.size)[0]
        if ptype == PT_INTERP:
            raise KernelLoadError(f"{name}: not a kernel: a user-space program (it names a dynamic loader)")
        if ptype == PT_TLS:
            raise KernelLoadError(f"{name}: not a kernel: a user-space program (it has thread-local storage)")
