"""The snapshot files without KVM: the state file's checks, the codec's strictness, the sparse memory file,
diff files and rebase."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from snapshots import check_count_stream

from pyrovm.errors import SnapshotError
from pyrovm.memory import GuestMemory
from pyrovm.snapshot import fileformat, memfile
from pyrovm.snapshot.codec import decode, encode

STATE = {"kind": "full", "vcpus": [{"regs": "AAEC"}], "n": 3}


def test_state_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.state"
    size = fileformat.write(path, STATE)
    assert path.stat().st_size == size
    assert fileformat.read(path) == STATE
    assert not [p for p in tmp_path.iterdir() if p.name != "s.state"]  # no temporary file left


def _header(data: bytes) -> tuple[bytes, int, int, int]:
    return struct.unpack_from("<8sIIQ", data)  # type: ignore[return-value]


def _rewrite_header(data: bytes, version: int | None = None, arch: int | None = None) -> bytes:
    magic, v, a, n = _header(data)
    head = struct.pack("<8sIIQ", magic, v if version is None else version, a if arch is None else arch, n)
    return head + data[24:]


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: b"", "not a pyrovm snapshot state file"),
        (lambda d: b"ELF" + d[3:], "not a pyrovm snapshot state file"),
        (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "corrupted (checksum mismatch)"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "corrupted (checksum mismatch)"),
        (lambda d: d + b"x", "garbage after the checksum"),
        (lambda d: _rewrite_header(d, version=99), "snapshot format version 99; this pyrovm reads version 1"),
        (lambda d: _rewrite_header(d, arch=0xAA64), "architecture 0xaa64; this pyrovm restores x86-64 only"),
    ],
)
def test_bad_state_files_are_refused_with_one_line(tmp_path: Path, mangle: object, message: str) -> None:
    path = tmp_path / "s.state"
    data = mangle(fileformat.dumps(STATE))  # type: ignore[operator]
    path.write_bytes(data)
    with pytest.raises(SnapshotError) as info:
        fileformat.read(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == data  # the input is never changed


def test_unreadable_state_paths(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="No such file"):
        fileformat.read(tmp_path / "missing")
    with pytest.raises(SnapshotError, match="is a directory"):
        fileformat.read(tmp_path)
    with pytest.raises(SnapshotError, match="not a JSON object"):
        fileformat.loads(fileformat.dumps([1]))  # type: ignore[arg-type]


@dataclass
class Inner:
    a: int
    b: bytes = b""


@dataclass
class Outer:
    name: str
    inner: Inner
    items: list[tuple[int, int]] = field(default_factory=list)
    maybe: float | None = None
    rest: tuple[int, ...] = ()


def test_codec_round_trip_and_strictness() -> None:
    value = Outer("x", Inner(1, b"\x00\xff"), [(1, 2)], 1.5, (3, 4))
    data = json.loads(json.dumps(encode(value)))
    assert decode(Outer, data) == value
    bad = [
        ({**data, "extra": 1}, "unknown field 'extra'"),
        ({k: v for k, v in data.items() if k != "name"}, "missing field 'name'"),
        ({**data, "inner": {"a": "1", "b": ""}}, "state.inner.a: str, expected an integer"),
        ({**data, "inner": {"a": True, "b": ""}}, "state.inner.a: bool, expected an integer"),
        ({**data, "inner": {"a": 1, "b": "!!"}}, "state.inner.b: not base64"),
        ({**data, "items": [[1, 2, 3]]}, r"state.items\[0\]: 3 items, expected 2"),
        ({**data, "items": {}}, "state.items: dict, expected a list"),
        ({**data, "maybe": "x"}, "state.maybe: str, expected a number"),
    ]
    for item, message in bad:
        with pytest.raises(SnapshotError, match=message):
            decode(Outer, item)


def _memory(tmp_path: Path) -> GuestMemory:
    mem = GuestMemory([(0, 4 << 20), (8 << 20, 2 << 20)])
    mem.write(0x1000, b"a" * 10)
    mem.write(0x3FF000, b"b")  # the last page of the first region
    mem.write((8 << 20) + 0x5000, b"c" * 4096)
    return mem


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_full_memory_file_is_sparse_and_exact(tmp_path: Path) -> None:
    mem = _memory(tmp_path)
    path = tmp_path / "m"
    written = memfile.write_full(mem, path)
    assert written == 3 * 4096
    assert path.stat().st_size == 6 << 20
    assert _allocated(path) < 1 << 20  # holes where the guest never wrote
    back = GuestMemory.from_file(path, [(0, 4 << 20), (8 << 20, 2 << 20)], private=True)
    assert back.read(0, 4 << 20) == mem.read(0, 4 << 20)
    assert back.read(8 << 20, 2 << 20) == mem.read(8 << 20, 2 << 20)
    back.write(0x1000, b"z")  # copy-on-write: the file does not change
    assert path.read_bytes()[0x1000:0x1001] == b"a"
    back.close()
    mem.close()


def test_diff_rebased_on_its_base_gives_the_later_memory(tmp_path: Path) -> None:
    mem = _memory(tmp_path)
    base, diff, full = tmp_path / "base", tmp_path / "diff", tmp_path / "full"
    memfile.write_full(mem, base)
    mem.write(0x1000, bytes(10))  # a page cleared: the diff must carry it
    mem.write(0x2000, b"new")
    mem.write((8 << 20) + 0x9000, b"d")
    dirty = {0: {1, 2}, 1: {9}}
    assert memfile.write_diff(mem, diff, dirty) == 3 * 4096
    assert _allocated(diff) <= 64 * 1024
    memfile.write_full(mem, full)
    assert memfile.rebase(base, diff) == 3 * 4096
    assert base.read_bytes() == full.read_bytes()
    other = tmp_path / "other"
    other.write_bytes(b"x" * 4096)
    with pytest.raises(SnapshotError, match="not the same size"):
        memfile.rebase(other, diff)
    mem.close()


def test_count_stream_checker() -> None:
    lines = ["count 1", "count 2"]
    assert check_count_stream("\n".join(lines) + "\n", from_start=True) == (1, 2)
    with pytest.raises(AssertionError, match="expected count 3"):
        check_count_stream("count 1\ncount 2\ncount 4\ncount 5\n", from_start=True)
    with pytest.raises(AssertionError, match="wrong sum"):
        check_count_stream("".join(f"count {i}\n" for i in range(1, 101)) + "sum 0x1\n", from_start=True)
    assert check_count_stream("nt 7\ncount 8\ncount 9\ncou") == (8, 9)
