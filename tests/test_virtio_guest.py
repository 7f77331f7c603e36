"""virtio-blk and virtio-rng driven for real by the test guest's virtio-mmio driver (at CPL3)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyrovm.vmm import VM, ConfigError, ExitReason

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = needs_kvm

HEADER = b"pyrovm-blk-test"
SECTOR = 512


def pattern(sectors: int) -> bytes:
    out = bytearray()
    for k in range(sectors):
        out += bytes((k * 7 + i) & 0xFF for i in range(SECTOR))
    out[: len(HEADER)] = HEADER
    return bytes(out)


def image(tmp_path: Path, size: int = 1 << 20, name: str = "disk.img", fill: bytes = b"\0") -> Path:
    path = tmp_path / name
    path.write_bytes(fill * size)
    return path


def test_blk_pattern_reaches_the_file(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path)
    with VM(guest, memory="32M", cmdline="test=blk sectors=64", disks=[str(disk)]) as vm:
        result = vm.wait(60)
        metrics = vm.metrics()
    assert "blk ok 64 sectors" in vm.console.text, vm.console.text
    assert result.reason is ExitReason.EXIT_PORT and result.guest_status == 0
    assert disk.read_bytes()[: 64 * SECTOR] == pattern(64)
    m = metrics["devices"]["virtio-blk:vda"]  # type: ignore[index]
    assert m["bytes_written"] == 64 * SECTOR and m["bytes_read"] == 64 * SECTOR and m["errors"] == 0
    assert m["notifications"] >= m["requests"] > 0


def test_blk_read_only_disk_refuses_writes(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path, fill=b"\xaa")
    before = disk.read_bytes()
    with VM(guest, memory="32M", cmdline="test=blk-ro", disks=[f"{disk},ro"]) as vm:
        result = vm.wait(60)
    assert "blk ro ok" in vm.console.text, vm.console.text
    assert result.guest_status == 0
    assert disk.read_bytes() == before


def test_blk_serial(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path)
    with VM(guest, memory="32M", cmdline="test=blk-id", disks=[f"{disk},serial=pyro-0001"]) as vm:
        vm.wait(60)
    assert "blk id pyro-0001" in vm.console.text, vm.console.text


def test_rng(guest: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=rng bytes=256", rng=True) as vm:
        result = vm.wait(60)
        metrics = vm.metrics()
    assert "rng ok 256" in vm.console.text, vm.console.text
    assert result.guest_status == 0
    assert metrics["devices"]["virtio-rng"]["bytes_read"] == 256  # type: ignore[index]
    assert vm.metrics()["devices"] == metrics["devices"]  # still there after close()


def test_two_devices_get_two_slots(guest: Path, tmp_path: Path) -> None:
    a, b = image(tmp_path, name="a.img"), image(tmp_path, name="b.img")
    with VM(guest, memory="32M", cmdline="test=virtio", disks=[str(a), f"{b},ro"], rng=True) as vm:
        vm.wait(60)
    assert "virtio_mmio.device=4K@0xd0000000:5" in vm.cmdline
    assert "virtio_mmio.device=4K@0xd0001000:6" in vm.cmdline
    assert "virtio_mmio.device=4K@0xd0002000:7" in vm.cmdline
    assert "virtio devices: 3" in vm.console.text, vm.console.text


def test_disk_locked_against_a_second_writer(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path)
    first = VM(guest, memory="32M", cmdline="test=spin", disks=[str(disk)])
    try:
        with pytest.raises(ConfigError, match="locked"):
            VM(guest, memory="32M", cmdline="test=spin", disks=[str(disk)])
    finally:
        first.close()
    VM(guest, memory="32M", cmdline="test=spin", disks=[str(disk)]).close()  # free again


@pytest.mark.parametrize(
    ("disk", "match"),
    [("/nonexistent.img", "no such file"), ("{img},bogus", "unknown option"), ("{odd}", "multiple of 512")],
)
def test_bad_disks(guest: Path, tmp_path: Path, disk: str, match: str) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    spec = disk.format(img=image(tmp_path), odd=odd)
    with pytest.raises(ConfigError, match=match):
        VM(guest, memory="32M", disks=[spec])


def test_rootfs_adds_root_to_cmdline(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path)
    vm = VM(guest, memory="32M", cmdline="test=hello", rootfs=f"{disk},ro")
    vm.close()
    assert vm.cmdline.endswith("root=/dev/vda ro")
    vm = VM(guest, memory="32M", cmdline="test=hello root=/dev/vdb", rootfs=str(disk))
    vm.close()
    assert "root=/dev/vda" not in vm.cmdline


def _cli(*args: str) -> list[str]:
    return pyrovm_argv("run", *args)


def test_cli_disk_and_metrics_file(guest: Path, tmp_path: Path) -> None:
    disk = image(tmp_path)
    metrics = tmp_path / "m.json"
    p = subprocess.run(
        _cli(
            "--kernel",
            str(guest),
            "--cmdline",
            "test=blk",
            "--disk",
            str(disk),
            "--rng",
            "--metrics",
            str(metrics),
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert p.returncode == 1, p.stderr
    assert "blk ok" in p.stdout
    data = json.loads(metrics.read_text())
    assert data["exit"]["reason"] == "exit-port"
    assert data["devices"]["virtio-blk:vda"]["requests"] > 0
    assert set(data["devices"]) == {"virtio-blk:vda", "virtio-rng"}
    assert data["vcpu_exits"]["exits"] > 0


def test_sigkill_after_acknowledged_flush_loses_nothing(guest: Path, tmp_path: Path) -> None:
    """The guest writes, flushes and reads back; the VMM is SIGKILLed the moment the guest reports
    success: everything the guest was told is on disk must be in the file."""
    disk = image(tmp_path)
    p = subprocess.Popen(
        _cli("--kernel", str(guest), "--cmdline", "test=blk sectors=128", "--disk", str(disk)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    assert p.stdout is not None
    out = b""
    while b"blk ok" not in out:
        chunk = p.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        out += chunk
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert b"blk ok" in out, out  # printed only after the flush completed and the data read back
    assert disk.read_bytes()[: 128 * SECTOR] == pattern(128)


def test_cli_metrics_on_sigusr1(guest: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "live.json"
    p = subprocess.Popen(
        _cli("--kernel", str(guest), "--cmdline", "test=echo", "--rng", "--metrics", str(metrics)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert p.stdout is not None and p.stdin is not None
    try:
        out = b""
        while b"echo ready" not in out:  # the VM runs: the handler is installed
            chunk = p.stdout.read1(4096)  # type: ignore[attr-defined]
            assert chunk, out
            out += chunk
        p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not metrics.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        data = json.loads(metrics.read_text())
        assert data["exit"] is None  # written while the VM runs
        assert "virtio-rng" in data["devices"]
        assert data["vcpu_exits"]["io"] > 0
        p.stdin.write(b"\x04")  # Ctrl-D: the guest exits
        p.stdin.flush()
        assert p.wait(20) == 1
    finally:
        p.kill()
    final = json.loads(metrics.read_text())
    assert final["exit"]["reason"] == "exit-port"
