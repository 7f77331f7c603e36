"""pyrovm: a virtual machine monitor in Python on Linux KVM.

>>> import pyrovm
>>> with pyrovm.VM(kernel="bzImage", memory="256M", cpus=2, initrd="initramfs.cpio") as vm:
...     result = vm.wait(timeout=60)

The layers, each usable alone: :class:`VmConfig` (what a VM is, validated without KVM) →
:func:`build` (config → :class:`Machine`) → :class:`Machine` (start, pause, resume, stop, wait).
Every error pyrovm raises on purpose is a :class:`PyrovmError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr

__version__ = "0.1.0"
__all__ = [
    "VM",
    "ConfigError",
    "ExitCode",
    "ExitReason",
    "Machine",
    "PyrovmError",
    "VmConfig",
    "VmExit",
    "__version__",
    "build",
    "install_kick_handler",
]

if TYPE_CHECKING:
    from .builder import build
    from .config import VmConfig
    from .errors import ConfigError, PyrovmError
    from .machine import Machine
    from .result import ExitCode, ExitReason, VmExit
    from .vcpu import install_kick_handler
    from .vmm import VM

_WHERE = {
    "VM": "vmm",
    "ConfigError": "errors",
    "PyrovmError": "errors",
    "ExitCode": "result",
    "ExitReason": "result",
    "VmExit": "result",
    "Machine": "machine",
    "VmConfig": "config",
    "build": "builder",
    "install_kick_handler": "vcpu",
}


#: Imported on first use (``pyrovm run`` starts faster without the layers it does not touch yet).
__getattr__ = lazy_getattr(__name__, _WHERE)
