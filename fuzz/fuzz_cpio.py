#!/usr/bin/env python3
"""Fuzz the initramfs writer (:mod:`pyrovm.initramfs`): :class:`CpioWriter` with names, modes, contents,
owners and device numbers from the input, and the tree that ``pyrovm initramfs --add HOST:GUEST`` builds
from a host directory (``_Tree.add_host``, then written), on a directory the input fills with files,
directories and symlinks whose names and targets are any bytes (as a host file system allows), and
``parse_add`` on the ``--add`` spec.

Expected: :class:`pyrovm.initramfs.InitramfsError`.  Checked besides: the archive reads back (a newc
reader here) with every entry that was added, in order, with its name, type, permission bits and data,
and the trailer.

    python fuzz/fuzz_cpio.py -max_total_time=600 fuzz/corpus/cpio
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import _common
import atheris

with _common.instrumented(__name__):
    from pyrovm.initramfs import CpioWriter, InitramfsError, _Tree, parse_add

_TMP = tempfile.TemporaryDirectory(prefix="pvf-cpio-", dir="/tmp")
_DIR = _TMP.name
HOST = os.path.join(_DIR, "host")
NAMES = [
    "TRAILER!!!",
    "/TRAILER!!!/",
    "bin",
    "/bin/sh",
    "a/../b",
    ".",
    "",
    "/",
    "dev/console",
    "a//b/",
    "init",
    "a\x00b",
    "é/ü",
]
U32 = 0xFFFFFFFF
#: Values around the header fields' 32 bits: out of range ones must be refused, not written.
WIDE = (-1, U32 + 1)


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """``(name, mode, data, (rdevmajor, rdevminor))`` of each entry of a newc archive, the trailer last."""
    out = []
    off = 0
    while True:
        if data[off : off + 6] != b"070701":
            raise AssertionError(f"no newc magic at {off}: {data[off : off + 16]!r}")
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, _uid, _gid, _nlink, _mtime, size, _, _, rmaj, rmin, namesize, _ = fields
        off += 110
        name = data[off : off + namesize]
        if not name.endswith(b"\0"):
            raise AssertionError(f"entry name {name!r} without its NUL")
        off = (off + namesize + 3) & ~3
        body = data[off : off + size]
        off = (off + size + 3) & ~3
        out.append((name[:-1].decode("utf-8", "surrogateescape"), mode, body, (rmaj, rmin)))
        if name == b"TRAILER!!!\0":
            if off != len(data):
                raise AssertionError(f"{len(data) - off} bytes after the trailer")
            return out


def _name(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return fdp.PickValueInList(NAMES)
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))


def _writer(fdp: atheris.FuzzedDataProvider) -> None:
    stream = io.BytesIO()
    try:
        w = CpioWriter(stream, mtime=fdp.ConsumeIntInRange(*WIDE))
    except InitramfsError:
        w = CpioWriter(stream)
    added: list[tuple[str, int, bytes, tuple[int, int]]] = []
    while fdp.remaining_bytes():
        op = fdp.ConsumeIntInRange(0, 4)
        name = _name(fdp)
        mode = fdp.ConsumeInt(4)
        owner = {"uid": fdp.ConsumeIntInRange(*WIDE), "gid": fdp.ConsumeIntInRange(*WIDE)}
        try:
            if op == 0:
                w.add_dir(name, mode, **owner)
                entry = (stat.S_IFDIR | (mode & 0o7777), b"", (0, 0))
            elif op == 1:
                data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                w.add_file(name, data, mode, **owner)
                entry = (stat.S_IFREG | (mode & 0o7777), data, (0, 0))
            elif op == 2:
                target = _name(fdp)
                w.add_symlink(name, target, **owner)
                entry = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))
            elif op == 3:
                rdev = (fdp.ConsumeIntInRange(*WIDE), fdp.ConsumeIntInRange(*WIDE))
                char = fdp.ConsumeBool()
                w.add_device(name, *rdev, mode, char=char, **owner)
                entry = ((stat.S_IFCHR if char else stat.S_IFBLK) | (mode & 0o7777), b"", rdev)
            else:
                w.close()
                break
        except InitramfsError:
            continue
        added.append(("/".join(p for p in name.split("/") if p not in ("", ".")), *entry))
    w.close()
    got = read_newc(stream.getvalue())
    if [e[0] for e in got[:-1]] != [e[0] for e in added] or got[:-1] != added:
        raise AssertionError(f"the archive has {got[:-1]!r}, {added!r} were added")


def _host_name(fdp: atheris.FuzzedDataProvider) -> bytes:
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)).replace(b"/", b"_").replace(b"\0", b"_")
    return raw if raw not in (b"", b".", b"..") else b"x"


def _host_tree(fdp: atheris.FuzzedDataProvider) -> None:
    shutil.rmtree(HOST, ignore_errors=True)
    os.mkdir(HOST)
    dirs = [os.fsencode(HOST)]
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        parent = dirs[fdp.ConsumeIntInRange(0, len(dirs) - 1)]
        path = os.path.join(parent, _host_name(fdp))
        if os.path.lexists(path):
            continue
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            os.mkdir(path)
            dirs.append(path)
        elif kind == 1:
            target = _host_name(fdp) if fdp.ConsumeBool() else fdp.ConsumeBytes(8).replace(b"\0", b"_")
            os.symlink(target or b"t", path)
        else:
            with open(path, "wb") as f:
                f.write(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)))
            os.chmod(path, fdp.ConsumeIntInRange(0, 0o7777) | 0o400)
    guest = fdp.PickValueInList(["/", "/x", "/usr/lib", "/a/../b", "x", "//", "/x/"])
    spec = f"{HOST}:{guest}" if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeUnicodeNoSurrogates(16)
    try:
        host, guest = parse_add(spec)
        tree = _Tree()
        tree.add_host(host, guest)
        if fdp.ConsumeBool():  # a second --add over the first
            tree.add_host(Path(HOST), fdp.PickValueInList(["/", "/x", "/x/y"]))
        stream = io.BytesIO()
        with CpioWriter(stream) as w:
            tree.write(w)
    except InitramfsError:
        return
    names = [e[0] for e in read_newc(stream.getvalue())[:-1]]
    if len(set(names)) != len(names):
        raise AssertionError(f"an archive path twice: {names!r}")


def fuzz_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        _writer(fdp)
    else:
        _host_tree(fdp)


if __name__ == "__main__":
    _common.run(fuzz_one)
