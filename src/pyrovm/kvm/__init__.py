"""The KVM layer: ioctl numbers, ABI structures, and one class per file descriptor."""

from . import constants, exits, structs
from .system import Kvm, KvmCapabilityError, KvmError, KvmUnavailable, Vcpu, Vm, is_pvm_host

__all__ = [
    "Kvm",
    "KvmCapabilityError",
    "KvmError",
    "KvmUnavailable",
    "Vcpu",
    "Vm",
    "constants",
    "exits",
    "is_pvm_host",
    "structs",
]
