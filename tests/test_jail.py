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

from pyrovm import cgroups
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


def _wait_for_jailed_server(proc: subprocess.Popen[bytes], sock: Path) -> int:
    """The jailed ``serve`` process's PID, once its API socket answers."""
    deadline = time.monotonic() + 30
    while not socket_answers(sock):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    return _jailed_pid(sock)


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
        pid = _wait_for_jailed_server(proc, sock)
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


def _v1_has(controller: str) -> bool:
    return controller in cgroups.mounts(cgroups.read_mounts())[0]


CGROUP_CASES = [
    pytest.param(
        1,
        ["memory.max=256M", "cpu.max=50000 100000", "pids.max=64", "memory.soft_limit_in_bytes=128M"],
        {
            "memory/memory.limit_in_bytes": "268435456",
            "memory/memory.soft_limit_in_bytes": "134217728",
            "cpu/cpu.cfs_quota_us": "50000",
            "cpu/cpu.cfs_period_us": "100000",
            "pids/pids.max": "64",
        },
        marks=pytest.mark.skipif(
            not all(map(_v1_has, ("memory", "cpu", "pids"))), reason="no cgroup v1 here"
        ),
        id="v1",
    ),
    pytest.param(
        2,
        ["cgroup.max.descendants=0", "cgroup.max.depth=0"],
        {"cgroup.max.descendants": "0", "cgroup.max.depth": "0"},
        marks=pytest.mark.skipif(cgroups.mounts(cgroups.read_mounts())[1] is None, reason="no cgroup2 here"),
        id="v2",
    ),
]


@pytest.mark.parametrize(("version", "settings", "expected"), CGROUP_CASES)
def test_a_jailed_vm_runs_in_its_own_cgroup(
    jail_dir: Path, version: int, settings: list[str], expected: dict[str, str]
) -> None:
    d = jail_dir
    sock = d / "out" / "api.sock"
    name = f"cg{version}"
    extra = [f"--cgroup={s}" for s in settings] + [
        "--cgroup-version",
        str(version),
        "--parent-cgroup",
        "pyrovm-test",
    ]
    cmd = _jail(d, name, "serve", "--api-sock", str(sock))
    cmd[cmd.index("--") : cmd.index("--")] = [*extra, "--bind", str(d / "guest.elf")]
    v1, v2 = cgroups.mounts(cgroups.read_mounts())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        pid = _wait_for_jailed_server(proc, sock)
        lines = cgroups.current(pid)
        for key, value in expected.items():
            if version == 1:
                controller, file = key.split("/")
                base = v1[controller]
                assert any(
                    controller in line.split(":")[1].split(",") and line.endswith(f":/pyrovm-test/{name}")
                    for line in lines
                ), lines
            else:
                file, base = key, v2
                assert f"0::/pyrovm-test/{name}" in lines, lines
            assert base is not None and (base / "pyrovm-test" / name / file).read_text().strip() == value
        with Client(str(sock)) as c:
            c.put("/boot-source", kernel_image_path=str(d / "guest.elf"), boot_args="test=exit status=3")
            c.put("/actions", action_type="InstanceStart")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 7 and b"exit status 3" in out
        bases = [v1[k.split("/")[0]] for k in expected] if version == 1 else [v2]
        assert not any(b is not None and (b / "pyrovm-test").exists() for b in bases)  # removed at the end
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
        (["--id", "x", "--uid", "5", "--gid", "5", "--cgroup", "memory", "--", "run"], "FILE=VALUE"),
        (
            ["--id", "x", "--uid", "5", "--gid", "5", "--cgroup=memory.max=lots", "--", "run"],
            "a size in bytes",
        ),
        (["--id", "x", "--uid", "5", "--gid", "5", "--cgroup=frob.max=1", "--", "run"], "no frob controller"),
        (["--id", "x", "--uid", "5", "--gid", "5", "--cgroup=cpu.max=half", "--", "run"], "'QUOTA [PERIOD]'"),
        (
            ["--id", "x", "--uid", "5", "--gid", "5", "--parent-cgroup", "../up", "--", "run"],
            "--parent-cgroup",
        ),
    ],
)
def test_bad_jailer_command_lines(args: list[str], message: str) -> None:
    p = subprocess.run(pyrovm_argv("jail", *args), capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.skipif(
    not _v1_has("pids") and cgroups.mounts(cgroups.read_mounts())[1] is None, reason="no pids"
)
def test_the_cgroup_limit_holds_from_the_start(jail_dir: Path) -> None:
    """pids.max=2: the VMM cannot start its vCPU and I/O threads; it says so in one line."""
    d = jail_dir
    cmd = _jail(
        d, "pids", "run", "--kernel", str(d / "guest.elf"), "--cmdline", "test=hello", "--memory", "32M"
    )
    cmd[cmd.index("--") : cmd.index("--")] = ["--cgroup", "pids.max=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=60)
    assert p.returncode == 8 and "cannot start a thread" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "hello" not in p.stdout
