"""``PUT /snapshot/create`` and ``PUT /snapshot/load``, with Firecracker's bodies and rules.

Create needs a started, paused VM; it writes the state file (with the server's resources, so that a load
answers ``GET /vm/config`` and takes PATCHes with the same ids) and the memory file.  Load is allowed only
on a server that has not started a VM nor configured a boot resource; it restores the VM (paused unless
``resume_vm``), with ``network_overrides`` (a new tap per interface id), ``vsock_override`` (a new socket
path), ``track_dirty_pages`` / ``enable_diff_snapshots`` and ``clock_realtime``.  The memory backend is a
file (``mem_backend: {"backend_type": "File", "backend_path": ...}`` or the older ``mem_file_path``);
``Uffd`` is refused: pyrovm has no userfaultfd page server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrovm.errors import PyrovmError
from pyrovm.snapshot import SnapshotState, load_state

from .resources import ApiError, Resources, fields

if TYPE_CHECKING:
    from .controller import Controller

BOOT_CONFIGURED = "Loading a microVM snapshot not allowed after configuring boot-specific resources."


def create(ctl: Controller, body: Any) -> tuple[int, Any]:
    b = fields(
        body,
        {"snapshot_path": str, "mem_file_path": str, "snapshot_type": str, "version": (str, type(None))},
        ("snapshot_path", "mem_file_path"),
    )
    if ctl.vm is None:
        raise ApiError("The requested operation is not supported before starting the microVM.")
    kind = b.get("snapshot_type", "Full")
    if kind not in ("Full", "Diff"):
        raise ApiError(
            "An error occurred when deserializing the json body of a request: "
            f"unknown variant `{kind}`, expected `Full` or `Diff`."
        )
    if ctl.vm.state != "paused":
        raise ApiError("Create snapshot error: the microVM must be paused (PATCH /vm Paused) first.")
    extra = {"api": {"vm_config": ctl.resources.vm_config(), "nics": list(ctl.resources.nics)}}
    try:
        ctl.vm.machine.snapshot(b["snapshot_path"], b["mem_file_path"], diff=kind == "Diff", extra=extra)
    except PyrovmError as e:
        raise ApiError(f"Create snapshot error: {e}") from None
    return 204, None


def _mem_path(b: dict[str, Any]) -> str:
    backend = b.get("mem_backend")
    if backend is not None and "mem_file_path" in b:
        raise ApiError("Load snapshot error: give either mem_backend or mem_file_path, not both.")
    if backend is None:
        if "mem_file_path" not in b:
            raise ApiError("Load snapshot error: missing field `mem_backend`.")
        return str(b["mem_file_path"])
    m = fields(backend, {"backend_type": str, "backend_path": str}, ("backend_type", "backend_path"))
    if m["backend_type"] == "Uffd":
        raise ApiError("Load snapshot error: the Uffd memory backend is not supported by pyrovm (use File).")
    if m["backend_type"] != "File":
        raise ApiError(
            "An error occurred when deserializing the json body of a request: "
            f"unknown variant `{m['backend_type']}`, expected `File` or `Uffd`."
        )
    return str(m["backend_path"])


def _overrides(b: dict[str, Any], nic_ids: list[str]) -> tuple[dict[str, str], Path | None]:
    taps: dict[str, str] = {}
    for item in b.get("network_overrides") or []:
        o = fields(item, {"iface_id": str, "host_dev_name": str}, ("iface_id", "host_dev_name"))
        if o["iface_id"] in nic_ids:
            taps[f"eth{nic_ids.index(o['iface_id'])}"] = o["host_dev_name"]
        else:
            taps[o["iface_id"]] = o["host_dev_name"]  # pyrovm's own names (eth0...) also work
    vsock = b.get("vsock_override")
    uds = None if vsock is None else Path(fields(vsock, {"uds_path": str}, ("uds_path",))["uds_path"])
    return taps, uds


def load(ctl: Controller, body: Any) -> tuple[int, Any]:
    from pyrovm.builder import RestoreOptions

    allowed = {
        "snapshot_path": str,
        "mem_file_path": str,
        "mem_backend": dict,
        "enable_diff_snapshots": bool,
        "track_dirty_pages": bool,
        "resume_vm": bool,
        "network_overrides": list,
        "vsock_override": (dict, type(None)),
        "clock_realtime": bool,
    }
    b = fields(body, allowed, ("snapshot_path",))
    if ctl.vm is not None:
        raise ApiError("The requested operation is not supported after starting the microVM.")
    r = ctl.resources
    if r.kernel is not None or r.drives or r.nics or r.vsock is not None or r.entropy:
        raise ApiError(BOOT_CONFIGURED)
    mem = _mem_path(b)
    try:
        state = load_state(b["snapshot_path"])
        api = _saved_api(state)
        taps, uds = _overrides(b, list(api.get("nics") or []))
        options = RestoreOptions(
            taps=taps,
            vsock_uds=uds,
            name=ctl.id,
            track_dirty_pages=bool(b.get("track_dirty_pages") or b.get("enable_diff_snapshots")),
            clock_realtime=bool(b.get("clock_realtime")),
        )
        restore_into(ctl, state, mem, options, resume=bool(b.get("resume_vm")))
    except PyrovmError as e:
        raise ApiError(f"Load snapshot error: {e}") from None
    return 204, None


def _saved_api(state: SnapshotState) -> dict[str, Any]:
    api = state.extra.get("api")
    return api if isinstance(api, dict) else {}


def restore_into(ctl: Controller, state: SnapshotState, mem_path: str, options: Any, resume: bool) -> None:
    """Restore the snapshot *state* as *ctl*'s VM (paused unless *resume*); its resources become the
    saved ones, with *options*' overrides.  PyrovmError for bad input."""
    from pyrovm.vmm import VM

    resources = _resources(_saved_api(state).get("vm_config"), options.taps, options.vsock_uds)
    vm = VM.restore(state, mem_path, console=ctl.console, resume=resume, options=options)
    if resources is not None:
        resources.track_dirty_pages = options.track_dirty_pages
        ctl.resources = resources
    ctl.adopt(vm)


def _resources(saved: Any, taps: dict[str, str], uds: Path | None) -> Resources | None:
    """The server resources saved with the snapshot, replayed through the PUT handlers (None when the
    snapshot was not taken through the API), with the load's overrides."""
    if not isinstance(saved, dict):
        return None
    r = Resources()
    try:
        if saved.get("boot-source"):
            r.put_boot_source(saved["boot-source"])
        r.put_machine_config(saved["machine-config"])
        for d in saved.get("drives") or []:
            r.put_drive(d["drive_id"], {k: v for k, v in d.items() if v is not None})
        for i, n in enumerate(saved.get("network-interfaces") or []):
            n = {k: v for k, v in n.items() if v is not None}
            n["host_dev_name"] = taps.get(f"eth{i}", n["host_dev_name"])
            r.put_nic(n["iface_id"], n)
        if saved.get("vsock"):
            r.put_vsock({**saved["vsock"], **({"uds_path": str(uds)} if uds is not None else {})})
        if saved.get("entropy") is not None:
            r.put_entropy({k: v for k, v in saved["entropy"].items() if v is not None})
    except (ApiError, KeyError, TypeError, AttributeError):
        return None  # an older or foreign layout: GET /vm/config shows less, the VM is the same
    return r
