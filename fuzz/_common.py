"""What the harnesses in ``fuzz/`` share: instrumentation, quiet logs, the guards that keep a fuzzed input
from reaching outside its sandbox (no VM is ever built, no log file is ever opened), the files the API
harnesses name, and the check of an API answer.

This module imports nothing of pyrovm at import time: a harness imports it first, then the pyrovm modules
under :func:`instrumented`, so that coverage instrumentation sees them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import atheris


def instrumented(main_module: str, *also: str) -> AbstractContextManager[Any]:
    """Coverage instrumentation of the pyrovm modules (and the packages *also*) imported in the block,
    only when the harness runs as the fuzzer (*main_module* is its ``__name__``): a test that imports a
    harness to replay an input must not leave instrumented pyrovm modules behind in the test process."""
    if main_module != "__main__":
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["pyrovm", *also])


def quiet() -> None:
    """pyrovm logs every malformed request once per device: nothing of that on the fuzzer's output."""
    logging.getLogger("pyrovm").setLevel(logging.CRITICAL + 10)
    logging.getLogger("pyrovm").propagate = False


@contextlib.contextmanager
def sandbox() -> Iterator[None]:
    """While in the block: :func:`pyrovm.vmm.build` and :func:`pyrovm.vmm.restore` validate their input
    and stop (a fuzzed config that happens to name a real kernel must never start a VM: this host may have
    KVM), ``PUT /logger`` opens no file (a fuzzed ``log_path`` must not create or append to files; the
    level is still checked) and pyrovm logs nothing.  Everything is put back after the block, so that a
    test replaying an input in its own process is not affected."""
    import pyrovm.vmm as vmm
    from pyrovm.api import logs
    from pyrovm.builder import RestoreOptions
    from pyrovm.config import VmConfig
    from pyrovm.errors import ConfigError

    def build(config: Any, *, console: Any = None) -> Any:
        config.validate()
        raise ConfigError("fuzzing: no VM is built")

    def restore(state: Any, mem_path: Any, options: Any = None, *, console: Any = None) -> Any:
        config = (options or RestoreOptions()).apply(VmConfig.from_json(state.config))
        config.validate(restoring=True)
        raise ConfigError("fuzzing: no VM is restored")

    def configure_logging(path: str, level: str, show_level: bool, show_origin: bool) -> None:
        if not isinstance(path, str) or level not in logs.LEVELS:
            raise AssertionError(f"configure_logging({path!r}, {level!r}): the API let a bad value through")

    saved = (vmm.build, vmm.restore, logs.configure_logging)
    logger = logging.getLogger("pyrovm")
    level, propagate = logger.level, logger.propagate
    vmm.build, vmm.restore, logs.configure_logging = build, restore, configure_logging  # type: ignore[assignment]
    logger.setLevel(logging.CRITICAL + 10)
    logger.propagate = False
    try:
        yield
    finally:
        vmm.build, vmm.restore, logs.configure_logging = saved  # type: ignore[assignment]
        logger.setLevel(level)
        logger.propagate = propagate


#: files the API and config-file harnesses name (their seeds too): a regular file as the kernel and the
#: initrd, a 1 MiB disk image, a state file that loads (its VM is never restored: see :func:`sandbox`);
#: validation goes on past them, no VM is ever built from them
FILES = "/tmp/pyrovm-fuzz-files"
KERNEL = FILES + "/vmlinux"
INITRD = FILES + "/initrd"
DISK = FILES + "/disk.img"
STATE = FILES + "/vm.state"
MEM = FILES + "/vm.mem"
#: bytes of the KVM structures a state file holds (``ctypes.sizeof`` of pyrovm.kvm.structs')
SIZES = {
    "regs": 144, "sregs": 312, "xsave": 4096, "xcrs": 392, "debugregs": 128, "lapic": 1024, "events": 64,
    "cpuid": 40, "pic": 520, "pit": 112,
}  # fmt: skip


def state_json(
    memory: int = 128 << 20, cpus: int = 1, config: Any = None, extra: Any = None
) -> dict[str, Any]:
    """The JSON values of a state file that :func:`pyrovm.snapshot.load_state` takes (zeroed structures)."""
    import base64

    def b64(size: int) -> str:
        return base64.b64encode(bytes(size)).decode()

    low = min(memory, 0xC0000000)
    ram = [[0, low]] + ([[1 << 32, memory - low]] if memory > low else [])
    vcpu = {
        "id": 0, "mp_state": 0, "regs": b64(SIZES["regs"]), "sregs": b64(SIZES["sregs"]),
        "xsave": b64(SIZES["xsave"]), "xcrs": b64(SIZES["xcrs"]), "debugregs": b64(SIZES["debugregs"]),
        "lapic": b64(SIZES["lapic"]), "tsc_khz": 0, "cpuid": [b64(SIZES["cpuid"])], "msrs": [[16, 5]],
        "events": b64(SIZES["events"]),
    }  # fmt: skip
    return {
        "pyrovm_version": "0.1.0", "created_at": 1.0, "kind": "full", "memory_layout": ram,
        "config": config if config is not None else {"kernel": KERNEL, "memory": memory, "cpus": cpus},
        "boot": {"mode": "linux64", "entry": 0x1000000, "cmdline": "", "initrd": None},
        "host_workarounds_applied": False, "host": {"tsc_khz": 0, "pvm": False},
        "vm": {"pic_master": b64(SIZES["pic"]), "pic_slave": b64(SIZES["pic"]), "ioapic": b64(SIZES["pic"]),
               "pit": b64(SIZES["pit"]), "clock": 0, "clock_flags": 0, "clock_realtime": 0},
        "vcpus": [dict(vcpu, id=i) for i in range(cpus)], "devices": {}, "memory_size": memory,
        "extra": extra if extra is not None else {},
    }  # fmt: skip


def make_files() -> None:
    """Create :data:`FILES` once per process."""
    global _made
    if _made:
        return
    import os

    from pyrovm.snapshot import fileformat

    os.makedirs(FILES, exist_ok=True)
    for path, size in ((KERNEL, 4096), (INITRD, 512), (DISK, 1 << 20), (MEM, 0)):
        with open(path, "wb") as f:
            f.truncate(size)
    net = [{"backend": "tap", "tap": "tap0", "mac": "02:00:00:00:00:01"}]
    config = {"kernel": KERNEL, "memory": 128 << 20, "cpus": 1, "net": net, "disks": [{"path": DISK}]}
    fileformat.write(STATE, state_json(config=config, extra={"api": {"nics": ["eth0"]}}))
    _made = True


_made = False


def check_reply(status: Any, value: Any, where: str) -> None:
    """An API answer: 200/204/400, a JSON-serialisable value, and never pyrovm's own internal error (the
    controller turns an unexpected exception into a 400 saying so: for the fuzzer that is a crash)."""
    import json

    if status not in (200, 204, 400):
        raise AssertionError(f"{where}: status {status!r}")
    json.dumps(value)
    if status == 400:
        message = value.get("fault_message") if isinstance(value, dict) else None
        if not isinstance(message, str):
            raise AssertionError(f"{where}: a 400 without a fault_message: {value!r}")
        if "Internal error of pyrovm" in message:
            raise AssertionError(f"{where}: {message}")
    elif status == 204 and value is not None:
        raise AssertionError(f"{where}: a 204 with a body {value!r}")


def run(fuzz_one: Any) -> None:
    """A harness's main: atheris over *fuzz_one* with libFuzzer's options from the command line."""
    import sys

    quiet()
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()
    sys.exit(0)
