"""A package's names imported on first use: ``__getattr__ = lazy_getattr(__name__, {name: submodule})``.

``pyrovm run`` starts faster when the modules it does not touch are not imported at start-up; the names
stay where users import them from (``from pyrovm import VM``, ``from pyrovm.devices.virtio import
VirtioBlock``), and type checkers see them through ``if TYPE_CHECKING:`` imports beside.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for *package*: *name* comes from ``package.<where[name]>``, imported the
    first time it is asked for, then kept in the package like any other name."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
