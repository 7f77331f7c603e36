"""Snapshots: save a paused VM to a state file and a memory file, and restore it in another process.

:func:`take_snapshot` (what :meth:`pyrovm.machine.Machine.snapshot` calls) writes the memory file first
(:mod:`~pyrovm.snapshot.memfile`: sparse; a diff snapshot only the pages written since the last snapshot,
from KVM's dirty log and the pages the VMM's devices wrote) and then the state file
(:mod:`~pyrovm.snapshot.fileformat`): the VM's config, its boot set-up, every vCPU's and the VM's KVM
state (:mod:`pyrovm.arch.x86.state`) and every device's state.  :func:`load_state` reads a state file back
(every check that needs no KVM); :func:`pyrovm.builder.restore` builds the machine from it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import SnapshotError

if TYPE_CHECKING:
    from .core import SnapshotInfo, SnapshotState, decode_devices, load_state, take_snapshot

__all__ = ["SnapshotError", "SnapshotInfo", "SnapshotState", "decode_devices", "load_state", "take_snapshot"]


def __getattr__(name: str) -> Any:
    """The names of :mod:`pyrovm.snapshot.core`, imported when first used (``pyrovm --help`` and
    ``pyrovm run`` do not pay for them)."""
    if name in __all__:
        return getattr(importlib.import_module(".core", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
