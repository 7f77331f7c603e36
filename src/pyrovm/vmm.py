"""A running VM: KVM objects, guest memory, devices, one thread per vCPU, and how it ends.

:class:`VM` is the public entry point::

    with pyrovm.VM(kernel="guest.elf", memory="128M", cpus=2, cmdline="test=hello") as vm:
        result = vm.wait(timeout=10)
    print(result.reason, result.exit_code, vm.console.text)
"""

from __future__ import annotations

import enum
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import host
from . import kvm as k
from .arch.x86 import bootparams, cpuid, layout, mptable, regs
from .console import ConsoleLog
from .devices.boot_timer import BootTimer
from .devices.bus import Bus
from .devices.debug_exit import DebugExit
from .devices.i8042 import I8042
from .devices.rtc import Rtc
from .devices.serial import Serial
from .devices.virtio import BlockError
from .devmgr import DeviceConfigError, DiskSpec, VirtioManager
from .kvm import exits as ex
from .loader import KernelLoadError
from .loader.bzimage import check_cmdline, is_bzimage, load_bzimage
from .loader.elf import is_elf, load_elf
from .memory import GuestMemory

log = logging.getLogger(__name__)

#: Signal used to kick a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN + 1
MIN_MEMORY = 8 << 20
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"
HALT_POLL_INTERVAL = 0.5
#: A Linux panic line on the console; the VM ends with ExitReason.PANIC when the guest then resets or
#: stops, or PANIC_GRACE seconds later (the rest of the panic report is kept in the console log).
PANIC_RE = re.compile(rb"Kernel panic - not syncing")
PANIC_GRACE = 10.0
#: Console lines longer than this are scanned in pieces.
LINE_LIMIT = 4096
RFLAGS_IF = 1 << 9


class ConfigError(ValueError):
    """Bad input: the VM cannot be built as asked."""


class ExitReason(enum.Enum):
    """Why a VM ended."""

    EXIT_PORT = "exit-port"  # the guest wrote its status to the exit port (0xf4)
    RESET = "reset"  # reset through the i8042 or a KVM reset event (Linux reboot=k)
    POWEROFF = "poweroff"  # KVM shutdown system event
    HALTED = "halted"  # every vCPU halted with interrupts disabled
    STOPPED = "stopped"  # the host called stop()
    TIMEOUT = "timeout"  # the host's time limit ran out
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN
    INTERNAL_ERROR = "internal-error"  # KVM could not go on (e.g. emulation failure)
    FAIL_ENTRY = "fail-entry"  # KVM could not enter the guest
    PANIC = "panic"  # the guest kernel panicked (seen on its console)
    VMM_ERROR = "vmm-error"  # a bug or I/O error in pyrovm itself


class ExitCode(enum.IntEnum):
    """Exit statuses of ``pyrovm run`` other than the exit port's ``(v << 1) | 1`` (always odd)."""

    OK = 0
    BAD_INPUT = 2
    CRASH = 4
    PANIC = 6
    TIMEOUT = 124
    INTERRUPTED = 130


_CODES = {
    ExitReason.RESET: ExitCode.OK,
    ExitReason.POWEROFF: ExitCode.OK,
    ExitReason.HALTED: ExitCode.OK,
    ExitReason.STOPPED: ExitCode.OK,
    ExitReason.TIMEOUT: ExitCode.TIMEOUT,
    ExitReason.PANIC: ExitCode.PANIC,
    ExitReason.TRIPLE_FAULT: ExitCode.CRASH,
    ExitReason.INTERNAL_ERROR: ExitCode.CRASH,
    ExitReason.FAIL_ENTRY: ExitCode.CRASH,
    ExitReason.VMM_ERROR: ExitCode.CRASH,
}


@dataclass
class VmExit:
    """How the VM ended."""

    reason: ExitReason
    exit_code: int
    guest_status: int | None = None  # value written to the exit port
    message: str = ""
    vcpu: int | None = None
    registers: dict[str, int] | None = None
    code_bytes: bytes | None = None  # bytes at the faulting RIP, when they could be read

    @property
    def crashed(self) -> bool:
        return self.exit_code == ExitCode.CRASH

    def describe(self) -> str:
        """A human-readable report (several lines when registers are known)."""
        text = f"{self.reason.value}: {self.message}" if self.message else self.reason.value
        if self.registers:
            r = self.registers
            names = [n for n in r if n not in ("cr0", "cr2", "cr3", "cr4", "efer")]
            rows = [" ".join(f"{n}={r[n]:#018x}" for n in names[i : i + 4]) for i in range(0, len(names), 4)]
            rows.append(" ".join(f"{n}={r[n]:#x}" for n in ("cr0", "cr2", "cr3", "cr4", "efer") if n in r))
            text += f"\n  vCPU {self.vcpu} registers:\n    " + "\n    ".join(rows)
        if self.code_bytes is not None:
            text += f"\n  code at rip: {self.code_bytes.hex(' ')}"
        elif self.registers:
            text += "\n  code at rip: not in guest RAM"
        return text


@dataclass
class VcpuStats:
    exits: int = 0
    io: int = 0
    mmio: int = 0
    interrupted: int = 0


def parse_size(value: str | int, what: str = "memory") -> int:
    """``"128M"``, ``"1G"``, ``"512K"``, ``"4096B"`` → bytes; a bare number (or an int) is MiB, as in QEMU."""
    if isinstance(value, int):
        return value << 20
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what} size {value!r} is not a size like 128M, 1G or 512K")
    n = int(m.group(1))
    unit = m.group(2).upper()
    if not unit:
        return n if (m.group(3) or "").upper() == "B" else n << 20
    return n << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _noop_handler(signum: int, frame: object) -> None:
    pass


def install_kick_handler() -> None:
    """Install the (no-op) handler of :data:`KICK_SIGNAL`; must run in the main thread once."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, _noop_handler)


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


def _disk_spec(spec: str | DiskSpec) -> DiskSpec:
    if isinstance(spec, DiskSpec):
        return spec
    try:
        return DiskSpec.parse(spec)
    except DeviceConfigError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class VmConfig:
    kernel: Path
    memory: int = 128 << 20
    cpus: int = 1
    cmdline: str = DEFAULT_CMDLINE
    initrd: Path | None = None
    boot: str = "auto"  # auto | pvh | linux64
    cpu_vendor: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    rootfs: DiskSpec | None = None
    rng: bool = False
    rng_rate: int | None = None
    host_workarounds: bool = True
    boot_marker: str | None = None


class VM:
    """A virtual machine.  Build it, :meth:`start` it, :meth:`wait` for it, read :attr:`console`."""

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        memory: str | int = "128M",
        cpus: int = 1,
        cmdline: str | None = None,
        initrd: str | os.PathLike[str] | None = None,
        console: str | BinaryIO | None = None,
        boot: str = "auto",
        kvm_path: str | None = None,
        cpu_vendor: str | None = None,
        disks: Sequence[str | DiskSpec] = (),
        rootfs: str | DiskSpec | None = None,
        rng: bool = False,
        rng_rate: int | None = None,
        host_workarounds: bool = True,
        boot_marker: str | None = None,
    ) -> None:
        """Check the configuration and build the VM (nothing runs until :meth:`start`).

        *console*: None (kept in memory only), ``"stdio"`` (also to this process's stdout), ``"file:PATH"``
        or a binary file object.  *disks*: virtio-blk images (``PATH[,ro][,serial=ID]`` or
        :class:`DiskSpec`), the first is ``/dev/vda``; *rootfs*: a disk put first and booted as the root
        (``root=/dev/vda rw`` is added unless the command line names a root); *rng*: a virtio-rng device,
        *rng_rate* its byte-rate limit.  Bad input raises :class:`ConfigError`, :class:`KernelLoadError`,
        or :class:`pyrovm.kvm.KvmUnavailable`.

        *host_workarounds*: on a PVM host, boot Linux kernels with the command-line options and CPU vendor
        they need there (see :mod:`pyrovm.host`); never applied elsewhere or to non-Linux kernels.
        *boot_marker*: a regular expression; the first console line matching it sets
        :attr:`boot_marker_at` (``time.monotonic()``).  The first write of 123 to the boot-timer device
        (:mod:`pyrovm.devices.boot_timer`) sets :attr:`boot_timer_at`.  A console line with
        ``Kernel panic - not syncing`` ends the VM with :attr:`ExitReason.PANIC` (when the guest then
        resets, or 10 s later).
        """
        self.config = VmConfig(
            kernel=Path(kernel),
            memory=parse_size(memory),
            cpus=cpus,
            cmdline=DEFAULT_CMDLINE if cmdline is None else cmdline,
            initrd=Path(initrd) if initrd is not None else None,
            boot=boot,
            cpu_vendor=cpu_vendor,
            disks=[_disk_spec(d) for d in disks],
            rootfs=None if rootfs is None else _disk_spec(rootfs),
            rng=rng or rng_rate is not None,
            rng_rate=rng_rate,
            host_workarounds=host_workarounds,
            boot_marker=boot_marker,
        )
        self._validate()
        try:
            self._boot_marker_re = re.compile(boot_marker.encode()) if boot_marker else None
        except re.error as exc:
            raise ConfigError(f"boot marker {boot_marker!r}: not a regular expression ({exc})") from None
        self._kernel_data = self._read_kernel()
        self.host_workarounds_applied = self._apply_host_workarounds()
        self.boot_marker_at: float | None = None
        self.boot_timer_at: float | None = None
        #: callables (time, line) and (time,), called from a vCPU thread
        self.on_boot_marker: list[Callable[[float, str], object]] = []
        self.on_boot_timer: list[Callable[[float], object]] = []
        self.panic_message: str | None = None
        self._line = bytearray()
        self._panic_timer: threading.Timer | None = None
        self._console_file: BinaryIO | None = None
        self.console = ConsoleLog(self._open_console(console))
        self._lock = threading.Lock()
        self._closed_device_metrics: dict[str, dict[str, int]] = {}
        self._exit: VmExit | None = None
        self._done = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._poll_seq = 0
        self._halted: list[bool] = []
        self.stats: list[VcpuStats] = []
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._build(kvm_path)

    # -- configuration -------------------------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.config
        if not cfg.kernel.exists():
            raise ConfigError(f"kernel {cfg.kernel}: no such file")
        if not cfg.kernel.is_file():
            raise ConfigError(f"kernel {cfg.kernel}: not a regular file")
        if not os.access(cfg.kernel, os.R_OK):
            raise ConfigError(f"kernel {cfg.kernel}: not readable")
        if cfg.initrd is not None and not (cfg.initrd.is_file() and os.access(cfg.initrd, os.R_OK)):
            raise ConfigError(f"initrd {cfg.initrd}: no such readable file")
        if cfg.memory < MIN_MEMORY:
            raise ConfigError(f"memory {cfg.memory >> 20} MiB is too small: at least {MIN_MEMORY >> 20} MiB")
        if cfg.memory % 4096:
            raise ConfigError("memory size must be a multiple of 4 KiB")
        host = _host_memory()
        if cfg.memory > host:
            raise ConfigError(f"memory {cfg.memory >> 20} MiB is more than this host has ({host >> 20} MiB)")
        if not isinstance(cfg.cpus, int) or cfg.cpus < 1:
            raise ConfigError(f"cpus must be at least 1, not {cfg.cpus}")
        if cfg.cpus > 255:
            raise ConfigError(f"{cfg.cpus} vCPUs: at most 255 (8-bit APIC ids)")
        if cfg.boot not in ("auto", "pvh", "linux64"):
            raise ConfigError(f"boot mode {cfg.boot!r}: choose auto, pvh or linux64")
        if cfg.rng_rate is not None and cfg.rng_rate <= 0:
            raise ConfigError(f"rng rate {cfg.rng_rate}: must be a positive number of bytes per second")
        for d in ([cfg.rootfs] if cfg.rootfs else []) + cfg.disks:
            if not d.path.is_file():
                raise ConfigError(f"disk {d.path}: no such file")

    def _open_console(self, console: str | BinaryIO | None) -> BinaryIO | None:
        if console is None or console == "none":
            return None
        if console == "stdio":
            return sys.stdout.buffer
        if isinstance(console, str):
            if not console.startswith("file:"):
                raise ConfigError(f"console {console!r}: use stdio, none or file:PATH")
            path = console[5:]
            try:
                self._console_file = open(path, "wb")
            except OSError as exc:
                raise ConfigError(f"console file {path}: {exc.strerror}") from None
            return self._console_file
        return console

    # -- building --------------------------------------------------------------------------------------
    def _build(self, kvm_path: str | None) -> None:
        cfg = self.config
        self.kvm = k.Kvm(kvm_path)
        try:
            self.kvm.require()
            if cfg.cpus > self.kvm.max_vcpus():
                raise ConfigError(f"{cfg.cpus} vCPUs: this host's KVM allows at most {self.kvm.max_vcpus()}")
            self.vm = self.kvm.create_vm()
            self.vm.set_tss_addr(layout.TSS_ADDR)
            self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            self.memory = GuestMemory(layout.ram_layout(cfg.memory))
            for slot, region in enumerate(self.memory):
                self.vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)
            self._build_devices()
            self._build_virtio()
            self._build_vcpus()
            self._load()
        except BaseException:
            self.close()
            raise

    def _build_devices(self) -> None:
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        vm = self.vm
        self.serial = Serial(
            out=self._console_out, irq=lambda level: vm.irq_line(layout.UART_COM1_IRQ, level)
        )
        self.pio.register(layout.UART_COM1_PORT, 8, self.serial, "uart0")
        self.i8042 = I8042(on_reset=lambda: self._finish(ExitReason.RESET, "the guest reset the machine"))
        self.pio.register(layout.I8042_PORT, 5, self.i8042, "i8042")
        self.debug_exit = DebugExit(self._on_exit_port)
        self.pio.register(layout.EXIT_PORT, 4, self.debug_exit, "exit-port")
        self._build_platform_devices()

    def _build_platform_devices(self) -> None:
        """The CMOS RTC and the boot-timer device (the Linux platform)."""
        self.rtc = Rtc()
        self.pio.register(layout.RTC_PORT, 2, self.rtc, "rtc")
        self.boot_timer = BootTimer(self._on_boot_timer)
        self.mmio.register(layout.BOOT_TIMER_MMIO_ADDR, 8, self.boot_timer, "boot-timer")

    def _build_virtio(self) -> None:
        cfg = self.config
        self.virtio = VirtioManager(self.vm, self.memory, self.mmio)
        self._cmdline_extra: list[str] = []
        disks = ([cfg.rootfs] if cfg.rootfs else []) + cfg.disks
        try:
            for i, spec in enumerate(disks):
                self.virtio.add_disk(spec, i)
            if cfg.rng:
                self.virtio.add_rng(cfg.rng_rate)
        except (DeviceConfigError, BlockError) as exc:
            raise ConfigError(str(exc)) from None
        if self.virtio.slots:
            self._cmdline_extra.append(self.virtio.cmdline())
        if cfg.rootfs is not None and not re.search(r"(^|\s)root=", cfg.cmdline):
            self._cmdline_extra.append("root=/dev/vda " + ("ro" if cfg.rootfs.read_only else "rw"))

    @property
    def cmdline(self) -> str:
        """The kernel command line the guest gets (the configured one plus device announcements)."""
        return " ".join([self.config.cmdline, *self._cmdline_extra]).strip()

    def _build_vcpus(self) -> None:
        cfg = self.config
        supported = self.kvm.supported_cpuid()
        self.vcpus: list[k.Vcpu] = []
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid2(cpuid.vcpu_cpuid(supported, i, cfg.cpus, cfg.cpu_vendor))
            regs.setup_msrs(vcpu)
            regs.setup_fpu(vcpu)
            regs.setup_lapic(vcpu)
            self.vcpus.append(vcpu)
            self.stats.append(VcpuStats())
            self._halted.append(False)

    def _read_kernel(self) -> bytes:
        try:
            return self.config.kernel.read_bytes()
        except OSError as exc:
            raise ConfigError(f"kernel {self.config.kernel}: {exc.strerror}") from None

    def _apply_host_workarounds(self) -> bool:
        """On a PVM host, give a Linux kernel the command line and CPU vendor it needs there."""
        cfg = self.config
        if not host.workarounds_apply(self._kernel_data, cfg.host_workarounds):
            return False
        host.warn_once()
        cfg.cmdline = host.pvm_cmdline(cfg.cmdline)
        if cfg.cpu_vendor is None:
            cfg.cpu_vendor = host.PVM_CPU_VENDOR
        return True

    def _load(self) -> None:
        cfg = self.config
        data = self._kernel_data
        cmdline = self.cmdline.encode()
        e820 = bootparams.e820_map([(r.guest_addr, r.size) for r in self.memory])
        mptable.write(self.memory, cfg.cpus)
        if is_bzimage(data):
            if cfg.boot == "pvh":
                raise KernelLoadError(f"{cfg.kernel}: a bzImage has no PVH entry (boot the vmlinux for PVH)")
            bz = load_bzimage(self.memory, data, str(cfg.kernel))
            check_cmdline(bz.header, cmdline, str(cfg.kernel))
            cmdline_addr = bootparams.write_cmdline(self.memory, cmdline)
            initrd = self._load_initrd(bz.load_end, bz.header.initrd_addr_max)
            bootparams.write_zero_page(
                self.memory, e820, cmdline_addr, bz.header.cmdline_size, bz.header.setup_header, initrd
            )
            regs.setup_long_mode(self.vcpus[0], self.memory, bz.entry64)
            self.boot_mode = "bzimage"
            return
        if not is_elf(data):
            raise KernelLoadError(
                f"{cfg.kernel}: not a kernel pyrovm can boot (not an ELF with a PVH note "
                "or 64-bit entry, not a bzImage)"
            )
        kernel = load_elf(self.memory, data, str(cfg.kernel))
        cmdline_addr = bootparams.write_cmdline(self.memory, cmdline)
        initrd = self._load_initrd(kernel.load_end)
        boot = cfg.boot
        if boot == "auto":
            boot = "pvh" if kernel.pvh_entry is not None else "linux64"
        if boot == "pvh" and kernel.pvh_entry is None:
            raise KernelLoadError(f"{cfg.kernel}: no PVH entry note (use boot=linux64)")
        if boot == "pvh":
            assert kernel.pvh_entry is not None
            bootparams.write_pvh_start_info(self.memory, e820, cmdline_addr, initrd)
            regs.setup_pvh(self.vcpus[0], self.memory, kernel.pvh_entry)
        else:
            bootparams.write_zero_page(self.memory, e820, cmdline_addr, layout.CMDLINE_MAX_SIZE, None, initrd)
            regs.setup_long_mode(self.vcpus[0], self.memory, kernel.entry64)
        self.boot_mode = boot

    def _load_initrd(self, kernel_end: int, max_addr: int = 0xFFFFFFFF) -> tuple[int, int] | None:
        """Put the initrd at the top of low RAM, its last byte at or below *max_addr* (the kernel's
        ``initrd_addr_max``)."""
        path = self.config.initrd
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"initrd {path}: {exc.strerror}") from None
        top = min(self.memory.regions[0].end, max_addr + 1)
        addr = (top - len(data)) & ~(layout.INITRD_ALIGN - 1)
        if addr < kernel_end:
            raise ConfigError(
                f"initrd {path} ({len(data)} bytes) does not fit in guest memory between the kernel "
                f"(up to {kernel_end:#x}) and {top:#x}: give the VM more memory or use a smaller initrd"
            )
        self.memory.write(addr, data)
        return addr, len(data)

    # -- console watching ------------------------------------------------------------------------------
    def _console_out(self, data: bytes) -> None:
        """UART output: into the console log; whole lines also to :meth:`_on_console_line`."""
        self.console.write(data)
        line = self._line
        line += data
        if b"\n" in data or len(line) > LINE_LIMIT:
            self._line = bytearray()
            self._on_console_line(bytes(line))

    def _on_console_line(self, line: bytes) -> None:
        rx = self._boot_marker_re
        if rx is not None and self.boot_marker_at is None and rx.search(line):
            self.boot_marker_at = now = time.monotonic()
            for cb in self.on_boot_marker:
                cb(now, line.decode("utf-8", "replace").rstrip())
        if self.panic_message is None and PANIC_RE.search(line):
            self.panic_message = line.decode("utf-8", "replace").strip()
            timer = threading.Timer(PANIC_GRACE, self._finish, (ExitReason.PANIC, self.panic_message))
            timer.daemon = True
            self._panic_timer = timer
            timer.start()

    def _on_boot_timer(self, when: float) -> None:
        self.boot_timer_at = when
        for cb in self.on_boot_timer:
            cb(when)

    # -- running ---------------------------------------------------------------------------------------
    def start(self) -> VM:
        """Start the vCPU threads (returns at once)."""
        if self._threads:
            raise RuntimeError("VM already started")
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "pyrovm needs a handler for its vCPU kick signal: import pyrovm from the main thread "
                    "(or call pyrovm.vmm.install_kick_handler() there) before starting VMs in other threads"
                )
            install_kick_handler()
        self.started_at = time.monotonic()
        self.virtio.start()
        for i, vcpu in enumerate(self.vcpus):
            t = threading.Thread(target=self._vcpu_thread, args=(i, vcpu), name=f"vcpu{i}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        self._monitor = threading.Thread(target=self._monitor_thread, name="vm-monitor", daemon=True)
        self._monitor.start()
        return self

    def _vcpu_thread(self, index: int, vcpu: k.Vcpu) -> None:
        try:
            self._run_vcpu(index, vcpu)
        except Exception as exc:  # a bug in a device or in pyrovm: end the VM, report it
            log.exception("vCPU %d: VMM error", index)
            self._finish(ExitReason.VMM_ERROR, f"vCPU {index}: {type(exc).__name__}: {exc}")

    def _run_vcpu(self, index: int, vcpu: k.Vcpu) -> None:
        pio_write, pio_read = self.pio.write, self.pio.read
        mmio_write, mmio_read = self.mmio.write, self.mmio.read
        stats = self.stats[index]
        IoOut, IoIn, MmioWrite, MmioRead = ex.IoOut, ex.IoIn, ex.MmioWrite, ex.MmioRead
        seen_poll = 0
        run = vcpu.run
        while not self._stopping:
            e = run()
            stats.exits += 1
            t = type(e)
            if t is IoOut:
                stats.io += 1
                if e.count == 1:  # type: ignore[union-attr, arg-type]
                    pio_write(e.port, e.data)  # type: ignore[union-attr, arg-type]
                else:
                    size = e.size  # type: ignore[union-attr, arg-type]
                    for off in range(0, len(e.data), size):  # type: ignore[union-attr, arg-type]
                        pio_write(e.port, e.data[off : off + size])  # type: ignore[union-attr, arg-type]
            elif t is IoIn:
                stats.io += 1
                vcpu.complete_io_in(b"".join(pio_read(e.port, e.size) for _ in range(e.count)))  # type: ignore[union-attr, arg-type]
            elif t is MmioWrite:
                stats.mmio += 1
                mmio_write(e.addr, e.data)  # type: ignore[union-attr, arg-type]
            elif t is MmioRead:
                stats.mmio += 1
                vcpu.complete_mmio_read(mmio_read(e.addr, e.length))  # type: ignore[union-attr, arg-type]
            elif t is ex.Interrupted:
                stats.interrupted += 1
                if self._poll_seq != seen_poll and not self._stopping:
                    seen_poll = self._poll_seq
                    self._halted[index] = self._is_halted(vcpu)
            else:
                self._fatal_exit(index, vcpu, e)
                return

    def _is_halted(self, vcpu: k.Vcpu) -> bool:
        try:
            if vcpu.get_mp_state() != k.constants.KVM_MP_STATE_HALTED:
                return False
            return not vcpu.get_regs().rflags & RFLAGS_IF
        except k.KvmError:
            return False

    def _fatal_exit(self, index: int, vcpu: k.Vcpu, e: ex.VcpuExit) -> None:
        if isinstance(e, ex.Shutdown):
            self._finish(ExitReason.TRIPLE_FAULT, "triple fault (the vCPU shut down)", index, vcpu)
        elif isinstance(e, ex.InternalError):
            extra = f", data {' '.join(hex(d) for d in e.data)}" if e.data else ""
            self._finish(
                ExitReason.INTERNAL_ERROR, f"KVM internal error: {e.description}{extra}", index, vcpu
            )
        elif isinstance(e, ex.FailEntry):
            self._finish(
                ExitReason.FAIL_ENTRY,
                f"KVM could not enter the guest (hardware reason {e.hardware_entry_failure_reason:#x})",
                index,
                vcpu,
            )
        elif isinstance(e, ex.SystemEvent):
            if e.type == k.constants.KVM_SYSTEM_EVENT_RESET:
                self._finish(ExitReason.RESET, "the guest reset the machine")
            elif e.type == k.constants.KVM_SYSTEM_EVENT_SHUTDOWN:
                self._finish(ExitReason.POWEROFF, "the guest powered off")
            else:
                self._finish(ExitReason.INTERNAL_ERROR, f"guest crash event (type {e.type})", index, vcpu)
        elif isinstance(e, ex.Hlt):
            self._finish(ExitReason.HALTED, f"vCPU {index} halted")
        else:
            self._finish(ExitReason.INTERNAL_ERROR, f"unhandled KVM exit {e}", index, vcpu)

    def _monitor_thread(self) -> None:
        """Ask the vCPUs now and then whether they all sit in ``hlt`` with interrupts off."""
        while not self._done.wait(HALT_POLL_INTERVAL):
            if self._stopping:
                return
            if all(self._halted):
                self._finish(ExitReason.HALTED, "every vCPU halted with interrupts disabled")
                return
            self._poll_seq += 1
            self._kick_all()

    def _on_exit_port(self, value: int) -> None:
        self._finish(ExitReason.EXIT_PORT, f"the guest wrote {value} to the exit port", guest_status=value)

    def _finish(
        self,
        reason: ExitReason,
        message: str = "",
        vcpu_index: int | None = None,
        vcpu: k.Vcpu | None = None,
        guest_status: int | None = None,
    ) -> None:
        """Record why the VM ends (the first reason wins) and stop every vCPU."""
        with self._lock:
            if self._exit is not None:
                return
            if self.panic_message is not None and reason not in (
                ExitReason.PANIC,
                ExitReason.STOPPED,
                ExitReason.TIMEOUT,
                ExitReason.VMM_ERROR,
            ):
                # the guest panicked, then reset, halted or crashed: report the panic
                message = f"{self.panic_message} (then: {message or reason.value})"
                reason = ExitReason.PANIC
            if reason is ExitReason.EXIT_PORT and guest_status is not None:
                code = ((guest_status << 1) | 1) & 0xFF
            else:
                code = _CODES[reason]
            result = VmExit(reason, int(code), guest_status, message, vcpu_index)
            if vcpu is not None:
                result.registers, result.code_bytes = self._crash_state(vcpu)
            self._exit = result
            self._stopping = True
        self.ended_at = time.monotonic()
        if self._panic_timer is not None:
            self._panic_timer.cancel()
        self._kick_all()
        threading.Thread(target=self._reap, name="vm-reaper", daemon=True).start()

    def _crash_state(self, vcpu: k.Vcpu) -> tuple[dict[str, int] | None, bytes | None]:
        try:
            r = vcpu.get_regs()
            s = vcpu.get_sregs()
        except k.KvmError:
            return None, None
        names = [n for n, *_ in r._fields_]
        state = {n: int(getattr(r, n)) for n in names}
        state.update(cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, efer=s.efer)
        code = None
        linear = s.cs.base + r.rip
        gpa = vcpu.translate(linear) if s.cr0 & (1 << 31) else linear
        if gpa is not None and self.memory.contains(gpa, 16):
            code = self.memory.read(gpa, 16)
        return state, code

    def _kick_all(self) -> None:
        me = threading.get_ident()
        for vcpu, t in zip(self.vcpus, self._threads, strict=False):
            vcpu.request_immediate_exit()
            if t.ident is not None and t.ident != me and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def _reap(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            alive = [t for t in self._threads if t.is_alive() and t.ident != threading.get_ident()]
            if not alive or time.monotonic() > deadline:
                break
            self._kick_all()
            for t in alive:
                t.join(0.05)
        self.console.close()
        if self._console_file is not None:
            self._console_file.close()
        self._done.set()

    def stop(self, reason: ExitReason = ExitReason.STOPPED, message: str = "stopped by the host") -> VmExit:
        """End the VM from any thread; returns how it ended (another reason may have come first)."""
        self._finish(reason, message)
        self._done.wait(10)
        assert self._exit is not None
        return self._exit

    def wait(self, timeout: float | None = None) -> VmExit:
        """Block until the VM ends; on *timeout* stop it and return a ``timeout`` result."""
        if not self._threads:
            raise RuntimeError("VM not started")
        if not self._done.wait(timeout):
            self._finish(ExitReason.TIMEOUT, f"no exit within {timeout} s")
            self._done.wait(10)
        assert self._exit is not None
        return self._exit

    def run(self, timeout: float | None = None) -> VmExit:
        """:meth:`start` then :meth:`wait`."""
        return self.start().wait(timeout)

    @property
    def result(self) -> VmExit | None:
        """How the VM ended, or None while it runs."""
        return self._exit if self._done.is_set() else None

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._done.is_set()

    def send_input(self, data: bytes) -> None:
        """Type *data* on the serial console."""
        self.serial.receive(data)

    def exit_counts(self) -> dict[str, int]:
        """vCPU exits to user space, summed over vCPUs, by kind."""
        return {
            "exits": sum(s.exits for s in self.stats),
            "io": sum(s.io for s in self.stats),
            "mmio": sum(s.mmio for s in self.stats),
            "interrupted": sum(s.interrupted for s in self.stats),
        }

    def metrics(self) -> dict[str, object]:
        """Counters of the VM: how it ended, vCPU exits, and per-device requests/bytes/errors/interrupts."""
        result = self._exit if self._done.is_set() else None
        virtio = getattr(self, "virtio", None)
        return {
            "exit": None
            if result is None
            else {
                "reason": result.reason.value,
                "exit_code": result.exit_code,
                "guest_status": result.guest_status,
                "message": result.message,
            },
            "uptime_s": None
            if self.started_at is None
            else (self.ended_at or time.monotonic()) - self.started_at,
            "vcpus": [vars(s).copy() for s in self.stats],
            "vcpu_exits": self.exit_counts(),
            "devices": virtio.metrics() if virtio is not None else self._closed_device_metrics,
            "serial": {"tx_bytes": self.serial.state.tx_bytes} if hasattr(self, "serial") else {},
            "pio_unclaimed": self.pio.stats.unclaimed_reads + self.pio.stats.unclaimed_writes
            if hasattr(self, "pio")
            else 0,
            "mmio_unclaimed": self.mmio.stats.unclaimed_reads + self.mmio.stats.unclaimed_writes
            if hasattr(self, "mmio")
            else 0,
        }

    def close(self) -> None:
        """Stop if running and release KVM file descriptors, devices and guest memory."""
        if self._threads and not self._done.is_set():
            self.stop()
        if any(t.is_alive() for t in self._threads):
            log.error("vCPU threads still running: leaving the VM's file descriptors open")
            return
        virtio = getattr(self, "virtio", None)
        if virtio is not None:
            self._closed_device_metrics = virtio.metrics()  # metrics() still answers after close()
            virtio.close()
            self.virtio = None  # type: ignore[assignment]
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        mem = getattr(self, "memory", None)
        if mem is not None:
            mem.close()
        kvm = getattr(self, "kvm", None)
        if kvm is not None:
            kvm.close()

    def __enter__(self) -> VM:
        if not self._threads:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
