"""Which kernel this is and how to enter it: :func:`load_kernel` puts a bzImage or an ELF kernel into
guest memory (with the loader of its kind) and returns the :class:`~pyrovm.arch.x86.boot.KernelEntry`
the boot set-up needs.  Files that are not kernels are refused here with one line saying why."""

from __future__ import annotations

from pyrovm.arch.x86 import layout
from pyrovm.arch.x86.boot import KernelEntry
from pyrovm.memory import GuestMemory

from .bzimage import check_cmdline, is_bzimage, load_bzimage
from .elf import KernelLoadError, is_elf, load_elf

__all__ = ["BOOT_MODES", "check_cmdline", "load_kernel"]

BOOT_MODES = ("auto", "pvh", "linux64")


def load_kernel(memory: GuestMemory, data: bytes, name: str, boot: str = "auto") -> KernelEntry:
    """Load kernel *data* (bzImage or ELF) into *memory*; *boot* picks the ELF entry (``auto``: PVH when
    the ELF has the note).  Raises :class:`KernelLoadError`."""
    if boot not in BOOT_MODES:
        raise KernelLoadError(f"boot mode {boot!r}: choose {', '.join(BOOT_MODES)}")
    if is_bzimage(data):
        if boot == "pvh":
            raise KernelLoadError(f"{name}: a bzImage has no PVH entry (boot the vmlinux for PVH)")
        bz = load_bzimage(memory, data, name)
        hdr = bz.header
        return KernelEntry(
            "bzimage", bz.entry64, bz.load_end, hdr.setup_header, hdr.cmdline_size, hdr.initrd_addr_max
        )
    if not is_elf(data):
        raise KernelLoadError(
            f"{name}: not a kernel pyrovm can boot "
            "(not an ELF with a PVH note or 64-bit entry, not a bzImage)"
        )
    elf = load_elf(memory, data, name)
    low = [start for start, _ in elf.segments if start < layout.HIGH_MEMORY_START]
    if low:
        raise KernelLoadError(
            f"{name}: not a kernel: it loads at {low[0]:#x}, below 1 MiB where the boot structures go "
            "(kernels load at 1 MiB or above)"
        )
    mode = boot if boot != "auto" else ("pvh" if elf.pvh_entry is not None else "linux64")
    if mode == "pvh":
        if elf.pvh_entry is None:
            raise KernelLoadError(f"{name}: no PVH entry note (use boot=linux64)")
        if not elf.loaded(elf.pvh_entry):
            raise KernelLoadError(
                f"{name}: not a kernel: its PVH entry point {elf.pvh_entry:#x} is outside its loaded segments"
            )
        return KernelEntry("pvh", elf.pvh_entry, elf.load_end)
    if not elf.loaded(elf.entry64):
        raise KernelLoadError(
            f"{name}: not a kernel: its entry point {elf.entry64:#x} is outside its loaded segments "
            "and it has no PVH note"
        )
    return KernelEntry("linux64", elf.entry64, elf.load_end)
