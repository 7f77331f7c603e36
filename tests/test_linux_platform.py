"""Linux platform pieces without a Linux kernel: boot structures, e820, MP table, bzImage headers, CMOS RTC,
PVM host workarounds, boot timer and panic detection (through hand-assembled guests)."""

from __future__ import annotations

import calendar
import os
import struct
import sys
from pathlib import Path

import pytest

from pyrovm.arch.x86 import bootparams, layout, mptable
from pyrovm.devices import rtc as rtcmod
from pyrovm.devices.boot_timer import BootTimer
from pyrovm.host import PVM_CMDLINE_OPTIONS, is_linux_kernel, pvm_cmdline, workarounds_apply
from pyrovm.loader import KernelLoadError
from pyrovm.loader import bzimage as bz
from pyrovm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rawelf

KVM = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not KVM, reason="needs /dev/kvm")


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory(layout.ram_layout(64 << 20))
    yield m
    m.close()


# -- e820 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64 << 20, 512 << 20, 3 << 30, (3 << 30) + (1 << 20), 6 << 30])
def test_e820_for_sizes(size: int) -> None:
    e820 = bootparams.e820_map(layout.ram_layout(size))
    ram = [e for e in e820 if e.type == bootparams.E820_RAM]
    assert sum(e.size for e in ram) == size - (layout.HIGH_MEMORY_START - layout.EBDA_START)
    assert e820[0] == bootparams.E820Entry(0, layout.EBDA_START, bootparams.E820_RAM)
    assert e820[1] == bootparams.E820Entry(layout.EBDA_START, 0x100000 - layout.EBDA_START, 2)
    for e in e820:  # nothing in the 3-4 GiB device hole
        assert e.addr + e.size <= layout.MMIO_GAP_START or e.addr >= layout.MMIO_GAP_END
    if size > layout.MMIO_GAP_START:
        assert e820[2].addr + e820[2].size == layout.MMIO_GAP_START
        assert e820[3] == bootparams.E820Entry(1 << 32, size - layout.MMIO_GAP_START, bootparams.E820_RAM)
    else:
        assert e820[2].addr + e820[2].size == size
        assert len(e820) == 3


# -- zero page and start_info --------------------------------------------------------------------------
def test_zero_page_fields(mem: GuestMemory) -> None:
    e820 = bootparams.e820_map(layout.ram_layout(64 << 20))
    addr = bootparams.write_zero_page(mem, e820, 0x20000, 2048, None, (0x3000000, 0x1234))
    zp = mem.read(addr, 4096)
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & 0x01  # LOADED_HIGH
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", zp, 0x238)[0] == 2048  # cmdline_size
    assert struct.unpack_from("<II", zp, 0x218) == (0x3000000, 0x1234)  # ramdisk image, size
    assert zp[0x1E8] == len(e820)
    for i, ent in enumerate(e820):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == (ent.addr, ent.size, ent.type)


def test_zero_page_keeps_kernel_setup_header(mem: GuestMemory) -> None:
    image = _bzimage(version=0x020F, cmdline_size=1234)
    hdr = bz.parse_header(image)
    bootparams.write_zero_page(mem, [], 0x20000, hdr.cmdline_size, hdr.setup_header)
    zp = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    assert zp[0x1F1:0x210] == image[0x1F1:0x210]
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020F
    assert struct.unpack_from("<I", zp, 0x238)[0] == 1234
    assert zp[0x210] == 0xFF


def test_pvh_start_info_fields(mem: GuestMemory) -> None:
    e820 = bootparams.e820_map(layout.ram_layout(64 << 20))
    addr = bootparams.write_pvh_start_info(mem, e820, 0x20000, (0x2000000, 4096))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", mem.read(addr, 56)
    )
    assert (magic, version, flags, nr_modules, cmdline, rsdp) == (0x336EC578, 1, 0, 1, 0x20000, 0)
    assert memmap == layout.PVH_MEMMAP_ADDR and entries == len(e820)
    for i, ent in enumerate(e820):
        assert struct.unpack("<QQII", mem.read(memmap + 16 * 2 * i // 2 + 8 * i, 24)) == (
            ent.addr,
            ent.size,
            ent.type,
            0,
        )
    assert struct.unpack("<QQQQ", mem.read(modlist, 32))[:2] == (0x2000000, 4096)


# -- MP table ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 8, 64])
def test_mptable_round_trip(cpus: int, mem: GuestMemory) -> None:
    size = mptable.write(mem, cpus)
    data = mem.read(layout.MPTABLE_START, size)
    assert data[:4] == b"_MP_" and sum(data[:16]) % 256 == 0
    t = mptable.parse(data)
    assert t.table_addr == layout.MPTABLE_START + 16
    assert [c[0] for c in t.cpus] == list(range(cpus))
    assert t.cpus[0][1] == 3 and all(f == 1 for _, f in t.cpus[1:])  # BSP + enabled
    assert t.ioapics == [(cpus, 0x11, layout.IOAPIC_ADDR)]
    assert t.lapic_addr == layout.LAPIC_ADDR
    assert t.buses == [(0, b"ISA   ")]
    assert [i[5] for i in t.interrupts] == list(range(24))  # every IOAPIC pin, virtio uses 16-23 too
    assert all(i[0] == mptable.MP_IRQ_INT and i[3] == i[5] and i[4] == cpus for i in t.interrupts)
    assert all(i[1] == 0x5 for i in t.interrupts)  # edge, active high
    assert sorted(li[0] for li in t.local_interrupts) == [mptable.MP_IRQ_NMI, mptable.MP_IRQ_EXTINT]
    # the floating pointer sits in the last KiB of base memory, where Linux scans
    assert 639 * 1024 <= layout.MPTABLE_START < 640 * 1024


def test_mptable_bad_checksum() -> None:
    data = bytearray(mptable.build(2))
    data[40] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        mptable.parse(bytes(data))


# -- bzImage header ----------------------------------------------------------------------------------
def _bzimage(
    version: int = 0x020F,
    setup_sects: int = 4,
    xloadflags: int = 1,
    cmdline_size: int = 2047,
    payload: int = 8192,
    init_size: int = 0x100000,
    relocatable: bool = False,
    pref_address: int = 0x1000000,
    magic: bytes = b"HdrS",
) -> bytes:
    setup_size = ((setup_sects or 4) + 1) * 512
    data = bytearray(setup_size + payload)
    data[0x1F1] = setup_sects
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x202:0x206] = magic
    struct.pack_into("<H", data, 0x206, version)
    struct.pack_into("<I", data, 0x22C, 0x7FFFFFFF)
    data[0x234] = int(relocatable)
    struct.pack_into("<H", data, 0x236, xloadflags)
    struct.pack_into("<I", data, 0x238, cmdline_size)
    struct.pack_into("<Q", data, 0x258, pref_address)
    struct.pack_into("<I", data, 0x260, init_size)
    if payload >= 4:
        data[setup_size : setup_size + 4] = b"\x90\x90\xeb\xfe"
    return bytes(data)


def test_bzimage_header_parse() -> None:
    hdr = bz.parse_header(_bzimage(setup_sects=0))
    assert hdr.setup_sects == 4 and hdr.setup_size == 5 * 512  # 0 means 4
    assert hdr.version_text == "2.15"
    assert hdr.cmdline_size == 2047 and hdr.initrd_addr_max == 0x7FFFFFFF
    assert hdr.xloadflags & bz.XLF_KERNEL_64


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (_bzimage()[:0x200], "truncated"),
        (_bzimage(magic=b"NOPE"), "not a Linux bzImage"),
        (_bzimage(version=0x0206), "too old"),
        (_bzimage(xloadflags=0), "no 64-bit entry"),
        (_bzimage(setup_sects=30, payload=0)[: 20 * 512], "truncated"),
    ],
)
def test_bzimage_header_errors(image: bytes, message: str) -> None:
    with pytest.raises(KernelLoadError, match=message):
        bz.parse_header(image)


def test_bzimage_cmdline_too_long() -> None:
    hdr = bz.parse_header(_bzimage(cmdline_size=16))
    bz.check_cmdline(hdr, b"x" * 16)
    with pytest.raises(KernelLoadError, match="at most 16"):
        bz.check_cmdline(hdr, b"x" * 17)


def test_bzimage_load(mem: GuestMemory) -> None:
    image = _bzimage(payload=4096, pref_address=0x1000000, init_size=0x200000)
    k = bz.load_bzimage(mem, image)
    assert k.load_addr == 0x100000 and k.entry64 == 0x100200
    assert mem.read(0x100000, 4) == b"\x90\x90\xeb\xfe"
    assert k.load_end == 0x1000000 + 0x200000  # non-relocatable: decompresses at pref_address
    k2 = bz.load_bzimage(mem, _bzimage(relocatable=True, pref_address=0x1000000, init_size=0x200000))
    assert k2.load_addr == 0x1000000 and k2.entry64 == 0x1000200
    with pytest.raises(KernelLoadError, match="more memory"):
        bz.load_bzimage(mem, _bzimage(init_size=128 << 20))


@needs_kvm
def test_bzimage_initrd_too_big(tmp_path: Path) -> None:
    from pyrovm.vmm import VM, ConfigError

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(_bzimage(init_size=0x100000))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(60 << 20))
    with pytest.raises(ConfigError, match="does not fit"):
        VM(kernel=kernel, memory="64M", initrd=initrd, host_workarounds=False)
    with pytest.raises(KernelLoadError, match="at most 16"):
        kernel.write_bytes(_bzimage(cmdline_size=16))
        VM(kernel=kernel, memory="64M", cmdline="x" * 40, host_workarounds=False)


@needs_kvm
def test_bzimage_boots_and_initrd_below_max(tmp_path: Path) -> None:
    """A synthetic bzImage whose 64-bit entry writes to the exit port: entry and zero page are right."""
    from pyrovm.vmm import VM, ExitReason

    code = rawelf.out8(layout.EXIT_PORT, 5)
    image = bytearray(_bzimage(payload=4096))
    struct.pack_into("<I", image, 0x22C, (48 << 20) - 1)  # initrd_addr_max below the 64 MiB RAM end
    off = 5 * 512 + 0x200
    image[off : off + len(code)] = code
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bytes(image))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd!" * 1000)
    with VM(kernel=kernel, memory="64M", initrd=initrd, cmdline="hello=1", host_workarounds=False) as vm:
        result = vm.wait(20)
        zp = vm.memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert result.reason is ExitReason.EXIT_PORT and result.guest_status == 5
    image_addr, size = struct.unpack_from("<II", zp, 0x218)
    assert size == 7000 and image_addr + size <= 48 << 20 and image_addr % 4096 == 0
    assert zp[0x210] == 0xFF and vm.boot_mode == "bzimage"


# -- RTC -----------------------------------------------------------------------------------------------
def test_rtc_registers_bcd_24h() -> None:
    t = calendar.timegm((2023, 11, 14, 22, 13, 20, 0, 0, 0))  # a Tuesday
    r = rtcmod.Rtc(clock=lambda: float(t))

    def read(reg: int) -> int:
        r.write(0, bytes((reg,)))
        return r.read(1, 1)[0]

    assert [read(x) for x in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x20, 0x13, 0x22, 0x03, 0x14, 0x11, 0x23, 0x20]
    assert read(0x0A) & 0x80 == 0 and read(0x0A) & 0x7F == 0x26
    assert read(0x0B) == 0x02
    assert read(0x0D) == 0x80
    assert read(0x0C) == 0
    r.write(0, b"\x8b")  # NMI mask bit is not part of the index
    assert r.read(1, 1)[0] == 0x02


def test_rtc_binary_12h_and_writes() -> None:
    now = [float(calendar.timegm((2023, 11, 14, 22, 13, 20, 0, 0, 0)))]
    r = rtcmod.Rtc(clock=lambda: now[0])
    r.write_register(0x0B, rtcmod.REG_B_DM_BINARY)  # binary, 12-hour
    assert r.read_register(0) == 20 and r.read_register(4) == 10 | 0x80  # 10 PM
    # set the clock: SET, write hours/minutes, clear SET
    r.write_register(0x0B, rtcmod.REG_B_SET | rtcmod.REG_B_DM_BINARY | rtcmod.REG_B_24H)
    r.write_register(4, 7)
    r.write_register(2, 30)
    r.write_register(0x0B, rtcmod.REG_B_DM_BINARY | rtcmod.REG_B_24H)
    now[0] += 5
    assert (r.read_register(4), r.read_register(2), r.read_register(0)) == (7, 30, 25)
    # CMOS memory
    r.write_register(0x40, 0xAB)
    assert r.read_register(0x40) == 0xAB
    r.write_register(0x0D, 0)  # read-only
    assert r.read_register(0x0D) == 0x80


# -- PVM host workarounds --------------------------------------------------------------------------------
def test_pvm_cmdline_adds_only_missing() -> None:
    out = pvm_cmdline("console=ttyS0 nopti clearcpuid=1")
    words = out.split()
    assert words[:3] == ["console=ttyS0", "nopti", "clearcpuid=1"]
    assert words.count("nopti") == 1 and "noxsave" in words and "nopv" in words
    assert sum(w.startswith("clearcpuid=") for w in words) == 1
    full = " ".join(PVM_CMDLINE_OPTIONS)
    assert pvm_cmdline(full) == full


def test_linux_kernel_detection(tmp_path: Path) -> None:
    assert is_linux_kernel(_bzimage())
    plain = rawelf.make_elf(rawelf.HLT, tmp_path / "g.elf", pvh_entry=0x100000).read_bytes()
    assert not is_linux_kernel(plain)
    assert not workarounds_apply(_bzimage(), enabled=True, pvm=False)
    assert not workarounds_apply(_bzimage(), enabled=False, pvm=True)
    assert workarounds_apply(_bzimage(), enabled=True, pvm=True)
    assert not workarounds_apply(plain, enabled=True, pvm=True)


def test_linux_elf_note_detection(tmp_path: Path) -> None:
    """An ELF with a note owned by "Linux" (as a vmlinux has) counts as Linux."""
    code = rawelf.HLT
    ehsize, phsize = 64, 56
    note = struct.pack("<III", 6, 4, 6) + b"Linux\0\0\0" + bytes(4)
    code_off = ehsize + 2 * phsize + len(note)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        62,
        1,
        0x100000,
        ehsize,
        0,
        0,
        ehsize,
        phsize,
        2,
        0,
        0,
        0,
    )
    ph = struct.pack("<IIQQQQQQ", 1, 7, code_off, 0x100000, 0x100000, 1, 1, 0x1000)
    ph += struct.pack("<IIQQQQQQ", 4, 4, ehsize + 2 * phsize, 0, 0, len(note), len(note), 4)
    assert is_linux_kernel(ehdr + ph + note + code)


# -- boot timer and panic detection, through raw guests ---------------------------------------------------
def test_boot_timer_device() -> None:
    hits: list[float] = []
    bt = BootTimer(hits.append)
    bt.write(0, b"\x01")
    assert bt.hit_at is None
    bt.write(0, bytes((123,)))
    bt.write(0, bytes((123,)))
    assert bt.hit_at is not None and len(hits) == 1


def _uart_text(text: bytes) -> bytes:
    return b"".join(rawelf.out8(layout.UART_COM1_PORT, c) for c in text)


@needs_kvm
def test_boot_timer_from_guest(tmp_path: Path) -> None:
    from pyrovm.vmm import VM, ExitReason

    # mov rax, BOOT_TIMER_MMIO_ADDR ; mov byte [rax], 123 ; out 0xf4, 0
    code = b"\x48\xb8" + struct.pack("<Q", layout.BOOT_TIMER_MMIO_ADDR) + b"\xc6\x00\x7b"
    code += rawelf.out8(layout.EXIT_PORT, 0) + rawelf.HLT
    kernel = rawelf.make_elf(code, tmp_path / "timer.elf")
    with VM(kernel=kernel, memory="32M") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.EXIT_PORT
    assert vm.boot_timer_at is not None and vm.started_at is not None
    assert vm.started_at <= vm.boot_timer_at <= (vm.ended_at or 1e99)


@needs_kvm
def test_boot_timer_cli(tmp_path: Path) -> None:
    import subprocess

    code = _uart_text(b"Run /init as init process\n")
    code += b"\x48\xb8" + struct.pack("<Q", layout.BOOT_TIMER_MMIO_ADDR) + b"\xc6\x00\x7b"
    code += rawelf.out8(layout.EXIT_PORT, 0) + rawelf.HLT
    kernel = rawelf.make_elf(code, tmp_path / "timer.elf")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, "-m", "pyrovm.cli", "run", "--kernel", str(kernel), "--boot-timer"]
    cmd += ["--timeout", "20"]
    proc = subprocess.run(cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.decode()
    assert "boot timer after" in err and "boot marker after" in err, err


@needs_kvm
def test_panic_then_reset_is_panic(tmp_path: Path) -> None:
    from pyrovm.vmm import VM, ExitCode, ExitReason

    code = _uart_text(b"[ 1.0] Kernel panic - not syncing: test panic\n---[ end Kernel panic ]---\n")
    code += rawelf.out8(layout.I8042_COMMAND_PORT, 0xFE) + rawelf.JMP_SELF
    kernel = rawelf.make_elf(code, tmp_path / "panic.elf")
    with VM(kernel=kernel, memory="32M") as vm:
        result = vm.wait(20)
    assert result.reason is ExitReason.PANIC and result.exit_code == ExitCode.PANIC
    assert "test panic" in result.message
    assert "end Kernel panic" in vm.console.text


@needs_kvm
def test_panic_without_reset_ends_after_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyrovm import console, vmm

    monkeypatch.setattr(console, "PANIC_GRACE", 0.5)
    code = _uart_text(b"Kernel panic - not syncing: hang\n") + rawelf.JMP_SELF
    kernel = rawelf.make_elf(code, tmp_path / "panic.elf")
    with vmm.VM(kernel=kernel, memory="32M") as vm:
        result = vm.wait(20)
    assert result.reason is vmm.ExitReason.PANIC
