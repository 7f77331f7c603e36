"""One class per KVM file descriptor: :class:`Kvm` (``/dev/kvm``), :class:`Vm`, :class:`Vcpu`."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pyrovm.errors import HostError, PyrovmError

from . import constants as c
from . import exits as e
from . import structs as s

_IO = struct.Struct("<BBHIQ")  # kvm_run.io at offset 32
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio at offset 32
_U32 = struct.Struct("<I")
_EXIT_OFFSET = s.kvm_run.exit.offset
_REASON_OFFSET = s.kvm_run.exit_reason.offset
_IMMEDIATE_EXIT_OFFSET = s.kvm_run.immediate_exit.offset


class KvmError(PyrovmError, OSError):
    """A KVM ioctl failed."""


class KvmUnavailable(HostError):
    """``/dev/kvm`` is missing, not accessible, or too old."""


class KvmCapabilityError(HostError):
    """The host KVM lacks a capability pyrovm needs."""


#: The KVM device pyrovm opens unless told otherwise.
DEFAULT_KVM_DEVICE = "/dev/kvm"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def _ioctl_ulong(fd: int, request: int, arg: int, what: str) -> int:
    """An ioctl whose argument is an unsigned long value (fcntl.ioctl takes only a C int)."""
    while True:
        ret = _libc.ioctl(fd, request, arg)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise KvmError(err, f"{what}: {os.strerror(err)}")


def _ioctl_plain(fd: int, request: int, arg: object = 0, what: str = "") -> int:
    """``ioctl(2)`` on a KVM fd; a call a signal interrupted (EINTR, e.g. ``KVM_CREATE_VM`` while the
    process gets SIGUSR1) is made again; any other failure is a :class:`KvmError`.  (``KVM_RUN`` has its
    own path: there EINTR is the kick.)"""
    if isinstance(arg, int) and arg > 0x7FFFFFFF:
        return _ioctl_ulong(fd, request, arg, what)
    while True:
        try:
            return fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload, no-any-return]
        except InterruptedError:
            continue
        except OSError as exc:
            raise KvmError(exc.errno, f"{what or hex(request)}: {os.strerror(exc.errno or 0)}") from exc


class IoctlTracer(Protocol):
    """What :func:`set_tracer` takes (``pyrovm.trace.Recorder``): it sees every KVM call pyrovm makes."""

    def wrap_ioctl(self, ioctl: Callable[[int, int, object, str], int]) -> Callable[..., int]: ...

    def opened(self, fd: int, path: str) -> None: ...

    def vcpu_created(self, vcpu: Vcpu) -> None: ...


#: every ioctl but KVM_RUN goes through this name (a tracer replaces it, see :func:`set_tracer`)
_ioctl: Callable[..., int] = _ioctl_plain
_tracer: IoctlTracer | None = None


def set_tracer(tracer: IoctlTracer | None) -> None:
    """Record every KVM call from now on with *tracer* (None: stop).  Costs nothing when off: the
    ioctls then go straight to the kernel, and only vCPUs created while a tracer is set have their
    ``KVM_RUN`` wrapped."""
    global _ioctl, _tracer
    _tracer = tracer
    _ioctl = _ioctl_plain if tracer is None else tracer.wrap_ioctl(_ioctl_plain)


def is_pvm_host() -> bool:
    """True when the host's KVM is PVM (a KVM without VT-x/AMD-V, guest CPL0 emulated)."""
    return Path("/sys/module/kvm_pvm").exists()


class Kvm:
    """The KVM system file descriptor."""

    def __init__(self, path: str | None = None) -> None:
        """Open *path* (default ``/dev/kvm``)."""
        path = path or DEFAULT_KVM_DEVICE
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or enable nested "
                "virtualization)"
            ) from exc
        except PermissionError as exc:
            raise KvmUnavailable(
                f"{path} is not readable and writable by this user: add the user to the 'kvm' group "
                f"(sudo usermod -aG kvm $USER) or run as root"
            ) from exc
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from exc
        if _tracer is not None:
            _tracer.opened(self.fd, path)
        try:
            version = _ioctl(self.fd, c.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        except KvmError as exc:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device (KVM_GET_API_VERSION failed)") from exc
        if version != 12:
            os.close(self.fd)
            raise KvmUnavailable(f"{path}: KVM API version {version}, pyrovm needs 12")
        self.api_version = version
        self.vcpu_mmap_size = _ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, else a capability-specific positive value."""
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def missing_capabilities(self, caps: tuple[int, ...] = c.REQUIRED_CAPS) -> list[str]:
        """Names of the capabilities in *caps* this host lacks."""
        return [c.CAP_NAMES.get(cap, str(cap)) for cap in caps if self.check_extension(cap) <= 0]

    def require(self, caps: tuple[int, ...] = c.REQUIRED_CAPS) -> None:
        """Raise :class:`KvmCapabilityError` naming every missing capability."""
        missing = self.missing_capabilities(caps)
        if missing:
            raise KvmCapabilityError(f"{self.path} lacks KVM capabilities pyrovm needs: {', '.join(missing)}")

    def max_vcpus(self) -> int:
        return self.check_extension(c.KVM_CAP_MAX_VCPUS) or self.check_extension(c.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID entries this host can give a guest."""
        n = 128
        while True:
            buf = s.cpuid2_type(n)()
            buf.nent = n
            try:
                _ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [buf.entries[i] for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``."""
        n = 512
        while True:
            buf = s.msr_list_type(n)()
            buf.nmsrs = n
            try:
                _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 8192:
                    n *= 4
                    continue
                raise
            return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, c.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and a local APIC per vCPU (create before the vCPUs)."""
        _ioctl(self.fd, c.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = c.KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254 PIT."""
        _ioctl(self.fd, c.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI *irq* to *level* on the in-kernel irqchip."""
        _ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(irq, int(level)), "KVM_IRQ_LINE")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Have KVM signal eventfd *fd* on a guest write to *addr* instead of exiting to user space."""
        flags = (c.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (c.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, c.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    def coalesce(self, addr: int, length: int, pio: bool = False, deassign: bool = False) -> None:
        """Have KVM queue guest writes to *addr* .. *addr*+*length* in the coalesced ring instead of
        exiting (see :mod:`pyrovm.kvm.coalesced`); *deassign*: exit for them again."""
        zone = s.kvm_coalesced_mmio_zone(addr=addr, size=length, pio=int(pio))
        request = c.KVM_UNREGISTER_COALESCED_MMIO if deassign else c.KVM_REGISTER_COALESCED_MMIO
        _ioctl(
            self.fd,
            request,
            zone,
            "KVM_UNREGISTER_COALESCED_MMIO" if deassign else "KVM_REGISTER_COALESCED_MMIO",
        )

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Have a write to eventfd *fd* inject an edge on GSI *gsi*."""
        req = s.kvm_irqfd(fd=fd, gsi=gsi, flags=c.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, c.KVM_IRQFD, req, "KVM_IRQFD")

    def get_clock(self) -> s.kvm_clock_data:
        data = s.kvm_clock_data()
        _ioctl(self.fd, c.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data

    def set_clock(self, clock: int, flags: int = 0, realtime: int = 0) -> None:
        """Set kvmclock to *clock* ns; with ``KVM_CLOCK_REALTIME`` in *flags*, KVM adds the host wall time
        elapsed since *realtime* (ns since the epoch, from :meth:`get_clock`)."""
        data = s.kvm_clock_data(clock=clock, flags=flags, realtime=realtime)
        _ioctl(self.fd, c.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """The state of the in-kernel PIC master (0), PIC slave (1) or IOAPIC (2)."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, c.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, c.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> s.kvm_pit_state2:
        pit = s.kvm_pit_state2()
        _ioctl(self.fd, c.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        return pit

    def set_pit2(self, pit: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, c.KVM_SET_PIT2, pit, "KVM_SET_PIT2")

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The bitmap (one bit per page, little-endian 64-bit words) of memory slot *slot*'s pages written
        since the last call (the slot must have been registered with ``KVM_MEM_LOG_DIRTY_PAGES``)."""
        words = (pages + 63) // 64
        bitmap = (ctypes.c_uint64 * max(words, 1))()
        log = s.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self.fd, c.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bytes(bitmap)[: (pages + 7) // 8]

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, vcpu_id, fd)
        self.vcpus.append(vcpu)
        if _tracer is not None:
            _tracer.vcpu_created(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = s.kvm_run.from_buffer(self._mm)
        self._io_out = e.IoOut()
        self._io_in = e.IoIn()
        self._mmio_write = e.MmioWrite()
        self._mmio_read = e.MmioRead()
        self._io_data_offset = 0

    # -- KVM_RUN -------------------------------------------------------------------------------------
    def run(self) -> e.VcpuExit:
        """Enter the guest until the next exit (the GIL is released meanwhile)."""
        try:
            fcntl.ioctl(self.fd, c.KVM_RUN, 0)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                self._mm[_IMMEDIATE_EXIT_OFFSET] = 0
                return e.INTERRUPTED
            raise KvmError(exc.errno, f"KVM_RUN on vCPU {self.id}: {os.strerror(exc.errno or 0)}") from exc
        mm = self._mm
        reason = _U32.unpack_from(mm, _REASON_OFFSET)[0]
        if reason == c.KVM_EXIT_IO:
            direction, size, port, count, offset = _IO.unpack_from(mm, _EXIT_OFFSET)
            if direction == c.KVM_EXIT_IO_OUT:
                out = self._io_out
                out.port, out.size, out.count = port, size, count
                out.data = mm[offset : offset + size * count]
                return out
            inp = self._io_in
            inp.port, inp.size, inp.count = port, size, count
            self._io_data_offset = offset
            return inp
        if reason == c.KVM_EXIT_MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(mm, _EXIT_OFFSET)
            if is_write:
                w = self._mmio_write
                w.addr, w.data = addr, data[:length]
                return w
            r = self._mmio_read
            r.addr, r.length = addr, length
            return r
        return self._rare_exit(reason)

    def _rare_exit(self, reason: int) -> e.VcpuExit:
        ex = self.run_struct.exit
        if reason == c.KVM_EXIT_HLT:
            return e.HLT
        if reason == c.KVM_EXIT_SHUTDOWN:
            return e.SHUTDOWN
        if reason == c.KVM_EXIT_INTR:
            return e.INTERRUPTED
        if reason == c.KVM_EXIT_FAIL_ENTRY:
            return e.FailEntry(ex.fail_entry.hardware_entry_failure_reason, ex.fail_entry.cpu)
        if reason == c.KVM_EXIT_INTERNAL_ERROR:
            n = min(ex.internal.ndata, 16)
            return e.InternalError(ex.internal.suberror, tuple(ex.internal.data[:n]))
        if reason == c.KVM_EXIT_SYSTEM_EVENT:
            n = min(ex.system_event.ndata, 16)
            return e.SystemEvent(ex.system_event.type, tuple(ex.system_event.data[:n]))
        return e.UnhandledExit(reason)

    def complete_io_in(self, data: bytes) -> None:
        """Give the guest the bytes of the pending :class:`~pyrovm.kvm.exits.IoIn`."""
        off = self._io_data_offset
        self._mm[off : off + len(data)] = data

    def complete_mmio_read(self, data: bytes) -> None:
        """Give the guest the bytes of the pending :class:`~pyrovm.kvm.exits.MmioRead`."""
        base = _EXIT_OFFSET + 8
        self._mm[base : base + len(data)] = data

    def request_immediate_exit(self) -> None:
        """Make the current or next ``KVM_RUN`` return at once (pair with a signal to kick)."""
        self._mm[_IMMEDIATE_EXIT_OFFSET] = 1

    # -- state ---------------------------------------------------------------------------------------
    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        _ioctl(self.fd, c.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, c.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        _ioctl(self.fd, c.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        _ioctl(self.fd, c.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        _ioctl(self.fd, c.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_cpuid2(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        buf = s.cpuid2_type(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self.fd, c.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = s.msrs_type(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = _ioctl(self.fd, c.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Set MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        buf = s.msrs_type(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        return _ioctl(self.fd, c.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_lapic(self) -> s.kvm_lapic_state:
        lapic = s.kvm_lapic_state()
        _ioctl(self.fd, c.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, c.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        st = s.kvm_mp_state()
        _ioctl(self.fd, c.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return int(st.mp_state)

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_cpuid2(self, max_entries: int = 256) -> list[s.kvm_cpuid_entry2]:
        """The CPUID entries set on this vCPU."""
        buf = s.cpuid2_type(max_entries)()
        buf.nent = max_entries
        _ioctl(self.fd, c.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [s.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_xsave(self) -> s.kvm_xsave:
        xsave = s.kvm_xsave()
        _ioctl(self.fd, c.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")
        return xsave

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        _ioctl(self.fd, c.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> s.kvm_xcrs:
        xcrs = s.kvm_xcrs()
        _ioctl(self.fd, c.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        _ioctl(self.fd, c.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_debugregs(self) -> s.kvm_debugregs:
        regs = s.kvm_debugregs()
        _ioctl(self.fd, c.KVM_GET_DEBUGREGS, regs, "KVM_GET_DEBUGREGS")
        return regs

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        _ioctl(self.fd, c.KVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS")

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        _ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, c.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self.fd, c.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock that the vCPU was stopped (no soft-lockup warning on resume)."""
        _ioctl(self.fd, c.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    def translate(self, linear_address: int) -> int | None:
        """Guest physical address of *linear_address* under the vCPU's current paging, or None."""
        tr = s.kvm_translation(linear_address=linear_address)
        try:
            _ioctl(self.fd, c.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        except KvmError:
            return None
        return int(tr.physical_address) if tr.valid else None

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            try:
                self._mm.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1
