#!/usr/bin/env python3
"""Fuzz the snapshot state file loader: :func:`pyrovm.snapshot.fileformat.loads` and
:func:`pyrovm.snapshot.load_state` (the typed codec, the config inside, the layout and size checks), and
what ``PUT /snapshot/load`` does next with a state that loaded (the API resources saved with it).

The first byte picks the mode:

* 0: the input's bytes as a state file (``loads``, then ``load_state`` on a file);
* 1: the rest is the state's JSON text, taken as it is (not even valid UTF-8 or JSON), in a state file
  with a good header and checksum: the fuzzer is past them at once and exercises the decoding;
* 2: a state built from the input (:class:`atheris.FuzzedDataProvider`): every field of the right kind and
  the KVM structures of the right size unless the input says otherwise, so that many states load and the
  checks after decoding run.

Expected: :class:`pyrovm.errors.SnapshotError` (load_state's ConfigError from the config inside is turned
into one).  A state that loads: the API's replay of its saved resources returns resources or None.

    python fuzz/fuzz_snapshot.py -max_total_time=600 fuzz/corpus/snapshot
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import tempfile
from typing import Any

import _common
import atheris

with _common.instrumented(__name__):
    from pyrovm.api import snapshots as api_snapshots
    from pyrovm.api.resources import Resources
    from pyrovm.arch.x86 import layout
    from pyrovm.errors import SnapshotError
    from pyrovm.snapshot import fileformat, load_state

_TMP = tempfile.TemporaryDirectory(prefix="pvf-snap-", dir="/tmp")
_DIR = _TMP.name
STATE = os.path.join(_DIR, "vm.state")
SIZES = _common.SIZES
MIB = 1 << 20
ODD = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, 1 << 64, "AAAA", "!!"]


def _odd(fdp: atheris.FuzzedDataProvider, value: Any) -> Any:
    """*value*, or (rarely) something of another kind."""
    return fdp.PickValueInList(ODD) if fdp.ConsumeIntInRange(0, 31) == 0 else value


def _b64(fdp: atheris.FuzzedDataProvider, size: int) -> Any:
    if fdp.ConsumeIntInRange(0, 31) == 0:
        size = fdp.ConsumeIntInRange(0, size + 8)
    return _odd(fdp, base64.b64encode(bytes(size)).decode())


def _config(fdp: atheris.FuzzedDataProvider, memory: int, cpus: int) -> Any:
    config: dict[str, Any] = {"kernel": _odd(fdp, "/nonexistent/vmlinux"), "memory": memory, "cpus": cpus}
    if fdp.ConsumeBool():
        config["cmdline"] = _odd(fdp, fdp.ConsumeUnicode(16))
    if fdp.ConsumeIntInRange(0, 3) == 0:
        config["disks"] = [_odd(fdp, {"path": "/nonexistent/disk", "read_only": fdp.ConsumeBool()})]
    if fdp.ConsumeIntInRange(0, 3) == 0:
        mac = fdp.PickValueInList([None, "02:00:00:00:00:01", "zz"])
        config["net"] = [
            _odd(fdp, {"backend": fdp.PickValueInList(["tap", "user", "x"]), "tap": "tap0", "mac": mac})
        ]
    if fdp.ConsumeIntInRange(0, 3) == 0:
        config["vsock"] = _odd(fdp, {"cid": fdp.ConsumeIntInRange(0, 5), "uds": fdp.ConsumeUnicode(8)})
    if fdp.ConsumeIntInRange(0, 7) == 0:
        config[fdp.PickValueInList(["rng", "timeout", "boot", "name", "cpu_features", "x"])] = _odd(fdp, "x")
    return _odd(fdp, config)


def _api_extra(fdp: atheris.FuzzedDataProvider) -> Any:
    """What the API server saves with a snapshot: its resources (replayed at load) and NIC ids."""
    r = Resources()
    r.kernel = "/nonexistent/vmlinux"
    saved = r.vm_config()
    for key in ("drives", "network-interfaces", "vsock", "entropy", "machine-config", "boot-source"):
        if fdp.ConsumeIntInRange(0, 3) == 0:
            saved[key] = fdp.PickValueInList([
                *ODD, [{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": True}],
                [{"iface_id": "eth0", "host_dev_name": "tap0"}], {"guest_cid": 3, "uds_path": "/x"},
                {"rate_limiter": None}, [None], ["x"], [{"iface_id": "eth0"}],
            ])  # fmt: skip
    return {"api": _odd(fdp, {"vm_config": _odd(fdp, saved), "nics": _odd(fdp, ["eth0"])})}


def _structured(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    memory = fdp.PickValueInList([128 * MIB, 8 * MIB, 4096 * MIB, 0, -1]) if fdp.ConsumeBool() else 128 * MIB
    cpus = fdp.ConsumeIntInRange(0, 3)
    ram = [list(r) for r in layout.ram_layout(memory)] if memory > 0 else [[0, 0]]
    vcpus = [
        _odd(fdp, {
            "id": i, "mp_state": 0, "regs": _b64(fdp, SIZES["regs"]), "sregs": _b64(fdp, SIZES["sregs"]),
            "xsave": _b64(fdp, SIZES["xsave"]), "xcrs": _b64(fdp, SIZES["xcrs"]),
            "debugregs": _b64(fdp, SIZES["debugregs"]), "lapic": _b64(fdp, SIZES["lapic"]), "tsc_khz": 0,
            "cpuid": [_b64(fdp, SIZES["cpuid"]) for _ in range(fdp.ConsumeIntInRange(0, 2))],
            "msrs": _odd(fdp, [[0x10, 5], [0x6E0, 0]]), "events": _b64(fdp, SIZES["events"]),
        })
        for i in range(cpus + (fdp.ConsumeIntInRange(0, 31) == 0))
    ]  # fmt: skip
    state: dict[str, Any] = {
        "pyrovm_version": "0.1.0", "created_at": _odd(fdp, 1.0),
        "kind": fdp.PickValueInList(["full", "diff", "x"]),
        "memory_layout": _odd(fdp, ram), "config": _config(fdp, memory, cpus),
        "boot": _odd(fdp, {"mode": "linux64", "entry": 0x1000000, "cmdline": "", "initrd": _odd(fdp, None)}),
        "host_workarounds_applied": False, "host": _odd(fdp, {"tsc_khz": 0, "pvm": False}),
        "vm": _odd(fdp, {"pic_master": _b64(fdp, SIZES["pic"]), "pic_slave": _b64(fdp, SIZES["pic"]),
                         "ioapic": _b64(fdp, SIZES["pic"]), "pit": _b64(fdp, SIZES["pit"]), "clock": 0,
                         "clock_flags": 0, "clock_realtime": 0}),
        "vcpus": _odd(fdp, vcpus), "devices": _odd(fdp, {}), "memory_size": memory,
        "extra": _api_extra(fdp) if fdp.ConsumeBool() else {},
    }  # fmt: skip
    for _ in range(fdp.ConsumeIntInRange(0, 1)):
        key = fdp.PickValueInList([*state, "unknown"])
        if fdp.ConsumeBool():
            state.pop(key, None)
        else:
            state[key] = fdp.PickValueInList(ODD)
    return state


def _checksummed(body: bytes) -> bytes:
    """*body* (meant to be JSON text, taken as it is) in a state file with a good header and checksum."""
    head = struct.pack(
        "<8sIIQ", fileformat.MAGIC, fileformat.FORMAT_VERSION, fileformat.ARCH_X86_64, len(body)
    )
    return head + body + hashlib.sha256(head + body).digest()


def _load(data: bytes) -> None:
    with open(STATE, "wb") as f:
        f.write(data)
    state = load_state(STATE)
    api = api_snapshots._saved_api(state)
    resources = api_snapshots._resources(api.get("vm_config"), {"eth0": "tap1"}, None)
    if resources is not None and not isinstance(resources, Resources):
        raise AssertionError(f"_resources gave {resources!r}")


def fuzz_one(data: bytes) -> None:
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    try:
        if mode == 0:
            try:
                fileformat.loads(rest)
            except SnapshotError:
                pass
            _load(rest)
        elif mode == 1:
            _load(_checksummed(rest))
        else:
            _load(fileformat.dumps(_structured(atheris.FuzzedDataProvider(rest))))
    except SnapshotError:
        pass


if __name__ == "__main__":
    _common.run(fuzz_one)
