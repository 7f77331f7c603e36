"""``pyrovm jail``: the VMM in its own mount, PID, IPC and UTS namespaces, pivot_root'ed into a directory
that holds only what it needs, as an unprivileged user with no_new_privs; the guest still boots and does
block I/O."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyrovm.api import Client
from pyrovm.api.server import socket_answers

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = [needs_kvm, pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")]
NOBODY = 65534


@pytest.fixture
def jail_dir(guest: Path) -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's are root's only), with the guest and a disk."""
    d = Path(tempfile.mkdtemp(prefix="pyrovm-jail-"))
    os.chmod(d, 0o755)
    shutil.copy(guest, d / "guest.elf")
    (d / "disk.img").write_bytes(bytes(1 << 20))
    (d / "out").mkdir()
    for p in (d / "guest.elf", d / "disk.img", d / "out"):
        os.chown(p, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _jail(d: Path, name: str, *command: str) -> list[str]:
    return pyrovm_argv(
        "jail",
        "--id",
        name,
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--chroot-base",
        str(d / "base"),
        "--rlimit",
        "nofile=256",
        "--",
        *command,
    )


def test_a_jailed_vm_boots_and_does_block_io(jail_dir: Path) -> None:
    d = jail_dir
    p = subprocess.run(
        _jail(
            d,
            "blk",
            "run",
            "--kernel",
            str(d / "guest.elf"),
            "--memory",
            "32M",
            "--cmdline",
            "test=blk sectors=32",
            "--disk",
            str(d / "disk.img"),
            "--timeout",
            "30",
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=90,
    )
    assert p.returncode == 1 and "blk ok 32 sectors" in p.stdout, p.stdout + p.stderr
    assert (d / "disk.img").read_bytes()[:512] != bytes(512)  # the guest's writes reached the image
    assert not (d / "base" / "pyrovm" / "blk").exists()  # the jail is removed afterwards


def _jailed_pid(sock: Path) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(sock).encode() in cmd and b"pyrovm.cli\0serve" in cmd:
                return int(entry.name)
    raise AssertionError("the jailed pyrovm process was not found")


def test_the_jailed_vmm_sees_only_its_jail(jail_dir: Path) -> None:
    d = jail_dir
    sock = d / "out" / "api.sock"
    cmd = _jail(d, "api", "serve", "--api-sock", str(sock))
    cmd[cmd.index("--") : cmd.index("--")] = [
        "--bind",
        str(d / "guest.elf"),
    ]  # (given later, through the API)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not socket_answers(sock):
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.05)
        pid = _jailed_pid(sock)
        status = (Path("/proc") / str(pid) / "status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(NOBODY)] * 4  # the user, with no way back
        assert "NoNewPrivs:\t1" in status
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
        assert nspid[-1] == "1"  # PID 1 in a PID namespace of its own
        root = Path("/proc") / str(pid) / "root"
        assert (
            not (root / "etc" / "shadow").exists() and not (root / "home").exists()
        )  # only the jail's files
        assert sorted(p.name for p in (root / "proc").iterdir() if p.name.isdigit()) == ["1"]  # no host PIDs
        assert (root / "dev" / "kvm").exists() and sorted(p.name for p in (root / "dev").iterdir()) == [
            "kvm",
            "net",
            "null",
            "urandom",
        ]
        with Client(str(sock)) as c:
            c.put("/boot-source", kernel_image_path=str(d / "guest.elf"), boot_args="test=exit status=2")
            c.put("/actions", action_type="InstanceStart")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 5 and b"exit status 2" in out  # (2 << 1) | 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "a b", "--uid", "1", "--gid", "1", "--", "run"], "--id 'a b'"),
        (["--id", "x", "--uid", "0", "--gid", "1", "--", "run"], "an unprivileged user"),
        (["--id", "x", "--uid", "5", "--gid", "5", "--", "snapshot"], "run ... or serve ..."),
        (["--id", "x", "--uid", "5", "--gid", "5", "--rlimit", "cpu=1", "--", "run"], "--rlimit 'cpu=1'"),
    ],
)
def test_bad_jailer_command_lines(args: list[str], message: str) -> None:
    p = subprocess.run(pyrovm_argv("jail", *args), capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr
