"""Snapshots with the test guest: a VM saved mid-run continues in another process (its counter and the
checksum of its memory), five clones and the original at once, diff snapshots, virtio-blk and vsock across
a snapshot, the API with an unmodified third-party client, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from snapshots import check_count_stream

from pyrovm import VM
from pyrovm.api.server import socket_answers
from pyrovm.builder import RestoreOptions
from pyrovm.config import DiskSpec
from pyrovm.devices.ratelimit import BucketSpec, RateLimitSpec
from pyrovm.errors import HostError, SnapshotError
from pyrovm.snapshot import fileformat, load_state, memfile

from conftest import cli_env, needs_kvm, pyrovm_argv

pytestmark = needs_kvm


def wait_for(predicate: object, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def counts(vm: VM) -> int:
    return vm.console.text.count("count ")


@dataclasses.dataclass
class Saved:
    state: Path
    mem: Path
    console: str  # the original's console up to the snapshot, exactly


@pytest.fixture(scope="module")
def count_snapshot(guest: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """``test=count`` saved after a few hundred counts; the original stopped right there."""
    d = tmp_path_factory.mktemp("snap")
    vm = VM(guest, memory="64M", cmdline="test=count")
    with vm:
        wait_for(lambda: counts(vm) > 250, what="250 counts")
        vm.pause()
        info = vm.snapshot(d / "vm.state", d / "vm.mem")
        text = vm.console.text
    assert info.kind == "full" and info.mem_bytes_written < 4 << 20  # sparse: the guest touched little
    return Saved(d / "vm.state", d / "vm.mem", text)


def test_restored_vm_waits_paused_then_continues_where_it_was(count_snapshot: Saved) -> None:
    check_count_stream(count_snapshot.console, from_start=True)
    mem_before = count_snapshot.mem.read_bytes()
    with VM.restore(count_snapshot.state, count_snapshot.mem) as vm:
        assert vm.state == "paused"
        time.sleep(0.3)
        assert vm.console.text == ""
        vm.resume()
        wait_for(lambda: counts(vm) > 120, what="counts after the restore")
        vm.pause()
        after = vm.console.text
    first, last = check_count_stream(count_snapshot.console + after, from_start=True)
    assert first == 1 and last > 300
    assert count_snapshot.mem.read_bytes() == mem_before  # MAP_PRIVATE: the memory file never changes


def _clone(saved: Saved, i: int, tmp: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        pyrovm_argv(
            "snapshot",
            "restore",
            str(saved.state),
            "--mem",
            str(saved.mem),
            "--resume",
            "--timeout",
            "4",
            "--name",
            f"clone{i}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )


def test_original_and_five_clones_run_at_once(guest: Path, tmp_path: Path) -> None:
    """The original runs under ``pyrovm run --api-sock``, is snapshotted through ``pyrovm snapshot create``
    and goes on; five ``pyrovm snapshot restore`` processes continue from the snapshot beside it."""
    sock = tmp_path / "api.sock"
    original = subprocess.Popen(
        pyrovm_argv(
            "run",
            "--kernel",
            str(guest),
            "--memory",
            "64M",
            "--cmdline",
            "test=count",
            "--api-sock",
            str(sock),
            "--timeout",
            "30",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    clones: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: socket_answers(sock), what="the API socket")
        time.sleep(0.5)
        state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
        create = subprocess.run(
            pyrovm_argv("snapshot", "create", "--api-sock", str(sock), str(state), str(mem)),
            capture_output=True,
            env=cli_env(),
            timeout=60,
        )
        assert create.returncode == 0, create.stderr
        saved = Saved(state, mem, "")
        clones = [_clone(saved, i, tmp_path) for i in range(5)]
        outs = [c.communicate(timeout=90) for c in clones]
        original.send_signal(signal.SIGTERM)
        orig_out, _ = original.communicate(timeout=30)
    finally:
        for p in [original, *clones]:
            if p.poll() is None:
                p.kill()
                p.wait()
    _, last_orig = check_count_stream(orig_out.decode(), from_start=True)
    starts = set()
    for clone, (out, err) in zip(clones, outs, strict=True):
        assert clone.returncode == 124, err  # ran until its --timeout
        first, last = check_count_stream(out.decode())
        assert first > 50 and last > first + 100, (first, last)  # continued, not from 0, and ran on
        starts.add(first)
    assert max(starts) - min(starts) <= 1  # all from the same point
    assert last_orig > min(starts)  # the original went on too


def test_diff_snapshot_on_its_base_restores_the_later_vm(guest: Path, tmp_path: Path) -> None:
    base, base_mem = tmp_path / "base.state", tmp_path / "base.mem"
    diff, diff_mem = tmp_path / "diff.state", tmp_path / "diff.mem"
    vm = VM(guest, memory="64M", cmdline="test=count", track_dirty_pages=True)
    with vm:
        with pytest.raises(SnapshotError, match="needs a base: take a full snapshot"):
            vm.snapshot(diff, diff_mem, diff=True)
        wait_for(lambda: counts(vm) > 100, what="100 counts")
        vm.snapshot(base, base_mem)
        wait_for(lambda: counts(vm) > 300, what="300 counts")
        vm.pause()
        info = vm.snapshot(diff, diff_mem, diff=True)
        text = vm.console.text
    assert info.kind == "diff" and 0 < info.mem_bytes_written < 1 << 20  # the pages written meanwhile only
    assert load_state(diff).kind == "diff"
    memfile.rebase(base_mem, diff_mem)
    with VM.restore(diff, base_mem, resume=True) as clone:
        wait_for(lambda: counts(clone) > 100, what="counts after the restore")
        clone.pause()
        after = clone.console.text
    check_count_stream(text + after, from_start=True)


def test_diff_needs_dirty_page_tracking(guest: Path, tmp_path: Path) -> None:
    with VM(guest, memory="32M", cmdline="test=spin") as vm:
        with pytest.raises(SnapshotError, match="needs dirty-page tracking"):
            vm.snapshot(tmp_path / "s", tmp_path / "m", diff=True)
        with pytest.raises(SnapshotError, match="same file"):
            vm.snapshot(tmp_path / "s", tmp_path / "s")
        with pytest.raises(SnapshotError, match="it is the VM's kernel"):
            vm.snapshot(guest, tmp_path / "m")
        assert vm.state == "running"  # a refused snapshot leaves the VM as it was


def test_blk_requests_interrupted_by_the_snapshot_complete_after_restore(guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    slow = RateLimitSpec(ops=BucketSpec(size=10, refill_time=250))  # 40 requests a second: ~3 s of test
    vm = VM(
        guest, memory="32M", cmdline="test=blk sectors=64 chunk=1", disks=[DiskSpec(disk, rate_limiter=slow)]
    )
    with vm:
        wait_for(lambda: vm.metrics()["devices"]["virtio-blk:vda"]["requests"] > 30, what="30 requests")
        vm.pause()
        vm.snapshot(tmp_path / "s", tmp_path / "m")
        before = vm.metrics()["devices"]["virtio-blk:vda"]["requests"]
    assert before < 100  # stopped part-way (64 writes, a flush, 64 reads)
    with VM.restore(tmp_path / "s", tmp_path / "m", resume=True) as clone:
        result = clone.wait(30)
        text = clone.console.text
    assert result.guest_status == 0, text
    assert "blk ok 64 sectors" in text


def test_vsock_echo_accepts_new_connections_after_restore(guest: Path, tmp_path: Path) -> None:
    vm = VM(guest, memory="32M", cmdline="test=vsock", vsock=f"cid=5,uds={tmp_path / 'a.sock'}")
    with vm:
        wait_for(lambda: "vsock: ready cid" in vm.console.text, what="vsock ready")
        with vm.vsock.connect(5000, timeout=10) as s:
            s.sendall(b"before")
            assert s.recv(100) == b"before"
        vm.pause()
        vm.snapshot(tmp_path / "s", tmp_path / "m")
    options = RestoreOptions(vsock_uds=tmp_path / "b.sock")
    with VM.restore(tmp_path / "s", tmp_path / "m", resume=True, options=options) as clone:
        assert clone.vsock.path == tmp_path / "b.sock"
        wait_for(lambda: "vsock: transport reset" in clone.console.text, what="the TRANSPORT_RESET event")
        with clone.vsock.connect(5000, timeout=10) as s:
            s.sendall(b"after the restore")
            assert s.recv(100) == b"after the restore"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rewrite(state: Path, out: Path, change: object) -> None:
    data = fileformat.read(state)
    change(data)  # type: ignore[operator]
    out.write_bytes(fileformat.dumps(data))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s, d: (d / "t").write_bytes(s.state.read_bytes()[:-100]), "truncated"),
        (
            lambda s, d: (d / "t").write_bytes(
                s.state.read_bytes()[:200] + b"X" + s.state.read_bytes()[201:]
            ),
            "corrupted (checksum mismatch)",
        ),
        (
            lambda s, d: _rewrite(
                s.state,
                d / "t",
                lambda x: (
                    x["devices"].pop("virtio-rng", None) or x["devices"].update(extra=x["devices"]["rtc"])
                ),
            ),
            "the snapshot has device 'extra', which this restore does not provide",
        ),
        (
            lambda s, d: _rewrite(s.state, d / "t", lambda x: x["devices"].pop("rtc")),
            "the snapshot has no state for device 'rtc'",
        ),
        (
            lambda s, d: _rewrite(s.state, d / "t", lambda x: x["vcpus"][0].update(regs="AAAA")),
            "regs: 3 bytes, KVM's structure has 144",
        ),
        (
            lambda s, d: _rewrite(s.state, d / "t", lambda x: x["vcpus"].append(x["vcpus"][0])),
            "2 vCPU states for 1 vCPUs",
        ),
    ],
)
def test_bad_state_files(count_snapshot: Saved, tmp_path: Path, make: object, message: str) -> None:
    make(count_snapshot, tmp_path)  # type: ignore[operator]
    fds = _fds()
    with pytest.raises(SnapshotError) as info:
        VM.restore(tmp_path / "t", count_snapshot.mem)
    assert message in str(info.value)
    assert _fds() <= fds  # nothing half-started (earlier tests may still be closing theirs)


def test_bad_memory_files_and_missing_capabilities(
    count_snapshot: Saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fds = _fds()
    short = tmp_path / "short.mem"
    short.write_bytes(bytes(4096))
    with pytest.raises(SnapshotError, match="4096 bytes, the snapshot's guest RAM is 67108864 bytes"):
        VM.restore(count_snapshot.state, short)
    with pytest.raises(SnapshotError, match="No such file"):
        VM.restore(count_snapshot.state, tmp_path / "nothing")
    from pyrovm.kvm import constants

    monkeypatch.setattr(constants, "SNAPSHOT_CAPS", (10_000,))  # a capability no KVM has
    with pytest.raises(HostError, match="10000"):
        VM.restore(count_snapshot.state, count_snapshot.mem)
    assert _fds() <= fds


def test_cli_refusals_are_one_line_with_status_2(count_snapshot: Saved, tmp_path: Path) -> None:
    bad = tmp_path / "bad.state"
    data = count_snapshot.state.read_bytes()
    bad.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    cases = [
        (["snapshot", "restore", str(bad), "--mem", str(count_snapshot.mem), "--resume"], "corrupted"),
        (
            ["snapshot", "restore", str(count_snapshot.state), "--mem", str(count_snapshot.mem)],
            "give --resume",
        ),
        (
            [
                "snapshot",
                "restore",
                str(count_snapshot.state),
                "--mem",
                str(count_snapshot.mem),
                "--resume",
                "--tap",
                "eth3=tap9",
            ],
            "network interface 'eth3': the snapshot has no such network interface",
        ),
        (["snapshot", "info", str(bad)], "corrupted"),
        (["snapshot", "create", "--api-sock", str(tmp_path / "none.sock"), "s", "m"], "API socket"),
    ]
    for args, message in cases:
        p = subprocess.run(pyrovm_argv(*args), capture_output=True, text=True, env=cli_env(), timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr and p.stderr.count("\n") == 1, p.stderr
    info = subprocess.run(
        pyrovm_argv("snapshot", "info", str(count_snapshot.state)),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert info.returncode == 0 and '"kind": "full"' in info.stdout


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _server(tmp_path: Path, name: str, procs: list[subprocess.Popen[bytes]]) -> Path:
    sock = tmp_path / f"{name}.sock"
    procs.append(
        subprocess.Popen(
            pyrovm_argv("serve", "--api-sock", str(sock), "--id", name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=cli_env(),
        )
    )
    wait_for(lambda: socket_answers(sock), what=f"the {name} API")
    return sock


def test_firecracker_python_snapshots_and_loads_in_a_new_server(
    guest: Path, tmp_path: Path, servers: list[subprocess.Popen[bytes]]
) -> None:
    from firecracker.api import Api  # the unmodified third-party client
    from firecracker.exceptions import APIError

    a = Api(str(_server(tmp_path, "a", servers)))
    a.machine_config.put(vcpu_count=1, mem_size_mib=64)
    a.boot.put(kernel_image_path=str(guest), boot_args="test=count")
    a.actions.put(action_type="InstanceStart")
    time.sleep(1.0)
    with pytest.raises(APIError, match="must be paused"):
        a.create_snapshot.put(snapshot_path=str(tmp_path / "s"), mem_file_path=str(tmp_path / "m"))
    a.vm.patch(state="Paused")
    a.create_snapshot.put(
        snapshot_path=str(tmp_path / "s"), mem_file_path=str(tmp_path / "m"), snapshot_type="Full"
    )
    a.close()
    servers[0].send_signal(signal.SIGTERM)
    servers[0].communicate(timeout=30)

    b = Api(str(_server(tmp_path, "b", servers)))
    b.load_snapshot.put(
        snapshot_path=str(tmp_path / "s"),
        mem_backend={"backend_type": "File", "backend_path": str(tmp_path / "m")},
    )
    assert b.describe.get().json()["state"] == "Paused"
    assert b.machine_config.get().json()["mem_size_mib"] == 64  # the snapshot's resources
    with pytest.raises(APIError, match="not supported after starting"):
        b.load_snapshot.put(snapshot_path=str(tmp_path / "s"), mem_file_path=str(tmp_path / "m"))
    b.vm.patch(state="Resumed")
    assert b.describe.get().json()["state"] == "Running"
    time.sleep(1.0)
    b.close()
    servers[1].send_signal(signal.SIGTERM)
    out, _ = servers[1].communicate(timeout=30)
    first, last = check_count_stream(out.decode())
    assert first > 50 and last > first + 50


def test_load_is_refused_after_boot_resources(tmp_path: Path) -> None:
    from pyrovm.api.controller import Controller
    from pyrovm.api.snapshots import BOOT_CONFIGURED

    c = Controller()
    assert c.handle("PUT", "/boot-source", {"kernel_image_path": "/k"}) == (204, None)
    body = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
    assert c.handle("PUT", "/snapshot/load", body) == (400, {"fault_message": BOOT_CONFIGURED})


def test_kvmclock_continues_from_the_snapshot_unless_clock_realtime(count_snapshot: Saved) -> None:
    """The guest's clock does not jump: after a restore KVM's clock reads what it read at the snapshot
    (plus the moments since the restore), not the time the snapshot sat on disk; with clock_realtime it
    has advanced by the wall time since the snapshot."""
    saved = load_state(count_snapshot.state)
    time.sleep(1.0)
    with VM.restore(count_snapshot.state, count_snapshot.mem) as vm:
        clock = vm.machine.kvm_vm.get_clock().clock
    assert 0 <= clock - saved.vm.clock < 300_000_000, (clock, saved.vm.clock)
    options = RestoreOptions(clock_realtime=True)
    with VM.restore(count_snapshot.state, count_snapshot.mem, options=options) as vm:
        clock = vm.machine.kvm_vm.get_clock().clock
    behind = time.time() - saved.created_at
    assert abs((clock - saved.vm.clock) / 1e9 - behind) < 0.5, (clock, saved.vm.clock, behind)
