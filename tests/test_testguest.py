"""The test guest: build, ELF layout, and boots under QEMU and (directly, both entries) under KVM."""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyrovm import testguest

QEMU = shutil.which("qemu-system-x86_64")
KVM_OK = os.access("/dev/kvm", os.R_OK | os.W_OK)

PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


@pytest.fixture(scope="module")
def guest() -> Path:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc and make are needed to build the test guest")
    return testguest.build()


# ---- ELF ------------------------------------------------------------------------------------------


@dataclass
class Phdr:
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass
class Elf:
    entry: int
    phdrs: list[Phdr]
    data: bytes

    def loads(self) -> list[Phdr]:
        return [p for p in self.phdrs if p.type == PT_LOAD]

    def pvh_entry(self) -> int | None:
        for p in self.phdrs:
            if p.type != PT_NOTE:
                continue
            off, end = p.offset, p.offset + p.filesz
            while off + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, off)
                name = self.data[off + 12 : off + 12 + namesz].rstrip(b"\0")
                desc_off = off + 12 + (namesz + 3) // 4 * 4
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                    size = 8 if descsz >= 8 else 4
                    return int.from_bytes(self.data[desc_off : desc_off + size], "little")
                off = desc_off + (descsz + 3) // 4 * 4
        return None


def parse_elf(path: Path) -> Elf:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2, "not ELF64"
    assert data[5] == 1, "not little-endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert e_type == 2, "not ET_EXEC"
    assert e_machine == 62, "not x86-64"
    (entry,) = struct.unpack_from("<Q", data, 24)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    phdrs = [Phdr(*struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)) for i in range(phnum)]
    return Elf(entry, phdrs, data)


def test_build_is_cached(guest: Path) -> None:
    assert guest.name == "guest.elf"
    assert guest.parent.name == testguest.source_hash()
    assert testguest.build() == guest


def test_build_honours_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc and make are needed to build the test guest")
    monkeypatch.setenv("PYROVM_CACHE", str(tmp_path))
    path = testguest.build()
    assert path.is_relative_to(tmp_path / "testguest")
    assert [p.name for p in path.parent.iterdir()] == ["guest.elf"]
    assert [p.name for p in (tmp_path / "testguest").iterdir()] == [path.parent.name]  # no temp dirs left
    assert testguest.build(force=True) == path


def test_build_without_gcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="gcc"):
        testguest.build()


def test_main_prints_path(guest: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(testguest.__file__).parents[2]))
    out = subprocess.run(
        ["python3", "-m", "pyrovm.testguest"], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.splitlines()[-1] == str(guest)


def test_elf_layout(guest: Path) -> None:
    elf = parse_elf(guest)
    loads = elf.loads()
    assert loads, "no PT_LOAD segment"
    assert min(p.paddr for p in loads) >= 0x100000, "must load at or above 1 MiB"
    assert max(p.paddr + p.memsz for p in loads) < 0x400000, "the guest should stay small"
    assert 0x8000 not in range(min(p.paddr for p in loads), max(p.paddr + p.memsz for p in loads))

    def in_load(addr: int) -> bool:
        return any(p.paddr <= addr < p.paddr + p.filesz and p.flags & 1 for p in loads)

    pvh = elf.pvh_entry()
    assert pvh is not None, "no Xen PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
    assert in_load(pvh), f"PVH entry {pvh:#x} is not in an executable PT_LOAD segment"
    assert in_load(elf.entry), f"e_entry {elf.entry:#x} is not in an executable PT_LOAD segment"
    assert guest.stat().st_size < 64 * 1024


# ---- QEMU -----------------------------------------------------------------------------------------

needs_qemu = pytest.mark.skipif(
    QEMU is None or not KVM_OK, reason="needs qemu-system-x86_64 and a usable /dev/kvm"
)


def qemu(guest: Path, cmdline: str, smp: int = 1, stdin: bytes = b"") -> tuple[int, str]:
    args = testguest.qemu_command(guest, cmdline, smp=smp)
    proc = subprocess.run(args, input=stdin, capture_output=True, timeout=120)
    return proc.returncode, proc.stdout.decode(errors="replace")


@needs_qemu
def test_qemu_hello(guest: Path) -> None:
    rc, out = qemu(guest, "test=hello")
    assert out == "hello from the test guest\n"
    assert rc == (0 << 1) | 1


@needs_qemu
@pytest.mark.parametrize("status", [0, 3, 42])
def test_qemu_exit(guest: Path, status: int) -> None:
    rc, out = qemu(guest, f"console=x test=exit status={status} foo")
    assert out == f"exit status {status}\n"
    assert rc == (status << 1) | 1


@needs_qemu
def test_qemu_unknown(guest: Path) -> None:
    assert qemu(guest, "test=nope") == ((2 << 1) | 1, "unknown test\n")
    assert qemu(guest, "") == ((2 << 1) | 1, "unknown test\n")


@needs_qemu
def test_qemu_triple_fault(guest: Path) -> None:
    rc, out = qemu(guest, "test=triple-fault")
    assert out == "triple-fault\n"
    assert rc == 0  # -no-reboot: the shutdown ends QEMU normally


@needs_qemu
@pytest.mark.parametrize("ncpus", [None, 2])
def test_qemu_cpus(guest: Path, ncpus: int | None) -> None:
    rc, out = qemu(guest, "test=cpus" + (f" ncpus={ncpus}" if ncpus else ""), smp=2)
    assert rc == 1, out
    lines = out.splitlines()
    assert lines[-1] == "cpus: 2"
    cpus = sorted(lines[:-1])
    assert len(cpus) == 2
    assert cpus[0].startswith("cpu 0 apic-id ") and cpus[1].startswith("cpu 1 apic-id ")
    assert sorted(line.split()[-1] for line in cpus) == ["0", "1"]


@needs_qemu
def test_qemu_pio(guest: Path) -> None:
    assert qemu(guest, "test=pio count=1000") == (1, "pio done 1000\n")


@needs_qemu
def test_qemu_mmio(guest: Path) -> None:
    assert qemu(guest, "test=mmio count=1000") == (1, "mmio done 1000\n")


@needs_qemu
def test_qemu_echo(guest: Path) -> None:
    rc, out = qemu(guest, "test=echo", stdin=b"hi there\n\x04")
    assert out == "echo ready\nhi there\n\nbye\n"
    assert rc == 1


# ---- direct KVM: both entries, with a minimal VMM written here -----------------------------------

MEM_SIZE = 16 << 20
START_INFO, ZERO_PAGE, CMDLINE, VMM_PML4 = 0x6000, 0x7000, 0x20000, 0x9000


@dataclass
class KvmRun:
    output: str
    status: int | None  # None: shutdown (triple fault)
    pio_writes: int
    mmio_writes: int


def kvm_boot(guest: Path, cmdline: str, entry: str) -> KvmRun:
    from pyrovm.kvm import Kvm, exits, structs

    elf = parse_elf(guest)
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = mmap.mmap(-1, MEM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        vm.set_user_memory_region(0, 0, MEM_SIZE, addr)
        for p in elf.loads():
            mem[p.paddr : p.paddr + p.filesz] = elf.data[p.offset : p.offset + p.filesz]
        mem[CMDLINE : CMDLINE + len(cmdline) + 1] = cmdline.encode() + b"\0"
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
        sregs = vcpu.get_sregs()
        regs = structs.kvm_regs()
        regs.rflags = 2

        def seg(selector: int, type_: int, long: int, db: int) -> structs.kvm_segment:
            return structs.kvm_segment(
                base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0, db=db, s=1,
                l=long, g=1,
            )  # fmt: skip

        if entry == "pvh":
            struct.pack_into("<IIIIQQQQI", mem, START_INFO, 0x336EC578, 1, 0, 0, 0, CMDLINE, 0, 0, 0)
            sregs.cs = seg(0x08, 0xB, 0, 1)
            sregs.cr0, sregs.cr4, sregs.efer = 0x11, 0, 0
            regs.rip = elf.pvh_entry() or 0
            regs.rbx = START_INFO
        else:
            struct.pack_into("<I", mem, ZERO_PAGE + 0x228, CMDLINE)
            struct.pack_into("<Q", mem, VMM_PML4, (VMM_PML4 + 0x1000) | 3)
            struct.pack_into("<Q", mem, VMM_PML4 + 0x1000, (VMM_PML4 + 0x2000) | 3)
            for i in range(512):  # 1 GiB of 2 MiB pages
                struct.pack_into("<Q", mem, VMM_PML4 + 0x2000 + 8 * i, (i << 21) | 0x83)
            sregs.cs = seg(0x08, 0xB, 1, 0)
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, VMM_PML4, 0x20, 0x500
            regs.rip = elf.entry
            regs.rsi = ZERO_PAGE
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, seg(0x10, 0x3, 0, 1))
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)

        out = bytearray()
        pio = mmio = 0
        for _ in range(100_000):
            ex = vcpu.run()
            if isinstance(ex, exits.IoOut):
                if ex.port == 0x3F8:
                    out += ex.data
                elif ex.port == 0xF4:
                    return KvmRun(out.decode(), int.from_bytes(ex.data, "little"), pio, mmio)
                elif ex.port == 0x500:
                    pio += 1
            elif isinstance(ex, exits.IoIn):
                vcpu.complete_io_in(bytes([0x20 if ex.port == 0x3FD else 0]) * ex.size)
            elif isinstance(ex, exits.MmioWrite):
                assert ex.addr == 0xC0000000 and len(ex.data) == 4
                mmio += 1
            elif isinstance(ex, exits.MmioRead):
                vcpu.complete_mmio_read(bytes(ex.length))
            elif isinstance(ex, exits.Shutdown):
                return KvmRun(out.decode(), None, pio, mmio)
            elif not isinstance(ex, exits.Interrupted):
                raise AssertionError(f"unexpected exit {ex!r}; output so far {bytes(out)!r}")
        raise AssertionError(f"guest did not finish; output so far {bytes(out)!r}")
    finally:
        vm.close()
        kvm.close()
        del mem


needs_kvm = pytest.mark.skipif(not KVM_OK, reason="needs a usable /dev/kvm")


@needs_kvm
@pytest.mark.parametrize("entry", ["pvh", "64"])
def test_kvm_entries(guest: Path, entry: str) -> None:
    assert kvm_boot(guest, "test=hello", entry) == KvmRun("hello from the test guest\n", 0, 0, 0)
    assert kvm_boot(guest, "test=exit status=9", entry) == KvmRun("exit status 9\n", 9, 0, 0)
    assert kvm_boot(guest, "test=pio count=7", entry) == KvmRun("pio done 7\n", 0, 7, 0)
    assert kvm_boot(guest, "test=mmio count=5", entry) == KvmRun("mmio done 5\n", 0, 0, 5)
    assert kvm_boot(guest, "test=triple-fault", entry) == KvmRun("triple-fault\n", None, 0, 0)
    assert kvm_boot(guest, "", entry) == KvmRun("unknown test\n", 2, 0, 0)
