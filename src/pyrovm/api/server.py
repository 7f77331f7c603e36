"""HTTP/1.1 over a Unix socket for the API (Python's ``http.server``, a thread per connection).

Keep-alive, one request at a time per connection, any number of connections.  Every answer is JSON: a
malformed request line or header, a body that is not JSON, a body over the payload limit each get a 400
with a ``fault_message`` (never an HTML page, never a 500); an idle or half-sent connection is dropped
after :data:`IDLE_TIMEOUT` seconds without holding up the others.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pyrovm import seccomp
from pyrovm.errors import ConfigError

from .controller import Controller

log = logging.getLogger("pyrovm.api")

DEFAULT_MAX_PAYLOAD = 51200
IDLE_TIMEOUT = 30.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # answers to unparsable request lines get a status line too
    server: ApiServer
    timeout = IDLE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return "unix"

    def parse_request(self) -> bool:
        """http.server's parser, less HTTP/0.9 (a 'GET /' line or 'HTTP/0.9'), which it would answer
        without a status line: refused with a 400, as Firecracker does."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9" or len(self.requestline.split()) == 2:
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, headers too long...) as JSON 400s."""
        self.request_version = "HTTP/1.1"  # (never answered as HTTP/0.9 was: without a status line)
        self.close_connection = True
        self._reply(400, {"fault_message": f"Bad request: {message or HTTPStatus(code).phrase}."})

    def _reply(self, status: int, value: Any) -> None:
        body = b"" if value is None else json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Server", "Firecracker API")
        if value is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _body(self) -> tuple[bool, Any]:
        """(ok, decoded body or None); on a refusal the answer has been sent."""
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return True, None
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.send_error(400, "invalid Content-Length")
            return False, None
        limit = self.server.max_payload
        if length > limit:
            self.close_connection = True
            self._reply(
                400,
                {
                    "fault_message": f"Request payload with size {length} is larger than the limit "
                    f"of {limit} allowed by server."
                },
            )
            return False, None
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client went away half-way
            self.close_connection = True
            return False, None
        if not raw.strip():
            return True, None
        try:
            return True, json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # (RecursionError: nested too deep)
            self._reply(
                400,
                {"fault_message": f"An error occurred when deserializing the json body of a request: {e}."},
            )
            return False, None

    def _handle(self) -> None:
        ok, body = self._body()
        if not ok:
            return
        status, value = self.server.controller.handle(self.command, self.path, body)
        self._reply(status, value)

    do_GET = do_PUT = do_PATCH = _handle

    def _other(self) -> None:
        ok, _ = self._body()
        if ok:
            self._reply(
                400, {"fault_message": f"Invalid request method and/or path: {self.command} {self.path}."}
            )

    do_POST = do_DELETE = do_HEAD = do_OPTIONS = _other


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The API server on the Unix socket *path* (refused when the path exists, as Firecracker does)."""

    daemon_threads = True
    request_queue_size = 256  # the listen backlog: many clients may connect at once

    def __init__(
        self, path: str | os.PathLike[str], controller: Controller, max_payload: int = DEFAULT_MAX_PAYLOAD
    ):
        self.path = Path(path)
        self.controller = controller
        self.max_payload = max_payload
        if os.path.lexists(self.path):
            raise ConfigError(
                f"API socket {self.path} already exists (remove it, or give another --api-sock)"
            )
        try:
            super().__init__(str(self.path), _Handler)
        except OSError as e:
            raise ConfigError(f"API socket {self.path}: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve on a thread of its own."""
        self._thread = threading.Thread(target=self._serve, name="pyrovm-api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        seccomp.thread_role("api")  # (the connection threads it starts inherit its filter)
        self.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (the client went away mid-request): logged, the server goes on."""
        log.debug("api: a connection failed", exc_info=True)


def socket_answers(path: str | os.PathLike[str], timeout: float = 1.0) -> bool:
    """True when an API server answers ``GET /`` at *path* (for tests and tools waiting for start-up)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
