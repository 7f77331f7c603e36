"""``pyrovm trace``: the KVM calls of a test-guest VM in order with their arguments decoded, the kernel's
trace events beside them (root), the three output formats, a trace without privileges, and tracefs left
clean after a killed or interrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from pyrovm.memory import GuestMemory
from pyrovm.trace.kernel import KernelPaths
from pyrovm.trace.tracefs import parse_trace

from conftest import cli_env, needs_kvm, pyrovm_argv

ROOT = os.geteuid() == 0
#: the creation calls the issue names, in the order pyrovm makes them (KVM_CHECK_EXTENSION is third)
CREATION = [
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_SET_TSS_ADDR",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_CREATE_IRQCHIP",
    "KVM_CREATE_PIT2",
    "KVM_CREATE_VCPU",
    "KVM_SET_CPUID2",
    "KVM_SET_SREGS",
    "KVM_SET_REGS",
    "KVM_SET_MSRS",
    "KVM_IOEVENTFD",
    "KVM_IRQFD",
    "KVM_RUN",
]


def _trace(guest: Path, tmp_path: Path, cmdline: str, fmt: str = "jsonl", *extra: str) -> Path:
    out = tmp_path / f"trace.{fmt}"
    p = subprocess.run(
        pyrovm_argv(
            "trace",
            "--kernel",
            str(guest),
            "--cmdline",
            cmdline,
            "--memory",
            "64M",
            "--console",
            "none",
            "--format",
            fmt,
            "--output",
            str(out),
            *extra,
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert p.returncode in (1, 0), p.stderr  # test guests exit through the exit port: (0 << 1) | 1
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_kvm
def test_creation_calls_in_order_with_their_arguments(guest: Path, tmp_path: Path) -> None:
    records = _records(_trace(guest, tmp_path, "test=hello", "jsonl", "--cpus", "2"))
    calls = [r for r in records if r["type"] == "call"]
    names = [c["name"] for c in calls]
    order = ["open", *CREATION[:2], *CREATION[3:11]]
    at = [names.index(n) for n in order]
    assert at == sorted(at), names
    region = next(c for c in calls if c["name"] == "KVM_SET_USER_MEMORY_REGION")["args"]
    assert region["slot"] == 0 and region["guest_phys_addr"] == "0x0" and region["memory_size"] == 64 << 20
    vcpus = [c for c in calls if c["name"] == "KVM_CREATE_VCPU"]
    assert [c["args"]["vcpu_id"] for c in vcpus] == [0, 1] and vcpus[0]["fd"] == "vm"
    assert {c["fd"] for c in calls if c["name"] == "KVM_SET_CPUID2"} == {"vcpu0", "vcpu1"}
    from pyrovm.loader.elf import load_elf

    mem = GuestMemory.anonymous(64 << 20)
    entry = load_elf(mem, guest.read_bytes()).pvh_entry
    mem.close()
    regs = [c for c in calls if c["name"] == "KVM_SET_REGS" and c["fd"] == "vcpu0"]
    assert regs[-1]["args"]["rip"] == hex(entry)  # the boot vCPU starts at the kernel's PVH entry
    zones = [c["args"] for c in calls if c["name"] == "KVM_REGISTER_COALESCED_MMIO"]
    assert {"addr": "0x70", "size": 1, "pio": True} in zones and {
        "addr": "0x3f8",
        "size": 1,
        "pio": True,
    } in zones
    exits = [r for r in records if r["type"] == "exit"]
    first_in = next(x for x in exits if x["kind"] == "io_in")
    assert first_in["details"]["port"] == "0x3fd"  # "hello...": the LSR poll exits, the bytes are queued
    first_out = next(x for x in exits if x["kind"] == "io_out")
    assert first_out["details"] == {
        "port": "0xf4",
        "size": 4,
        "count": 1,
        "data": "00000000",
    }  # the exit port
    header = records[0]
    assert header["type"] == "header" and "checked against this kernel" in header["kernel_paths"]


@needs_kvm
@pytest.mark.skipif(not ROOT, reason="the kernel's trace events need root")
def test_pio_exits_match_the_kernel_events_and_statistics(guest: Path, tmp_path: Path) -> None:
    n = 300
    records = _records(_trace(guest, tmp_path, f"test=pio count={n}"))
    assert records[0]["kernel_side"] == "recorded"
    kernel = [r for r in records if r["type"] == "kernel"]
    assert sum(1 for r in kernel if r["event"] == "kvm_pio" and "at 0x500 " in r["details"]) == n
    summary = records[-1]
    assert summary["exits_by_port"]["io_out 0x500"] == n
    assert summary["kernel_events"]["kvm_userspace_exit"] >= n
    stats = summary["kvm_stats"]["vcpu0"]
    from pyrovm.kvm import is_pvm_host

    # PVM counts port I/O as emulated instructions, not io_exits
    assert stats["exits"] >= n if is_pvm_host() else stats["io_exits"] >= n
    assert not _instances(), "the tracefs instance was not removed"


@needs_kvm
def test_text_and_chrome_formats(guest: Path, tmp_path: Path) -> None:
    text = _trace(guest, tmp_path, "test=cpus", "text", "--cpus", "2", "--exits", "20").read_text()
    assert "KVM_CREATE_VM" in text and "# create a VM:" in text and "# kernel: kvm_dev_ioctl" in text
    assert "exits to pyrovm by kind:" in text
    chrome = json.loads(_trace(guest, tmp_path, "test=cpus", "chrome", "--cpus", "2").read_text())
    tracks = {e["args"]["name"] for e in chrome["traceEvents"] if e["ph"] == "M"}
    assert {"vcpu0", "vcpu1"} <= tracks
    slices = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert any(e["name"].startswith("KVM_RUN -> ") for e in slices)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)


def _tracefs() -> Path | None:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] == "tracefs":
                return Path(parts[1])
    return None


def _instances() -> list[str]:
    root = _tracefs()
    return [] if root is None else [p.name for p in (root / "instances").glob("pyrovm-*")]


@needs_kvm
@pytest.mark.skipif(not ROOT, reason="the kernel's trace events need root")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_or_interrupted_trace_leaves_tracefs_clean(guest: Path, tmp_path: Path, sig: int) -> None:
    proc = subprocess.Popen(
        pyrovm_argv(
            "trace",
            "--kernel",
            str(guest),
            "--cmdline",
            "test=spin",
            "--memory",
            "32M",
            "--console",
            "none",
            "--output",
            str(tmp_path / "t.txt"),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        name = f"pyrovm-{proc.pid}"
        deadline = time.monotonic() + 30
        while name not in _instances():
            assert proc.poll() is None and time.monotonic() < deadline, "no tracefs instance appeared"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while name in _instances() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert name not in _instances()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_kvm
@pytest.mark.skipif(not ROOT, reason="dropping privileges needs root")
def test_without_privileges_the_trace_says_why_the_kernel_side_is_missing(
    guest: Path, tmp_path: Path
) -> None:
    """A forked child gives up root (a KVM device node of its own, owned by nobody) and traces a VM."""
    from pyrovm import VM  # (everything the child needs is imported before it drops privileges)

    with VM(guest, memory="32M", cmdline="test=hello") as warm:  # loads every module a run uses
        warm.wait(30)
    shared = Path(tempfile.mkdtemp(prefix="pyrovm-nobody-"))  # (pytest's own directories are root's only)
    os.chmod(shared, 0o777)
    try:
        _trace_as_nobody(guest, shared)
    finally:
        shutil.rmtree(shared)


def _trace_as_nobody(guest: Path, shared: Path) -> None:
    from pyrovm import VM
    from pyrovm.trace.session import TraceSession

    guest = Path(shutil.copy(guest, shared / "guest.elf"))
    node = shared / "kvm"
    os.mknod(node, 0o600 | 0o020000, os.stat("/dev/kvm").st_rdev)
    os.chown(node, 65534, 65534)
    out = shared / "trace.jsonl"
    pid = os.fork()
    if pid == 0:  # the child: nobody from here on
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            session = TraceSession.start(str(out), "jsonl", 10, True)
            with VM(guest, memory="32M", cmdline="test=hello", kvm_path=str(node)) as vm:
                session.attach(vm)
                vm.wait(30)
            session.finish()
            code = 0
        except BaseException:
            import traceback

            (shared / "error.txt").write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    error = shared / "error.txt"
    assert os.waitstatus_to_exitcode(status) == 0, error.read_text() if error.exists() else status
    records = _records(out)
    assert records[0]["kernel_side"].startswith("not root: the kernel's KVM trace events need root")
    assert any(r["type"] == "call" and r["name"] == "KVM_CREATE_VM" for r in records)
    assert not any(r["type"] == "kernel" for r in records)


@needs_kvm
def test_metrics_include_kvm_statistics(guest: Path) -> None:
    from pyrovm import VM

    with VM(guest, memory="32M", cmdline="test=pio count=500") as vm:
        vm.wait(30)
        metrics = vm.metrics()
    stats = metrics["kvm_stats"]
    assert isinstance(stats, dict) and stats["vcpu_total"]["exits"] >= 500  # type: ignore[index]


def test_parse_trace_lines() -> None:
    text = """# tracer: nop
#
           vcpu0-1234    [001] d..1.   123.456789: kvm_pio: pio_write at 0x500 size 1 count 1 val 0x2
 python3-with-dash-77    [000] .....     5.000001: kvm_userspace_exit: reason KVM_EXIT_IO (2)
"""
    events = parse_trace(text)
    assert [(e.tid, e.cpu, e.event) for e in events] == [(1234, 1, "kvm_pio"), (77, 0, "kvm_userspace_exit")]
    assert events[0].t == 123_456_789_000 and events[0].details.startswith("pio_write at 0x500")


def test_kernel_paths_are_checked_against_the_symbols() -> None:
    paths = KernelPaths(symbols={"kvm_dev_ioctl", "kvm_create_vm", "svm_vcpu_run"})
    steps = {s.name: s.present for s in paths.path("KVM_CREATE_VM")}
    assert steps["kvm_dev_ioctl"] and steps["kvm_create_vm"] and not steps["kvm_arch_init_vm"]
    run = [s for s in paths.path("KVM_RUN") if "vcpu_run" in s.name and s.name.endswith("_vcpu_run")]
    assert run[0].name == "svm_vcpu_run" and run[0].present  # the alternative the kernel has
    for name in CREATION:  # the list: each has a sentence and a path
        assert paths.explain(name) and paths.path(name), name
