"""The errors pyrovm raises, under one root: :class:`PyrovmError`.

Every error the library raises for bad input, an unusable host or a failed guest is a subclass of
:class:`PyrovmError`, so ``except pyrovm.PyrovmError`` catches them all; each also keeps the built-in
base it always had (``ValueError``, ``OSError``, ``RuntimeError``) so older ``except`` clauses still work.
Where an error comes from another exception, that one is chained as ``__cause__``.

This module imports nothing of pyrovm: every layer can use it.
"""

from __future__ import annotations


class PyrovmError(Exception):
    """Root of every error pyrovm raises on purpose."""


class ConfigError(PyrovmError, ValueError):
    """Bad input: the VM cannot be built as asked (a missing file, a bad size, a conflicting option)."""


class HostError(PyrovmError, RuntimeError):
    """This host cannot run the VM (no usable ``/dev/kvm``, a missing KVM capability)."""


class DeviceError(PyrovmError):
    """A device backend cannot be used (a disk image that is locked, missing or of a bad size)."""


class GuestError(PyrovmError):
    """The guest did something invalid (a malformed virtqueue); devices catch these and go on."""


class StateError(PyrovmError, RuntimeError):
    """The operation does not fit the VM's state (start twice, pause before start, resume a stopped VM)."""


class SnapshotError(ConfigError):
    """A snapshot cannot be read or restored: a truncated, corrupted or foreign state file, a memory file
    of the wrong size, devices the snapshot needs that the restore cannot provide."""


__all__ = [
    "ConfigError",
    "DeviceError",
    "GuestError",
    "HostError",
    "PyrovmError",
    "SnapshotError",
    "StateError",
]
