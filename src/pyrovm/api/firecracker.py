"""``pyrovm-firecracker``: a drop-in for the ``firecracker`` binary (its flags, its API, its config file).

    pyrovm-firecracker --api-sock /tmp/fc.sock [--id ID] [--config-file vm.json [--no-api]] ...

The guest's serial console is this process's stdin and stdout, as in Firecracker.  The process ends
when the guest does (with ``pyrovm run``'s exit statuses), or on SIGTERM/SIGINT (128 + the signal).
``pyrovm serve --api-sock PATH`` runs the same server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pyrovm import __version__
from pyrovm.errors import PyrovmError

from .controller import FIRECRACKER_VERSION, Controller
from .server import DEFAULT_MAX_PAYLOAD, ApiServer

log = logging.getLogger("pyrovm.api")

#: config-file sections, in the order Firecracker applies them, and the request each one is.
CONFIG_SECTIONS: list[tuple[str, str, str, str | None]] = [
    ("logger", "PUT", "/logger", None),
    ("metrics", "PUT", "/metrics", None),
    ("machine-config", "PUT", "/machine-config", None),
    ("boot-source", "PUT", "/boot-source", None),
    ("drives", "PUT", "/drives", "drive_id"),
    ("network-interfaces", "PUT", "/network-interfaces", "iface_id"),
    ("vsock", "PUT", "/vsock", None),
    ("entropy", "PUT", "/entropy", None),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str = "pyrovm-firecracker") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--api-sock", default="/run/firecracker.socket", help="the API's Unix socket (must not exist)"
    )
    p.add_argument("--id", default="anonymous-instance", help="the microVM's id (GET / reports it)")
    p.add_argument("--config-file", help="Firecracker's JSON configuration: the VM boots from it at once")
    p.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    p.add_argument("--log-path", help="where the log goes")
    p.add_argument("--level", default="Info", help="log level: Off, Error, Warning, Info, Debug, Trace")
    p.add_argument("--show-level", action="store_true", help="put the level in each log line")
    p.add_argument("--show-log-origin", action="store_true", help="put the file and line in each log line")
    p.add_argument("--metrics-path", help="metrics file (one JSON object a line, at each FlushMetrics)")
    p.add_argument(
        "--boot-timer", action="store_true", help="accepted (the boot-timer device is always there)"
    )
    p.add_argument(
        "--http-api-max-payload-size",
        type=int,
        default=DEFAULT_MAX_PAYLOAD,
        metavar="BYTES",
        help=f"largest request body (default {DEFAULT_MAX_PAYLOAD})",
    )
    p.add_argument("--no-seccomp", action="store_true", help="no seccomp filters (README 'Security')")
    p.add_argument(
        "--seccomp-filter", metavar="FILE", help="seccomp filters to use instead of pyrovm's (JSON)"
    )
    p.add_argument(
        "--version", action="version", version=f"Firecracker v{FIRECRACKER_VERSION} (pyrovm {__version__})"
    )
    return p


def apply_config_file(controller: Controller, path: str) -> None:
    """Configure *controller* from Firecracker's JSON file and start the VM; PyrovmError-like ValueError
    naming the field on bad input."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # (RecursionError: nested too deep)
        raise ValueError(f"config file {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a JSON object")
    known = {name for name, *_ in CONFIG_SECTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown section(s) {', '.join(unknown)}")
    for name in ("boot-source", "drives"):
        if name not in data:
            raise ValueError(f"config file {path}: '{name}' is required")
    for name, method, route, id_field in CONFIG_SECTIONS:
        if name not in data:
            continue
        items: list[tuple[str, Any]]
        if id_field is None:
            items = [(name, data[name])]
        elif isinstance(data[name], list):
            items = [(f"{name}[{i}]", item) for i, item in enumerate(data[name])]
        else:
            raise ValueError(f"config file {path}: '{name}' must be a list")
        for where, body in items:
            url = route
            if id_field is not None:
                item_id = body.get(id_field) if isinstance(body, dict) else None
                url = f"{route}/{item_id if isinstance(item_id, str) else ''}"
            _apply(controller, method, url, body, f"config file {path}: {where}")
    _apply(controller, "PUT", "/actions", {"action_type": "InstanceStart"}, f"config file {path}")


def _apply(controller: Controller, method: str, url: str, body: Any, where: str) -> None:
    status, value = controller.handle(method, url, body)
    if status >= 400:
        raise ValueError(f"{where}: {value['fault_message']}")


def _forward_stdin(controller: Controller) -> None:
    """The guest's serial input is this process's stdin."""
    while True:
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        vm = controller.vm
        if vm is not None:
            vm.send_input(data)


def main(
    argv: Sequence[str] | None = None,
    prog: str = "pyrovm-firecracker",
    on_ready: Callable[[Controller], None] | None = None,
) -> int:
    """The server; *on_ready*: called with the controller once the API socket listens (``pyrovm
    snapshot restore --api-sock`` loads its snapshot there)."""
    args = build_parser(prog).parse_args(argv)
    if args.no_api and not args.config_file:
        print(f"{prog}: error: --no-api needs --config-file", file=sys.stderr)
        return 2
    if args.http_api_max_payload_size <= 0:
        print(f"{prog}: error: --http-api-max-payload-size must be positive", file=sys.stderr)
        return 2
    if not args.no_seccomp:
        from pyrovm.seccomp import enable

        try:
            enable(args.seccomp_filter)
        except PyrovmError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    from pyrovm.vcpu import install_kick_handler

    install_kick_handler()  # VMs start on an API thread: the vCPU kick signal's handler is set from here
    done = threading.Event()
    status: list[int] = []
    controller = Controller(args.id, console=sys.stdout.buffer)

    def finish(code: int) -> None:
        status.append(code)
        done.set()

    controller.on_exit = lambda result: finish(result.exit_code)
    if args.metrics_path:
        controller.resources.metrics_path = args.metrics_path
    server = None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: finish(128 + signum))
    try:
        if args.log_path:
            _apply(
                controller,
                "PUT",
                "/logger",
                {
                    "log_path": args.log_path,
                    "level": args.level,
                    "show_level": args.show_level,
                    "show_log_origin": args.show_log_origin,
                },
                "--log-path",
            )
        if not args.no_api:
            server = ApiServer(args.api_sock, controller, args.http_api_max_payload_size)
            server.start()
        if args.config_file:
            apply_config_file(controller, args.config_file)
        if on_ready is not None:
            on_ready(controller)
        from pyrovm import seccomp

        if seccomp.enabled():
            seccomp.thread_role("main")
        threading.Thread(target=_forward_stdin, args=(controller,), daemon=True).start()
        while not done.wait(0.5):
            pass
        return status[0]
    except (PyrovmError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
        controller.close()


if __name__ == "__main__":
    sys.exit(main())
