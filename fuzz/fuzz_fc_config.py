#!/usr/bin/env python3
"""Fuzz Firecracker's configuration file as ``pyrovm-firecracker --config-file`` reads it
(:func:`pyrovm.api.firecracker.apply_config_file`): the input is the file's bytes; each section goes through
the API controller, then ``InstanceStart``.

Expected: ``ValueError`` (the function's documented error: a bad file, a refused section, the start
refused; ``ConfigError`` is one), whose message must not be pyrovm's "Internal error".  No VM is ever
built (``_common.sandbox``: the config is validated, then the start is refused), so a file that would
boot is refused too; the kernel, initrd and disk in the seeds are the harness's own files
(``/tmp/pyrovm-fuzz-files``).

    python fuzz/fuzz_fc_config.py -max_total_time=600 fuzz/corpus/fc_config
"""

from __future__ import annotations

import os
import tempfile

import _common

with _common.instrumented(__name__):
    from pyrovm.api.controller import Controller
    from pyrovm.api.firecracker import apply_config_file

_TMP = tempfile.TemporaryDirectory(prefix="pvf-fc-", dir="/tmp")
_DIR = _TMP.name
CONFIG = os.path.join(_DIR, "vm.json")


def fuzz_one(data: bytes) -> None:
    _common.make_files()
    with open(CONFIG, "wb") as f:
        f.write(data)
    controller = Controller("fuzz")
    try:
        with _common.sandbox():
            apply_config_file(controller, CONFIG)
    except ValueError as e:
        if "Internal error of pyrovm" in str(e):
            raise AssertionError(str(e)) from e
    else:
        raise AssertionError("the config file started a VM, though no VM can be built here")
    finally:
        controller.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
