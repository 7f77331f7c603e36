"""A Firecracker-compatible control API: the server (:mod:`.server`), its rules (:mod:`.controller`,
:mod:`.resources`), the ``pyrovm-firecracker`` command (:mod:`.firecracker`) and a thin client."""

from .client import ApiFault, Client

__all__ = ["ApiFault", "Client"]
