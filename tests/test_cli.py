"""The pyrovm command as a user runs it: exit statuses, one-line errors, help."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import cli_env, needs_kvm, pyrovm_argv


def pyrovm(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pyrovm_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**(env or {})),
        stdin=subprocess.DEVNULL,
    )


def test_help_explains() -> None:
    out = pyrovm("--help").stdout
    for word in ("run", "guest", "doctor", "kernel", "initramfs", "disk"):
        assert word in out
    run_help = pyrovm("run", "--help").stdout
    for word in ("--kernel", "--memory", "--cpus", "--cmdline", "--initrd", "--console", "--timeout", "124"):
        assert word in run_help


@needs_kvm
def test_run_hello_shows_console_and_exit_port_status(guest: Path) -> None:
    p = pyrovm("run", "--kernel", str(guest), "--cmdline", "test=hello")
    assert p.stdout == "hello from the test guest\n"
    assert p.returncode == 1, p.stderr


@needs_kvm
@pytest.mark.parametrize("status", [0, 7, 100])
def test_run_guest_status(guest: Path, status: int) -> None:
    p = pyrovm("run", "--kernel", str(guest), "--cmdline", f"test=exit status={status}", "--console", "none")
    assert p.stdout == ""
    assert p.returncode == (status << 1) | 1


@needs_kvm
def test_run_four_cpus(guest: Path) -> None:
    p = pyrovm("run", "--kernel", str(guest), "--cpus", "4", "--cmdline", "test=cpus ncpus=4")
    assert p.returncode == 1, p.stderr
    assert "cpus: 4" in p.stdout


@needs_kvm
def test_run_crash_status_and_report(guest: Path) -> None:
    p = pyrovm("run", "--kernel", str(guest), "--cmdline", "test=triple-fault")
    assert p.returncode == 4
    assert "triple fault" in p.stderr and "rip=" in p.stderr
    assert "Traceback" not in p.stderr


@needs_kvm
def test_run_timeout_status(guest: Path) -> None:
    p = pyrovm("run", "--kernel", str(guest), "--cmdline", "test=spin", "--timeout", "0.5")
    assert p.returncode == 124
    assert "timeout" in p.stderr


@needs_kvm
def test_console_file(guest: Path, tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    p = pyrovm("run", "--kernel", str(guest), "--cmdline", "test=hello", "--console", f"file:{log}")
    assert p.returncode == 1
    assert p.stdout == ""
    assert log.read_text() == "hello from the test guest\n"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--kernel", "/nonexistent"], {}, "no such file"),
        (["--kernel", "{junk}"], {}, "not a kernel"),
        (["--kernel", "{guest}", "--memory", "2M"], {}, "too small"),
        (["--kernel", "{guest}", "--memory", "100T"], {}, "more than this host has"),
        (["--kernel", "{guest}", "--memory", "many"], {}, "not a size"),
        (["--kernel", "{guest}", "--cpus", "0"], {}, "at least 1"),
        (["--kernel", "{guest}", "--console", "bogus"], {}, "console"),
        (["--kernel", "{guest}"], {"PYROVM_KVM_DEVICE": "/nonexistent/kvm"}, "does not exist"),
        (["--kernel", "{guest}"], {"PYROVM_KVM_DEVICE": "/dev/null"}, "not a KVM device"),
    ],
)
def test_bad_input_one_clear_line(
    guest: Path, tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    args = [a.format(guest=guest, junk=junk) for a in args]
    p = pyrovm("run", *args, env=env)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovm: "), p.stderr
    assert message in lines[0]


def test_guest_build_prints_path_last() -> None:
    p = pyrovm("guest", "build", timeout=300)
    assert p.returncode == 0, p.stderr
    path = Path(p.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.read_bytes()[:4] == b"\x7fELF"


@needs_kvm
def test_doctor() -> None:
    p = pyrovm("doctor", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "API version 12" in p.stdout
    assert "said hello" in p.stdout
    assert "µs" in p.stdout
    assert "coalesced port I/O: yes" in p.stdout  # (KVM_CAP_COALESCED_PIO: Linux 5.1 and later)


def test_doctor_without_kvm() -> None:
    p = pyrovm("doctor", env={"PYROVM_KVM_DEVICE": "/nonexistent/kvm"})
    assert p.returncode == 1
    assert "does not exist" in p.stdout
