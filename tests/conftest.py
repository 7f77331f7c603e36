"""Shared fixtures: KVM availability and the test guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

KVM_DEVICE = os.environ.get("PYROVM_KVM_DEVICE", "/dev/kvm")


def kvm_usable() -> str | None:
    """None when /dev/kvm can be used, else the reason it cannot."""
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} is absent on this host"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    return None


needs_kvm = pytest.mark.skipif(kvm_usable() is not None, reason=kvm_usable() or "")


@pytest.fixture(scope="session")
def guest() -> Path:
    """The test guest ELF (built once, cached; ``$PYROVM_TEST_GUEST`` points at a prebuilt one)."""
    from pyrovm import testguest

    prebuilt = os.environ.get("PYROVM_TEST_GUEST")
    return Path(prebuilt) if prebuilt else testguest.build()
