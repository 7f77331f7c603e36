"""One root for every error pyrovm raises on purpose, with the cause chained."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import pyrovm
from pyrovm import kvm
from pyrovm.errors import ConfigError, HostError, PyrovmError


def _error_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(pyrovm.__path__, "pyrovm."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{obj.__module__}.{name}"] = obj
    return list(found.values())


def test_every_public_error_class_is_a_pyrovm_error() -> None:
    classes = _error_classes()
    assert len(classes) >= 15  # the walk found the package's errors
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, PyrovmError)]
    assert outside == []


def test_builtin_bases_are_kept() -> None:
    from pyrovm.devices.virtio import BlockError
    from pyrovm.loader import KernelLoadError
    from pyrovm.memory import GuestMemoryError

    assert issubclass(ConfigError, ValueError)
    assert issubclass(KernelLoadError, ConfigError)
    assert issubclass(kvm.KvmError, OSError)
    assert issubclass(kvm.KvmUnavailable, HostError) and issubclass(kvm.KvmUnavailable, RuntimeError)
    assert issubclass(GuestMemoryError, ValueError)
    assert issubclass(BlockError, PyrovmError)
    assert pyrovm.PyrovmError is PyrovmError and pyrovm.ConfigError is ConfigError


def test_cause_is_chained() -> None:
    with pytest.raises(kvm.KvmUnavailable) as info:
        kvm.Kvm("/nonexistent/kvm")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(kvm.KvmUnavailable) as info:
        kvm.Kvm("/dev/null")
    assert isinstance(info.value.__cause__, kvm.KvmError)


def test_config_errors_chain_their_cause(tmp_path: Path) -> None:
    from pyrovm.config import VmConfig

    with pytest.raises(ConfigError, match="no such file") as info:
        VmConfig(kernel=tmp_path / "missing").validate()
    assert isinstance(info.value.__cause__, FileNotFoundError)
