"""Workarounds for hosts whose ``/dev/kvm`` is PVM (``/sys/module/kvm_pvm`` exists).

On PVM the guest's CPL0 code is emulated by the host instruction by instruction, the emulator lacks some
instructions (``cmpxchg16b``, ``xrstor``, ``clac``, ``popcnt``, ...), and guest CPUID is only partly the
VMM's.  A Linux kernel gets through boot there only when its command line hides those features
(``noxsave nopti nopv clearcpuid=...``) and it sees an Intel CPU vendor (no AMD-only ``fnclex`` path).
Guest user space cannot make system calls on PVM at all: init starts, then dies at its first syscall.

pyrovm applies these only to *Linux* kernels, and only on PVM hosts: a bzImage (it has the ``HdrS`` setup
header) or an ELF ``vmlinux`` (it carries ELF notes owned by ``"Linux"``, which Linux's ``ELFNOTE()``
macro emits and the test guest does not).  ``VM(host_workarounds=False)`` / ``--no-host-workarounds``
turns them off.
"""

from __future__ import annotations

import logging
import threading

from .kvm import is_pvm_host
from .loader.bzimage import is_bzimage
from .loader.cmdline import Cmdline
from .loader.elf import is_elf, iter_notes, note_segments

#: Kernel command-line options Linux needs on PVM (see /work/shared/notes/environment.md).
PVM_CMDLINE_OPTIONS: tuple[str, ...] = (
    "noxsave",
    "nopti",
    "nopv",
    "clearcpuid=308,295,141,151,150,158,288,298,534,145,197,291,296,306,311,312,297,580,59,147",
)
PVM_CPU_VENDOR = "GenuineIntel"
PVM_WARNING = (
    "this host's KVM is PVM: guest kernel code is emulated here (slow: a Linux boot takes about a "
    "minute) and guest user space cannot make system calls (init dies at its first one); pyrovm adds "
    "Linux command-line workarounds (--no-host-workarounds turns them off)"
)

log = logging.getLogger(__name__)
_warned = False
_warn_lock = threading.Lock()


def _elf_note_owners(data: bytes) -> set[bytes]:
    return {name for off, size in note_segments(data) for name, _type, _desc in iter_notes(data, off, size)}


def is_linux_kernel(data: bytes) -> bool:
    """A bzImage, or an ELF with ``"Linux"``-owned notes (a vmlinux)."""
    if is_bzimage(data):
        return True
    return is_elf(data) and b"Linux" in _elf_note_owners(data)


def pvm_cmdline(cmdline: str) -> str:
    """*cmdline* plus the PVM options it does not already have (an option already given, with any value,
    is left as the user wrote it)."""
    return str(Cmdline(cmdline).add_missing(*PVM_CMDLINE_OPTIONS))


def warn_once() -> None:
    """Tell the user once per process (a warning on the ``pyrovm.host`` logger) what PVM means for a Linux
    guest."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    log.warning("%s", PVM_WARNING)


def workarounds_apply(data: bytes, enabled: bool = True, pvm: bool | None = None) -> bool:
    """Whether the PVM workarounds are for this kernel: enabled, on a PVM host, and a Linux kernel."""
    if not enabled:
        return False
    if pvm is None:
        pvm = is_pvm_host()
    return pvm and is_linux_kernel(data)
