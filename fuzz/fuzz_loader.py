#!/usr/bin/env python3
"""Fuzz the kernel loaders: :func:`pyrovm.loader.load_kernel` (which kernel is this: bzImage, ELF with a
PVH note or a 64-bit entry, or not a kernel) into a 64 MiB guest RAM, with each boot mode.

The first byte picks the boot mode (auto, pvh, linux64); the rest is the file.  Expected:
:class:`pyrovm.loader.KernelLoadError` (a ConfigError).  A bzImage or a 64-bit ELF entry that loads: its
entry lies in guest RAM (the loader checks that an ELF's, the PVH note's too, is in a loaded segment).

    python fuzz/fuzz_loader.py -max_total_time=600 fuzz/corpus/loader
"""

from __future__ import annotations

import _common

with _common.instrumented(__name__):
    from pyrovm.errors import ConfigError
    from pyrovm.loader import check_cmdline, load_kernel
    from pyrovm.memory import GuestMemory

MEM_SIZE = 64 << 20
_MEMORY = GuestMemory.anonymous(MEM_SIZE)
MODES = ["auto", "pvh", "linux64"]


def fuzz_one(data: bytes) -> None:
    mode = MODES[data[0] % 3] if data else "auto"
    try:
        entry = load_kernel(_MEMORY, data[1:], "k", mode)
    except ConfigError:  # KernelLoadError
        return
    if not _MEMORY.contains(entry.entry, 1):
        raise AssertionError(f"{entry}: the entry point is outside guest RAM")
    if entry.mode == "bzimage":
        try:
            check_cmdline(entry, b"console=ttyS0")
        except ConfigError:
            pass


if __name__ == "__main__":
    _common.run(fuzz_one)
