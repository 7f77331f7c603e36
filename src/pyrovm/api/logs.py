"""Firecracker's logger settings (``--log-path``, ``--level``, ``--show-level``, ``--show-log-origin``,
``PUT /logger``) on Python's logging: pyrovm's log records go to that file."""

from __future__ import annotations

import logging

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
    handler = logging.FileHandler(path)  # OSError for a path that cannot be written: the caller reports it
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("pyrovm")
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _handler = handler
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
