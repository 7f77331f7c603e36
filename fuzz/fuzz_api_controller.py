#!/usr/bin/env python3
"""Fuzz the API's rules without HTTP: :meth:`pyrovm.api.controller.Controller.handle` with structured
requests from the input (a method, a path, a JSON body made of the API's own field names and values
around their limits), several per input on one fresh controller, so that sequences (configure, then start,
then PATCH...) are reached.

Every call must return ``(status, value)`` with status 200, 204 or 400, a JSON value, and never pyrovm's
own "Internal error" (what the controller answers when an unexpected exception reaches it).  No VM is
ever built (``_common.sandbox``): ``InstanceStart`` validates the config and is refused.

    python fuzz/fuzz_api_controller.py -max_total_time=600 fuzz/corpus/api_controller
"""

from __future__ import annotations

from typing import Any

import _common
import atheris

with _common.instrumented(__name__):
    from pyrovm.api.controller import Controller

METHODS = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"]
PATHS = [
    "/", "/version", "/machine-config", "/vm/config", "/boot-source", "/drives/rootfs", "/drives/scratch",
    "/drives/", "/drives/a/b", "/network-interfaces/eth0", "/network-interfaces/x y", "/vsock", "/entropy",
    "/metrics", "/logger", "/actions", "/vm", "/snapshot/create", "/snapshot/load", "/balloon", "/mmds",
    "/mmds/config", "/cpu-config", "/serial", "/hotplug/memory", "/openapi.json", "/machine-config?x=1",
]  # fmt: skip
KEYS = [
    "kernel_image_path", "boot_args", "initrd_path", "vcpu_count", "mem_size_mib", "smt", "track_dirty_pages",
    "huge_pages", "cpu_template", "drive_id", "path_on_host", "is_root_device", "is_read_only", "partuuid",
    "cache_type", "io_engine", "rate_limiter", "socket", "iface_id", "host_dev_name", "guest_mac",
    "rx_rate_limiter", "tx_rate_limiter", "guest_cid", "uds_path", "vsock_id", "metrics_path", "log_path",
    "level", "show_level", "show_log_origin", "module", "action_type", "state", "snapshot_path",
    "mem_file_path", "snapshot_type", "version", "mem_backend", "backend_type", "backend_path",
    "enable_diff_snapshots", "resume_vm", "network_overrides", "vsock_override", "clock_realtime",
    "bandwidth", "ops", "size", "refill_time", "one_time_burst",
]  # fmt: skip
STRINGS = [
    "", "rootfs", "scratch", "eth0", "tap0", "InstanceStart", "FlushMetrics", "SendCtrlAltDel", "Paused",
    "Resumed", "Full", "Diff", "File", "Uffd", "None", "T2", "2M", "Info", "debug", "Off", "Unsafe", "Sync",
    "/nonexistent/vmlinux", "/dev/null", "/tmp", "/tmp/pyrovm-fuzz-nothing/x.sock", "06:00:00:00:00:01",
    "01:00:00:00:00:00", "00:00:00:00:00:00", "console=ttyS0", "a" * 65, "\ud800", "x\x00y", "1.0",
]  # fmt: skip
INTS = [0, 1, 2, 3, 7, 8, 32, 33, 128, -1, 1 << 31, 1 << 32, 1 << 63, 1 << 64, 10**30]


#: the requests the API takes, with their fields and each field's kind
LIMITER = "limiter"
ROUTES: list[tuple[str, str, dict[str, str]]] = [
    ("PUT", "/boot-source", {"kernel_image_path": "path", "boot_args": "str", "initrd_path": "path"}),
    ("PUT", "/machine-config", {"vcpu_count": "int", "mem_size_mib": "int", "smt": "bool",
                                "track_dirty_pages": "bool", "huge_pages": "str", "cpu_template": "str"}),
    ("PATCH", "/machine-config", {"vcpu_count": "int", "mem_size_mib": "int", "track_dirty_pages": "bool"}),
    ("PUT", "/drives/{id}", {"drive_id": "id", "path_on_host": "path", "is_root_device": "bool",
                             "is_read_only": "bool", "partuuid": "str", "cache_type": "str",
                             "io_engine": "str", "rate_limiter": LIMITER, "socket": "str"}),
    ("PATCH", "/drives/{id}", {"drive_id": "id", "path_on_host": "path", "rate_limiter": LIMITER}),
    ("PUT", "/network-interfaces/{id}", {"iface_id": "id", "host_dev_name": "str", "guest_mac": "str",
                                         "rx_rate_limiter": LIMITER, "tx_rate_limiter": LIMITER}),
    ("PATCH", "/network-interfaces/{id}", {"iface_id": "id", "rx_rate_limiter": LIMITER,
                                           "tx_rate_limiter": LIMITER}),
    ("PUT", "/vsock", {"guest_cid": "int", "uds_path": "path", "vsock_id": "str"}),
    ("PUT", "/entropy", {"rate_limiter": LIMITER}),
    ("PUT", "/metrics", {"metrics_path": "path"}),
    ("PUT", "/logger", {"log_path": "path", "level": "str", "show_level": "bool", "show_log_origin": "bool",
                        "module": "str"}),
    ("PUT", "/actions", {"action_type": "str"}),
    ("PATCH", "/vm", {"state": "str"}),
    ("PUT", "/snapshot/create", {"snapshot_path": "path", "mem_file_path": "path", "snapshot_type": "str",
                                 "version": "str"}),
    ("PUT", "/snapshot/load", {"snapshot_path": "path", "mem_file_path": "path", "mem_backend": "backend",
                               "enable_diff_snapshots": "bool", "track_dirty_pages": "bool",
                               "resume_vm": "bool", "network_overrides": "overrides",
                               "vsock_override": "vsock", "clock_realtime": "bool"}),
]  # fmt: skip
IDS = ["rootfs", "scratch", "eth0", "eth1", "eth\u00b2", "vda", "a" * 64, "a" * 65, "x y", ""]
PATHS_ON_HOST = [
    _common.KERNEL, _common.INITRD, _common.DISK, _common.STATE, _common.MEM, "/nonexistent/vmlinux",
    "/dev/null", "/tmp", "", _common.FILES + "/v.sock", "\ud800",
]  # fmt: skip


def _value(fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.PickValueInList(INTS) if fdp.ConsumeBool() else fdp.ConsumeInt(8)
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind <= 5:
        return fdp.PickValueInList(STRINGS)
    if kind == 6:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))
    if kind == 7:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return _object(fdp, depth + 1)


def _object(fdp: atheris.FuzzedDataProvider, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        key = fdp.PickValueInList(KEYS) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicode(8)
        out[key] = _value(fdp, depth)
    return out


def _bucket(fdp: atheris.FuzzedDataProvider) -> Any:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return _value(fdp, 2)
    keys = ["size", "refill_time"] + (["one_time_burst"] if fdp.ConsumeBool() else [])
    return {k: fdp.PickValueInList(INTS) if fdp.ConsumeIntInRange(0, 7) else _value(fdp, 3) for k in keys}


def _typed(fdp: atheris.FuzzedDataProvider, kind: str, dev_id: str) -> Any:
    if fdp.ConsumeIntInRange(0, 15) == 0:
        return _value(fdp, 1)  # the wrong type
    if kind == "int":
        return fdp.PickValueInList(INTS) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 300)
    if kind == "bool":
        return fdp.ConsumeBool()
    if kind == "id":
        return dev_id if fdp.ConsumeIntInRange(0, 7) else fdp.PickValueInList(IDS)
    if kind == "path":
        return fdp.PickValueInList(PATHS_ON_HOST) if fdp.ConsumeBool() else fdp.ConsumeUnicode(12)
    if kind == LIMITER:
        if fdp.ConsumeIntInRange(0, 3) == 0:
            return None
        return {k: _bucket(fdp) for k in ("bandwidth", "ops") if fdp.ConsumeBool()}
    if kind == "backend":
        return {"backend_type": fdp.PickValueInList(["File", "Uffd", "x"]), "backend_path": "/nonexistent"}
    if kind == "overrides":
        return [{"iface_id": fdp.PickValueInList(IDS), "host_dev_name": "tap0"}
                for _ in range(fdp.ConsumeIntInRange(0, 2))]  # fmt: skip
    if kind == "vsock":
        return {"uds_path": fdp.ConsumeUnicode(8)}
    return fdp.PickValueInList(STRINGS) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeUnicode(12)


def _request(fdp: atheris.FuzzedDataProvider) -> tuple[str, str, Any]:
    if fdp.ConsumeIntInRange(0, 3) == 0:  # anything
        method = fdp.PickValueInList(METHODS) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeUnicode(6)
        path = fdp.PickValueInList(PATHS) if fdp.ConsumeIntInRange(0, 7) else "/" + fdp.ConsumeUnicode(16)
        return method, path, _object(fdp, 0) if fdp.ConsumeIntInRange(0, 7) else _value(fdp, 0)
    method, template, schema = ROUTES[fdp.ConsumeIntInRange(0, len(ROUTES) - 1)]
    dev_id = fdp.PickValueInList(IDS)
    body = {k: _typed(fdp, kind, dev_id) for k, kind in schema.items() if fdp.ConsumeIntInRange(0, 2)}
    if fdp.ConsumeIntInRange(0, 15) == 0:
        body[fdp.PickValueInList(KEYS)] = _value(fdp, 1)
    return method, template.replace("{id}", dev_id), body


def fuzz_one(data: bytes) -> None:
    _common.make_files()
    fdp = atheris.FuzzedDataProvider(data)
    controller = Controller("fuzz")
    with _common.sandbox():
        for _ in range(8):
            if not fdp.remaining_bytes():
                break
            method, path, body = _request(fdp)
            reply = controller.handle(method, path, body)
            if not isinstance(reply, tuple) or len(reply) != 2:
                raise AssertionError(f"{method} {path}: {reply!r} is not (status, value)")
            _common.check_reply(reply[0], reply[1], f"{method} {path} {body!r}")
    controller.close()


if __name__ == "__main__":
    _common.run(fuzz_one)
