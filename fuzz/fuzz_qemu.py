#!/usr/bin/env python3
"""Fuzz the QEMU command-line translator: :func:`pyrovm.qemu.translate.translate` on an argv made of the
input split at NUL bytes (decoded as the OS decodes argv: UTF-8 with surrogate escapes), and
:func:`pyrovm.qemu.args.parse_props` on each argument (with and without an implied key).

Expected: :class:`pyrovm.errors.ConfigError` (:class:`QemuArgError` is one).  A command line that
translates: its config survives ``to_json`` / ``VmConfig.from_json`` (or is refused with a ConfigError).

    python fuzz/fuzz_qemu.py -max_total_time=600 fuzz/corpus/qemu
"""

from __future__ import annotations

import _common

with _common.instrumented(__name__):
    from pyrovm.config import VmConfig
    from pyrovm.errors import ConfigError
    from pyrovm.qemu.args import parse_props
    from pyrovm.qemu.translate import translate


def fuzz_one(data: bytes) -> None:
    argv = data.decode("utf-8", "surrogateescape").split("\0")
    if argv and argv[-1] == "":
        argv.pop()
    for arg in argv[:8]:
        for implied in (None, "type"):
            try:
                props = parse_props(arg, "x", implied)
            except ConfigError:
                continue
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
                raise AssertionError(f"parse_props({arg!r}) gave {props!r}")
    try:
        setup = translate(argv)
    except ConfigError:
        return
    try:
        VmConfig.from_json(setup.config.to_json())
    except ConfigError:
        pass


if __name__ == "__main__":
    _common.run(fuzz_one)
