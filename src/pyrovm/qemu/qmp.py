"""A minimal QMP server (QEMU's JSON machine protocol) for ``pyrovm qemu -qmp unix:PATH,server,wait=off``.

Each connection gets QMP's greeting, must send ``qmp_capabilities`` first, and can then use
``query-status`` (``running`` / ``paused``), ``stop``, ``cont``, ``system_reset`` (the VM ends as when the
guest resets, as QEMU does with ``-no-reboot``: pyrovm cannot reboot a guest) and ``quit``.  Other
commands get QMP's ``CommandNotFound`` error.  ``stop`` and ``cont`` also send the ``STOP`` and ``RESUME``
events to that client.  Messages are JSON objects, with or without newlines between them.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..result import ExitReason

QEMU_VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "pyrovm"}
COMMANDS = ("qmp_capabilities", "query-status", "stop", "cont", "system_reset", "quit", "query-commands")


class _Handler(socketserver.StreamRequestHandler):
    server: QmpServer

    def handle(self) -> None:
        self._send({"QMP": {"version": QEMU_VERSION, "capabilities": []}})
        ready = False
        decoder = json.JSONDecoder()
        buf = ""
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            buf += data.decode("utf-8", errors="replace")
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except RecursionError:
                    self._error("GenericError", "JSON nested too deeply")
                    return
                except ValueError:
                    if len(buf) > 1 << 20:
                        self._error("GenericError", "JSON parse error")
                        return
                    break
                buf = buf.lstrip()[end:]
                ready = self._message(msg, ready)

    def _message(self, msg: Any, ready: bool) -> bool:
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            self._error("GenericError", "QMP input must be a JSON object with 'execute'", msg)
            return ready
        cmd = msg["execute"]
        if cmd == "qmp_capabilities":
            self._reply({}, msg)
            return True
        if not ready:
            self._error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", msg)
            return ready
        self._run(cmd, msg)
        return ready

    def _run(self, cmd: str, msg: dict[str, Any]) -> None:
        vm = self.server.vm
        if cmd == "query-status":
            paused = vm.paused
            self._reply(
                {"status": "paused" if paused else "running", "running": not paused, "singlestep": False}, msg
            )
        elif cmd == "query-commands":
            self._reply([{"name": c} for c in COMMANDS], msg)
        elif cmd in ("stop", "cont"):
            (vm.pause if cmd == "stop" else vm.resume)()
            self._reply({}, msg)
            self._event("STOP" if cmd == "stop" else "RESUME")
        elif cmd == "quit":
            self._reply({}, msg)
            vm.stop(ExitReason.STOPPED, "quit (QMP)")
        elif cmd == "system_reset":
            self._reply({}, msg)
            vm.stop(ExitReason.RESET, "system_reset (QMP): pyrovm ends the VM, as QEMU with -no-reboot")
        else:
            self._error("CommandNotFound", f"The command {cmd} has not been found", msg)

    def _reply(self, value: Any, msg: dict[str, Any]) -> None:
        self._send({"return": value, **({"id": msg["id"]} if "id" in msg else {})})

    def _error(self, cls: str, desc: str, msg: Any = None) -> None:
        extra = {"id": msg["id"]} if isinstance(msg, dict) and "id" in msg else {}
        self._send({"error": {"class": cls, "desc": desc}, **extra})

    def _event(self, name: str) -> None:
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        self._send({"event": name, "timestamp": stamp})

    def _send(self, obj: Any) -> None:
        try:
            self.wfile.write(json.dumps(obj).encode() + b"\r\n")
            self.wfile.flush()
        except OSError:
            pass


class QmpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, vm: Any) -> None:
        if os.path.lexists(path):
            raise ConfigError(f"-qmp: {path} already exists")
        self.vm = vm
        try:
            super().__init__(str(path), _Handler)
        except OSError as exc:
            raise ConfigError(f"-qmp: cannot listen on {path}: {exc.strerror}") from None
        self.path = path
        self._thread = threading.Thread(target=self._serve, name="qmp", daemon=True)

    def _serve(self) -> None:
        from .. import seccomp

        seccomp.thread_role("api", "pyrovm-qmp")
        self.serve_forever()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
