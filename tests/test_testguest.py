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


def qemu(
    guest: Path, cmdline: str, smp: int = 1, stdin: bytes = b"", extra: list[str] | None = None
) -> tuple[int, str]:
    args = testguest.qemu_command(guest, cmdline, smp=smp, extra=extra or [])
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


# ---- QEMU: virtio-mmio devices --------------------------------------------------------------------

SECTOR = 512
DISK_SIZE = 4 << 20
RNG = ["-device", "virtio-rng-device"]


def blk_args(image: Path, readonly: bool = False, serial: str | None = None) -> list[str]:
    dev = "virtio-blk-device,drive=d0" + (f",serial={serial}" if serial else "")
    drive = f"id=d0,file={image},format=raw,if=none" + (",readonly=on" if readonly else "")
    return ["-device", dev, "-drive", drive]


def blk_pattern(sectors: int) -> bytes:
    data = bytearray((k * 7 + i) & 0xFF for k in range(sectors) for i in range(SECTOR))
    data[:15] = b"pyrovm-blk-test"
    return bytes(data)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A raw image of DISK_SIZE bytes filled with 0xa5 (so that written zeros would show)."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xa5" * DISK_SIZE)
    return path


def capacity_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("blk capacity "))


@needs_qemu
def test_qemu_virtio_list(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, "test=virtio", extra=blk_args(disk) + RNG)
    assert rc == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("cmdline: test=virtio virtio_mmio.device=512@0xfeb0")
    devices = [line for line in lines if line.startswith("virtio-mmio ")]
    assert len(devices) == 2, out
    assert all(" magic 0x74726976 version 2 " in line for line in devices), out
    assert sorted(line.split(" device-id ")[1].split()[0] for line in devices) == ["2", "4"]
    assert lines[-1] == "virtio devices: 2"


@needs_qemu
def test_qemu_virtio_cmdline_formats(guest: Path) -> None:
    # microvm's own virtio_mmio.device= words are turned off: only the ones written here count
    cmdline = (
        "test=virtio virtio_mmio.device=0x200@4272950784:12:1 virtio_mmio.device=junk "
        "virtio_mmio.device=1K@0x100000000:3 virtio_mmio.device=4k@0xfec01000:5"
    )
    extra = ["-M", "microvm,auto-kernel-cmdline=off", *RNG]
    rc, out = qemu(guest, cmdline, extra=extra)
    assert rc == 1, out
    assert out.splitlines()[1:] == [
        "virtio-mmio: cannot parse `virtio_mmio.device=junk`",
        "virtio-mmio: 0x100000000 is above 4 GiB (not mapped)",
        "virtio-mmio 0xfeb00e00: size 0x200 irq 12 magic 0x74726976 version 2 device-id 4 (entropy) "
        "vendor 0x554d4551",
        "virtio-mmio 0xfec01000: size 0x1000 irq 5 magic 0x0 version 0 device-id 0 (?) vendor 0x0",
        "virtio-mmio 0xfec01000: bad magic 0x0",
        "virtio devices: 2",
    ]


@needs_qemu
@pytest.mark.parametrize(("sectors", "chunk"), [(None, None), (300, 7), (1, 1)])
def test_qemu_blk(guest: Path, disk: Path, sectors: int | None, chunk: int | None) -> None:
    cmdline = "test=blk" + (f" sectors={sectors}" if sectors else "") + (f" chunk={chunk}" if chunk else "")
    n = sectors or 64
    rc, out = qemu(guest, cmdline, extra=blk_args(disk))
    assert rc == 1, out
    assert capacity_line(out).startswith(f"blk capacity {DISK_SIZE // SECTOR} sectors features 0x1")
    assert out.splitlines()[-1] == f"blk ok {n} sectors"
    data = disk.read_bytes()
    assert data[: n * SECTOR] == blk_pattern(n)
    assert data[n * SECTOR :] == b"\xa5" * (DISK_SIZE - n * SECTOR)


@needs_qemu
def test_qemu_blk_too_many_sectors(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, f"test=blk sectors={DISK_SIZE // SECTOR + 1}", extra=blk_args(disk))
    assert rc == 3, out
    assert "blk: bad sectors=" in out
    assert disk.read_bytes() == b"\xa5" * DISK_SIZE


@needs_qemu
def test_qemu_blk_ro(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, "test=blk-ro", extra=blk_args(disk, readonly=True))
    assert rc == 1, out
    assert out.splitlines()[-1] == "blk ro ok"
    assert disk.read_bytes() == b"\xa5" * DISK_SIZE


@needs_qemu
def test_qemu_blk_ro_on_writable_disk(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, "test=blk-ro", extra=blk_args(disk))
    assert rc == 3, out
    assert out.splitlines()[-1] == "blk-ro: the device does not offer VIRTIO_BLK_F_RO"


@needs_qemu
def test_qemu_blk_write_on_readonly_disk(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, "test=blk", extra=blk_args(disk, readonly=True))
    assert rc == 3, out
    assert out.splitlines()[-1] == "blk: write sector 0: status 1 (IOERR), expected OK"


@needs_qemu
def test_qemu_blk_id(guest: Path, disk: Path) -> None:
    rc, out = qemu(guest, "test=blk-id", extra=blk_args(disk, serial="pyrovm-disk-7"))
    assert rc == 1, out
    assert out.splitlines()[-1] == "blk id pyrovm-disk-7"


@needs_qemu
def test_qemu_blk_no_device(guest: Path) -> None:
    rc, out = qemu(guest, "test=blk", extra=RNG)
    assert (rc, out) == (3, "no virtio block device (1 virtio_mmio.device= entries on the command line)\n")


@needs_qemu
def test_qemu_blk_legacy_device(guest: Path, disk: Path) -> None:
    extra = ["-global", "virtio-mmio.force-legacy=true", *blk_args(disk)]
    rc, out = qemu(guest, "test=blk", extra=extra)
    assert rc == 3, out
    assert out.endswith(": version 1 (legacy) device: not supported, only version 2 (virtio 1.x)\n")
    assert disk.read_bytes() == b"\xa5" * DISK_SIZE


@needs_qemu
@pytest.mark.parametrize("nbytes", [None, 5, 100_000])
def test_qemu_rng(guest: Path, nbytes: int | None) -> None:
    rc, out = qemu(guest, "test=rng" + (f" bytes={nbytes}" if nbytes else ""), extra=RNG)
    assert rc == 1, out
    words = out.split()
    assert words[:3] == ["rng", "ok", str(nbytes or 64)], out
    assert len(words[3]) == 2 * min(8, nbytes or 64)
    int(words[3], 16)


@needs_qemu
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("depth", [1, 32])
def test_qemu_blkbench(guest: Path, disk: Path, op: str, depth: int) -> None:
    count = 3000  # 12 MB of 4 KiB requests: wraps around the 4 MiB disk
    rc, out = qemu(guest, f"test=blkbench op={op} depth={depth} count={count}", extra=blk_args(disk))
    assert rc == 1, out
    lines = out.splitlines()
    assert lines[1] == f"blkbench start op={op} bs=4096 depth={depth} count={count}"
    assert lines[2] == f"blkbench done {count}"
    assert lines[3].startswith("blkbench guest-tsc-us ")
    if op == "read":
        assert disk.read_bytes() == b"\xa5" * DISK_SIZE
    else:
        data = disk.read_bytes()
        assert data != b"\xa5" * DISK_SIZE
        assert data[:4096] == bytes(i & 0xFF for i in range(4096))


@needs_qemu
def test_qemu_blkbench_bad_args(guest: Path, disk: Path) -> None:
    assert qemu(guest, "test=blkbench op=trim", extra=blk_args(disk)) == (
        3,
        "blkbench: op must be read or write\n",
    )
    rc, out = qemu(guest, "test=blkbench bs=1000", extra=blk_args(disk))
    assert rc == 3 and out.startswith("blkbench: bad bs=/depth="), out


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


@needs_kvm
def test_kvm_virtio_discovery(guest: Path) -> None:
    # nothing behind the addresses (MMIO reads give 0): only the command-line parsing and the probe
    cmdline = (
        "test=virtio virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=0x200@3221233664:6:2 "
        "virtio_mmio.device=1M@0x100000000:7 virtio_mmio.device=512@:1 virtio_mmio.devicex=1@0x1:1"
    )
    run = kvm_boot(guest, cmdline, "pvh")
    assert run.status == 0
    assert run.output.splitlines() == [
        f"cmdline: {cmdline}",
        "virtio-mmio: 0x100000000 is above 4 GiB (not mapped)",
        "virtio-mmio: cannot parse `virtio_mmio.device=512@:1`",
        "virtio-mmio 0xc0000000: size 0x1000 irq 5 magic 0x0 version 0 device-id 0 (?) vendor 0x0",
        "virtio-mmio 0xc0000000: bad magic 0x0",
        "virtio-mmio 0xc0002000: size 0x200 irq 6 magic 0x0 version 0 device-id 0 (?) vendor 0x0",
        "virtio-mmio 0xc0002000: bad magic 0x0",
        "virtio devices: 2",
    ]
    run = kvm_boot(guest, "test=blk virtio_mmio.device=4K@0xc0000000:5", "64")
    assert run == KvmRun(
        "virtio-mmio 0xc0000000: bad magic 0x0\nno virtio block device (1 virtio_mmio.device= entries on "
        "the command line)\n",
        1, 0, 0,
    )  # fmt: skip
