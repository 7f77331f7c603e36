"""seccomp: every role's thread is stopped, with a report naming the call and the thread, when it makes a
system call outside its filter (provoked through the PYROVM_SECCOMP_TEST_VIOLATION hook and through filter
files that take away what pyrovm needs); --no-seccomp turns the filters off; bad filter files are one line.
The rest of the suite runs the CLI with the filters on (the default)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pyrovm.api.server import socket_answers
from pyrovm.seccomp import EXIT_STATUS, FILTERS

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = needs_kvm


def _run(
    guest: Path, cmdline: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pyrovm_argv(
            "run",
            "--kernel",
            str(guest),
            "--memory",
            "32M",
            "--cmdline",
            cmdline,
            "--timeout",
            "20",
            "--console",
            "none",
            *extra,
        ),
        capture_output=True,
        text=True,
        env=cli_env(**(env or {})),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(("role", "thread"), [("vcpu", "vcpu0"), ("io", "pyrovm-io"), ("main", "MainThread")])
def test_a_call_outside_the_filter_stops_pyrovm_with_a_report(guest: Path, role: str, thread: str) -> None:
    p = _run(guest, "test=spin", "--rng", env={"PYROVM_SECCOMP_TEST_VIOLATION": role})
    assert p.returncode == EXIT_STATUS, p.stderr
    line = f"pyrovm: seccomp: thread {thread} ({role}) made system call swapoff (168)"
    assert p.stderr.startswith(line) and p.stderr.count("\n") == 1, p.stderr


def test_the_api_thread_has_its_filter(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    p = subprocess.Popen(
        pyrovm_argv("serve", "--api-sock", str(sock)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(PYROVM_SECCOMP_TEST_VIOLATION="api"),
    )
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_STATUS and "thread pyrovm-api (api) made system call swapoff" in err, err


def test_without_seccomp_the_hook_does_nothing(guest: Path) -> None:
    p = _run(guest, "test=hello", "--no-seccomp", env={"PYROVM_SECCOMP_TEST_VIOLATION": "vcpu"})
    assert p.returncode == 1, p.stderr  # the guest's own exit: (0 << 1) | 1


def _filters(tmp_path: Path, change: object) -> Path:
    data = json.loads(FILTERS.read_text())
    change(data)  # type: ignore[operator]
    path = tmp_path / "filters.json"
    path.write_text(json.dumps(data))
    return path


def test_a_filter_without_ioctl_stops_the_vcpu_at_its_first_kvm_run(guest: Path, tmp_path: Path) -> None:
    path = _filters(tmp_path, lambda d: d["vcpu"]["syscalls"].remove("ioctl"))
    p = _run(guest, "test=hello", "--seccomp-filter", str(path))
    assert p.returncode == EXIT_STATUS, p.stderr
    assert "thread vcpu0 (vcpu) made system call ioctl (16)" in p.stderr, p.stderr


def test_the_ioctl_argument_filter(guest: Path, tmp_path: Path) -> None:
    """Without KVM_GET_MP_STATE among the vCPU's allowed ioctl requests, the halt check (every 0.5 s) is
    refused: the filter looks at the request, not only at the call."""

    def drop(d: dict[str, object]) -> None:
        values = d["vcpu"]["args"]["ioctl"]["values"]  # type: ignore[index]
        values.remove(hex(0x8004AE98))  # KVM_GET_MP_STATE

    p = _run(guest, "test=spin", "--seccomp-filter", str(_filters(tmp_path, drop)))
    assert p.returncode == EXIT_STATUS and "(vcpu) made system call ioctl (16)" in p.stderr, p.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"vcpu": {"kind": "allow", "syscalls": []}}', "no filter for role 'io'"),
        (None, "unknown system call 'no_such_call'"),
        (None, "kind must be 'allow' or 'deny'"),
    ],
)
def test_bad_filter_files_are_one_line(
    guest: Path, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "f.json"
    if content is not None:
        path.write_text(content)
    elif "unknown" in message:
        path = _filters(tmp_path, lambda d: d["io"]["syscalls"].append("no_such_call"))
    else:
        path = _filters(tmp_path, lambda d: d["main"].update(kind="maybe"))
    p = _run(guest, "test=hello", "--seccomp-filter", str(path))
    assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_serve_runs_a_vm_with_filters_on(guest: Path, tmp_path: Path) -> None:
    """InstanceStart through the API builds the VM on the API thread (under its filter); the guest runs."""
    from pyrovm.api import Client

    sock = tmp_path / "api.sock"
    p = subprocess.Popen(
        pyrovm_argv("serve", "--api-sock", str(sock)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not socket_answers(sock):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with Client(str(sock)) as c:
            c.put("/boot-source", kernel_image_path=str(guest), boot_args="test=exit status=3")
            c.put("/actions", action_type="InstanceStart")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 7 and b"exit status 3" in out, err  # (3 << 1) | 1
