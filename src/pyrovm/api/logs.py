"""Firecracker's logger settings (``--log-path``, ``--level``, ``--show-level``, ``--show-log-origin``,
``PUT /logger``) on Python's logging: pyrovm's log records go to that file."""

from __future__ import annotations

import io
import logging
import os
from typing import IO

LEVELS = {
    "Off": logging.CRITICAL + 10,
    "Error": logging.ERROR,
    "Warning": logging.WARNING,
    "Info": logging.INFO,
    "Debug": logging.DEBUG,
    "Trace": logging.DEBUG,
}
_handler: logging.Handler | None = None


def configure_logging(path: str, level: str, show_level: bool, show_origin: bool) -> None:
    """Send the ``pyrovm`` loggers to *path* (appended), at *level* (one of :data:`LEVELS`)."""
    global _handler
    fmt = "%(asctime)s [%(name)s" + (":%(levelname)s" if show_level else "")
    fmt += (":%(pathname)s:%(lineno)d" if show_origin else "") + "] %(message)s"
    handler = logging.StreamHandler(open_append(path))  # OSError: the caller reports it
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("pyrovm")
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _handler = handler
    root.addHandler(handler)
    root.setLevel(LEVELS[level])


def open_append(path: str) -> IO[str]:
    """*path* opened for appending text without ever blocking: a FIFO (as firecracker-go-sdk passes for
    logs and metrics) must already have a reader, else OSError (ENXIO) instead of a hang."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    os.set_blocking(fd, True)
    return io.TextIOWrapper(io.FileIO(fd, "w"), line_buffering=True)
