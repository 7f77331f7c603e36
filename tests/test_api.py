"""The Firecracker-compatible API: its rules (no KVM), the HTTP server on a real Unix socket under bad
input, ``pyrovm-firecracker``'s flags and config file, and unmodified third-party clients
(firecracker-python from PyPI, curl) booting and controlling the test guest."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyrovm.api import ApiFault, Client
from pyrovm.api.controller import BEFORE, Controller
from pyrovm.api.server import ApiServer, socket_answers

from conftest import cli_env, needs_kvm

BIN = [sys.executable, "-m", "pyrovm.api.firecracker"]


# -- the rules, without HTTP ---------------------------------------------------------------------------
def fault(reply: tuple[int, object]) -> str:
    status, value = reply
    assert status == 400 and isinstance(value, dict), reply
    return str(value["fault_message"])


def test_describe_version_and_machine_config_defaults() -> None:
    c = Controller("vm-1")
    assert c.handle("GET", "/", None) == (
        200,
        {"id": "vm-1", "state": "Not started", "vmm_version": "0.1.0", "app_name": "Firecracker"},
    )
    assert c.handle("GET", "/version", None)[0] == 200
    assert c.handle("GET", "/machine-config", None)[1] == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert c.handle("PATCH", "/machine-config", {"mem_size_mib": 256}) == (204, None)
    assert c.handle("GET", "/machine-config", None)[1]["mem_size_mib"] == 256


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("PUT", "/boot-source", None, "Empty PUT request."),
        ("PATCH", "/machine-config", None, "Empty PATCH request."),
        ("PUT", "/boot-source", {"kernel_image_path": "k", "x": 1}, "unknown field `x`"),
        ("PUT", "/boot-source", {"boot_args": "a"}, "missing field `kernel_image_path`"),
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": "2", "mem_size_mib": 64},
            "invalid type for field `vcpu_count`",
        ),
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": True, "mem_size_mib": 64},
            "invalid type for field `vcpu_count`",
        ),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 64}, "The vCPU number is invalid"),
        (
            "PUT",
            "/drives/a",
            {"drive_id": "b", "is_root_device": False, "path_on_host": "x"},
            "The id from the path does not match the id from the body!",
        ),
        (
            "PUT",
            "/network-interfaces/e0",
            {"iface_id": "e1", "host_dev_name": "tap0"},
            "The id from the path does not match the id from the body!",
        ),
        (
            "PUT",
            "/drives/a-b",
            {"drive_id": "a-b", "is_root_device": False, "path_on_host": "x"},
            "Invalid drive ID",
        ),
        ("DELETE", "/drives/a", {}, "Invalid request method and/or path: DELETE /drives/a."),
        ("GET", "/nowhere", None, "Invalid request method and/or path: GET /nowhere."),
        ("PUT", "/actions", {"action_type": "Explode"}, "unknown variant `Explode`"),
        ("PUT", "/actions", {"action_type": "FlushMetrics"}, BEFORE),
        (
            "PUT",
            "/actions",
            {"action_type": "InstanceStart"},
            "Cannot start microvm without kernel configuration.",
        ),
        ("PATCH", "/vm", {"state": "Paused"}, BEFORE),
        ("PATCH", "/drives/a", {"drive_id": "a", "path_on_host": "y"}, BEFORE),
        ("GET", "/balloon", None, "A balloon device is not supported by pyrovm yet."),
        ("PUT", "/mmds", {}, "MMDS (the microVM metadata service) is not supported by pyrovm yet."),
        ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}, BEFORE),
        ("PUT", "/snapshot/load", {"snapshot_path": "s"}, "missing field `mem_backend`"),
        (
            "PUT",
            "/snapshot/load",
            {"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}},
            "the Uffd memory backend is not supported",
        ),
        (
            "PUT",
            "/snapshot/load",
            {"snapshot_path": "/nonexistent", "mem_file_path": "m"},
            "Load snapshot error: state file /nonexistent: No such file or directory",
        ),
        (
            "PUT",
            "/drives/r",
            {
                "drive_id": "r",
                "is_root_device": True,
                "path_on_host": "x",
                "rate_limiter": {"bandwidth": {"size": 1}},
            },
            "a token bucket is {size, refill_time[, one_time_burst]}",
        ),
    ],
)
def test_refusals(method: str, path: str, body: object, message: str) -> None:
    assert message in fault(Controller().handle(method, path, body))


def test_second_root_drive_and_vm_config() -> None:
    c = Controller()
    assert c.handle("PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "quiet"})[0] == 204
    assert (
        c.handle("PUT", "/drives/root", {"drive_id": "root", "path_on_host": "/r", "is_root_device": True})[0]
        == 204
    )
    body = {"drive_id": "other", "path_on_host": "/o", "is_root_device": True}
    assert fault(c.handle("PUT", "/drives/other", body)) == "A root block device already exists!"
    assert (
        c.handle("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})[0] == 204
    )
    assert c.handle("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})[0] == 204
    cfg = c.handle("GET", "/vm/config", None)[1]
    assert cfg["boot-source"]["kernel_image_path"] == "/k" and cfg["drives"][0]["is_root_device"]
    assert cfg["network-interfaces"] == [
        {
            "iface_id": "eth0",
            "host_dev_name": "tap0",
            "guest_mac": None,
            "rx_rate_limiter": None,
            "tx_rate_limiter": None,
        }
    ]
    vm_config = c.resources.to_config("x")
    assert (
        vm_config.rootfs is not None and str(vm_config.rootfs.path) == "/r" and vm_config.net[0].tap == "tap0"
    )
    assert vm_config.cmdline == "console=ttyS0 quiet" and vm_config.vsock is not None


def test_start_failure_is_a_400_naming_the_problem(tmp_path: Path) -> None:
    c = Controller()
    c.handle("PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "missing")})
    message = fault(c.handle("PUT", "/actions", {"action_type": "InstanceStart"}))
    assert message.startswith("Failed to start microVM: kernel") and "no such file" in message
    assert c.state == "Not started"


# -- the HTTP server --------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    srv = ApiServer(tmp_path / "api.sock", Controller("srv"), max_payload=51200)
    srv.start()
    yield srv
    srv.close()


def raw(path: Path, data: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # refused before the whole body was sent
            pass
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                m = re.search(rb"Content-Length: (\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
        return out


def test_keep_alive_and_json_everywhere(server: ApiServer) -> None:
    with Client(str(server.path)) as c:
        for _ in range(3):  # one connection, several requests
            assert c.get("/")["id"] == "srv"
        assert c.put("/machine-config", vcpu_count=2, mem_size_mib=64) is None
        with pytest.raises(ApiFault) as info:
            c.put("/machine-config", vcpu_count=0, mem_size_mib=64)
        assert info.value.status == 400 and "vCPU number is invalid" in info.value.message
        assert c.get("/machine-config")["vcpu_count"] == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/0.9\r\n\r\n",  # (http.server would answer without a status line)
        b"GET /\r\n\r\n",  # the same, HTTP/0.9's simple request
        b"PATCH /vm x HTTP/0.9\r\n\r\n",  # (found by fuzzing: a refusal of a line that ends HTTP/0.9)
        b"PUT /machine-config HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope",
        b"PUT /machine-config HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"PUT /machine-config HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"{" * 1000,
        b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_bad_requests_get_one_json_fault(server: ApiServer, request_bytes: bytes) -> None:
    reply = raw(server.path, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), reply[:200]
    assert "fault_message" in json.loads(body)
    assert socket_answers(server.path)  # and the server goes on


def test_half_requests_idle_connections_and_a_1mb_body(server: ApiServer) -> None:
    idle = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(server.path))
        idle.append(s)
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(server.path))
    half.sendall(b'PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"vcpu')
    killed = socket.socket(socket.AF_UNIX)
    killed.connect(str(server.path))
    killed.sendall(b"GET / HTTP/1.1\r\n")
    killed.close()  # the client died mid-request
    big = raw(server.path, b"PUT /boot-source HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + b" " * (1 << 20))
    assert b"larger than the limit of 51200" in big
    with Client(str(server.path), timeout=5) as c:
        assert c.get("/")["state"] == "Not started"
    for s in [*idle, half]:
        s.close()


def test_existing_socket_path_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep")
    proc = subprocess.run(
        [*BIN, "--api-sock", str(taken)], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"pyrovm-firecracker: API socket {taken} already exists (remove it, or give another --api-sock)"
    ]
    assert taken.read_text() == "keep"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-api"], "--no-api needs --config-file"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--http-api-max-payload-size", "0"], "must be positive"),
    ],
)
def test_bad_flags(args: list[str], message: str) -> None:
    proc = subprocess.run([*BIN, *args], capture_output=True, text=True, env=cli_env(), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# -- with a guest -----------------------------------------------------------------------------------
def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not socket_answers(path):
        assert proc.poll() is None and time.monotonic() < deadline, "the API did not come up"
        time.sleep(0.02)


@needs_kvm
def test_firecracker_python_drives_the_test_guest(guest: Path, tmp_path: Path) -> None:
    from firecracker.api import Api  # the unmodified third-party client

    sock = tmp_path / "fc.sock"
    proc = subprocess.Popen(
        [*BIN, "--api-sock", str(sock), "--id", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        wait_socket(sock, proc)
        api = Api(str(sock))
        assert api.describe.get().json()["state"] == "Not started"
        api.machine_config.put(vcpu_count=2, mem_size_mib=64)
        assert api.machine_config.get().json()["vcpu_count"] == 2
        api.boot.put(kernel_image_path=str(guest), boot_args="test=spin")
        api.actions.put(action_type="InstanceStart")
        assert api.describe.get().json() == {
            "id": "demo",
            "state": "Running",
            "vmm_version": "0.1.0",
            "app_name": "Firecracker",
        }
        api.vm.patch(state="Paused")
        assert api.describe.get().json()["state"] == "Paused"
        api.vm.patch(state="Resumed")
        assert api.describe.get().json()["state"] == "Running"
        from firecracker.exceptions import APIError

        with pytest.raises(APIError, match="not supported after starting the microVM"):
            api.actions.put(action_type="InstanceStart")
        api.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 128 + 15
        assert b"spin counter at" in out  # the guest's console is the process's stdout
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_kvm
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_through_every_endpoint(guest: Path, tmp_path: Path) -> None:
    sock = tmp_path / "fc.sock"
    metrics = tmp_path / "metrics.json"
    proc = subprocess.Popen(
        [*BIN, "--api-sock", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )

    def curl(method: str, path: str, body: object = None) -> tuple[int, str]:
        args = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", str(sock), "-X", method]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = subprocess.run(
            [*args, f"http://localhost{path}"], capture_output=True, text=True, timeout=30
        ).stdout
        text, _, code = out.rpartition("\n")
        return int(code), text

    try:
        wait_socket(sock, proc)
        disk = tmp_path / "d.img"
        disk.write_bytes(bytes(1 << 20))
        steps = [
            ("GET", "/", None, 200),
            ("GET", "/version", None, 200),
            ("GET", "/machine-config", None, 200),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}, 204),
            ("PATCH", "/machine-config", {"mem_size_mib": 96}, 204),
            ("PUT", "/boot-source", {"kernel_image_path": str(guest), "boot_args": "test=spin"}, 204),
            (
                "PUT",
                "/drives/d1",
                {"drive_id": "d1", "path_on_host": str(disk), "is_root_device": False},
                204,
            ),
            ("PUT", "/entropy", {}, 204),
            ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}, 204),
            ("PUT", "/metrics", {"metrics_path": str(metrics)}, 204),
            (
                "PUT",
                "/logger",
                {"log_path": str(tmp_path / "log"), "level": "Debug", "show_level": True},
                204,
            ),
            ("GET", "/vm/config", None, 200),
            ("PUT", "/network-interfaces/e0", {"iface_id": "e1", "host_dev_name": "t"}, 400),
            ("PUT", "/actions", {"action_type": "InstanceStart"}, 204),
            ("PATCH", "/vm", {"state": "Paused"}, 204),
            ("PATCH", "/vm", {"state": "Resumed"}, 204),
            ("PUT", "/actions", {"action_type": "FlushMetrics"}, 204),
            ("PUT", "/boot-source", {"kernel_image_path": "k"}, 400),
            ("PATCH", "/drives/d1", {"drive_id": "d1", "path_on_host": str(tmp_path / "other")}, 400),
            (
                "PATCH",
                "/drives/d1",
                {"drive_id": "d1", "rate_limiter": {"ops": {"size": 100, "refill_time": 10}}},
                204,
            ),
            ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, 204),
            ("GET", "/balloon", None, 400),
        ]
        for method, path, body, want in steps:
            code, text = curl(method, path, body)
            assert code == want, (method, path, code, text)
            if code == 400:
                assert "fault_message" in json.loads(text)
        flushed = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert len(flushed) == 1 and "virtio-blk:vda" in flushed[0]["devices"]
        code, text = curl("GET", "/vm/config")
        assert json.loads(text)["drives"][0]["rate_limiter"]["ops"]["size"] == 100
        assert (tmp_path / "log").exists()
    finally:
        proc.kill()
        proc.wait()


@needs_kvm
def test_config_file_boots_at_once_and_errors_name_the_field(guest: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(guest), "boot_args": "test=exit status=3"},
                "drives": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            }
        )
    )
    proc = subprocess.run(
        [*BIN, "--no-api", "--config-file", str(cfg)],
        capture_output=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == (3 << 1) | 1 and b"exit status 3" in proc.stdout, proc.stderr
    bad = {
        "boot-source": {"kernel_image_path": str(guest)},
        "drives": [{"drive_id": "a", "is_root_device": "no"}],
    }
    cfg.write_text(json.dumps(bad))
    proc = subprocess.run(
        [*BIN, "--no-api", "--config-file", str(cfg)],
        capture_output=True,
        text=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"config file {cfg}: drives[0]:" in lines[0] and "`is_root_device`" in lines[0]
    os.unlink(cfg)


def test_logger_on_a_fifo_without_reader_is_refused_not_hung(tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    c = Controller()
    t0 = time.monotonic()
    message = fault(c.handle("PUT", "/logger", {"log_path": str(fifo), "level": "Info"}))
    assert time.monotonic() - t0 < 2 and message.startswith(f"Cannot open the log file {fifo}")


def test_entropy_bandwidth_becomes_the_rng_rate() -> None:
    c = Controller()
    c.handle("PUT", "/boot-source", {"kernel_image_path": "/k"})
    body = {"rate_limiter": {"bandwidth": {"size": 5000, "refill_time": 500}}}
    assert c.handle("PUT", "/entropy", body) == (204, None)
    cfg = c.resources.to_config("x")
    assert cfg.rng and cfg.rng_rate == 10000
    assert c.handle("GET", "/vm/config", None)[1]["entropy"]["rate_limiter"]["bandwidth"]["size"] == 5000
    ops = {"rate_limiter": {"ops": {"size": 5, "refill_time": 500}}}
    assert "ops limit on the entropy device" in fault(c.handle("PUT", "/entropy", ops))


@needs_kvm
def test_metrics_are_also_written_periodically(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyrovm.api.controller as controller

    monkeypatch.setattr(controller, "METRICS_PERIOD", 0.2)
    metrics = tmp_path / "m.json"
    c = Controller()
    c.handle("PUT", "/boot-source", {"kernel_image_path": str(guest), "boot_args": "test=spin"})
    c.handle("PUT", "/metrics", {"metrics_path": str(metrics)})
    assert c.handle("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    try:
        deadline = time.monotonic() + 10
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert all(json.loads(line)["state"] == "running" for line in metrics.read_text().splitlines())
    finally:
        c.close()


@needs_kvm
def test_patch_drive_swaps_the_backing_file(guest: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(2 << 20))
    c = Controller()
    c.handle("PUT", "/boot-source", {"kernel_image_path": str(guest), "boot_args": "test=spin"})
    c.handle("PUT", "/drives/d", {"drive_id": "d", "path_on_host": str(a), "is_root_device": False})
    assert c.handle("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    try:
        missing = {"drive_id": "d", "path_on_host": str(tmp_path / "missing.img")}
        assert "Unable to patch the block device" in fault(c.handle("PATCH", "/drives/d", missing))
        assert c.handle("PATCH", "/drives/d", {"drive_id": "d", "path_on_host": str(b)}) == (204, None)
        assert c.handle("GET", "/vm/config", None)[1]["drives"][0]["path_on_host"] == str(b)
        [slot] = [s for s in c.vm.machine.devices.slots if s.name == "virtio-blk:vda"]
        assert slot.transport.state.config_generation == 1  # the guest is told its disk changed
        assert slot.transport.device.capacity == 4096
    finally:
        c.close()
