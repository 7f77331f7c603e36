"""What every harness in ``fuzz/`` shares: instrumentation, the libFuzzer entry point, and the guards that
keep a fuzzed input from reaching outside its sandbox (no VM is ever built, no log file is ever opened).

This module imports nothing of pyrovm at import time: a harness imports it first, then the pyrovm modules
under :func:`instrumented`, so that coverage instrumentation sees them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import atheris

#: True when a harness runs as a fuzzer (``python fuzz/fuzz_x.py ...``), not imported by a test.
FUZZING = False


def instrumented(main_module: str) -> AbstractContextManager[Any]:
    """Coverage instrumentation of the pyrovm modules imported in the block, only when the harness runs as
    the fuzzer (*main_module* is its ``__name__``): a test that imports a harness to replay an input must
    not leave instrumented pyrovm modules behind in the test process."""
    global FUZZING
    if main_module != "__main__":
        return contextlib.nullcontext()
    FUZZING = True
    return atheris.instrument_imports(include=["pyrovm"])


def quiet() -> None:
    """pyrovm logs every malformed request once per device: nothing of that on the fuzzer's output."""
    logging.getLogger("pyrovm").setLevel(logging.CRITICAL + 10)
    logging.getLogger("pyrovm").propagate = False


def run(fuzz_one: Callable[[bytes], None]) -> None:
    """The libFuzzer main loop (arguments: libFuzzer's flags and corpus directories)."""
    quiet()
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


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
