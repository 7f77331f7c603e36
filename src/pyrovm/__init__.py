"""pyrovm: a virtual machine monitor in Python on Linux KVM.

>>> import pyrovm
>>> with pyrovm.VM(kernel="bzImage", memory="256M", cpus=2, initrd="initramfs.cpio") as vm:
...     result = vm.wait(timeout=60)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["VM", "ConfigError", "ExitCode", "ExitReason", "VmExit", "__version__"]

if TYPE_CHECKING:
    from .vmm import VM, ConfigError, ExitCode, ExitReason, VmExit


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import vmm

        return getattr(vmm, name)
    raise AttributeError(f"module 'pyrovm' has no attribute {name!r}")
