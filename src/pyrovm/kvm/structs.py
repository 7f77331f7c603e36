"""ctypes mirrors of the KVM ABI structures (x86-64), from ``<linux/kvm.h>`` and ``<asm/kvm.h>``.

Each structure's size and field offsets are checked against the kernel headers by the test suite.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int32, c_uint8, c_uint16, c_uint32, c_uint64

# fmt: off


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
        ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
        ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
        ("unusable", c_uint8), ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
        ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8),
        ("pad1", c_uint8), ("last_opcode", c_uint16), ("last_ip", c_uint64), ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64), ("userspace_addr", c_uint64),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
        ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; entries follow (see :func:`cpuid2_type`)."""
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; entries follow (see :func:`msrs_type`)."""
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; indices follow."""
    _fields_ = [("nmsrs", c_uint32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_irq_level(ctypes.Structure):
    # union { __u32 irq; __s32 status; } is represented by its first member.
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32), ("fd", c_int32),
        ("flags", c_uint32), ("pad", c_uint8 * 36),
    ]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("len", c_uint32), ("pio", c_uint32), ("data", c_uint8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    _fields_ = [("first", c_uint32), ("last", c_uint32)]  # then the entries, up to the end of the page


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32), ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", c_uint64), ("physical_address", c_uint64), ("valid", c_uint8),
        ("writeable", c_uint8), ("usermode", c_uint8), ("pad", c_uint8 * 5),
    ]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32), ("realtime", c_uint64),
        ("host_tsc", c_uint64), ("pad", c_uint32 * 4),
    ]


# --- state saved in snapshots ----------------------------------------------------------------------

class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class kvm_vcpu_events_4(ctypes.Structure):
    """The four-byte members (interrupt, nmi, smi), each four __u8."""
    _fields_ = [("b", c_uint8 * 4)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception), ("interrupt", kvm_vcpu_events_4),
        ("nmi", kvm_vcpu_events_4), ("sipi_vector", c_uint32), ("flags", c_uint32),
        ("smi", kvm_vcpu_events_4), ("triple_fault", c_uint8), ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8), ("exception_payload", c_uint64),
    ]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8),
        ("status_latched", c_uint8), ("status", c_uint8), ("read_state", c_uint8),
        ("write_state", c_uint8), ("write_latch", c_uint8), ("rw_mode", c_uint8), ("mode", c_uint8),
        ("bcd", c_uint8), ("gate", c_uint8), ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


# --- struct kvm_run and the members of its exit union that pyrovm reads ---------------------------

class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
        ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event), ("padding", c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8), ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
        ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
        ("s", c_char * 2048),
    ]

# fmt: on


def cpuid2_type(n: int) -> type[ctypes.Structure]:
    """A ``struct kvm_cpuid2`` with room for *n* entries."""

    class _kvm_cpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * n)]

    return _kvm_cpuid2


def msrs_type(n: int) -> type[ctypes.Structure]:
    """A ``struct kvm_msrs`` with room for *n* entries."""

    class _kvm_msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs


def msr_list_type(n: int) -> type[ctypes.Structure]:
    """A ``struct kvm_msr_list`` with room for *n* indices."""

    class _kvm_msr_list(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return _kvm_msr_list
