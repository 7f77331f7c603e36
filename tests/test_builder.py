"""The builder: a failure at any step releases everything already acquired (fds, mappings, threads,
console file, disk image locks); a success hands all of it to the machine, which releases it on close."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyrovm import builder
from pyrovm.arch.x86 import boot as x86boot
from pyrovm.config import DiskSpec, VmConfig
from pyrovm.errors import ConfigError, PyrovmError
from pyrovm.loader import KernelLoadError

import rawelf
from conftest import needs_kvm

pytestmark = needs_kvm


class Injected(Exception):
    pass


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _config(guest: Path, tmp_path: Path, **kw: Any) -> VmConfig:
    disk = tmp_path / "disk.img"
    if not disk.exists():
        disk.write_bytes(bytes(1 << 20))
    base: dict[str, Any] = {
        "kernel": guest,
        "memory": 32 << 20,
        "cpus": 2,
        "cmdline": "test=hello",
        "disks": (DiskSpec(disk),),
        "rng": True,
        "console": f"file:{tmp_path / 'console.log'}",
    }
    return VmConfig(**(base | kw))


def _assert_released(before_fds: set[str], before_threads: int, disk: Path) -> None:
    leaked = _fds() - before_fds
    assert not leaked, {
        fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert threading.active_count() == before_threads
    with open(disk, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no lock left on the image
        fcntl.flock(f, fcntl.LOCK_UN)


STEPS: list[tuple[Any, str]] = [
    (builder, "_open_console"),
    (builder, "_map_memory"),
    (builder, "_create_vm"),
    (builder, "_create_devices"),
    (builder, "_create_vcpus"),
    (builder, "load_kernel"),
    (x86boot, "configure_boot"),
    (x86boot, "setup_boot_vcpu"),
    (builder, "Machine"),
]


@pytest.mark.parametrize(("module", "step"), STEPS, ids=[s for _, s in STEPS])
def test_failure_after_each_step_releases_everything(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: Any, step: str
) -> None:
    config = _config(guest, tmp_path)
    builder.build(config).close()  # warm up (imports, lazily created fds) before counting
    real: Callable[..., Any] = getattr(module, step)

    def fail_after(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise Injected(step)

    monkeypatch.setattr(module, step, fail_after)
    before_fds, before_threads = _fds(), threading.active_count()
    with pytest.raises(Injected):
        builder.build(config)
    _assert_released(before_fds, before_threads, config.disks[0].path)


def test_natural_failures_release_everything(guest: Path, tmp_path: Path) -> None:
    builder.build(_config(guest, tmp_path)).close()
    before_fds, before_threads = _fds(), threading.active_count()
    disk = tmp_path / "disk.img"
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(KernelLoadError, match="not a kernel"):
        builder.build(_config(junk, tmp_path))
    high = rawelf.make_elf(b"\x90", tmp_path / "high.elf", load_addr=0x3000000)
    with pytest.raises(KernelLoadError, match="does not fit"):
        builder.build(_config(high, tmp_path))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(31 << 20))
    with pytest.raises(ConfigError, match="initrd"):
        builder.build(_config(guest, tmp_path, initrd=initrd))
    plain = rawelf.make_elf(b"\x90", tmp_path / "plain.elf")
    with pytest.raises(KernelLoadError, match="no PVH entry"):
        builder.build(_config(plain, tmp_path, boot="pvh"))
    stray = rawelf.make_elf(b"\x90", tmp_path / "stray.elf", pvh_entry=0x2000)  # (found by fuzzing)
    with pytest.raises(KernelLoadError, match="PVH entry point 0x2000 is outside"):
        builder.build(_config(stray, tmp_path))
    _assert_released(before_fds, before_threads, disk)


def test_locked_disk_releases_the_rest(guest: Path, tmp_path: Path) -> None:
    config = _config(guest, tmp_path)
    builder.build(config).close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    with open(other, "rb+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another "VM" holds the second disk
        before_fds, before_threads = _fds(), threading.active_count()
        with pytest.raises(PyrovmError, match="locked"):
            builder.build(config.replace(disks=(*config.disks, DiskSpec(other))))
        assert _fds() == before_fds and threading.active_count() == before_threads
    _assert_released(_fds(), threading.active_count(), config.disks[0].path)


def test_built_never_started_machine_releases_on_close(guest: Path, tmp_path: Path) -> None:
    config = _config(guest, tmp_path)
    builder.build(config).close()
    before_fds, before_threads = _fds(), threading.active_count()
    machine = builder.build(config)
    assert len(_fds() - before_fds) > 5  # kvm, vm, 2 vcpus, eventfds, disk, console file
    assert machine.state == "created"
    machine.close()
    assert machine.closed
    _assert_released(before_fds, before_threads, config.disks[0].path)


def test_a_run_releases_everything(guest: Path, tmp_path: Path) -> None:
    config = _config(guest, tmp_path)
    builder.build(config).close()
    before_fds, before_threads = _fds(), threading.active_count()
    machine = builder.build(config).start()
    result = machine.wait(20)
    assert result.guest_status == 0
    machine.close()
    assert (tmp_path / "console.log").read_text() == "hello from the test guest\n"
    deadline = threading.Event()
    for _ in range(50):  # the reaper and monitor threads end right after the VM
        if threading.active_count() == before_threads:
            break
        deadline.wait(0.05)
    _assert_released(before_fds, before_threads, config.disks[0].path)
