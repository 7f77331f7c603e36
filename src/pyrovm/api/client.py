"""``pyrovm.api.Client``: a thin client of the API for scripts (HTTP/1.1 over the Unix socket, stdlib only).

c = Client("/tmp/fc.sock")
c.put("/boot-source", kernel_image_path="guest.elf", boot_args="test=hello")
c.put("/actions", action_type="InstanceStart")
print(c.get("/")["state"])
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from pyrovm.errors import PyrovmError


class ApiFault(PyrovmError):
    """The server refused the request: ``status`` and its ``fault_message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Client:
    """One keep-alive connection to the API at *socket_path*."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self._conn = _UnixConnection(str(socket_path), timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded answer (None for 204); ApiFault for a refusal."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        self._conn.request(method, path, body=payload, headers=headers)
        res = self._conn.getresponse()
        raw = res.read()
        value = json.loads(raw) if raw else None
        if res.status >= 400:
            message = value.get("fault_message", raw.decode()) if isinstance(value, dict) else raw.decode()
            raise ApiFault(res.status, message)
        return value

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, **body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, **body: Any) -> Any:
        return self.request("PATCH", path, body)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
