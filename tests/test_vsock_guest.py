"""virtio-vsock end to end with the test guest's driver (test=vsock): Firecracker's protocol spoken by
socat and by pyrovm's own client, many connections at once, guest-initiated connections."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyrovm.netback.vsock import VsockError, VsockHost

from conftest import needs_kvm, pyrovm_argv
from test_net_guest import Guest

pytestmark = [needs_kvm]

READY = re.compile(r"vsock: ready cid (\d+) port (\d+)")


def start(guest: Path, tmp_path: Path, cmdline: str = "test=vsock port=5000") -> tuple[Guest, VsockHost]:
    path = tmp_path / "v.sock"
    vm = Guest(
        pyrovm_argv(
            "run", "--kernel", str(guest), "--cmdline", cmdline, "--console", "stdio",
            "--vsock", f"cid=7,uds={path}", "--timeout", "120",
        )
    )  # fmt: skip
    m = vm.wait_for(READY)
    assert m.group(1) == "7"
    return vm, VsockHost(path, 7)


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (Debian package socat)")
def test_socat_echo_10_mib(guest: Path, tmp_path: Path) -> None:
    vm, host = start(guest, tmp_path)
    try:
        data = os.urandom(10 << 20)
        src = tmp_path / "in"
        src.write_bytes(b"CONNECT 5000\n" + data)
        with open(src, "rb") as stdin:
            out = subprocess.run(
                ["socat", "-t", "60", "-", f"UNIX-CONNECT:{host.path}"],
                stdin=stdin,
                capture_output=True,
                timeout=120,
            ).stdout
        line, _, echoed = out.partition(b"\n")
        assert re.fullmatch(rb"OK \d+", line), out[:100]
        assert len(echoed) == len(data) and echoed == data
        # a port nobody listens on: socat's connection is closed without an OK
        out = subprocess.run(
            ["socat", "-", f"UNIX-CONNECT:{host.path}"],
            input=b"CONNECT 4999\n",
            capture_output=True,
            timeout=30,
        ).stdout
        assert out == b""
    finally:
        vm.kill()


def test_sixteen_connections_at_once_and_the_python_client(guest: Path, tmp_path: Path) -> None:
    vm, host = start(guest, tmp_path)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with host.connect(5000, timeout=10) as s:
                s.settimeout(30)
                data = os.urandom(200_000 + i)
                sender = threading.Thread(target=s.sendall, args=(data,))
                sender.start()
                got = b""
                while len(got) < len(data):
                    chunk = s.recv(65536)
                    assert chunk, "closed early"
                    got += chunk
                sender.join()
                assert got == data
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        with pytest.raises(VsockError, match="refused"):
            host.connect(4999, timeout=10)
        # the source port streams 10 MiB and closes
        with host.connect(5001, timeout=10) as s:
            s.settimeout(30)
            total = 0
            while chunk := s.recv(1 << 16):
                total += len(chunk)
        assert total == 10 << 20
    finally:
        vm.kill()


def test_guest_initiated_connection_and_refusal(guest: Path, tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    lst = VsockHost(path, 7).listen(6000)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(30)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            got.append(data)

    t = threading.Thread(target=accept)
    t.start()
    vm, _ = start(guest, tmp_path, "test=vsock connect=6000 msg=hi-from-the-guest")
    try:
        assert "vsock: connected to host port 6000" in vm.text
        t.join(30)
        assert got == [b"hi-from-the-guest"]
    finally:
        vm.kill()
        lst.close()
    (tmp_path / "v.sock").unlink(missing_ok=True)
    vm, _ = start(guest, tmp_path, "test=vsock connect=6001")  # nobody at PATH_6001: RST
    try:
        assert "vsock: host port 6001 refused" in vm.text
    finally:
        vm.kill()


def test_bad_vsock_options(guest: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    taken.write_text("keep")
    for spec, message in [
        ("cid=2", "vsock guest CID 2: from 3"),
        ("cid=x", "cid 'x' is not a number"),
        ("uds=/tmp/a", "cid=N is required"),
        ("cid=3,port=1", "unknown option 'port=1'"),
        (f"cid=3,uds={taken}", "already exists"),
        (f"cid=3,uds={tmp_path}/missing/v.sock", "does not exist"),
    ]:
        proc = subprocess.run(
            pyrovm_argv("run", "--kernel", str(guest), "--vsock", spec),
            capture_output=True, text=True, timeout=60, env=__import__("conftest").cli_env(),
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (spec, proc.stderr)
    assert taken.read_text() == "keep"


def test_socket_removed_when_the_vm_ends(guest: Path, tmp_path: Path) -> None:
    vm, host = start(guest, tmp_path)
    assert host.path.exists()
    vm.proc.terminate()
    vm.finish(30)
    assert not host.path.exists()
    s = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        s.connect(str(host.path))
    s.close()


def test_python_api_and_per_connection_metrics(guest: Path, tmp_path: Path) -> None:
    from pyrovm import VM

    with VM(guest, memory="64M", cmdline="test=vsock", vsock=f"cid=9,uds={tmp_path / 'api.sock'}") as vm:
        vm.console.wait_for("vsock: ready cid 9", 30)  # (the with block started it)
        with vm.vsock.connect(5000, timeout=10) as s:
            s.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += s.recv(4096)
            for _ in range(100):  # (the I/O thread counts right after the host socket took the bytes)
                dev = vm.metrics()["devices"]["virtio-vsock"]  # type: ignore[index]
                [conn] = dev["connections"]
                if conn["bytes_to_host"] == 1000:
                    break
                time.sleep(0.02)
            assert (
                conn["guest_port"] == 5000
                and conn["bytes_to_guest"] == 1000
                and conn["bytes_to_host"] == 1000
            )
            assert dev["host_connects"] == 1 and dev["rx_packets"] >= 2 and dev["tx_packets"] >= 2
        vm.stop()
    assert not (tmp_path / "api.sock").exists()
