"""State dataclasses to JSON values and back, strictly typed by their annotations.

:func:`encode` turns a dataclass (nested dataclasses, ``int``, ``float``, ``bool``, ``str``, ``bytes`` as
base64, lists, tuples, dicts with string keys, ``X | None``) into plain JSON values; :func:`decode` builds
the dataclass back from them and checks every value against its annotation, so a state file that was
edited or damaged gives a :class:`~pyrovm.errors.SnapshotError` naming the field, never a wrong object.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
import typing
from typing import Any

from ..errors import SnapshotError


def encode(value: Any) -> Any:
    """*value* as JSON values (see the module)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(kind: Any, data: Any, where: str = "state") -> Any:
    """An object of type *kind* from JSON values *data*; :class:`SnapshotError` names *where* it fails."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return decode(options[0], data, where)
        raise SnapshotError(f"{where}: unsupported type {kind}")
    if dataclasses.is_dataclass(kind):
        return _decode_dataclass(kind, data, where)  # type: ignore[arg-type]
    if origin is list:
        return [decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(_expect(data, list, where))]
    if origin is tuple:
        items = _expect(data, list, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise SnapshotError(f"{where}: {len(items)} items, expected {len(args)}")
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, items, strict=True)))
    if origin is dict:
        return {k: decode(args[1], v, f"{where}.{k}") for k, v in _expect(data, dict, where).items()}
    return _decode_scalar(kind, data, where)


def _decode_scalar(kind: Any, data: Any, where: str) -> Any:
    if kind is bytes:
        try:
            return base64.b64decode(_expect(data, str, where), validate=True)
        except binascii.Error:
            raise SnapshotError(f"{where}: not base64") from None
    if kind is bool:
        return _expect(data, bool, where)
    if kind is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise SnapshotError(f"{where}: {type(data).__name__}, expected an integer")
        return data
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise SnapshotError(f"{where}: {type(data).__name__}, expected a number")
        return float(data)
    if kind is str:
        return _expect(data, str, where)
    if kind is Any:
        return data
    raise SnapshotError(f"{where}: unsupported type {kind}")


def _decode_dataclass(kind: type, data: Any, where: str) -> Any:
    values = _expect(data, dict, where)
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SnapshotError(f"{where}: unknown field {unknown[0]!r}")
    missing = sorted(set(fields) - set(values))
    if missing:
        raise SnapshotError(f"{where}: missing field {missing[0]!r}")
    args = {name: decode(hints[name], values[name], f"{where}.{name}") for name in fields}
    try:
        return kind(**args)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{where}: {exc}") from None


def _expect(data: Any, kind: type, where: str) -> Any:
    if not isinstance(data, kind):
        names = {list: "a list", dict: "an object", str: "a string", bool: "true or false"}
        raise SnapshotError(f"{where}: {type(data).__name__}, expected {names.get(kind, kind.__name__)}")
    return data
