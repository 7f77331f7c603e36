"""The CPUID a vCPU sees: the host's supported set, with per-vCPU topology and a hypervisor leaf."""

from __future__ import annotations

import struct

from pyrovm.kvm.structs import kvm_cpuid_entry2

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
X2APIC_BIT = 1 << 21  # leaf 1 ECX
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"


def _copy(entry: kvm_cpuid_entry2) -> kvm_cpuid_entry2:
    new = kvm_cpuid_entry2()
    new.function, new.index, new.flags = entry.function, entry.index, entry.flags
    new.eax, new.ebx, new.ecx, new.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
    return new


def vendor_registers(vendor: str) -> tuple[int, int, int]:
    """EBX, EDX, ECX of leaf 0 for a 12-character vendor string."""
    raw = vendor.encode().ljust(12)[:12]
    ebx, edx, ecx = struct.unpack("<III", raw)
    return ebx, edx, ecx


def vcpu_cpuid(
    supported: list[kvm_cpuid_entry2], apic_id: int, ncpus: int, vendor: str | None = None
) -> list[kvm_cpuid_entry2]:
    """The CPUID entries for one vCPU."""
    out: list[kvm_cpuid_entry2] = []
    have_hv = False
    for src in supported:
        e = _copy(src)
        fn = e.function
        if fn == 0 and vendor:
            e.ebx, e.edx, e.ecx = vendor_registers(vendor)
        elif fn == 1:
            e.ebx = (apic_id << 24) | (min(ncpus, 255) << 16) | (e.ebx & 0xFFFF)
            e.ecx |= HYPERVISOR_BIT
            if ncpus > 1:
                e.edx |= HTT_BIT
        elif fn in (0xB, 0x1F):
            e.edx = apic_id
        elif fn == 0xA:  # no PMU for the guest
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == 0x40000000:
            have_hv = True
            e.ebx, e.ecx, e.edx = struct.unpack("<III", KVM_SIGNATURE)
            e.eax = max(e.eax, 0x40000001)
        out.append(e)
    if not have_hv:
        e = kvm_cpuid_entry2(function=0x40000000, eax=0x40000001)
        e.ebx, e.ecx, e.edx = struct.unpack("<III", KVM_SIGNATURE)
        out.append(e)
    return out
