"""What the arguments of a KVM ioctl and a ``KVM_RUN`` exit say, as a small dict for a trace.

:func:`decode_args` reads the ctypes structure (or integer) pyrovm passed: memory slots (slot, guest
physical address, size, host address, flags), vCPU ids, CPUID entry counts, the registers that decide
where and how a vCPU starts (RIP, RSP, RFLAGS; CR0, CR3, CR4, EFER, CS), MSR indices, ioeventfd and irqfd
wiring, capability names.  :func:`decode_exit` names an exit and its port, address, size and data.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..kvm import constants as c
from ..kvm import exits as e


def _hex(v: int) -> str:
    return f"{v:#x}"


def _mem_region(a: Any) -> dict[str, Any]:
    return {
        "slot": a.slot,
        "guest_phys_addr": _hex(a.guest_phys_addr),
        "memory_size": a.memory_size,
        "userspace_addr": _hex(a.userspace_addr),
        "flags": a.flags,
    }


def _regs(a: Any) -> dict[str, Any]:
    return {"rip": _hex(a.rip), "rsp": _hex(a.rsp), "rflags": _hex(a.rflags), "rbx": _hex(a.rbx)}


def _sregs(a: Any) -> dict[str, Any]:
    return {
        "cr0": _hex(a.cr0),
        "cr3": _hex(a.cr3),
        "cr4": _hex(a.cr4),
        "efer": _hex(a.efer),
        "cs": {"selector": _hex(a.cs.selector), "l": a.cs.l, "dpl": a.cs.dpl},
    }


def _msrs(a: Any) -> dict[str, Any]:
    n = int(a.nmsrs)
    entries = getattr(a, "entries", None)
    indices = [_hex(entries[i].index) for i in range(min(n, 32))] if entries is not None else []
    return {"nmsrs": n, "indices": indices}


def _ioeventfd(a: Any) -> dict[str, Any]:
    out = {"addr": _hex(a.addr), "len": a.len, "fd": a.fd, "pio": bool(a.flags & c.KVM_IOEVENTFD_FLAG_PIO)}
    if a.flags & c.KVM_IOEVENTFD_FLAG_DATAMATCH:
        out["datamatch"] = a.datamatch
    if a.flags & c.KVM_IOEVENTFD_FLAG_DEASSIGN:
        out["deassign"] = True
    return out


_STRUCT_DECODERS = {
    "KVM_SET_USER_MEMORY_REGION": _mem_region,
    "KVM_SET_REGS": _regs,
    "KVM_GET_REGS": _regs,
    "KVM_SET_SREGS": _sregs,
    "KVM_GET_SREGS": _sregs,
    "KVM_SET_MSRS": _msrs,
    "KVM_GET_MSRS": _msrs,
    "KVM_IOEVENTFD": _ioeventfd,
    "KVM_IRQFD": lambda a: {"fd": a.fd, "gsi": a.gsi, "deassign": bool(a.flags & c.KVM_IRQFD_FLAG_DEASSIGN)},
    "KVM_IRQ_LINE": lambda a: {"irq": a.irq, "level": a.level},
    "KVM_REGISTER_COALESCED_MMIO": lambda a: {"addr": _hex(a.addr), "size": a.size, "pio": bool(a.pio)},
    "KVM_UNREGISTER_COALESCED_MMIO": lambda a: {"addr": _hex(a.addr), "size": a.size, "pio": bool(a.pio)},
    "KVM_CREATE_PIT2": lambda a: {"flags": a.flags},
    "KVM_SET_CPUID2": lambda a: {"nent": a.nent},
    "KVM_GET_SUPPORTED_CPUID": lambda a: {"nent": a.nent},
    "KVM_GET_CPUID2": lambda a: {"nent": a.nent},
    "KVM_GET_MSR_INDEX_LIST": lambda a: {"nmsrs": a.nmsrs},
    "KVM_SET_MP_STATE": lambda a: {"mp_state": a.mp_state},
    "KVM_GET_MP_STATE": lambda a: {"mp_state": a.mp_state},
    "KVM_SET_CLOCK": lambda a: {"clock": a.clock, "flags": a.flags},
    "KVM_GET_CLOCK": lambda a: {"clock": a.clock, "flags": a.flags},
    "KVM_GET_IRQCHIP": lambda a: {"chip_id": a.chip_id},
    "KVM_SET_IRQCHIP": lambda a: {"chip_id": a.chip_id},
    "KVM_GET_DIRTY_LOG": lambda a: {"slot": a.slot},
}


def decode_args(name: str, arg: object) -> dict[str, Any]:
    """The interesting fields of *arg* for ioctl *name* (never raises)."""
    try:
        if isinstance(arg, int):
            return _int_arg(name, arg)
        if isinstance(arg, ctypes.c_uint64):
            return {"value": _hex(arg.value)}
        decoder = _STRUCT_DECODERS.get(name)
        return decoder(arg) if decoder is not None else {}
    except Exception as exc:  # a trace never breaks the VM
        return {"undecoded": type(exc).__name__}


def _int_arg(name: str, arg: int) -> dict[str, Any]:
    if name == "KVM_CHECK_EXTENSION":
        return {"cap": c.CAP_NAMES.get(arg, str(arg))}
    if name == "KVM_CREATE_VCPU":
        return {"vcpu_id": arg}
    if name in ("KVM_SET_TSS_ADDR",):
        return {"addr": _hex(arg)}
    if name in ("KVM_SET_TSC_KHZ",):
        return {"khz": arg}
    return {}


def decode_exit(ex: e.VcpuExit) -> tuple[str, dict[str, Any]]:
    """The kind of exit *ex* and its details (port, address, size, data)."""
    if type(ex) is e.IoOut:
        return "io_out", {"port": _hex(ex.port), "size": ex.size, "count": ex.count, "data": ex.data.hex()}
    if type(ex) is e.IoIn:
        return "io_in", {"port": _hex(ex.port), "size": ex.size, "count": ex.count}
    if type(ex) is e.MmioWrite:
        return "mmio_write", {"addr": _hex(ex.addr), "len": len(ex.data), "data": ex.data.hex()}
    if type(ex) is e.MmioRead:
        return "mmio_read", {"addr": _hex(ex.addr), "len": ex.length}
    if ex is e.INTERRUPTED:
        return "intr", {}
    if ex is e.HLT:
        return "hlt", {}
    if ex is e.SHUTDOWN:
        return "shutdown", {}
    name = type(ex).__name__
    return name.lower(), {k: str(v) for k, v in getattr(ex, "__dict__", {}).items()}
