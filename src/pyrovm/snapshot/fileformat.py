"""The snapshot state file: a header, the state as JSON, and a SHA-256 over everything before it.

Layout (little-endian)::

    magic    8 bytes   b"PYROSNAP"
    version  u32       FORMAT_VERSION
    arch     u32       ARCH_X86_64 (0x8664)
    length   u64       bytes of JSON that follow
    json     length bytes (UTF-8): the SnapshotState, see pyrovm.snapshot
    sha256   32 bytes  over magic .. json

Reading checks, in order: the magic (is it a pyrovm state file at all), the version, the architecture,
the length (a truncated file), the checksum (any changed byte), then the JSON and every field's type.
Each failure is a :class:`~pyrovm.errors.SnapshotError` with one line that says which.  Writing goes to a
temporary file in the same directory, renamed over the target once complete: a crash never leaves half a
state file under the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SnapshotError

MAGIC = b"PYROSNAP"
FORMAT_VERSION = 1
ARCH_X86_64 = 0x8664
_HEADER = struct.Struct("<8sIIQ")
_DIGEST = 32
#: Largest state file read (the JSON of a VM with 32 vCPUs and every device is well under 2 MiB).
MAX_STATE_SIZE = 64 << 20


def dumps(state: dict[str, Any]) -> bytes:
    """The state file's bytes for *state* (JSON values)."""
    body = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, ARCH_X86_64, len(body))
    return head + body + hashlib.sha256(head + body).digest()


def loads(data: bytes, name: str = "state file") -> dict[str, Any]:
    """The JSON values of a state file's bytes; :class:`SnapshotError` says what is wrong with it."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name}: not a pyrovm snapshot state file (no {MAGIC.decode()} magic)")
    if len(data) < _HEADER.size + _DIGEST:
        raise SnapshotError(f"{name}: truncated ({len(data)} bytes)")
    _, version, arch, length = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{name}: snapshot format version {version}; this pyrovm reads version {FORMAT_VERSION}"
        )
    if arch != ARCH_X86_64:
        raise SnapshotError(f"{name}: a snapshot of architecture {arch:#x}; this pyrovm restores x86-64 only")
    expected = _HEADER.size + length + _DIGEST
    if len(data) < expected:
        raise SnapshotError(f"{name}: truncated ({len(data)} bytes of {expected})")
    if len(data) > expected:
        raise SnapshotError(f"{name}: {len(data) - expected} bytes of garbage after the checksum")
    end = _HEADER.size + length
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise SnapshotError(f"{name}: corrupted (checksum mismatch)")
    try:
        state = json.loads(data[_HEADER.size : end].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
        raise SnapshotError(f"{name}: the state is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{name}: the state is not a JSON object")
    return state


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the state file at *path*."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_STATE_SIZE:
                raise SnapshotError(f"state file {path}: {size} bytes, more than a state file can be")
            data = f.read(MAX_STATE_SIZE + 1)
    except IsADirectoryError:
        raise SnapshotError(f"state file {path}: is a directory") from None
    except OSError as exc:
        raise SnapshotError(f"state file {path}: {exc.strerror}") from None
    except ValueError as exc:  # a NUL byte in the path, or a character it cannot have (an unpaired surrogate)
        raise SnapshotError(f"state file {path!r}: not a usable path ({exc})") from None
    return loads(data, f"state file {path}")


def write(path: str | os.PathLike[str], state: dict[str, Any]) -> int:
    """Write *state* to *path* atomically (a temporary file renamed over it); returns its size."""
    data = dumps(state)
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    except OSError as exc:
        raise SnapshotError(f"state file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        os.unlink(tmp)
        raise SnapshotError(f"state file {path}: {exc.strerror}") from None
    return len(data)
