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


def _bits(n: int) -> int:
    """Bits needed to number *n* things (0 for one)."""
    return max(n - 1, 0).bit_length()


def _topology_leaf(function: int, apic_id: int, ncpus: int) -> list[kvm_cpuid_entry2]:
    """Leaf 0xB/0x1F for one package of *ncpus* cores with one thread each: SMT level, core level, end."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        kvm_cpuid_entry2(
            function=function, index=0, flags=flags, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=apic_id
        ),
        kvm_cpuid_entry2(
            function=function,
            index=1,
            flags=flags,
            eax=_bits(ncpus),
            ebx=ncpus,
            ecx=(2 << 8) | 1,
            edx=apic_id,
        ),
        kvm_cpuid_entry2(function=function, index=2, flags=flags, eax=0, ebx=0, ecx=2, edx=apic_id),
    ]


def vcpu_cpuid(
    supported: list[kvm_cpuid_entry2], apic_id: int, ncpus: int, vendor: str | None = None
) -> list[kvm_cpuid_entry2]:
    """The CPUID entries for one vCPU.

    The topology the guest sees is one socket of *ncpus* cores, one thread each, whatever the host's:
    leaf 1 (initial APIC id, logical count), 4 (cores per package, cache sharing), 0xB/0x1F (x2APIC
    topology), and AMD's 0x80000008 (core count) and 0x8000001E (extended APIC id, core id).  No PMU
    (leaf 0xA), and the KVM hypervisor leaf.
    """
    out: list[kvm_cpuid_entry2] = []
    have_hv = False
    topology_done: set[int] = set()
    for src in supported:
        e = _copy(src)
        fn = e.function
        if fn == 0 and vendor:
            e.ebx, e.edx, e.ecx = vendor_registers(vendor)
        elif fn == 1:
            e.ebx = (apic_id << 24) | (min(ncpus, 255) << 16) | (e.ebx & 0xFFFF)
            e.ecx |= HYPERVISOR_BIT
            e.edx = (e.edx | HTT_BIT) if ncpus > 1 else (e.edx & ~HTT_BIT)
        elif fn == 4:
            level = (e.eax >> 5) & 7
            sharing = ncpus - 1 if level >= 3 else 0
            cores = min(ncpus, 64) - 1
            e.eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (cores << 26) if e.eax & 0x1F else e.eax
        elif fn in (0xB, 0x1F):
            if fn not in topology_done:
                topology_done.add(fn)
                out.extend(_topology_leaf(fn, apic_id, ncpus))
            continue
        elif fn == 0xA:  # no PMU for the guest
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == 0x80000008:
            e.ecx = (e.ecx & ~0xF0FF) | (min(ncpus, 256) - 1) | (_bits(ncpus) << 12)
        elif fn == 0x8000001E:
            e.eax, e.ebx, e.ecx = apic_id, apic_id & 0xFF, 0
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


#: QEMU's names of CPU features: (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    **{n: (1, 0, "ecx", b) for n, b in (
        ("pni", 0), ("sse3", 0), ("pclmulqdq", 1), ("ssse3", 9), ("fma", 12), ("cx16", 13), ("pcid", 17),
        ("sse4.1", 19), ("sse4_1", 19), ("sse4.2", 20), ("sse4_2", 20), ("x2apic", 21), ("movbe", 22),
        ("popcnt", 23), ("tsc-deadline", 24), ("aes", 25), ("xsave", 26), ("avx", 28), ("f16c", 29),
        ("rdrand", 30), ("hypervisor", 31))},
    **{n: (1, 0, "edx", b) for n, b in (
        ("fpu", 0), ("vme", 1), ("de", 2), ("pse", 3), ("tsc", 4), ("msr", 5), ("pae", 6), ("mce", 7),
        ("cx8", 8), ("apic", 9), ("sep", 11), ("mtrr", 12), ("pge", 13), ("mca", 14), ("cmov", 15),
        ("pat", 16), ("pse36", 17), ("clflush", 19), ("mmx", 23), ("fxsr", 24), ("sse", 25), ("sse2", 26),
        ("ht", 28))},
    **{n: (7, 0, "ebx", b) for n, b in (
        ("fsgsbase", 0), ("bmi1", 3), ("hle", 4), ("avx2", 5), ("smep", 7), ("bmi2", 8), ("erms", 9),
        ("invpcid", 10), ("rtm", 11), ("avx512f", 16), ("rdseed", 18), ("adx", 19), ("smap", 20),
        ("clflushopt", 23), ("clwb", 24), ("sha-ni", 29))},
    **{n: (7, 0, "ecx", b) for n, b in (("umip", 2), ("pku", 3), ("rdpid", 22))},
    "fsrm": (7, 0, "edx", 4),
    **{n: (0x80000001, 0, "ecx", b) for n, b in (
        ("lahf_lm", 0), ("lahf-lm", 0), ("svm", 2), ("abm", 5), ("lzcnt", 5), ("sse4a", 6),
        ("misalignsse", 7), ("3dnowprefetch", 8), ("xop", 11), ("fma4", 16), ("tbm", 21), ("topoext", 22))},
    **{n: (0x80000001, 0, "edx", b) for n, b in (
        ("syscall", 11), ("nx", 20), ("mmxext", 22), ("pdpe1gb", 26), ("rdtscp", 27), ("lm", 29))},
    **{n: (0xD, 1, "eax", b) for n, b in (("xsaveopt", 0), ("xsavec", 1), ("xgetbv1", 2), ("xsaves", 3))},
}  # fmt: skip


def apply_cpu_options(
    entries: list[kvm_cpuid_entry2], hide_kvm: bool = False, features: tuple[str, ...] = ()
) -> list[kvm_cpuid_entry2]:
    """*entries* with QEMU's ``-cpu`` options applied: *hide_kvm* (``kvm=off``) drops the hypervisor leaves
    0x40000000-0x400000FF (no KVM signature, no paravirtual features); each of *features* is ``+name``
    (the guest must have it: ValueError when this host's KVM cannot give it) or ``-name`` (hidden)."""
    out = [e for e in entries if not (hide_kvm and 0x40000000 <= e.function <= 0x400000FF)]
    for item in features:
        name = item[1:]
        if name not in FEATURES:
            raise ValueError(f"unknown CPU feature {name!r}")
        leaf, sub, reg, bit = FEATURES[name]
        match = [e for e in out if e.function == leaf and (e.index == sub or leaf not in (7, 0xD))]
        if item[0] == "+":
            if not any(getattr(e, reg) >> bit & 1 for e in match):
                raise ValueError(f"CPU feature {name}: this host's KVM cannot give it to a guest")
        else:
            for e in match:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))
    return out
