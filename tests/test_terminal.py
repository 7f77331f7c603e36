"""The interactive console: keystrokes to the guest's UART through VM.send_input, a pipe and a pty."""

from __future__ import annotations

import os
import select
import subprocess
import termios
import time
from pathlib import Path

from pyrovm.terminal import CTRL_A, EscapeDecoder

from conftest import cli_env, needs_kvm, pyrovm_argv


def _echo_argv(guest: Path, timeout: int = 60) -> list[str]:
    """pyrovm running the test guest's echo test."""
    return pyrovm_argv("run", "--kernel", str(guest), "--cmdline", "test=echo", "--timeout", str(timeout))


def _spawn_on_pty(guest: Path) -> tuple[int, int, subprocess.Popen[bytes]]:
    """The echo test under pyrovm with a pty as its terminal: (master, slave, process)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        _echo_argv(guest),
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=cli_env(),
        start_new_session=True,
    )
    return master, slave, proc


def test_escape_decoder() -> None:
    d = EscapeDecoder()
    assert d.feed(b"abc") == (b"abc", [])
    assert d.feed(b"\x01\x01") == (b"\x01", [])
    assert d.feed(b"\x01x") == (b"", [ord("x")])
    assert d.feed(b"\x01") == (b"", [])  # split across reads
    assert d.feed(b"X") == (b"", [ord("x")])
    assert d.feed(b"\x01q") == (bytes((CTRL_A,)) + b"q", [])
    assert d.feed(b"a\x03b") == (b"a\x03b", [])  # Ctrl-C goes to the guest


@needs_kvm
def test_send_input_echo(guest: Path) -> None:
    from pyrovm.vmm import VM, ExitReason

    with VM(kernel=guest, cmdline="test=echo") as vm:
        assert vm.console.wait_for("echo ready", timeout=20)
        vm.send_input(b"hello pyrovm")
        assert vm.console.wait_for("hello pyrovm", timeout=20), vm.console.text
        vm.send_input(b"\x04")
        result = vm.wait(20)
    assert result.reason is ExitReason.EXIT_PORT
    assert result.guest_status == 0
    assert "bye" in vm.console.text


@needs_kvm
def test_cli_pipe_input(guest: Path) -> None:
    proc = subprocess.run(
        _echo_argv(guest, timeout=30),
        input=b"piped text\x04",
        capture_output=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr  # exit port value 0 -> (0 << 1) | 1
    assert b"echo ready" in proc.stdout
    assert b"piped text" in proc.stdout
    assert b"bye" in proc.stdout


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} within {timeout} s; got {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


@needs_kvm
def test_pty_raw_mode_echo_and_quit(guest: Path) -> None:
    master, slave, proc = _spawn_on_pty(guest)
    before = termios.tcgetattr(slave)
    try:
        _read_until(master, b"echo ready", 30)
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ECHO  # raw mode: the terminal does not echo, the guest does
        assert not during[3] & termios.ICANON
        os.write(master, b"typed keys")
        _read_until(master, b"typed keys", 30)
        os.write(master, b"\x01x")  # Ctrl-A x quits
        code = proc.wait(30)
        assert code == 0, proc.stderr.read() if proc.stderr else b""
        after = termios.tcgetattr(slave)
        assert after == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


@needs_kvm
def test_pty_sigterm_restores_terminal(guest: Path) -> None:
    master, slave, proc = _spawn_on_pty(guest)
    before = termios.tcgetattr(slave)
    try:
        _read_until(master, b"echo ready", 30)
        assert termios.tcgetattr(slave) != before
        proc.terminate()
        assert proc.wait(30) == 128 + 15
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
