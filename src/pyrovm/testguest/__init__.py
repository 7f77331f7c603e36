"""The pyrovm test guest: a small freestanding C + asm program for booting under pyrovm or QEMU.

The guest is an ELF64 image loaded at 1 MiB with a Xen PVH entry note (32-bit entry, EBX =
``hvm_start_info``) and a 64-bit ``e_entry`` (long mode, CPL0, RSI = Linux zero page).  Its CPL0
set-up is a straight line of 18 instructions (PVH), 10 (64-bit entry) or 16 (AP, from real mode),
iretq included: own GDT, static identity-mapped page tables for the low 4 GiB (2 MiB pages, U+W+P,
A/D preset), EFER.LME, paging, CPUID leaf 1 (see below), then ``iretq`` to CPL3 with IOPL=3.  No IDT:
any exception triple-faults.  The ``test=`` word on the command line selects a test (hello, exit,
spin, triple-fault, cpus, pio, mmio, echo, virtio, blk, blk-ro, blk-id, blkbench, rng); output goes
to the 16550 UART at 0x3f8 and the exit status is written with ``outl`` to port 0xf4 (QEMU
``isa-debug-exit``).

Virtio tests (``virtio.c``: a minimal virtio-mmio driver at CPL3, VIRTIO 1.2, modern devices only)::

    test=virtio                          print the command line and every virtio-mmio device
    test=blk [sectors=64] [chunk=16]     write sector k byte i = (k*7 + i) & 0xff ("pyrovm-blk-test"
                                         over the start of sector 0) to sectors 0..N-1 in requests of
                                         chunk sectors, FLUSH (if offered), read back, compare:
                                         "blk ok N sectors"
    test=blk-ro                          read-only disk: VIRTIO_BLK_F_RO offered, read OK, write
                                         IOERR, sector unchanged: "blk ro ok"
    test=blk-id                          VIRTIO_BLK_T_GET_ID: "blk id <serial>"
    test=blkbench op=read|write bs=4096 depth=1 count=1000
                                         load generator: prints "blkbench start ...", keeps depth
                                         requests in flight on sequential sectors (wrapping at the
                                         capacity), "blkbench done N" (then "blkbench guest-tsc-us T",
                                         a rough guest-side time); the host does the real timing
    test=rng [bytes=64]                  "rng ok <bytes> <first 8 bytes in hex>"

The blk tests print ``blk capacity <sectors> sectors features <negotiated> offered <device's>
queue <size>/<QueueNumMax> at <base>`` first.  Every failure prints a line saying what failed and
exits 1 (a legacy, version 1 device: "... version 1 (legacy) device: not supported ...").

For the VMM:

* Memory: the image occupies 0x100000 to the end of its .bss (about 0x390000); .bss must read as
  zero (fresh guest RAM is).  The guest's own page tables are inside the image (CR3 = its ``pml4``,
  about 0x104000).
  Below 1 MiB only 0x8000-0x802a is written (the AP trampoline, copied there by ``test=cpus``).
  Neither entry needs a stack or GDT from the VMM; the 64-bit entry needs the image identity-mapped.
* The vCPU's CPUID must report long mode (``KVM_SET_CPUID2``): the guest writes EFER.LME.
* ``test=cpus`` uses the LAPIC at 0xfee00000 from CPL3 (SVR, ICR with shorthand "all excluding
  self": INIT, then SIPI vector 0x08 twice) and runs each AP in real mode from 0x8000.
* APIC ids come from CPUID leaf 1 executed at CPL0: on PVM hosts CPUID at CPL3 is not intercepted
  and reports the host CPU's values.
* Virtio devices are found on the command line, one ``virtio_mmio.device=<size>@<base>:<irq>[:<id>]``
  word per device (the Linux format: size with an optional K/M/G suffix, numbers decimal or 0x hex;
  e.g. ``virtio_mmio.device=4K@0xd0000000:5``), below 4 GiB (the guest maps only the low 4 GiB).
  Only version 2 (modern) devices; the driver negotiates VIRTIO_F_VERSION_1 and, for block,
  VIRTIO_BLK_F_RO and VIRTIO_BLK_F_FLUSH when offered (never EVENT_IDX), uses queue 0 only, with
  QueueNum = the largest power of 2 <= min(QueueNumMax, 256), sets VRING_AVAIL_F_NO_INTERRUPT, polls
  the used ring, honours VRING_USED_F_NO_NOTIFY, notifies with a 32-bit write of 0 to QueueNotify,
  writes InterruptACK (what InterruptStatus shows) after synchronous requests, and resets the device
  (Status = 0) when a test ends.  The device reads and writes only the guest's .bss: the ring (4 KiB
  pages of descriptors ``vq_desc``, driver area ``vq_avail``, device area ``vq_used``, about
  0x28c000-0x28f000), request headers and status bytes (``blk_hdr``/``blk_status``, after the rings)
  and a 2 MiB data buffer ``virtio_buf`` (about 0x18c000-0x38c000).  Block chains are 3 descriptors
  (header, data, status; a FLUSH has no data); chain c uses descriptors 3c..3c+2.

Booting under QEMU (works on this project's PVM hosts; QEMU 7.2)::

    qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu qemu64,-cx16,-xsave -m 128M \\
        -nodefaults -no-user-config -no-reboot -display none -serial stdio \\
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 -global virtio-mmio.force-legacy=false \\
        -kernel guest.elf -append "test=hello"

add ``-smp 4`` for ``test=cpus``; for ``test=echo`` feed stdin (``-serial stdio`` reads it).  For the
virtio tests add devices, e.g. ``-device virtio-blk-device,drive=d0,serial=ID -drive
id=d0,file=disk.img,format=raw,if=none`` (``,readonly=on`` for ``test=blk-ro``) and ``-device
virtio-rng-device``; ``QEMU_ARGS`` has ``-global virtio-mmio.force-legacy=false`` (QEMU's
virtio-mmio is legacy, version 1, by default) and microvm with ``acpi=off`` appends a
``virtio_mmio.device=512@0xfeb00e00:12`` word per device to the command line (at 0xfeb00000 +
0x200 * slot).  QEMU's exit code is ``(status << 1) | 1``; a triple fault with ``-no-reboot`` ends
QEMU with exit code 0.  ``QEMU_ARGS`` holds those arguments without ``-kernel``/``-append``/``-smp``;
``qemu_command()`` builds a full command line (``extra``: more arguments, such as devices).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pyrovm.errors import PyrovmError


class GuestBuildError(PyrovmError, RuntimeError):
    """The test guest could not be built (no gcc, a compiler error)."""


__all__ = ["QEMU_ARGS", "SOURCE_DIR", "build", "cache_dir", "qemu_command", "source_hash"]

SOURCE_DIR = Path(__file__).resolve().parent

QEMU_ARGS: list[str] = [
    "qemu-system-x86_64",
    "-M", "microvm,acpi=off",
    "-enable-kvm",
    "-cpu", "qemu64,-cx16,-xsave",
    "-m", "128M",
    "-nodefaults",
    "-no-user-config",
    "-no-reboot",
    "-display", "none",
    "-serial", "stdio",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-global", "virtio-mmio.force-legacy=false",
]  # fmt: skip
"""QEMU command line for the test guest; append ``-kernel PATH -append CMDLINE`` (and ``-smp N``)."""


def qemu_command(kernel: Path | str, cmdline: str, smp: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Full QEMU command line booting *kernel* (the test guest) with *cmdline* on *smp* vCPUs.

    *extra* is appended (devices, e.g. ``["-device", "virtio-rng-device"]``).
    """
    return [*QEMU_ARGS, "-smp", str(smp), *extra, "-kernel", str(kernel), "-append", cmdline]


_SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}


def _source_files() -> list[Path]:
    files = [p for p in SOURCE_DIR.iterdir() if p.suffix in _SOURCE_SUFFIXES or p.name == "Makefile"]
    return sorted((p for p in files if p.is_file()), key=lambda p: p.name)


def _require_tools() -> None:
    missing = [tool for tool in ("gcc", "make") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build the pyrovm test guest: {' and '.join(missing)} not found on PATH "
            "(install them, e.g. `apt-get install gcc make`)"
        )


def source_hash() -> str:
    """sha256 over the guest's source files (names and contents) and ``gcc --version``."""
    _require_tools()
    h = hashlib.sha256()
    for path in _source_files():
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    gcc = subprocess.run(["gcc", "--version"], capture_output=True)
    if gcc.returncode != 0:
        raise GuestBuildError(f"`gcc --version` failed: {gcc.stderr.decode(errors='replace')}")
    h.update(gcc.stdout)
    return h.hexdigest()


def cache_dir() -> Path:
    """``$PYROVM_CACHE/testguest`` (``PYROVM_CACHE`` defaults to ``~/.cache/pyrovm``)."""
    root = os.environ.get("PYROVM_CACHE") or str(Path.home() / ".cache" / "pyrovm")
    return Path(root) / "testguest"


def build(force: bool = False) -> Path:
    """Build the test guest (or reuse a cached build) and return the path of ``guest.elf``."""
    digest = source_hash()
    final = cache_dir() / digest
    elf = final / "guest.elf"
    if elf.is_file() and not force:
        return elf
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=final.parent))
    try:
        proc = subprocess.run(
            ["make", "--no-print-directory", "-f", str(SOURCE_DIR / "Makefile"), f"OUT={tmp}"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise GuestBuildError(f"building the pyrovm test guest failed:\n{proc.stderr}{proc.stdout}")
        for obj in tmp.glob("*.o"):
            obj.unlink()
        if final.exists():  # forced rebuild, or a broken entry
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not elf.is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return elf
