"""Kernel loaders: they put an image into guest memory and say where to enter it."""

from .elf import ElfKernel, KernelLoadError, load_elf
from .kernel import check_cmdline, load_kernel

__all__ = ["ElfKernel", "KernelLoadError", "check_cmdline", "load_elf", "load_kernel"]
