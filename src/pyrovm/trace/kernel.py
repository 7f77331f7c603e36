"""The kernel functions behind each KVM call, checked against the running kernel's ``/proc/kallsyms``.

The table is data (``kernel_paths.json`` beside this file: for each ioctl a sentence saying what it does
and the path of kernel functions it enters, written from the Linux 6.1 source).  :class:`KernelPaths`
loads it and marks each function present or absent in the running kernel (a function can be inlined or
renamed; alternatives such as ``vmx_vcpu_run|svm_vcpu_run|pvm_vcpu_run`` resolve to the one present).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("kernel_paths.json")


@dataclass(frozen=True)
class Step:
    """One function of a path: its name (the alternative the kernel has, or all of them) and whether
    ``/proc/kallsyms`` lists it."""

    name: str
    present: bool


def kallsyms_names(path: str = "/proc/kallsyms") -> set[str] | None:
    """The kernel's function names (text symbols), or None when the file cannot be read."""
    names: set[str] = set()
    try:
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in (b"t", b"T", b"w", b"W"):
                    names.add(parts[2].split(b".", 1)[0].decode("latin-1"))  # (foo.isra.0: foo)
    except OSError:
        return None
    return names


class KernelPaths:
    """The table, resolved against the running kernel."""

    def __init__(self, symbols: set[str] | None = None, table: Path = TABLE) -> None:
        data = json.loads(table.read_text())
        self.source: str = data.pop("source")
        self._table: dict[str, dict[str, object]] = data
        self.symbols = kallsyms_names() if symbols is None else symbols
        self.kernel = os.uname().release

    def explain(self, ioctl: str) -> str | None:
        entry = self._table.get(ioctl)
        return None if entry is None else str(entry["explain"])

    def path(self, ioctl: str) -> list[Step]:
        """The functions *ioctl* enters, each marked present or not (empty for an ioctl not in the table;
        every step unknown, marked absent, when kallsyms could not be read)."""
        entry = self._table.get(ioctl)
        if entry is None:
            return []
        steps = []
        for item in entry["path"]:  # type: ignore[attr-defined]
            options = str(item).split("|")
            have = [o for o in options if self.symbols is not None and o in self.symbols]
            steps.append(Step(have[0] if have else str(item), bool(have)))
        return steps

    @property
    def names(self) -> list[str]:
        return list(self._table)

    def describe_check(self) -> str:
        if self.symbols is None:
            return f"kernel paths from {self.source.split(' (')[0]}; /proc/kallsyms unreadable: not checked"
        return f"kernel paths from {self.source.split(' (')[0]}, checked against this kernel ({self.kernel})"
