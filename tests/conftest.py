"""Shared fixtures: KVM availability and the test guest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

KVM_DEVICE = os.environ.get("PYROVM_KVM_DEVICE", "/dev/kvm")
SRC = Path(__file__).resolve().parents[1] / "src"


def pyrovm_argv(*args: str) -> list[str]:
    """The command line that runs ``pyrovm ARGS...`` from this checkout."""
    return [sys.executable, "-m", "pyrovm.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for :func:`pyrovm_argv`: this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


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
