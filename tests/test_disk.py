"""``pyrovm disk create``: sparse ext4 images with mkfs.ext4."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyrovm import disk
from pyrovm.disk import DiskError, create_disk, parse_size, register

E2FS = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
needs_mkfs = pytest.mark.skipif(E2FS is None, reason="mkfs.ext4 (e2fsprogs) not installed")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pyrovm")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("1G", 1 << 30), ("2048k", 2 << 20), ("4MiB", 4 << 20), ("1048576", 1 << 20)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "12X", "-5M", "1.5G", "100K", "1048577"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(DiskError):
        parse_size(text)


@needs_mkfs
def test_create_sparse_ext4(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    assert create_disk(img, "64M") == img
    st = os.stat(img)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < st.st_size // 2  # sparse
    out = subprocess.run(
        [tool("dumpe2fs"), "-h", str(img)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   pyrovm" in out
    assert "clean" in out


@needs_mkfs
def test_create_from_dir(tmp_path: Path) -> None:
    src = tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from the host\n")
    (src / "etc" / "motd").write_text("hi\n")
    img = tmp_path / "disk.img"
    create_disk(img, 16 << 20, from_dir=src, label="data")
    debugfs = tool("debugfs")
    ls = subprocess.run(
        [debugfs, "-R", "ls -l /", str(img)], capture_output=True, text=True, check=True
    ).stdout
    assert "hello.txt" in ls and "etc" in ls
    cat = subprocess.run(
        [debugfs, "-R", "cat /hello.txt", str(img)], capture_output=True, text=True, check=True
    )
    assert cat.stdout == "hello from the host\n"
    out = subprocess.run(
        [tool("dumpe2fs"), "-h", str(img)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   data" in out


@needs_mkfs
def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"precious")
    with pytest.raises(DiskError, match=r"already exists.*--force"):
        create_disk(img, "8M")
    assert img.read_bytes() == b"precious"
    create_disk(img, "8M", force=True)
    assert img.stat().st_size == 8 << 20


def test_missing_from_dir(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="no such directory"):
        create_disk(tmp_path / "d.img", "8M", from_dir=tmp_path / "nope")
    assert not (tmp_path / "d.img").exists()


def test_mkfs_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk.shutil, "which", lambda *a, **k: None)
    with pytest.raises(DiskError, match=r"mkfs\.ext4 not found"):
        create_disk(tmp_path / "d.img", "8M")
    assert not (tmp_path / "d.img").exists()


def test_mkfs_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "mkfs.ext4"
    fake.write_text("#!/bin/sh\necho 'mkfs.ext4: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(disk, "find_mkfs", lambda: str(fake))
    with pytest.raises(DiskError, match="something broke"):
        create_disk(tmp_path / "d.img", "8M")
    assert not (tmp_path / "d.img").exists()


@needs_mkfs
def test_cli_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "cli.img"
    args = cli(["disk", "create", str(img), "--size", "8M"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(img)
    assert img.stat().st_size == 8 << 20
    args = cli(["disk", "create", str(img), "--size", "8M"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


def test_cli_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli(["disk", "create", str(tmp_path / "x.img"), "--size", "lots"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad size" in err


def test_cli_disk_without_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli(["disk"])
    assert args.func(args) == 2
