"""The CPUID pyrovm gives each vCPU: topology, hypervisor leaf, vendor, no PMU."""

from __future__ import annotations

import struct

import pytest

from pyrovm.arch.x86.cpuid import KVM_SIGNATURE, vcpu_cpuid, vendor_registers
from pyrovm.kvm.structs import kvm_cpuid_entry2

from conftest import needs_kvm


def host_like() -> list[kvm_cpuid_entry2]:
    """A small host CPUID as KVM_GET_SUPPORTED_CPUID returns it (a 2-thread, 8-core host)."""
    e = kvm_cpuid_entry2
    return [
        e(function=0, eax=0x1F, ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163),  # AuthenticAMD
        e(function=1, eax=0x00A00F11, ebx=0x07020800, ecx=0x7ED8320B, edx=0x178BFBFF),
        e(function=4, index=0, flags=1, eax=0x04000121),  # L1d, 2 threads share, 2 cores
        e(function=4, index=1, flags=1, eax=0x04000163),  # L3
        e(function=4, index=2, flags=1, eax=0),  # end of list
        e(function=0xA, eax=0x07300805, ebx=0, ecx=0, edx=0x603),
        e(function=0xB, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=5),
        e(function=0xB, index=1, flags=1, eax=4, ebx=16, ecx=0x201, edx=5),
        e(function=0x80000008, ecx=0x700F),
        e(function=0x8000001E, eax=5, ebx=0x102, ecx=0x300),
    ]


def leaf(entries: list[kvm_cpuid_entry2], fn: int, index: int = 0) -> kvm_cpuid_entry2:
    (match,) = [x for x in entries if x.function == fn and x.index == index]
    return match


@pytest.mark.parametrize(("apic_id", "ncpus"), [(0, 1), (2, 4), (5, 6)])
def test_topology_is_one_socket_of_ncpus_cores(apic_id: int, ncpus: int) -> None:
    out = vcpu_cpuid(host_like(), apic_id, ncpus)
    l1 = leaf(out, 1)
    assert l1.ebx >> 24 == apic_id
    assert (l1.ebx >> 16) & 0xFF == ncpus
    assert l1.ecx & (1 << 31)  # hypervisor present
    assert bool(l1.edx & (1 << 28)) == (ncpus > 1)
    smt, core, end = leaf(out, 0xB, 0), leaf(out, 0xB, 1), leaf(out, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx >> 8 & 0xFF) == (0, 1, 1)
    assert core.ebx == ncpus and (core.ecx >> 8) & 0xFF == 2 and (1 << core.eax) >= ncpus
    assert end.ecx >> 8 & 0xFF == 0  # no further levels
    assert {smt.edx, core.edx, end.edx} == {apic_id}
    assert leaf(out, 4, 0).eax >> 26 == ncpus - 1
    assert (leaf(out, 4, 0).eax >> 14) & 0xFFF == 0  # L1 private
    assert (leaf(out, 4, 1).eax >> 14) & 0xFFF == ncpus - 1  # L3 shared by all
    assert leaf(out, 4, 2).eax == 0  # the end marker stays
    assert leaf(out, 0x80000008).ecx & 0xFF == ncpus - 1
    assert leaf(out, 0x8000001E).eax == apic_id


def test_no_pmu_and_kvm_signature() -> None:
    out = vcpu_cpuid(host_like(), 0, 1)
    assert (leaf(out, 0xA).eax, leaf(out, 0xA).edx) == (0, 0)
    hv = leaf(out, 0x40000000)
    assert struct.pack("<III", hv.ebx, hv.ecx, hv.edx) == KVM_SIGNATURE


def test_vendor_override() -> None:
    out = vcpu_cpuid(host_like(), 0, 1, vendor="GenuineIntel")
    l0 = leaf(out, 0)
    assert struct.pack("<III", l0.ebx, l0.edx, l0.ecx) == b"GenuineIntel"
    assert vendor_registers("GenuineIntel") == (l0.ebx, l0.edx, l0.ecx)


@needs_kvm
def test_host_cpuid_accepted_by_kvm() -> None:
    from pyrovm.kvm import Kvm

    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.create_irqchip()
        supported = kvm.supported_cpuid()
        for i in range(4):
            vm.create_vcpu(i).set_cpuid2(vcpu_cpuid(supported, i, 4))
        vm.close()
