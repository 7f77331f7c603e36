#!/usr/bin/env python3
"""Fuzz the API server's HTTP handling (:class:`pyrovm.api.server.ApiServer`, Python's ``http.server``
underneath, and the controller behind it): the input is sent as raw bytes on a new connection to a server
on a temporary Unix socket (one server per process, a fresh controller per input), the write side is shut
and the answers are read until the server closes.

A crash: no close within 5 s (a hang), an answer that is not ``HTTP/1.x`` with status 200, 204 or 400 and
a JSON body, pyrovm's "Internal error" in a fault message, or an exception that ends a connection thread
(other than the client going away).  No VM is ever built (``_common.sandbox``).

    python fuzz/fuzz_api_http.py -max_total_time=600 fuzz/corpus/api_http
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from typing import Any

import _common

with _common.instrumented(__name__, "http.server", "http.client", "email"):
    from pyrovm.api.controller import Controller
    from pyrovm.api.server import ApiServer

TIMEOUT = 5.0
_TMP = tempfile.TemporaryDirectory(prefix="pvf-api-", dir="/tmp")
_server: ApiServer | None = None
_errors: list[BaseException] = []


def _start() -> ApiServer:
    global _server
    if _server is None:
        path = os.path.join(_TMP.name, "api.sock")
        server = ApiServer(path, Controller())

        def handle_error(request: Any, client_address: Any) -> None:
            error = sys.exc_info()[1]
            if not isinstance(error, ConnectionError | TimeoutError):
                _errors.append(error or AssertionError("handle_error without an exception"))

        server.handle_error = handle_error  # type: ignore[method-assign]
        server.start()
        _server = server
    return _server


def _exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"the server neither answered nor closed in {TIMEOUT} s") from None
            if not chunk:
                return bytes(out)
            out += chunk
    return bytes(out)


def _check_answers(raw: bytes, request: bytes) -> None:
    """Each answer: a status line, headers, a Content-Length body of JSON (or nothing)."""
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"an answer without the end of its headers: {raw[:200]!r}")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] not in (b"200", b"204", b"400"):
            raise AssertionError(f"status line {lines[0][:200]!r}")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body, raw = rest[:length], rest[length:]
        if len(body) < length:
            raise AssertionError(f"a body shorter than its Content-Length {length}: {body[:200]!r}")
        value = json.loads(body) if body else None
        _common.check_reply(int(parts[1]), value, "answer")


def fuzz_one(data: bytes) -> None:
    server = _start()
    server.controller = Controller()
    with _common.sandbox():
        raw = _exchange(str(server.path), data)
    if _errors:
        error = _errors.pop()
        _errors.clear()
        raise AssertionError(f"a connection thread failed: {error!r}") from error
    _check_answers(raw, data)


if __name__ == "__main__":
    _common.run(fuzz_one)
