"""The API's rules, without HTTP: which request is allowed in which state, and what it does.

:meth:`Controller.handle` takes a method, a path and a decoded JSON body (or None) and returns a status
and a JSON value (or None for 204).  Refusals are :class:`~pyrovm.api.resources.ApiError` (400 with a
``fault_message``), worded as Firecracker words them.  Calls are serialised by one lock: the server may
run several connections at once.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyrovm import __version__
from pyrovm.errors import PyrovmError

from . import snapshots
from .resources import ApiError, Resources, check_id, fields, rate_limiter

log = logging.getLogger("pyrovm.api")

#: The Firecracker API version whose behaviour pyrovm follows (clients check it in GET /version).
FIRECRACKER_VERSION = "1.10.0"
BEFORE = "The requested operation is not supported before starting the microVM."
AFTER = "The requested operation is not supported after starting the microVM."
NOT_YET = {
    "/balloon": "A balloon device",
    "/mmds": "MMDS (the microVM metadata service)",
    "/mmds/config": "MMDS (the microVM metadata service)",
    "/cpu-config": "Custom CPU templates",
    "/hotplug/memory": "Memory hotplug",
    "/serial": "Serial output redirection",
}

Reply = tuple[int, Any]
#: Seconds between the metrics lines written without a FlushMetrics (Firecracker's period).
METRICS_PERIOD = 60.0
OPENAPI = Path(__file__).with_name("openapi.json")


def openapi_document() -> Any:
    """pyrovm's API as an OpenAPI 3 document (``src/pyrovm/api/openapi.json``, served at /openapi.json)."""
    return json.loads(OPENAPI.read_text())


class Controller:
    """The state behind one API socket: pre-boot resources, then the running VM."""

    def __init__(self, instance_id: str = "anonymous-instance", *, console: Any = None) -> None:
        self.id = instance_id
        self.resources = Resources()
        self.vm: Any = None  # pyrovm.vmm.VM once started
        self.console = console  # a binary stream the guest console goes to
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.on_exit: Callable[[Any], None] | None = None  # called with the VmExit when the guest ends

    @property
    def state(self) -> str:
        if self.vm is None:
            return "Not started"
        return "Paused" if self.vm.state == "paused" else "Running"

    def handle(self, method: str, path: str, body: Any) -> Reply:
        with self._lock:
            try:
                return self._dispatch(method, path.split("?", 1)[0], body)
            except ApiError as e:
                return 400, {"fault_message": e.message}
            except Exception as e:  # a bug of pyrovm's: the client still gets an answer, the log the trace
                log.exception("api: %s %s failed", method, path)
                return 400, {"fault_message": f"Internal error of pyrovm: {type(e).__name__}: {e}"}

    # -- routing ---------------------------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, body: Any) -> Reply:
        if method in ("PUT", "PATCH") and body is None:
            raise ApiError(f"Empty {method} request.")
        if method == "GET":
            return self._get(path)
        m = re.fullmatch(r"/(drives|network-interfaces)/([^/]*)", path)
        if m:
            return self._device(method, m.group(1), m.group(2), body)
        route = {
            ("PUT", "/boot-source"): self._put_boot_source,
            ("PUT", "/machine-config"): lambda b: self._pre_boot(self.resources.put_machine_config, b),
            ("PATCH", "/machine-config"): lambda b: self._pre_boot(
                lambda x: self.resources.put_machine_config(x, partial=True), b
            ),
            ("PUT", "/vsock"): lambda b: self._pre_boot(self.resources.put_vsock, b),
            ("PUT", "/entropy"): lambda b: self._pre_boot(self.resources.put_entropy, b),
            ("PUT", "/metrics"): self._put_metrics,
            ("PUT", "/logger"): self._put_logger,
            ("PUT", "/actions"): self._actions,
            ("PATCH", "/vm"): self._patch_vm,
            ("PUT", "/snapshot/create"): lambda b: snapshots.create(self, b),
            ("PUT", "/snapshot/load"): lambda b: snapshots.load(self, b),
        }.get((method, path))
        if route is not None:
            return route(body)
        if path in NOT_YET and method in ("GET", "PUT", "PATCH"):
            raise ApiError(f"{NOT_YET[path]} is not supported by pyrovm yet.")
        raise ApiError(f"Invalid request method and/or path: {method} {path}.")

    def _get(self, path: str) -> Reply:
        if path == "/":
            return 200, {
                "id": self.id,
                "state": self.state,
                "vmm_version": __version__,
                "app_name": "Firecracker",
            }
        if path == "/version":
            return 200, {"firecracker_version": FIRECRACKER_VERSION}
        if path == "/machine-config":
            return 200, self.resources.machine_config()
        if path == "/vm/config":
            return 200, self.resources.vm_config()
        if path == "/openapi.json":
            return 200, openapi_document()
        if path in NOT_YET:
            raise ApiError(f"{NOT_YET[path]} is not supported by pyrovm yet.")
        raise ApiError(f"Invalid request method and/or path: GET {path}.")

    def _pre_boot(self, fn: Callable[[Any], None], body: Any) -> Reply:
        if self.vm is not None:
            raise ApiError(AFTER)
        fn(body)
        return 204, None

    def _put_boot_source(self, body: Any) -> Reply:
        return self._pre_boot(self.resources.put_boot_source, body)

    def _device(self, method: str, kind: str, dev_id: str, body: Any) -> Reply:
        if method == "PUT":
            put = self.resources.put_drive if kind == "drives" else self.resources.put_nic
            return self._pre_boot(lambda b: put(dev_id, b), body)
        if method == "PATCH":
            if self.vm is None:
                raise ApiError(BEFORE)
            if kind == "drives":
                return self._patch_drive(dev_id, body)
            return self._patch_nic(dev_id, body)
        raise ApiError(f"Invalid request method and/or path: {method} /{kind}/{dev_id}.")

    def _patch_drive(self, drive_id: str, body: Any) -> Reply:
        """PATCH /drives/{id} after boot: another backing file (its capacity announced to the guest) and/or
        new rate limits."""
        b = fields(
            body, {"drive_id": str, "path_on_host": str, "rate_limiter": (dict, type(None))}, ("drive_id",)
        )
        check_id(drive_id, b["drive_id"], "drive")
        drive = self.resources.drives.get(drive_id)
        if drive is None:
            raise ApiError(f"Invalid block device ID: {drive_id} (no such drive).")
        slot = self._slot(f"virtio-blk:vd{chr(ord('a') + self.resources.drive_order().index(drive_id))}")
        if "path_on_host" in b and b["path_on_host"] != drive.path_on_host:
            try:  # the new image is opened and locked before the old one is let go
                slot.transport.device.locked(lambda: slot.transport.device.swap(b["path_on_host"]))
            except PyrovmError as e:
                raise ApiError(f"Unable to patch the block device: {e}") from None
            slot.transport.config_changed()  # the guest rereads the capacity
            drive.path_on_host = b["path_on_host"]
        if "rate_limiter" in b:
            limiter = rate_limiter(b["rate_limiter"])
            slot.transport.device.throttle.update(limiter)
            drive.limiter = limiter
        return 204, None

    def _slot(self, name: str) -> Any:
        """The running VM's virtio slot called *name* (the device manager names them as the guest sees)."""
        return next(s for s in self.vm.machine.devices.slots if s.name == name)

    def _patch_nic(self, iface_id: str, body: Any) -> Reply:
        """PATCH /network-interfaces/{id} after boot: new rx/tx rate limits."""
        allowed = {
            "iface_id": str,
            "rx_rate_limiter": (dict, type(None)),
            "tx_rate_limiter": (dict, type(None)),
        }
        b = fields(body, allowed, ("iface_id",))
        check_id(iface_id, b["iface_id"], "network interface")
        nic = self.resources.nics.get(iface_id)
        if nic is None:
            raise ApiError(f"Invalid network interface ID: {iface_id} (no such interface).")
        device = self._slot(f"virtio-net:eth{list(self.resources.nics).index(iface_id)}").transport.device
        for key, throttle in (
            ("rx_rate_limiter", device.rx_throttle),
            ("tx_rate_limiter", device.tx_throttle),
        ):
            if key in b:
                limiter = rate_limiter(b[key])
                throttle.update(limiter)
                nic[key] = limiter
        return 204, None

    def _put_metrics(self, body: Any) -> Reply:
        b = fields(body, {"metrics_path": str}, ("metrics_path",))
        if self.vm is not None:
            raise ApiError(AFTER)
        self.resources.metrics_path = b["metrics_path"]
        return 204, None

    def _put_logger(self, body: Any) -> Reply:
        allowed = {
            "log_path": (str, type(None)),
            "level": (str, type(None)),
            "show_level": (bool, type(None)),
            "show_log_origin": (bool, type(None)),
            "module": (str, type(None)),
        }
        b = fields(body, allowed)
        if self.vm is not None:
            raise ApiError(AFTER)
        level = (b.get("level") or "Info").capitalize()
        if level not in ("Off", "Error", "Warning", "Info", "Debug", "Trace"):
            raise ApiError(f"Invalid log level: {b.get('level')}.")
        if b.get("log_path"):
            from .logs import configure_logging

            try:
                configure_logging(
                    b["log_path"], level, bool(b.get("show_level")), bool(b.get("show_log_origin"))
                )
            except OSError as e:
                raise ApiError(f"Cannot open the log file {b['log_path']}: {e.strerror}") from None
        return 204, None

    # -- actions and state -----------------------------------------------------------------------------
    def _actions(self, body: Any) -> Reply:
        b = fields(body, {"action_type": str}, ("action_type",))
        action = b["action_type"]
        if action == "InstanceStart":
            if self.vm is not None:
                raise ApiError(AFTER)
            self._start()
        elif action == "FlushMetrics":
            if self.vm is None:
                raise ApiError(BEFORE)
            self._flush_metrics()
        elif action == "SendCtrlAltDel":
            if self.vm is None:
                raise ApiError(BEFORE)
            self.vm.machine.devices.i8042.ctrl_alt_del()
        else:
            raise ApiError(
                "An error occurred when deserializing the json body of a request: "
                f"unknown variant `{action}`, "
                "expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."
            )
        return 204, None

    def _start(self) -> None:
        from pyrovm.vmm import VM

        config = self.resources.to_config(self.id)
        try:
            vm = VM.from_config(config, console=self.console)
        except PyrovmError as e:
            raise ApiError(f"Failed to start microVM: {e}") from None
        vm.start()
        self.adopt(vm)

    def adopt(self, vm: Any) -> None:
        """*vm* (started) is this server's VM from now on: metrics and the exit callback follow it."""
        self.vm = vm
        threading.Thread(target=self._periodic_metrics, name="pyrovm-api-metrics", daemon=True).start()
        if self.on_exit is not None:
            callback = self.on_exit
            threading.Thread(target=lambda: callback(vm.wait()), name="pyrovm-api-wait", daemon=True).start()

    def _flush_metrics(self) -> None:
        path = self.resources.metrics_path
        if path is None:
            return
        from .logs import open_append

        try:
            with open_append(path) as f:  # one JSON object a line, as Firecracker writes them
                f.write(json.dumps(self.vm.metrics()) + "\n")
        except OSError as e:
            raise ApiError(f"Cannot write metrics to {path}: {e.strerror}") from None

    def _periodic_metrics(self) -> None:
        """A metrics line every :data:`METRICS_PERIOD` seconds while the VM lives (when a path is set)."""
        while not self._closing.wait(METRICS_PERIOD):
            with self._lock:
                if self.resources.metrics_path is not None and self.vm is not None:
                    try:
                        self._flush_metrics()
                    except ApiError as e:
                        log.warning("api: %s", e.message)

    def _patch_vm(self, body: Any) -> Reply:
        b = fields(body, {"state": str}, ("state",))
        if self.vm is None:
            raise ApiError(BEFORE)
        if b["state"] == "Paused":
            self.vm.pause()
        elif b["state"] == "Resumed":
            self.vm.resume()
        else:
            raise ApiError(
                f"An error occurred when deserializing the json body of a request: unknown variant "
                f"`{b['state']}`, expected `Paused` or `Resumed`."
            )
        return 204, None

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self.vm is not None:
                self.vm.close()
