"""``python -m pyrovm.testguest [--force]``: build the test guest and print the path of guest.elf."""

from __future__ import annotations

import sys

from pyrovm.testguest import build


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
