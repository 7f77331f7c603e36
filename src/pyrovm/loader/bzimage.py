"""Linux ``bzImage`` kernels, loaded as ``qemu -kernel`` does, per ``Documentation/arch/x86/boot.rst``.

The file starts with the real-mode setup code (``setup_sects + 1`` sectors of 512 bytes; 0 means 4) whose
second sector holds the *setup header* (at 0x1f1, magic ``HdrS`` at 0x202).  The protected-mode kernel
follows: pyrovm copies it to 1 MiB (or to ``pref_address`` when the kernel is relocatable and that fits)
and enters it through the 64-bit entry at load address + 0x200 (needs boot protocol 2.12 with
``XLF_KERNEL_64``), with RSI pointing at a zero page whose setup header is the kernel's own, patched with
the loader's fields (``type_of_loader``, ``loadflags``, ``cmd_line_ptr``, ``ramdisk_image``/``size``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from pyrovm.memory import GuestMemory, GuestMemoryError

from .elf import KernelLoadError

HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
SETUP_HEADER_OFFSET = 0x1F1
#: The setup header runs up to 0x0268 (``kernel_info_offset`` ends there in protocol 2.15).
SETUP_HEADER_END = 0x268
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags (64-bit entry)
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
DEFAULT_LOAD_ADDR = 0x100000
ENTRY64_OFFSET = 0x200

# Offsets in the file (= offsets in boot_params)
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_LOADFLAGS = 0x211
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260


@dataclass(frozen=True)
class BzImageHeader:
    """The setup-header fields a loader needs."""

    setup_sects: int  # real-mode sectors after the boot sector (0 already turned into 4)
    version: int  # boot protocol, e.g. 0x020F
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    setup_header: bytes  # raw bytes 0x1f1..0x268 of the file, copied into the zero page

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


@dataclass(frozen=True)
class BzImageKernel:
    header: BzImageHeader
    load_addr: int
    entry64: int
    load_end: int  # first byte past what the kernel may use while it boots (load address + init_size)


def is_bzimage(data: bytes) -> bool:
    """True when *data* has a Linux setup header (``HdrS`` at 0x202)."""
    return len(data) >= OFF_HEADER + 4 and data[OFF_HEADER : OFF_HEADER + 4] == HDRS_MAGIC


def parse_header(data: bytes, name: str = "kernel") -> BzImageHeader:
    """Check and decode the setup header of bzImage *data*; :class:`KernelLoadError` says what is wrong."""
    if len(data) < SETUP_HEADER_END:
        raise KernelLoadError(f"{name}: truncated ({len(data)} bytes): too short for a Linux setup header")
    if data[OFF_HEADER : OFF_HEADER + 4] != HDRS_MAGIC:
        raise KernelLoadError(f"{name}: not a Linux bzImage (no 'HdrS' setup header magic at 0x202)")
    if struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] != BOOT_FLAG:
        raise KernelLoadError(f"{name}: bad boot sector flag (expected 0xaa55 at 0x1fe)")
    version = struct.unpack_from("<H", data, OFF_VERSION)[0]
    if version < MIN_PROTOCOL:
        raise KernelLoadError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old: "
            "pyrovm needs 2.12 or later (the 64-bit entry, Linux 3.8+)"
        )
    setup_sects = data[OFF_SETUP_SECTS] or 4
    xloadflags = struct.unpack_from("<H", data, OFF_XLOADFLAGS)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoadError(f"{name}: the kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")
    hdr = BzImageHeader(
        setup_sects=setup_sects,
        version=version,
        loadflags=data[OFF_LOADFLAGS],
        initrd_addr_max=struct.unpack_from("<I", data, OFF_INITRD_ADDR_MAX)[0],
        kernel_alignment=struct.unpack_from("<I", data, OFF_KERNEL_ALIGNMENT)[0],
        relocatable=bool(data[OFF_RELOCATABLE]),
        xloadflags=xloadflags,
        cmdline_size=struct.unpack_from("<I", data, OFF_CMDLINE_SIZE)[0],
        pref_address=struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", data, OFF_INIT_SIZE)[0],
        setup_header=bytes(data[SETUP_HEADER_OFFSET:SETUP_HEADER_END]),
    )
    if hdr.setup_size + ENTRY64_OFFSET + 1 > len(data):
        raise KernelLoadError(
            f"{name}: truncated: {len(data)} bytes, but the setup code alone takes {hdr.setup_size}"
        )
    return hdr


class _HasCmdlineSize(Protocol):
    @property
    def cmdline_size(self) -> int: ...


def check_cmdline(hdr: _HasCmdlineSize, cmdline: bytes, name: str = "kernel") -> None:
    """The command line (without its NUL) must fit the kernel's ``cmdline_size`` (a setup header's, or a
    loaded kernel's :class:`~pyrovm.arch.x86.boot.KernelEntry`)."""
    if len(cmdline) > hdr.cmdline_size:
        raise KernelLoadError(
            f"{name}: kernel command line is {len(cmdline)} bytes, "
            f"this kernel takes at most {hdr.cmdline_size}"
        )


def load_bzimage(mem: GuestMemory, data: bytes, name: str = "kernel") -> BzImageKernel:
    """Copy the protected-mode kernel of bzImage *data* into guest memory."""
    hdr = parse_header(data, name)
    payload = memoryview(data)[hdr.setup_size :]
    ram_end = mem.regions[0].end
    need = max(len(payload), hdr.init_size)
    addr = DEFAULT_LOAD_ADDR
    if hdr.relocatable and hdr.pref_address and hdr.pref_address + need <= ram_end:
        addr = hdr.pref_address
    if addr + need > ram_end:
        raise KernelLoadError(
            f"{name}: the kernel needs {need >> 20} MiB at {addr:#x} while it boots: give the VM more memory"
        )
    try:
        mem.write(addr, payload)
    except GuestMemoryError as exc:
        raise KernelLoadError(f"{name}: does not fit in guest memory at {addr:#x} (more memory?)") from exc
    # A non-relocatable kernel decompresses itself to pref_address (LOAD_PHYSICAL_ADDR): that must be RAM.
    end = max(addr + need, (hdr.pref_address + hdr.init_size) if not hdr.relocatable else 0)
    if end > ram_end:
        raise KernelLoadError(
            f"{name}: the kernel needs RAM up to {end:#x} while it boots: give the VM more memory"
        )
    return BzImageKernel(header=hdr, load_addr=addr, entry64=addr + ENTRY64_OFFSET, load_end=end)
