"""The KVM state of an x86 VM and of its vCPUs, as snapshots save and restore it.

Each structure is kept as the kernel's own bytes (``bytes(struct)``), so a snapshot holds exactly what KVM
gave and gives it back unchanged.  The order of the calls follows what KVM needs (the same as Firecracker's
``vstate``): save MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC, TSC
frequency, CPUID, MSRs, events; restore CPUID first (it decides which MSRs and XSAVE parts are valid), then
MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs (TSC before the TSC
deadline, both after the LAPIC), events, and tell kvmclock the vCPU was stopped.  VM-wide: the PIT, the
kvmclock and the PIC master, PIC slave and IOAPIC.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import TypeVar

from ... import kvm as k
from ...errors import SnapshotError
from ...kvm import constants as c
from ...kvm import structs as s
from . import msrs as m

MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_TSC_AUX = 0xC0000103
MSR_IA32_APICBASE = 0x1B
#: KVM's own MSR ranges (kvmclock, async page faults, steal time, PV EOI...).
KVM_MSR_RANGES = ((0x11, 0x12), (0x4B564D00, 0x4B564DFF))

#: MSRs saved besides KVM's range, when the host lists them or can read them (sregs hold EFER, the
#: segment bases, CR8 and the APIC base).
SAVED_MSRS = (
    m.MSR_IA32_TSC,
    m.MSR_IA32_SYSENTER_CS,
    m.MSR_IA32_SYSENTER_ESP,
    m.MSR_IA32_SYSENTER_EIP,
    m.MSR_STAR,
    m.MSR_LSTAR,
    m.MSR_CSTAR,
    m.MSR_SYSCALL_MASK,
    m.MSR_KERNEL_GS_BASE,
    MSR_IA32_TSC_AUX,
    m.MSR_IA32_MISC_ENABLE,
    m.MSR_MTRR_DEF_TYPE,
    0x277,  # PAT
    0x3A,  # FEATURE_CONTROL
    0x10A,  # ARCH_CAPABILITIES
    0x48,  # SPEC_CTRL
    MSR_IA32_TSC_DEADLINE,
)


class StateSizeError(SnapshotError):
    """A saved structure does not have the size of the kernel's."""


_S = TypeVar("_S", bound=ctypes.Structure)


def _load(cls: type[_S], data: bytes, what: str) -> _S:
    if len(data) != ctypes.sizeof(cls):
        raise StateSizeError(f"{what}: {len(data)} bytes, KVM's structure has {ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)


@dataclass
class VcpuState:
    """One vCPU, as KVM reports it (the structures as bytes; MSRs as (index, value) pairs in the order
    they are restored)."""

    id: int = 0
    mp_state: int = 0
    regs: bytes = b""
    sregs: bytes = b""
    xsave: bytes = b""
    xcrs: bytes = b""
    debugregs: bytes = b""
    lapic: bytes = b""
    tsc_khz: int = 0
    cpuid: list[bytes] = field(default_factory=list)
    msrs: list[tuple[int, int]] = field(default_factory=list)
    events: bytes = b""


@dataclass
class VmState:
    """The VM-wide in-kernel devices and clock."""

    pic_master: bytes = b""
    pic_slave: bytes = b""
    ioapic: bytes = b""
    pit: bytes = b""
    clock: int = 0
    clock_flags: int = 0
    clock_realtime: int = 0


def msr_indices(kvm: k.Kvm) -> list[int]:
    """The MSRs a snapshot saves on this host: :data:`SAVED_MSRS` and KVM's ranges, where the host's
    ``KVM_GET_MSR_INDEX_LIST`` has them (TSC first and TSC deadline last: the restore order)."""
    listed = set(kvm.msr_index_list())
    wanted = [
        i for i in SAVED_MSRS if (i in listed or i == m.MSR_MTRR_DEF_TYPE) and i != MSR_IA32_TSC_DEADLINE
    ]
    wanted += sorted(i for i in listed if any(lo <= i <= hi for lo, hi in KVM_MSR_RANGES))
    if MSR_IA32_TSC_DEADLINE in listed:
        wanted.append(MSR_IA32_TSC_DEADLINE)
    return wanted


def _read_msrs(vcpu: k.Vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """Every MSR of *indices* KVM can read (``KVM_GET_MSRS`` stops at the first it cannot: that one is
    skipped and the rest read again)."""
    out: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        out += [(i, got[i]) for i in rest if i in got]
        rest = rest[len(got) + 1 :]
    return out


def save_vcpu(vcpu: k.Vcpu, indices: list[int]) -> VcpuState:
    """The state of a vCPU that is out of ``KVM_RUN`` (paused)."""
    msrs = _read_msrs(vcpu, indices)
    return VcpuState(
        id=vcpu.id,
        mp_state=vcpu.get_mp_state(),
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        xsave=bytes(vcpu.get_xsave()),
        xcrs=bytes(vcpu.get_xcrs()),
        debugregs=bytes(vcpu.get_debugregs()),
        lapic=bytes(vcpu.get_lapic()),
        tsc_khz=vcpu.get_tsc_khz(),
        cpuid=[bytes(e) for e in vcpu.get_cpuid2()],
        msrs=msrs,
        events=bytes(vcpu.get_vcpu_events()),
    )


def check_vcpu_state(state: VcpuState) -> None:
    """Raise :class:`StateSizeError` when a structure of *state* cannot be KVM's (before any VM exists)."""
    _load(s.kvm_regs, state.regs, "regs")
    _load(s.kvm_sregs, state.sregs, "sregs")
    _load(s.kvm_xsave, state.xsave, "xsave")
    _load(s.kvm_xcrs, state.xcrs, "xcrs")
    _load(s.kvm_debugregs, state.debugregs, "debugregs")
    _load(s.kvm_lapic_state, state.lapic, "lapic")
    _load(s.kvm_vcpu_events, state.events, "vcpu events")
    for entry in state.cpuid:
        _load(s.kvm_cpuid_entry2, entry, "CPUID entry")
    if not state.cpuid:
        raise StateSizeError("no CPUID entries")


def restore_vcpu(vcpu: k.Vcpu, state: VcpuState) -> None:
    """Load *state* into a new vCPU of a VM whose irqchip exists (see the module's order)."""
    vcpu.set_cpuid2([_load(s.kvm_cpuid_entry2, e, "CPUID entry") for e in state.cpuid])
    if state.tsc_khz and state.tsc_khz != vcpu.get_tsc_khz():
        vcpu.set_tsc_khz(state.tsc_khz)  # KvmError without TSC scaling: the caller says so
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(_load(s.kvm_regs, state.regs, "regs"))
    vcpu.set_sregs(_load(s.kvm_sregs, state.sregs, "sregs"))
    vcpu.set_xsave(_load(s.kvm_xsave, state.xsave, "xsave"))
    vcpu.set_xcrs(_load(s.kvm_xcrs, state.xcrs, "xcrs"))
    vcpu.set_debugregs(_load(s.kvm_debugregs, state.debugregs, "debugregs"))
    vcpu.set_lapic(_load(s.kvm_lapic_state, state.lapic, "lapic"))
    msrs = dict(state.msrs)
    if msrs.get(MSR_IA32_TSC_DEADLINE) == 0 and m.MSR_IA32_TSC in msrs:
        msrs[MSR_IA32_TSC_DEADLINE] = msrs[m.MSR_IA32_TSC]  # as Firecracker: a 0 deadline is the TSC's
    done = vcpu.set_msrs(msrs) if msrs else 0
    if done != len(msrs):
        index = list(msrs)[done]
        raise k.KvmError(errno.EINVAL, f"KVM_SET_MSRS: this host refused MSR {index:#x}")
    vcpu.set_vcpu_events(_load(s.kvm_vcpu_events, state.events, "vcpu events"))
    try:
        vcpu.kvmclock_ctrl()
    except k.KvmError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the guest does not use kvmclock
            raise


def save_vm(vm: k.Vm) -> VmState:
    """The PIC, IOAPIC, PIT and kvmclock of a paused VM."""
    clock = vm.get_clock()
    return VmState(
        pic_master=bytes(vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=bytes(vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=bytes(vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)),
        pit=bytes(vm.get_pit2()),
        clock=int(clock.clock),
        clock_flags=int(clock.flags),
        clock_realtime=int(clock.realtime),
    )


def check_vm_state(state: VmState) -> None:
    for name in ("pic_master", "pic_slave", "ioapic"):
        _load(s.kvm_irqchip, getattr(state, name), name)
    _load(s.kvm_pit_state2, state.pit, "pit")


def restore_vm(vm: k.Vm, state: VmState, clock_realtime: bool = False) -> None:
    """Load *state* into a new VM (irqchip and PIT created, before its vCPUs are restored).  The kvmclock
    continues from the saved value (the guest sees no time pass); with *clock_realtime* KVM adds the host
    wall time elapsed since the snapshot (when the snapshot's host could report it)."""
    vm.set_pit2(_load(s.kvm_pit_state2, state.pit, "pit"))
    if clock_realtime and state.clock_flags & c.KVM_CLOCK_REALTIME:
        vm.set_clock(state.clock, c.KVM_CLOCK_REALTIME, state.clock_realtime)
    else:
        vm.set_clock(state.clock)
    for name, chip_id in (
        ("pic_master", s.KVM_IRQCHIP_PIC_MASTER),
        ("pic_slave", s.KVM_IRQCHIP_PIC_SLAVE),
        ("ioapic", s.KVM_IRQCHIP_IOAPIC),
    ):
        chip = _load(s.kvm_irqchip, getattr(state, name), name)
        if chip.chip_id != chip_id:
            raise StateSizeError(f"{name}: chip id {chip.chip_id}, expected {chip_id}")
        vm.set_irqchip(chip)
