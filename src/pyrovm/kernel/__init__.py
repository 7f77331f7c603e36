"""Guest kernel tooling: build a minimal microVM Linux kernel (see :mod:`pyrovm.kernel.build`)."""

from pyrovm.kernel.build import KernelBuildError, build_kernel, cache_root, register

__all__ = ["KernelBuildError", "build_kernel", "cache_root", "register"]
