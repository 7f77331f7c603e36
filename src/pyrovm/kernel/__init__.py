"""Guest kernel tooling: build a minimal microVM Linux kernel (see :mod:`pyrovm.kernel.build`).

The names below are loaded lazily so that ``python -m pyrovm.kernel.build`` runs cleanly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KernelBuildError", "build_kernel", "cache_root", "register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pyrovm.kernel import build

        return getattr(build, name)
    raise AttributeError(f"module 'pyrovm.kernel' has no attribute {name!r}")
