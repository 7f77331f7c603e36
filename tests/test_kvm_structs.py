"""Every ctypes structure of pyrovm.kvm against the kernel's ABI.

Sizes and offsets are checked two ways: against numbers from the kernel headers written down here, and
against a C program compiled with gcc on this machine from <linux/kvm.h> (so a wrong field anywhere
shows up, not only the ones listed by hand).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyrovm.kvm import constants as c
from pyrovm.kvm import structs as s

# struct name -> ctypes class; the C side uses "struct <name>"
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "kvm_regs": s.kvm_regs,
    "kvm_segment": s.kvm_segment,
    "kvm_dtable": s.kvm_dtable,
    "kvm_sregs": s.kvm_sregs,
    "kvm_fpu": s.kvm_fpu,
    "kvm_userspace_memory_region": s.kvm_userspace_memory_region,
    "kvm_cpuid_entry2": s.kvm_cpuid_entry2,
    "kvm_cpuid2": s.kvm_cpuid2,
    "kvm_msr_entry": s.kvm_msr_entry,
    "kvm_msrs": s.kvm_msrs,
    "kvm_msr_list": s.kvm_msr_list,
    "kvm_lapic_state": s.kvm_lapic_state,
    "kvm_irq_level": s.kvm_irq_level,
    "kvm_pit_config": s.kvm_pit_config,
    "kvm_ioeventfd": s.kvm_ioeventfd,
    "kvm_irqfd": s.kvm_irqfd,
    "kvm_coalesced_mmio_zone": s.kvm_coalesced_mmio_zone,
    "kvm_coalesced_mmio": s.kvm_coalesced_mmio,
    "kvm_coalesced_mmio_ring": s.kvm_coalesced_mmio_ring,
    "kvm_mp_state": s.kvm_mp_state,
    "kvm_translation": s.kvm_translation,
    "kvm_clock_data": s.kvm_clock_data,
    "kvm_run": s.kvm_run,
    "kvm_xsave": s.kvm_xsave,
    "kvm_xcr": s.kvm_xcr,
    "kvm_xcrs": s.kvm_xcrs,
    "kvm_debugregs": s.kvm_debugregs,
    "kvm_vcpu_events": s.kvm_vcpu_events,
    "kvm_pit_channel_state": s.kvm_pit_channel_state,
    "kvm_pit_state2": s.kvm_pit_state2,
    "kvm_irqchip": s.kvm_irqchip,
    "kvm_dirty_log": s.kvm_dirty_log,
}

# fields of kvm_run's exit union: (C path, ctypes offset)
RUN_UNION = {
    "io.direction": s.kvm_run.exit.offset + s.kvm_run_io.direction.offset,
    "io.size": s.kvm_run.exit.offset + s.kvm_run_io.size.offset,
    "io.port": s.kvm_run.exit.offset + s.kvm_run_io.port.offset,
    "io.count": s.kvm_run.exit.offset + s.kvm_run_io.count.offset,
    "io.data_offset": s.kvm_run.exit.offset + s.kvm_run_io.data_offset.offset,
    "mmio.phys_addr": s.kvm_run.exit.offset + s.kvm_run_mmio.phys_addr.offset,
    "mmio.data": s.kvm_run.exit.offset + s.kvm_run_mmio.data.offset,
    "mmio.len": s.kvm_run.exit.offset + s.kvm_run_mmio.len.offset,
    "mmio.is_write": s.kvm_run.exit.offset + s.kvm_run_mmio.is_write.offset,
    "fail_entry.cpu": s.kvm_run.exit.offset + s.kvm_run_fail_entry.cpu.offset,
    "internal.suberror": s.kvm_run.exit.offset + s.kvm_run_internal.suberror.offset,
    "internal.ndata": s.kvm_run.exit.offset + s.kvm_run_internal.ndata.offset,
    "internal.data": s.kvm_run.exit.offset + s.kvm_run_internal.data.offset,
    "system_event.type": s.kvm_run.exit.offset + s.kvm_run_system_event.type.offset,
    "system_event.ndata": s.kvm_run.exit.offset + s.kvm_run_system_event.ndata.offset,
    "ex.error_code": s.kvm_run.exit.offset + s.kvm_run_ex.error_code.offset,
    "kvm_valid_regs": s.kvm_run.kvm_valid_regs.offset,
    "s": s.kvm_run.s.offset,
}

# Sizes from the x86-64 kernel headers.
KNOWN_SIZES = {
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_fpu": 416,
    "kvm_userspace_memory_region": 32,
    "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8,
    "kvm_msr_entry": 16,
    "kvm_msrs": 8,
    "kvm_msr_list": 4,
    "kvm_lapic_state": 1024,
    "kvm_irq_level": 8,
    "kvm_pit_config": 64,
    "kvm_ioeventfd": 64,
    "kvm_irqfd": 32,
    "kvm_coalesced_mmio_zone": 16,
    "kvm_coalesced_mmio": 24,
    "kvm_coalesced_mmio_ring": 8,
    "kvm_mp_state": 4,
    "kvm_translation": 24,
    "kvm_clock_data": 48,
    "kvm_run": 2352,
    "kvm_xsave": 4096,
    "kvm_xcr": 16,
    "kvm_xcrs": 392,
    "kvm_debugregs": 128,
    "kvm_vcpu_events": 64,
    "kvm_pit_channel_state": 24,
    "kvm_pit_state2": 112,
    "kvm_irqchip": 520,
    "kvm_dirty_log": 16,
}

IOCTLS = {
    "KVM_GET_API_VERSION": c.KVM_GET_API_VERSION,
    "KVM_CREATE_VM": c.KVM_CREATE_VM,
    "KVM_GET_MSR_INDEX_LIST": c.KVM_GET_MSR_INDEX_LIST,
    "KVM_CHECK_EXTENSION": c.KVM_CHECK_EXTENSION,
    "KVM_GET_VCPU_MMAP_SIZE": c.KVM_GET_VCPU_MMAP_SIZE,
    "KVM_GET_SUPPORTED_CPUID": c.KVM_GET_SUPPORTED_CPUID,
    "KVM_CREATE_VCPU": c.KVM_CREATE_VCPU,
    "KVM_SET_USER_MEMORY_REGION": c.KVM_SET_USER_MEMORY_REGION,
    "KVM_SET_TSS_ADDR": c.KVM_SET_TSS_ADDR,
    "KVM_SET_IDENTITY_MAP_ADDR": c.KVM_SET_IDENTITY_MAP_ADDR,
    "KVM_CREATE_IRQCHIP": c.KVM_CREATE_IRQCHIP,
    "KVM_IRQ_LINE": c.KVM_IRQ_LINE,
    "KVM_IRQFD": c.KVM_IRQFD,
    "KVM_CREATE_PIT2": c.KVM_CREATE_PIT2,
    "KVM_IOEVENTFD": c.KVM_IOEVENTFD,
    "KVM_REGISTER_COALESCED_MMIO": c.KVM_REGISTER_COALESCED_MMIO,
    "KVM_UNREGISTER_COALESCED_MMIO": c.KVM_UNREGISTER_COALESCED_MMIO,
    "KVM_SET_CLOCK": c.KVM_SET_CLOCK,
    "KVM_GET_CLOCK": c.KVM_GET_CLOCK,
    "KVM_RUN": c.KVM_RUN,
    "KVM_GET_REGS": c.KVM_GET_REGS,
    "KVM_SET_REGS": c.KVM_SET_REGS,
    "KVM_GET_SREGS": c.KVM_GET_SREGS,
    "KVM_SET_SREGS": c.KVM_SET_SREGS,
    "KVM_TRANSLATE": c.KVM_TRANSLATE,
    "KVM_GET_MSRS": c.KVM_GET_MSRS,
    "KVM_SET_MSRS": c.KVM_SET_MSRS,
    "KVM_GET_FPU": c.KVM_GET_FPU,
    "KVM_SET_FPU": c.KVM_SET_FPU,
    "KVM_GET_LAPIC": c.KVM_GET_LAPIC,
    "KVM_SET_LAPIC": c.KVM_SET_LAPIC,
    "KVM_SET_CPUID2": c.KVM_SET_CPUID2,
    "KVM_GET_CPUID2": c.KVM_GET_CPUID2,
    "KVM_GET_MP_STATE": c.KVM_GET_MP_STATE,
    "KVM_SET_MP_STATE": c.KVM_SET_MP_STATE,
    "KVM_GET_DIRTY_LOG": c.KVM_GET_DIRTY_LOG,
    "KVM_GET_IRQCHIP": c.KVM_GET_IRQCHIP,
    "KVM_SET_IRQCHIP": c.KVM_SET_IRQCHIP,
    "KVM_GET_PIT2": c.KVM_GET_PIT2,
    "KVM_SET_PIT2": c.KVM_SET_PIT2,
    "KVM_GET_VCPU_EVENTS": c.KVM_GET_VCPU_EVENTS,
    "KVM_SET_VCPU_EVENTS": c.KVM_SET_VCPU_EVENTS,
    "KVM_GET_DEBUGREGS": c.KVM_GET_DEBUGREGS,
    "KVM_SET_DEBUGREGS": c.KVM_SET_DEBUGREGS,
    "KVM_SET_TSC_KHZ": c.KVM_SET_TSC_KHZ,
    "KVM_GET_TSC_KHZ": c.KVM_GET_TSC_KHZ,
    "KVM_GET_XSAVE": c.KVM_GET_XSAVE,
    "KVM_SET_XSAVE": c.KVM_SET_XSAVE,
    "KVM_GET_XCRS": c.KVM_GET_XCRS,
    "KVM_SET_XCRS": c.KVM_SET_XCRS,
    "KVM_KVMCLOCK_CTRL": c.KVM_KVMCLOCK_CTRL,
}


def _fields(cls: type[ctypes.Structure]) -> list[str]:
    return [name for name, *_ in cls._fields_]


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_known_sizes(name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == KNOWN_SIZES[name]


def test_known_offsets() -> None:
    assert s.kvm_run.exit_reason.offset == 8
    assert s.kvm_run.exit.offset == 32
    assert s.kvm_run.kvm_valid_regs.offset == 288
    assert s.kvm_run.s.offset == 304
    assert s.kvm_sregs.cr0.offset == 224
    assert s.kvm_sregs.apic_base.offset == 272
    assert s.kvm_ioeventfd.fd.offset == 20
    assert c.KVM_RUN == 0xAE80
    assert c.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert c.KVM_GET_SREGS == 0x8138AE83


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Sizes, offsets and ioctl numbers as the C compiler sees them in <linux/kvm.h>."""
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or <linux/kvm.h> (Debian linux-libc-dev) not installed")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    for name, cls in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field in _fields(cls):
            if name == "kvm_run" and field == "exit":
                continue
            if name == "kvm_irq_level" and field == "irq":
                lines.append(f'printf("{name}.irq %zu\\n", offsetof(struct {name}, irq));')
                continue
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for path in RUN_UNION:
        lines.append(f'printf("run.{path} %zu\\n", offsetof(struct kvm_run, {path}));')
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines.append("return 0;}")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_matches_kernel_headers(name: str, c_layout: dict[str, int]) -> None:
    cls = STRUCTS[name]
    assert ctypes.sizeof(cls) == c_layout[name], f"sizeof(struct {name})"
    for field in _fields(cls):
        key = f"{name}.{field}"
        if key in c_layout:
            assert getattr(cls, field).offset == c_layout[key], f"offsetof(struct {name}, {field})"


def test_kvm_run_exit_union_matches(c_layout: dict[str, int]) -> None:
    for path, offset in RUN_UNION.items():
        assert offset == c_layout[f"run.{path}"], path


def test_ioctl_numbers_match(c_layout: dict[str, int]) -> None:
    for name, value in IOCTLS.items():
        assert value == c_layout[name], name
