"""Kernel loaders: they put an image into guest memory and say where to enter it."""

from .elf import ElfKernel, KernelLoadError, load_elf

__all__ = ["ElfKernel", "KernelLoadError", "load_elf"]
