"""Helpers for the snapshot tests: what the test guest's ``test=count`` prints, checked line by line."""

from __future__ import annotations

import re

COUNT_WORDS = 8192
_MASK = (1 << 64) - 1
_COUNT = re.compile(r"count (\d+)")
_SUM = re.compile(r"sum 0x([0-9a-f]+)")


def _write(area: list[int], n: int) -> None:
    area[(n * 521) % COUNT_WORDS] = (n * 0x9E3779B97F4A7C15 + 1) & _MASK


def check_count_stream(text: str, from_start: bool = False) -> tuple[int, int]:
    """Check console text of ``test=count``: ``count N`` lines rising by one and every ``sum X`` line the
    sum the guest's memory must hold after N counts.  Without *from_start* the text may begin anywhere
    (a restored VM's output): the first line is skipped (it may be the end of a line cut by the snapshot)
    and checking starts at the first whole ``count N``.  Returns (first N checked, last N); AssertionError
    names the line that is wrong."""
    lines = text.split("\n")
    lines.pop()  # after the last newline: a line not finished yet
    if not from_start and lines:
        lines.pop(0)
    area = [0] * COUNT_WORDS
    first = expect = None
    for i, line in enumerate(lines):
        if (
            i == len(lines) - 1
            and expect is not None
            and line != f"count {expect}"
            and not _SUM.fullmatch(line)
        ):
            # the last line, cut where the VM stopped (pyrovm then ends its console with a newline)
            assert f"count {expect}".startswith(line) or "sum 0x".startswith(line[:6]), f"last line {line!r}"
            break
        m = _COUNT.fullmatch(line)
        if m:
            n = int(m.group(1))
            if expect is None:
                assert not from_start or n == 1, f"line {i}: {line!r}, expected count 1"
                first = expect = n
                for k in range(1, n):
                    _write(area, k)
            assert n == expect, f"line {i}: {line!r}, expected count {expect}"
            _write(area, n)
            expect += 1
            continue
        m = _SUM.fullmatch(line)
        if m and expect is not None:
            assert int(m.group(1), 16) == sum(area) & _MASK, (
                f"line {i}: {line!r}: wrong sum after {expect - 1}"
            )
            continue
        assert expect is None, f"line {i}: unexpected {line!r}"
    assert first is not None and expect is not None, f"no count lines in {text[:200]!r}"
    return first, expect - 1
